"""CuPy: the GPU. It imports without a GPU and fails on the first array, so availability
asks ``cupy.cuda.is_available()`` rather than trusting the import. It has no bfloat16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.backends.base import Backend


class CupyBackend(Backend):
    name = "cupy"
    module = "cupy"

    def unavailable_reason(self) -> str | None:
        reason = super().unavailable_reason()
        if reason is not None:
            return reason
        try:
            import cupy

            if not cupy.cuda.is_available():
                return "cupy is installed but no CUDA device is usable"
        except Exception as error:  # a broken CUDA install raises all sorts
            return f"cupy cannot reach a GPU: {type(error).__name__}: {error}"
        return None

    def namespace(self) -> Any:
        import array_api_compat.cupy

        return array_api_compat.cupy

    def devices(self) -> list[str]:
        import cupy

        return [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]

    def dtypes(self, device: str) -> tuple[str, ...]:
        return ("float64", "float32", "float16")

    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        import cupy

        with cupy.cuda.Device(_index(device)):
            return cupy.asarray(self._rounded(np.asarray(x), dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.get()

    def synchronize(self, device: str) -> None:
        import cupy

        cupy.cuda.Device(_index(device)).synchronize()


def _index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0
