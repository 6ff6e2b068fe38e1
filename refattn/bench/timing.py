"""How ``refattn bench`` times a call and measures a device's memory bandwidth."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.bench.plan import Target
from refattn.bench.shapes import Shape

#: The smallest bandwidth buffer: bigger than any CPU's last-level cache here.
MIN_BANDWIDTH_BYTES = 64 * 2**20


@dataclass
class Bandwidth:
    """A device's measured memory bandwidth, in bytes per second."""

    backend: str
    device: str
    buffer_bytes: int
    read: float  # bytes / time of a sum over the buffer
    copy: float  # 2 * bytes / time of a copy into a preallocated buffer (read + write)
    read_with: str
    copy_with: str


def time_calls(
    step: Callable[[], Any], synchronize: Callable[[], None], *, repeats: int, warmup: int
) -> tuple[float, float]:
    """Median and minimum seconds of ``repeats`` calls after ``warmup`` untimed ones.

    The device is synchronized around each timed call, and the garbage
    collector is off while timing.

    Examples
    --------
    >>> median, minimum = time_calls(lambda: sum(range(100)), lambda: None, repeats=3, warmup=1)
    >>> 0 < minimum <= median
    True
    """
    for _ in range(warmup):
        step()
    collecting = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return statistics.median(times), min(times)


def cuda_event_seconds(step: Callable[[], Any], *, repeats: int, warmup: int) -> float:
    """Median GPU seconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones,
    each between two CUDA events on CuPy's current stream.

    Unlike :func:`time_calls` this leaves out the host's launch time when the
    GPU is busy, and counts it when the GPU waits for the host. The GPU
    profiles in ``benchmarks/`` use it.
    """
    import cupy

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)  # ms -> s
    return statistics.median(times)


def measure_bandwidth(target: Target, nbytes: int, *, repeats: int) -> Bandwidth:
    """Read and copy bandwidth of ``target``'s memory, on float32 buffers of ``nbytes``."""
    n = nbytes // 4
    name, device = target.backend.name, target.device
    src: Any
    dst: Any
    read: Callable[[], Any]
    copy: Callable[[], Any]
    if name == "torch":
        import torch

        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.zeros_like(src)
        read, copy = (lambda: torch.sum(src)), (lambda: dst.copy_(src))
        read_with, copy_with = "torch.sum", "Tensor.copy_"
    elif name == "cupy":
        import cupy

        with cupy.cuda.Device(int(device.partition(":")[2] or 0)):
            src = cupy.ones(n, dtype=cupy.float32)
            dst = cupy.zeros_like(src)
        read, copy = (lambda: cupy.sum(src)), (lambda: cupy.copyto(dst, src))
        read_with, copy_with = "cupy.sum", "cupy.copyto"
    else:  # NumPy, and array-api-strict, which holds NumPy arrays
        src = np.ones(n, dtype=np.float32)
        dst = np.zeros_like(src)  # written once, so its pages exist before the timing
        read, copy = (lambda: np.add.reduce(src)), (lambda: np.copyto(dst, src))
        read_with, copy_with = "np.add.reduce", "np.copyto"

    def synchronize() -> None:
        target.backend.synchronize(device)

    repeats = max(repeats, 3)
    read_s, _ = time_calls(read, synchronize, repeats=repeats, warmup=1)
    copy_s, _ = time_calls(copy, synchronize, repeats=repeats, warmup=1)
    return Bandwidth(name, device, 4 * n, 4 * n / read_s, 2 * 4 * n / copy_s, read_with, copy_with)


def bandwidth_bytes(shapes: Iterable[Shape]) -> int:
    """Four times the largest K+V of the grid, at least :data:`MIN_BANDWIDTH_BYTES`."""
    return max([MIN_BANDWIDTH_BYTES, *(4 * shape.kv_bytes for shape in shapes)])
