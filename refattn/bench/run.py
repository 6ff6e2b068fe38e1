"""One ``refattn bench`` run: check, then time, every row; fill in the ratios; print.

Every row's output is checked once against SDPA's on the same data (SDPA's
own against the spec's), by ``np.allclose`` at
:data:`refattn.testing.tolerance.AGREEMENT`; a row that disagrees is marked
MISMATCH and the run exits 1, because a time for a wrong answer is worthless.
A backward row's output is its dq, dk and dv, checked against those of
SDPA's autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from refattn.backends import Backend, get
from refattn.bench.peers import make_step
from refattn.bench.plan import PEERS, Job, bandwidth_targets, plan, select_targets, spec_paths
from refattn.bench.report import bandwidth_table, format_tables, plot, to_json
from refattn.bench.shapes import Grid, Settings, Shape
from refattn.bench.timing import Bandwidth, bandwidth_bytes, measure_bandwidth, time_calls
from refattn.console import make_console, progress_bar, write_json
from refattn.testing.tolerance import AGREEMENT


@dataclass
class Row:
    """One timed path on one shape: the table's line and the JSON's record."""

    shape: Shape
    implementation: str
    backend: str
    device: str
    block_q: int | None
    block_k: int | None
    median_s: float
    min_s: float
    repeats: int
    peer_device: str | None
    kv_bandwidth: float = 0.0  # K+V bytes / median time
    read_bandwidth: float | None = None  # measured on this row's device
    read_fraction: float | None = None  # kv_bandwidth / read_bandwidth = floor / time
    floor_s: float | None = None  # K+V bytes / read_bandwidth
    gflops: float = 0.0
    vs_sdpa: float | None = None
    vs_fastest_torch: float | None = None
    reference: str | None = None  # what the output was compared with
    max_abs_diff: float | None = None
    agrees: bool | None = None  # None when there was nothing to compare with


@dataclass
class Result:
    """Everything one run measured."""

    rows: list[Row]
    bandwidths: list[Bandwidth]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def mismatches(self) -> list[Row]:
        return [row for row in self.rows if row.agrees is False]


def run(
    jobs: Sequence[Job],
    *,
    block_q: int,
    block_k: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Check, then time, every job; rows come back in the jobs' order.

    The data of a shape is drawn once from ``seed`` in NumPy (see :func:`draw_data`) and
    rounded to the shape's dtype by each backend, so every path sees the same
    values.
    """
    rows: list[Row] = []
    checks = _Checks()
    for job in jobs:
        checks.start(job.shape, seed)
        step = make_step(job, *checks.arrays(job), block_q=block_q, block_k=block_k)
        backend = get(job.backend)
        out = checked_output(backend, step())  # the one checked call, outside the timing

        def synchronize(backend: Backend = backend, device: str = job.device) -> None:
            backend.synchronize(device)

        median, minimum = time_calls(step, synchronize, repeats=repeats, warmup=warmup)
        blocks = job.implementation == spec_paths(job.shape.mode)[1]
        row = Row(
            shape=job.shape, implementation=job.implementation, backend=job.backend,
            device=job.device, block_q=block_q if blocks else None,
            block_k=block_k if blocks else None, median_s=median, min_s=minimum,
            repeats=repeats, peer_device=job.peer_device,
        )  # fmt: skip
        checks.check(job, row, out)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


class _Checks:
    """One shape's data on each backend, and the outputs that check each other.

    Every row is compared with SDPA's output on its peer device; SDPA's own row
    waits for the first plain spec row (``refattn.attention``, or
    ``refattn.attention_backward``) that uses it, and is compared with that.
    """

    def __init__(self) -> None:
        self.shape: Shape | None = None

    def start(self, shape: Shape, seed: int) -> None:
        """A new shape: new data, nothing computed yet."""
        if shape == self.shape:
            return
        self.shape, self.data = shape, draw_data(shape, seed)
        self.on_backend: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.outputs: dict[tuple[str, str, str], np.ndarray] = {}  # (path, backend, device)
        self.unchecked_sdpa: dict[str, Row] = {}  # peer device -> SDPA's row

    def arrays(self, job: Job) -> tuple[Any, ...]:
        """q, k and v (and a backward's dout) on the job's backend and device, converted
        once."""
        where = (job.backend, job.device)
        if where not in self.on_backend:
            backend = get(job.backend)
            self.on_backend[where] = tuple(
                backend.asarray(x, dtype=job.shape.dtype, device=job.device)
                for x in self.data.values()
            )
        return self.on_backend[where]

    def check(self, job: Job, row: Row, out: np.ndarray) -> None:
        """Compare ``out`` with SDPA's; and SDPA's with the first spec output after it."""
        self.outputs[job.implementation, job.backend, job.device] = out
        sdpa = self.outputs.get(("torch SDPA", "torch", job.peer_device or ""))
        if job.implementation != "torch SDPA" and sdpa is not None:
            compare(row, out, sdpa, f"torch SDPA on {job.peer_device}")
        if job.implementation == "torch SDPA":
            self.unchecked_sdpa[job.device] = row
        sdpa_row = self.unchecked_sdpa.get(job.peer_device or "")
        if job.implementation == spec_paths(job.shape.mode)[0] and sdpa_row is not None:
            compare(sdpa_row, self.outputs[sdpa_row.implementation, "torch", sdpa_row.device],
                    out, f"{job.implementation} on {job.backend} {job.device}")  # fmt: skip
            del self.unchecked_sdpa[sdpa_row.device]


def draw_data(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """q (B, Hq, Sq, D), k and v (B, Hkv, S, D), and for a backward the output's
    gradient dout (B, Hq, Sq, D): standard normal, from ``seed``.

    Drawn in float32 (float64 for a float64 shape): a GPU grid holds caches of
    several GB, and drawing them in float64 would take longer than timing them.
    """
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, D, S = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.seq_len
    dtype = np.float64 if shape.dtype == "float64" else np.float32
    data = {
        "q": rng.standard_normal((B, Hq, shape.q_len, D), dtype=dtype),
        "k": rng.standard_normal((B, Hkv, S, D), dtype=dtype),
        "v": rng.standard_normal((B, Hkv, S, D), dtype=dtype),
    }
    if shape.mode == "backward":
        data["dout"] = rng.standard_normal((B, Hq, shape.q_len, D), dtype=dtype)
    return data


def checked_output(backend: Backend, out: Any) -> np.ndarray:
    """A call's output as one NumPy array: a backward's (dq, dk, dv) flattened and joined,
    so that one ``np.allclose`` checks all three."""
    if isinstance(out, tuple):
        return np.concatenate([np.ravel(backend.to_numpy(x)) for x in out])
    return backend.to_numpy(out)


def compare(row: Row, out: np.ndarray, reference: np.ndarray, name: str) -> None:
    """Record on ``row`` whether ``out`` equals ``reference`` by ``np.allclose``.

    The tolerance is :data:`refattn.testing.tolerance.AGREEMENT` for the row's dtype.
    """
    rtol, atol = AGREEMENT[row.shape.dtype]
    out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
    row.reference = name
    row.max_abs_diff = float(np.max(np.abs(out - reference), initial=0.0))
    row.agrees = bool(np.allclose(out, reference, rtol=rtol, atol=atol))


def finish(rows: list[Row], bandwidths: list[Bandwidth]) -> None:
    """Fill in each row's bandwidth, floor, GFLOP/s and its ratios to the torch peers."""
    read = {(b.backend, b.device): b.read for b in bandwidths}
    peer_times: dict[tuple[Shape, str, str | None], float] = {
        (row.shape, row.implementation, row.device): row.median_s
        for row in rows
        if row.implementation in PEERS
    }
    for row in rows:
        row.kv_bandwidth = row.shape.kv_bytes / row.median_s
        row.gflops = row.shape.flops / row.median_s / 1e9
        row.read_bandwidth = read.get((row.backend, row.device))
        if row.read_bandwidth:
            row.floor_s = row.shape.kv_bytes / row.read_bandwidth
            row.read_fraction = row.kv_bandwidth / row.read_bandwidth
        sdpa = peer_times.get((row.shape, "torch SDPA", row.peer_device))
        matmul = peer_times.get((row.shape, "torch matmul", row.peer_device))
        if sdpa is not None:
            row.vs_sdpa = row.median_s / sdpa
        if sdpa is not None and matmul is not None:
            row.vs_fastest_torch = row.median_s / min(sdpa, matmul)


def main(
    grid: Grid,
    settings: Settings | None = None,
    *,
    backends: Sequence[str] | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    console: Console | None = None,
) -> int:
    """Time the grid on the backends and print the tables; 1 if an output disagreed.

    ``backends`` of None means every available backend but array-api-strict
    (see :func:`select_targets`).
    """
    console = console or make_console()
    settings = settings or Settings()
    block_q, block_k = settings.blocks
    shapes = grid.shapes()
    targets, skipped = select_targets(backends)
    jobs, more_skipped = plan(shapes, targets)
    skipped |= more_skipped
    devices = bandwidth_targets(jobs)
    nbytes = bandwidth_bytes(shapes)
    if settings.bandwidth_mib is not None:
        nbytes = settings.bandwidth_mib * 2**20
    console.print(
        f"refattn bench: {len(shapes)} shapes on {', '.join(t.name for t in targets) or 'nothing'}"
        f"; {len(jobs)} rows, each the median of {settings.repeats} calls after "
        f"{settings.warmup} warm-up; seed {settings.seed}",
        highlight=False,
    )
    with progress_bar(console) as bar:
        task = bar.add_task("bandwidth", total=len(devices) + len(jobs))
        bandwidths = []
        for device in devices:
            bar.update(task, description=f"bandwidth {device.name}")
            bandwidths.append(measure_bandwidth(device, nbytes, repeats=settings.repeats))
            bar.advance(task)

        def advance(row: Row) -> None:
            bar.update(
                task, advance=1, description=f"{row.shape.mode} S={row.shape.seq_len} {row.backend}"
            )

        rows = run(jobs, block_q=block_q, block_k=block_k, repeats=settings.repeats,
                   warmup=settings.warmup, seed=settings.seed, on_row=advance)  # fmt: skip
    finish(rows, bandwidths)
    result = Result(rows, bandwidths, skipped)
    print_result(console, result)
    if json_path:
        recorded = {"grid": asdict(grid), **asdict(settings), "block_q": block_q,
                    "backends": [t.name for t in targets], "bandwidth_bytes": nbytes}  # fmt: skip
        write_json(json_path, to_json(result, recorded))
        console.print(f"JSON written to {json_path}", highlight=False)
    if plot_path:
        console.print(plot(result, plot_path), highlight=False)
    return 1 if result.mismatches else 0


def print_result(console: Console, result: Result) -> None:
    """The bandwidth table, a table per mode and dtype, what was skipped, every mismatch."""
    console.print(bandwidth_table(result.bandwidths))
    for table in format_tables(result.rows):
        console.print(table)
    for name, reason in result.skipped.items():
        console.print(f"{name}: skipped ({reason})", highlight=False)
    for row in result.mismatches:
        console.print(
            f"MISMATCH: {row.implementation} on {row.backend} {row.device}, {row.shape.mode} "
            f"{row.shape.label} {row.shape.dtype}: max |diff| {row.max_abs_diff:.2e} against "
            f"{row.reference} (rtol, atol = {AGREEMENT[row.shape.dtype]}); its time is not "
            "meaningful",
            style="bold red", highlight=False,
        )  # fmt: skip
