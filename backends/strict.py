"""array-api-strict: runs only what the standard defines, so passing here proves the spec
uses nothing else. It has no float16 and no bfloat16, and offers extra logical devices
(``device1``) that catch arrays created without ``device=``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.backends.base import Backend


class StrictBackend(Backend):
    name = "array_api_strict"
    module = "array_api_strict"

    def namespace(self) -> Any:
        import array_api_strict

        return array_api_strict

    def devices(self) -> list[str]:
        return ["CPU_DEVICE", "device1"]

    def dtypes(self, device: str) -> tuple[str, ...]:
        return ("float64", "float32")

    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        xp = self.namespace()
        return xp.asarray(self._rounded(np.asarray(x), dtype), device=xp.Device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.from_dlpack(x).copy()
