"""What ``refattn bench`` prints and writes: tables, the plot, the JSON, the machine."""

from __future__ import annotations

import math
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

import refattn
from refattn.backends import BACKENDS
from refattn.bench.timing import Bandwidth

if TYPE_CHECKING:
    from refattn.bench.run import Result, Row


def machine_info() -> dict[str, Any]:
    """Versions, CPU count and thread settings: what a reader needs to weigh the times.

    BLAS libraries and their threads come from ``threadpoolctl`` when it is
    installed, and are left out otherwise.
    """
    info: dict[str, Any] = {
        "refattn": refattn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    thread_vars = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    info["thread_env"] = {name: os.environ[name] for name in thread_vars if name in os.environ}
    if BACKENDS["torch"].available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    if "cupy" in sys.modules:
        info["cupy"] = sys.modules["cupy"].__version__
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return info
    with warnings.catch_warnings():  # it may warn about two OpenMPs; that is not our run's news
        warnings.simplefilter("ignore")
        pools = threadpool_info()
    keys = ("user_api", "internal_api", "version", "num_threads")
    info["blas"] = [{key: pool.get(key) for key in keys} for pool in pools]
    return info


def format_seconds(t: float) -> str:
    """A duration with three significant digits and a unit.

    Examples
    --------
    >>> format_seconds(0.0123), format_seconds(4.5e-6), format_seconds(2.0), format_seconds(0.25)
    ('12.3 ms', '4.50 us', '2.00 s', '250 ms')
    >>> format_seconds(0.00099996)
    '1.00 ms'
    """
    t = float(f"{t:.3g}")  # round first, so that 999.96 us reads 1.00 ms
    units = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
    unit, scale = next(((u, x) for u, x in units if t >= x), ("ns", 1e-9))
    value = t / scale
    return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def format_tables(rows: Sequence[Row]) -> list[Table]:
    """The bench tables, one per mode and dtype: a line per shape, path and device."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.shape.mode, row.shape.dtype), []).append(row)
    return [format_table(mode, dtype, group) for (mode, dtype), group in groups.items()]


#: Each mode's table title: what one timed call is. A backward row is the backward
#: alone: the spec's paths given their forward's ``out`` and ``lse``, torch's
#: ``torch.autograd.grad`` through its forward's graph (see :mod:`refattn.bench.peers`).
TITLES = {
    "decode": "decode step (Sq = 1)",
    "prefill": "causal prefill (Sq = S)",
    "backward": (
        "causal prefill's backward (Sq = S): dq, dk, dv from the saved forward (torch: "
        "autograd.grad through its graph); no forward timed"
    ),
}


def format_table(mode: str, dtype: str, rows: Sequence[Row]) -> Table:
    """One mode and dtype: time, bandwidth, floor, arithmetic rate, ratios and check."""
    table = Table(title=f"{TITLES[mode]}, {dtype}: median time per call", title_justify="left")
    for name in ("BxHq/HkvxSxD", "implementation", "on"):
        table.add_column(name)
    for name in ("median", "K+V GB/s", "% read BW", "floor", "GFLOP/s", "/ SDPA",
                 "/ best torch"):  # fmt: skip
        table.add_column(name, justify="right")
    table.add_column("check")
    for row in rows:
        name = row.implementation
        if row.block_k is not None:
            kind = "backward blockwise" if mode == "backward" else "blockwise"
            name = f"refattn {kind} bq={row.block_q} bk={row.block_k}"
        if row.agrees is None:
            check = "-"
        elif row.agrees:
            check = "ok"
        else:
            check = f"[bold red]MISMATCH[/] ({row.max_abs_diff:.1e})"
        table.add_row(
            row.shape.label, name, f"{row.backend} {row.device}",
            format_seconds(row.median_s),
            f"{row.kv_bandwidth / 1e9:.1f}",
            "-" if row.read_fraction is None else f"{row.read_fraction:.0%}",
            "-" if row.floor_s is None else format_seconds(row.floor_s),
            f"{row.gflops:.1f}",
            "-" if row.vs_sdpa is None else f"{row.vs_sdpa:.2f}x",
            "-" if row.vs_fastest_torch is None else f"{row.vs_fastest_torch:.2f}x",
            check,
        )  # fmt: skip
    return table


def bandwidth_table(bandwidths: Sequence[Bandwidth]) -> Table:
    """The measured bandwidths: read (a sum) and copy (read + write)."""
    table = Table(title="memory bandwidth, measured in this run", title_justify="left")
    table.add_column("on")
    for name in ("buffer", "read GB/s", "copy GB/s (read + write)"):
        table.add_column(name, justify="right")
    table.add_column("how")
    for b in bandwidths:
        table.add_row(
            f"{b.backend} {b.device}", f"{b.buffer_bytes / 2**20:.0f} MiB",
            f"{b.read / 1e9:.1f}", f"{b.copy / 1e9:.1f}", f"{b.read_with}, {b.copy_with}",
        )  # fmt: skip
    return table


def plot(result: Result, path: str) -> str:
    """Time per decode step against S, log-log, with each device's floor dashed.

    One line per path, backend and device (and dtype and heads when the grid
    has several); the floor is K+V bytes / the measured read bandwidth of each
    device that ran the spec. Returns what happened, for the console.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written"
    decode = [row for row in result.rows if row.shape.mode == "decode"]
    if not decode:
        return "--plot: no decode rows to plot; nothing written"

    def others(row: Row) -> tuple[Any, ...]:  # what a line holds fixed besides S
        return (
            row.shape.dtype,
            row.shape.batch,
            row.shape.q_heads,
            row.shape.kv_heads,
            row.shape.head_dim,
        )

    several = len({others(row) for row in decode}) > 1
    lines: dict[tuple[Any, ...], list[Row]] = {}
    floors: dict[tuple[Any, ...], list[Row]] = {}
    for row in decode:
        key = (row.implementation, row.backend, row.device, *others(row))
        lines.setdefault(key, []).append(row)
        if row.implementation == "refattn.attention" and row.read_bandwidth:
            floors.setdefault((row.backend, row.device, *others(row)), []).append(row)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for (name, backend, device, *rest), line in lines.items():
        line.sort(key=lambda row: row.shape.seq_len)
        label = f"{name} on {backend} {device}" + (f" {rest}" if several else "")
        axes.plot(
            [r.shape.seq_len for r in line], [r.median_s for r in line], marker="o", label=label
        )
    dashes = ("--", ":", "-.")
    for i, ((backend, device, *rest), line) in enumerate(floors.items()):
        line.sort(key=lambda row: row.shape.seq_len)
        read = line[0].read_bandwidth or math.inf  # the same for the whole line
        label = f"floor: K+V / {backend} {device} read {read / 1e9:.1f} GB/s"
        label += f" {rest}" if several else ""
        axes.plot([r.shape.seq_len for r in line], [r.shape.kv_bytes / read for r in line],
                  linestyle=dashes[i % 3], color="black", alpha=0.6, label=label)  # fmt: skip
    shape = decode[0].shape
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("S, keys in the cache")
    axes.set_ylabel("seconds per decode step (median)")
    title = "decode step" if several else (
        f"decode step: B={shape.batch}, Hq={shape.q_heads}, Hkv={shape.kv_heads}, "
        f"D={shape.head_dim}, {shape.dtype}"
    )  # fmt: skip
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return f"plot written to {path}"


def to_json(result: Result, settings: dict[str, Any]) -> dict[str, Any]:
    """The run as plain data: rows, bandwidths, machine, settings and what was skipped.

    A row's shape is nested under ``"shape"``, as :class:`~refattn.bench.shapes.Shape`'s
    fields: ``Shape(**row["shape"])`` gives it back, with its sizes (``q_len``,
    ``kv_bytes``, ``flops``).
    """
    return {
        "rows": [asdict(row) for row in result.rows],
        "bandwidth": [asdict(b) for b in result.bandwidths],
        "machine": machine_info(),
        "settings": settings,
        "skipped": result.skipped,
    }
