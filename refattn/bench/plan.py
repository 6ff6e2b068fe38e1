"""Which rows ``refattn bench`` times, where, and in what order.

A row is a path (the spec's two, or its backward's two; the fused CuPy kernel;
the torch peers) on a backend and device for one shape. The peers run where
the backend's arrays live and are timed once per peer device and shape, before
the spec rows that compare with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from refattn.backends import BACKENDS, Backend, get
from refattn.bench.shapes import Shape

#: The spec's two paths, timed on every selected backend: the plain one, then the blockwise.
SPEC_PATHS = ("refattn.attention", "refattn.attention_blockwise")


#: The spec's two backward paths, timed on every selected backend in the backward mode.
BACKWARD_PATHS = ("refattn.attention_backward", "refattn.attention_backward_blockwise")


#: The fused split-KV decode kernel of ``backends/cupy_kernels/``, timed on CuPy decode rows.
FUSED = "cupy fused decode"


#: The PyTorch peers, timed once per peer device; in the backward mode, their autograd.
PEERS = ("torch SDPA", "torch matmul")


def spec_paths(mode: str) -> tuple[str, str]:
    """The spec's plain and blockwise paths for ``mode``.

    >>> spec_paths("backward")
    ('refattn.attention_backward', 'refattn.attention_backward_blockwise')
    """
    return BACKWARD_PATHS if mode == "backward" else SPEC_PATHS


@dataclass(frozen=True)
class Target:
    """A backend on one device: where the spec's paths run."""

    backend: Backend
    device: str

    @property
    def name(self) -> str:
        return f"{self.backend.name} {self.device}"


@dataclass(frozen=True)
class Job:
    """One row to time: a path, on a backend and device, for a shape."""

    shape: Shape
    implementation: str
    backend: str
    device: str
    peer_device: str | None  # where this shape's torch peers run; None without torch


def select_targets(names: Iterable[str] | None) -> tuple[list[Target], dict[str, str]]:
    """The backends to time on, each on its default device and its first GPU.

    ``None`` means every available backend but array-api-strict, which is a
    conformance shim and runs only when named. Returns the targets and, for
    each backend left out, why.
    """
    if names is None:
        names = [name for name in BACKENDS if name != "array_api_strict"]
    targets, skipped = [], {}
    for name in names:
        backend = get(name)
        reason = backend.unavailable_reason()
        if reason is not None:
            skipped[name] = reason
            continue
        devices = backend.devices()
        gpus = [d for d in devices[1:] if d.startswith("cuda")]
        targets += [Target(backend, device) for device in devices[:1] + gpus[:1]]
    return targets, skipped


def peer_device(device: str) -> str | None:
    """Where torch runs the peers for arrays on ``device``; None if it cannot there."""
    torch = BACKENDS["torch"]
    if not torch.available():
        return None
    if device.startswith("cuda"):
        return device if device in torch.devices() else None
    return "cpu"


def plan(shapes: Iterable[Shape], targets: Sequence[Target]) -> tuple[list[Job], dict[str, str]]:
    """The rows to time, in order: per shape, each peer device's peers before the spec
    paths that compare with them. Returns the jobs and what was skipped, and why."""
    jobs, skipped = [], {}
    torch = BACKENDS["torch"]
    if not torch.available():
        skipped["torch SDPA, torch matmul"] = f"{torch.unavailable_reason()}: no peers, no ratios"
    for shape in shapes:
        peers_planned = set()
        for target in targets:
            if shape.dtype not in target.backend.dtypes(target.device):
                skipped[f"{target.name} {shape.dtype}"] = (
                    f"{target.backend.name} has no {shape.dtype}"
                )
                continue
            peer = peer_device(target.device)
            if peer is not None and peer not in peers_planned:
                jobs += [Job(shape, name, "torch", peer, peer) for name in PEERS]
                peers_planned.add(peer)
            paths: tuple[str, ...] = spec_paths(shape.mode)
            if target.backend.name == "cupy" and shape.mode == "decode":
                paths = (*SPEC_PATHS, FUSED)
            jobs += [Job(shape, name, target.backend.name, target.device, peer)
                     for name in paths]  # fmt: skip
    return jobs, skipped


def bandwidth_targets(jobs: Iterable[Job]) -> list[Target]:
    """Each (backend, device) that runs a job, once."""
    seen = dict.fromkeys((job.backend, job.device) for job in jobs)
    return [Target(get(name), device) for name, device in seen]
