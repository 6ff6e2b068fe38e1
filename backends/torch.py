"""PyTorch: the cross-check, on the CPU and on CUDA when a GPU is present."""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"
    module = "torch"

    def namespace(self) -> Any:
        import array_api_compat.torch

        return array_api_compat.torch

    def devices(self) -> list[str]:
        import torch

        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu", *gpus]

    def dtypes(self, device: str) -> tuple[str, ...]:
        return ("float64", "float32", "float16", "bfloat16")

    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        import torch

        x = np.asarray(x)
        rounded = torch.from_numpy(np.ascontiguousarray(self._rounded(x, dtype)))
        if dtype == "bfloat16" and x.dtype.kind == "f":
            rounded = rounded.to(torch.bfloat16)
        return rounded.to(device)

    def to_numpy(self, x: Any) -> np.ndarray:
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy()

    def synchronize(self, device: str) -> None:
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(device)
