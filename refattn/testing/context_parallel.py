"""Check a context-parallel attention on a real process group: ``check_context_parallel``.

A context-parallel kernel runs on every rank of a ``torch.distributed`` group,
each rank holding a shard of the queries and of the keys and values. To check
one, :class:`LocalGroup` starts ``world_size`` processes on this machine,
joined by gloo over the loopback interface (nothing leaves the machine), and
:func:`check_context_parallel` hands it the problems of
:func:`~refattn.testing.check_attention` (the same search, shrinking and
report): each problem is sharded (:func:`refattn.distributed.shard_indices`),
every rank calls the candidate on its :class:`Shard`, and the outputs the ranks
return are put back in sequence order and judged against the spec as any
kernel's output is.

Every call on the group is bounded in time: a rank that raises sends its
traceback back, and a rank that does not answer within ``timeout`` seconds
ends the whole group with a :class:`GroupError`, so a deadlocked candidate
fails the check rather than hanging it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from refattn.backends import get
from refattn.namespace import compute_dtype_name
from refattn.testing.attention_check import check_attention
from refattn.testing.candidate import AttentionProblem, Result
from refattn.testing.drawing import FEATURES, resolve_features
from refattn.testing.report import Report

#: What a context-parallel candidate can be handed: every feature but those that index
#: the global key axis (masks, bias) or a cache in the call.
CONTEXT_PARALLEL_FEATURES = frozenset(FEATURES) - {
    "mask", "tree_mask", "document_mask", "prefix_lm", "bias", "in_op_cache",
}  # fmt: skip
#: The options of a problem that every rank receives whole.
SHARED_OPTIONS = ("causal", "scale", "window", "softcap", "alibi_slopes", "sink_logits",
                  "sink_tokens", "window_right")  # fmt: skip

Task = Callable[[Any, int, int], Any]


class GroupError(RuntimeError):
    """A rank of a :class:`LocalGroup` raised, died or did not answer in time."""


@dataclass(frozen=True)
class Shard:
    """One rank's share of a problem, as a context-parallel candidate receives it.

    ``q`` (B, Hq, Sq_r, D) and ``q_pos`` (B, Sq_r) are the queries at the global
    indices ``q_index``; ``k``, ``v`` and ``k_pos`` the keys at ``k_index``.
    ``options`` are the problem's other options (:data:`SHARED_OPTIONS`), whole
    on every rank. The candidate returns this rank's ``out`` (B, Hq, Sq_r, Dv),
    or ``(out, lse)`` when ``return_lse``.
    """

    q: Any
    k: Any
    v: Any
    q_pos: Any
    k_pos: Any
    q_index: np.ndarray
    k_index: np.ndarray
    options: dict[str, Any]
    return_lse: bool
    rank: int
    world_size: int


class LocalGroup:
    """``world_size`` processes on this machine, one ``torch.distributed`` rank each (gloo,
    loopback only), that run tasks on request. Use it as a context manager.

    ``run(task, payload)`` calls ``task(payload, rank, world_size)`` on every rank (``task``
    must be importable by name: a module-level function) and returns the results in rank
    order; every call waits at most ``timeout`` seconds.
    """

    def __init__(self, world_size: int, *, timeout: float = 120.0) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
        self.world_size, self.timeout = world_size, timeout
        context = multiprocessing.get_context("spawn")
        self._outbox: Any = context.Queue()
        self._inboxes: list[Any] = [context.Queue() for _ in range(world_size)]
        port = _free_port()
        threads = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
        os.environ.update(dict.fromkeys(_THREAD_VARIABLES, "1"))  # ranks share the cores
        try:
            self._ranks = []
            for r in range(world_size):
                args = (r, world_size, port, self._inboxes[r], self._outbox, timeout)
                self._ranks.append(context.Process(target=_serve, args=args, daemon=True))
            for process in self._ranks:
                process.start()
        finally:
            for name, value in threads.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._closed = False
        self.run(_ready, None)

    def run(self, task: Task, payload: Any) -> list[Any]:
        """``task(payload, rank, world_size)`` on every rank; the results in rank order.

        Raises :class:`GroupError` with each failed rank's traceback if any rank raised,
        and ends the group if a rank died or did not answer within the timeout.
        """
        if self._closed:
            raise GroupError("this LocalGroup is closed")
        for inbox in self._inboxes:
            inbox.put((task, payload))
        answers: dict[int, tuple[str, Any]] = {}
        while len(answers) < self.world_size:
            try:
                rank, answer = self._outbox.get(timeout=self.timeout)
            except queue.Empty:
                silent = [r for r in range(self.world_size) if r not in answers]
                dead = [r for r in silent if not self._ranks[r].is_alive()]
                self.close()
                raise GroupError(
                    f"ranks {silent} did not answer within {self.timeout:g} s"
                    + (f" (ranks {dead} died)" if dead else "")
                    + "; the group is ended"
                ) from None
            answers[rank] = answer
        failed = {r: a[1] for r, a in answers.items() if a[0] == "error"}
        if failed:
            details = "\n".join(f"--- rank {r} ---\n{failed[r]}" for r in sorted(failed))
            raise GroupError(f"ranks {sorted(failed)} raised:\n{details}")
        return [answers[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop every rank (politely, then by force)."""
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes:
            inbox.put(None)
        for process in self._ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_context_parallel(
    fn: Callable[[Shard], Any],
    *,
    world_size: int = 2,
    layout: str = "zigzag",
    backend: str = "numpy",
    dtypes: Iterable[str] = ("float32",),
    features: Iterable[str] | None = None,
    max_examples: int = 50,
    seed: int | None = None,
    max_failures: int = 5,
    timeout: float = 120.0,
    group: LocalGroup | None = None,
) -> Report:
    """Search for problems on which a context-parallel ``fn`` disagrees with the spec.

    ``fn(shard: Shard)`` runs on every rank of a :class:`LocalGroup` of ``world_size``
    ranks (``torch.distributed`` is initialised there, gloo, the default group); it must
    be importable by name. Each problem's queries and keys are sharded by ``layout``
    (``"zigzag"`` or ``"contiguous"``, :func:`refattn.distributed.shard_indices`), the
    ranks' outputs are put back in order and judged by
    :func:`~refattn.testing.check_attention`'s rule, which does the search, the
    shrinking and the report. ``features`` default to :data:`CONTEXT_PARALLEL_FEATURES`
    less ``unseen_nan``. ``group``, a :class:`LocalGroup` already started, is used instead
    of a new one of ``world_size`` ranks (and left running).
    """
    from refattn.distributed import shard_indices

    shard_indices(0, world_size, 0, layout=layout)  # the layout and world size, checked
    if features is None:
        features = CONTEXT_PARALLEL_FEATURES - {"unseen_nan"}
    chosen = resolve_features(features, allowed=CONTEXT_PARALLEL_FEATURES)
    if group is not None and group.world_size != world_size:
        raise ValueError(f"group has {group.world_size} ranks but world_size is {world_size}")
    ranks = group if group is not None else LocalGroup(world_size, timeout=timeout)

    def gathered(problem: AttentionProblem) -> Any:
        payload = (fn, layout, _arrays_of(problem), problem.return_lse)
        return _reassembled(problem, ranks.run(_run_shard, payload))

    try:
        return check_attention(gathered, backend=backend, dtypes=dtypes, features=chosen,
                               max_examples=max_examples, seed=seed,
                               max_failures=max_failures)  # fmt: skip
    finally:
        if group is None:
            ranks.close()


def shard_of(arrays: dict[str, Any], layout: str, rank: int, world_size: int) -> Shard:
    """Rank ``rank``'s :class:`Shard` of a problem's arrays (q, k, v, q_pos, k_pos and the
    shared options), cut by ``layout``."""
    from refattn.distributed import shard_indices

    q_index = shard_indices(arrays["q"].shape[2], world_size, rank, layout=layout)
    k_index = shard_indices(arrays["k"].shape[2], world_size, rank, layout=layout)
    options = {n: arrays[n] for n in SHARED_OPTIONS if arrays.get(n) is not None}
    return Shard(
        q=arrays["q"][:, :, q_index], k=arrays["k"][:, :, k_index],
        v=arrays["v"][:, :, k_index], q_pos=arrays["q_pos"][:, q_index],
        k_pos=arrays["k_pos"][:, k_index], q_index=q_index, k_index=k_index,
        options=options, return_lse=bool(arrays.get("return_lse")), rank=rank,
        world_size=world_size,
    )  # fmt: skip


def _arrays_of(problem: AttentionProblem) -> dict[str, Any]:
    """The problem's arrays as they travel to the ranks: as the backend holds them."""
    options = problem.options()
    return {"q": problem.q, "k": problem.k, "v": problem.v, **options}


def _run_shard(payload: Any, rank: int, world_size: int) -> tuple[np.ndarray, Any]:
    fn, layout, arrays, return_lse = payload
    shard = shard_of({**arrays, "return_lse": return_lse}, layout, rank, world_size)
    return shard.q_index, fn(shard)


def _reassembled(problem: AttentionProblem, parts: list[tuple[np.ndarray, Any]]) -> Any:
    """The ranks' outputs (and lses) put back at their queries' indices."""
    backend = get(problem.backend)
    B, Hq, Sq = problem.q.shape[0], problem.q.shape[1], problem.q.shape[2]
    Dv = problem.v.shape[3]
    out = np.zeros((B, Hq, Sq, Dv))
    lse = np.zeros((B, Hq, Sq))
    for index, result in parts:
        got_out, got_lse = result if problem.return_lse else (result, None)
        out[:, :, index] = _as_float64(backend, got_out)
        if got_lse is not None:
            lse[:, :, index] = _as_float64(backend, got_lse)
    out_on = backend.asarray(out, dtype=problem.dtype, device=problem.device)
    if not problem.return_lse:
        return out_on
    lse_dtype = compute_dtype_name(problem.dtype)  # the lse is kept in the compute dtype
    return Result(out=out_on, lse=backend.asarray(lse, dtype=lse_dtype, device=problem.device))


def _as_float64(backend: Any, x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = backend.to_numpy(x)
    return np.asarray(x, dtype=np.float64)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _serve(rank: int, world_size: int, port: int, inbox: Any, outbox: Any, timeout: float) -> None:
    """One rank: join the group, then run each task the parent sends until told to stop."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))  # fmt: skip
    try:
        while (message := inbox.get()) is not None:
            task, payload = message
            try:
                outbox.put((rank, ("ok", task(payload, rank, world_size))))
            except BaseException:  # the traceback goes to the parent, which reports it
                outbox.put((rank, ("error", traceback.format_exc())))
    finally:
        dist.destroy_process_group()


def _ready(payload: Any, rank: int, world_size: int) -> int:
    """A task that checks every rank is up and the group works (one all-reduce)."""
    import torch
    import torch.distributed as dist

    one = torch.ones(1)
    dist.all_reduce(one)
    if int(one.item()) != world_size:
        raise RuntimeError(f"the group's all-reduce gave {one.item()}, not {world_size}")
    return rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
