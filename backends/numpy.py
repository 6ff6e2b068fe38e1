"""NumPy: the readable default; bfloat16 through ml_dtypes."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from refattn.backends.base import Backend, round_to


class NumpyBackend(Backend):
    name = "numpy"
    module = "numpy"

    def namespace(self) -> Any:
        import array_api_compat.numpy

        return array_api_compat.numpy

    def devices(self) -> list[str]:
        return ["cpu"]

    def dtypes(self, device: str) -> tuple[str, ...]:
        base = ("float64", "float32", "float16")
        if importlib.util.find_spec("ml_dtypes") is None:
            return base
        return (*base, "bfloat16")

    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        x = np.asarray(x)
        return x.copy() if x.dtype.kind in "biu" else round_to(x, dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float32) if "bfloat16" in str(x.dtype) else x
