r"""Attention over a context sharded across the ranks of a ``torch.distributed`` group.

Long contexts are split over devices: each rank holds a shard of the queries
and a shard of the keys and values. The exact answer needs no new algebra:
attention over all keys is the merge of the partial states over any partition
of them (:func:`refattn.merge_states_n`),

.. math::

    \text{lse}_i = \log \textstyle\sum_r e^{\text{lse}^{(r)}_i}, \qquad
    o_i = \textstyle\sum_r e^{\text{lse}^{(r)}_i - \text{lse}_i}\, o^{(r)}_i

where :math:`(o^{(r)}, \text{lse}^{(r)})` is attention of query :math:`i`
over the keys of rank :math:`r` alone. Positions are the single source of
truth: every shard carries the absolute positions of its tokens (``q_pos``,
``k_pos``), so causal masks, windows, sink tokens, ALiBi, per-row positions
and grouped-query attention are :func:`refattn.attention`'s own, applied to
each partial, whatever the sharding. Sink logits join the denominator once,
after the merge. Partial states are held in the compute dtype (float32 for
float16 and bfloat16 inputs) and the output is cast back at the end, as a
ring kernel accumulates.

Three plans, all on ``torch.distributed``'s own transport (gloo on the CPU,
NCCL on GPUs):

- :func:`ring_attention`: each rank's K/V shard travels once around the ring
  by point-to-point sends (the next shard is on its way while the current
  one is attended to); a rank sends :math:`(P-1)/P` of the K/V bytes.
- :func:`all_gather_attention`: every rank gathers every K/V shard, then
  attends once over all of them (the same bytes, one collective).
- :func:`attention_over_shards`: decoding from a KV cache sharded over the
  ranks. The queries are the same on every rank; each rank attends to its
  shard, the partial states are gathered and merged in rank order, so the
  output is identical on every rank, bit for bit.

Shards may differ in length (they are padded to the longest with empty slots,
``k_pos = -1``, which no query sees) and may be empty. :func:`shard_indices`
gives the contiguous and the causal load-balancing ("zigzag", head-tail)
shardings. A failure on one rank (bad input, an exception while a block is
attended to) is agreed on by every rank before the next exchange, so every
rank raises :class:`ContextParallelError` naming it, and none waits forever.

Importing this module imports ``torch``; importing :mod:`refattn` does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import array_api_compat
import numpy as np
import torch
import torch.distributed as dist

from refattn.attention import attention
from refattn.merge import merge_states_n
from refattn.namespace import Array, compute_dtype_name

__all__ = [
    "ContextParallelError",
    "Traffic",
    "all_gather_attention",
    "attention_over_shards",
    "ring_attention",
    "shard_indices",
]

#: Options that index the global key axis and so cannot follow a shard around.
GLOBAL_OPTIONS = ("mask", "bias")


class ContextParallelError(RuntimeError):
    """One rank of the group failed; every rank raises this, naming it."""


@dataclass
class Traffic:
    """Bytes this rank sent and received, counted as they go (K, V and positions)."""

    sent: int = 0
    received: int = 0


def shard_indices(length: int, world_size: int, rank: int, *, layout: str = "zigzag") -> np.ndarray:
    """The positions, along a sequence of ``length`` tokens, that ``rank`` holds.

    ``"contiguous"`` gives rank :math:`r` the :math:`r`-th of :math:`P` equal
    runs; ``"zigzag"`` cuts the sequence into :math:`2P` runs and gives rank
    :math:`r` runs :math:`r` and :math:`2P - 1 - r`, so that under a causal mask
    every rank holds as many early (cheap) as late (dear) queries. Runs differ
    in length by at most one token.

    >>> [shard_indices(8, 2, r).tolist() for r in range(2)]
    [[0, 1, 6, 7], [2, 3, 4, 5]]
    >>> shard_indices(5, 2, 0, layout="contiguous").tolist()
    [0, 1, 2]
    """
    _check_count("length", length, minimum=0)
    _check_count("world_size", world_size, minimum=1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank!r}")
    if layout == "contiguous":
        return np.array_split(np.arange(length), world_size)[rank]
    if layout == "zigzag":
        runs = np.array_split(np.arange(length), 2 * world_size)
        return np.concatenate([runs[rank], runs[2 * world_size - 1 - rank]])
    raise ValueError(f"layout must be 'contiguous' or 'zigzag'; got {layout!r}")


def ring_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_pos: Array,
    k_pos: Array,
    group: Any = None,
    traffic: Traffic | None = None,
    return_lse: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """This rank's queries over every rank's keys, the K/V shards passed around a ring.

    At step :math:`t` rank :math:`r` attends to the shard of rank
    :math:`(r - t) \\bmod P` while it sends that shard on to rank :math:`r + 1`
    and receives the next from rank :math:`r - 1`; after :math:`P` steps the
    :math:`P` partial states are merged.

    Parameters
    ----------
    q : (B, Hq, Sq_r, D) this rank's queries (a NumPy array or a torch tensor)
    k : (B, Hkv, Sk_r, D) this rank's keys; ``v`` : (B, Hkv, Sk_r, Dv) its values
    q_pos : (B, Sq_r) integer, the absolute positions of this rank's queries
    k_pos : (B, Sk_r) integer, of its keys (negative for an empty slot)
    group : the ``torch.distributed`` process group (default: the world)
    traffic : counts the bytes this rank sends and receives, if given
    return_lse : also return this rank's queries' lse
    options : any option of :func:`refattn.attention` but ``mask`` and ``bias``

    Returns
    -------
    out : (B, Hq, Sq_r, Dv) in q's dtype; lse : (B, Hq, Sq_r), if ``return_lse``
    """
    plan = _Plan.of("ring_attention", q, k, v, q_pos, k_pos, group, options)
    P, r = plan.world_size, plan.rank
    block = plan.padded_shard()
    states = []
    for step in range(P):
        source = (r - step) % P
        exchange = plan.pass_on(block, traffic) if step < P - 1 else None
        where = f"step {step} of the ring (the keys of rank {source})"
        settle = exchange.wait if exchange is not None else partial(tuple, block)
        state, block = plan.attended(block, where, settle)
        states.append(state)
    return plan.finish(states, return_lse)


def all_gather_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_pos: Array,
    k_pos: Array,
    group: Any = None,
    traffic: Traffic | None = None,
    return_lse: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """This rank's queries over every rank's keys, gathered first: one attention call.

    Parameters and returns as :func:`ring_attention`.
    """
    plan = _Plan.of("all_gather_attention", q, k, v, q_pos, k_pos, group, options)
    shards = plan.gather(plan.padded_shard(), traffic)
    keys = [torch.cat([s[i] for s in shards], dim=2 if i < 2 else 1) for i in range(3)]
    state, _ = plan.attended(tuple(keys), "attention over the gathered keys")
    return plan.finish([state], return_lse)


def attention_over_shards(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_pos: Array,
    k_pos: Array,
    group: Any = None,
    traffic: Traffic | None = None,
    return_lse: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """Decoding from a KV cache sharded over the ranks: the same queries on every rank.

    Each rank attends to its own keys (what its cache's ``view()`` gives, with
    its ``attention_options``); the partial states, one per rank, are gathered
    and merged in rank order on every rank, so every rank returns the same
    output, bit for bit. Only the states travel: :math:`P - 1` outputs and lses
    per rank, never a key.

    Parameters and returns as :func:`ring_attention`, with ``q`` and ``q_pos``
    the same on every rank.
    """
    plan = _Plan.of("attention_over_shards", q, k, v, q_pos, k_pos, group, options)
    (out, lse), _ = plan.attended(plan.padded_shard(), "attention over this rank's shard")
    gathered = plan.gather((_to_wire(out), _to_wire(lse)), traffic)
    outs = [plan.from_wire(o) for o, _ in gathered]
    lses = [plan.from_wire(s) for _, s in gathered]
    return plan.finish(list(zip(outs, lses, strict=True)), return_lse)


def attend_block(plan: _Plan, block: tuple[Any, ...]) -> tuple[Array, Array]:
    """The partial state of this rank's queries over one block of keys, in compute dtype:
    :func:`refattn.attention` with every option but the sink logits, which join once."""
    xp = array_api_compat.array_namespace(plan.q)
    k, v, k_pos = (plan.from_wire(t) for t in block)
    k, v = xp.astype(k, plan.q.dtype), xp.astype(v, plan.q.dtype)  # (B, Hkv, L, D), (.., Dv)
    out, lse = attention(plan.q, k, v, q_pos=plan.q_pos, k_pos=k_pos, return_lse=True,
                         **plan.options)  # fmt: skip
    return out, lse


@dataclass
class _Plan:
    """One call's checked inputs, its group, and the moves between arrays and the wire."""

    name: str
    q: Array  # (B, Hq, Sq_r, D) in the compute dtype
    k: Array  # (B, Hkv, Sk_r, D) in the input dtype, as it travels
    v: Array  # (B, Hkv, Sk_r, Dv)
    q_pos: Array  # (B, Sq_r)
    k_pos: Array  # (B, Sk_r)
    dtype: Any  # q's dtype: the output's
    sink_logits: Array | None
    options: dict[str, Any]
    group: Any
    rank: int
    world_size: int
    longest: int  # the longest K/V shard of any rank
    from_wire: Callable[[Any], Array]

    @classmethod
    def of(
        cls, name: str, q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
        group: Any, options: dict[str, Any],
    ) -> _Plan:  # fmt: skip
        for option in GLOBAL_OPTIONS:
            if options.get(option) is not None:
                raise ValueError(
                    f"{name} does not take {option}: its columns index the global keys, which "
                    f"no rank holds; express it through positions, windows or ALiBi"
                )
        if "return_lse" in options:
            raise ValueError(f"{name} takes return_lse once; got it twice")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name} needs torch.distributed initialised (init_process_group)")
        group = dist.group.WORLD if group is None else group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        xp = array_api_compat.array_namespace(q, k, v)
        from_wire = _from_wire_for(q)
        failure = None
        try:
            _check_shard(q, k, v, q_pos, k_pos)
        except Exception as error:
            failure = error
        report = None if failure is None else _Failure(failure)
        shapes = _gather_objects(group, world_size, (report, _shape_of(q, k, v)))
        _agree_on(shapes, f"{name}'s input checks", failure)
        mine = shapes[rank][1]
        for other, (_, theirs) in enumerate(shapes):
            if theirs["kv"] != mine["kv"] or theirs["dtype"] != mine["dtype"]:
                raise ContextParallelError(
                    f"{name}: rank {other} holds keys of {theirs['kv']} (B, Hkv, D, Dv) in "
                    f"{theirs['dtype']}, rank {rank} {mine['kv']} in {mine['dtype']}; every "
                    f"rank's shard must agree but for its length"
                )
            if name == "attention_over_shards" and theirs["q"] != mine["q"]:
                raise ContextParallelError(
                    f"{name}: rank {other} holds queries of shape {theirs['q']}, rank {rank} "
                    f"{mine['q']}; every rank must hold the same queries"
                )
        compute = getattr(xp, compute_dtype_name(str(q.dtype).removeprefix("torch.")))
        sink_logits = options.pop("sink_logits", None)
        return cls(
            name=name, q=xp.astype(q, compute), k=k, v=v, q_pos=q_pos, k_pos=k_pos,
            dtype=q.dtype, sink_logits=sink_logits, options=options, group=group, rank=rank,
            world_size=world_size, longest=max(s[1]["length"] for s in shapes),
            from_wire=from_wire,
        )  # fmt: skip

    def attended(
        self, block: tuple[Any, ...], where: str, settle: Callable[[], Any] = lambda: None
    ) -> tuple[tuple[Array, Array], Any]:
        """:func:`attend_block` on ``block``, then ``settle()`` (a pending exchange's wait, so
        no send is left in flight), then every rank agrees on whether any failed at ``where``.
        Returns the state and what ``settle`` returned."""
        failure, state = None, None
        try:
            state = attend_block(self, block)
        except Exception as error:  # agreed on below, so no rank waits for this one
            failure = error
        settled = settle()
        self.agree(failure, where)
        assert state is not None
        return state, settled

    def agree(self, failure: BaseException | None, where: str) -> None:
        """Every rank learns whether any rank failed at ``where``; if one did, all raise."""
        report = None if failure is None else _Failure(failure)
        _agree_on(_gather_objects(self.group, self.world_size, (report,)), where, failure)

    def padded_shard(self) -> tuple[Any, Any, Any]:
        """This rank's (k, v, k_pos) on the wire, padded to the longest shard with empty
        slots: zero keys and values at position -1, which no query sees."""
        k, v, k_pos = _to_wire(self.k), _to_wire(self.v), _to_wire(self.k_pos)
        missing = self.longest - k.shape[2]
        if missing:
            B, H = k.shape[0], k.shape[1]
            k = torch.cat([k, k.new_zeros((B, H, missing, k.shape[3]))], dim=2)
            v = torch.cat([v, v.new_zeros((B, H, missing, v.shape[3]))], dim=2)
            k_pos = torch.cat([k_pos, k_pos.new_full((B, missing), -1)], dim=1)
        return k, v, k_pos

    def pass_on(self, block: tuple[Any, ...], traffic: Traffic | None) -> _Exchange:
        """Send ``block`` to the next rank and receive the previous rank's, without waiting."""
        following = _global_rank(self.group, (self.rank + 1) % self.world_size)
        preceding = _global_rank(self.group, (self.rank - 1) % self.world_size)
        incoming = tuple(torch.empty_like(t) for t in block)
        ops = [dist.P2POp(dist.isend, t, following, group=self.group) for t in block]
        ops += [dist.P2POp(dist.irecv, t, preceding, group=self.group) for t in incoming]
        nonempty = [op for op in ops if op.tensor.numel()]
        requests = dist.batch_isend_irecv(nonempty) if nonempty else []
        if traffic is not None:
            size = sum(t.numel() * t.element_size() for t in block)
            traffic.sent += size
            traffic.received += size
        return _Exchange(requests, incoming)

    def gather(self, block: tuple[Any, ...], traffic: Traffic | None) -> list[tuple[Any, ...]]:
        """Every rank's ``block`` (all of equal shapes), in rank order."""
        gathered = []
        for t in block:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            if t.numel():
                dist.all_gather(parts, t.contiguous(), group=self.group)
            gathered.append(parts)
            if traffic is not None:
                size = t.numel() * t.element_size()
                traffic.sent += size * (self.world_size - 1)
                traffic.received += size * (self.world_size - 1)
        return [tuple(parts[r] for parts in gathered) for r in range(self.world_size)]

    def finish(self, states: list[tuple[Array, Array]], return_lse: bool) -> Any:
        """Merge the partial states, add the sink logits once, cast to q's dtype."""
        xp = array_api_compat.array_namespace(self.q)
        out, lse = merge_states_n([o for o, _ in states], [s for _, s in states])
        if self.sink_logits is not None:
            B, Hq, Sq = lse.shape
            sink = xp.astype(xp.asarray(self.sink_logits), lse.dtype)
            sink = xp.broadcast_to(xp.reshape(sink, (1, Hq, 1)), (B, Hq, Sq))
            out, lse = merge_states_n([out, xp.zeros_like(out)], [lse, sink])
        out = xp.astype(out, self.dtype)
        return (out, lse) if return_lse else out


@dataclass
class _Exchange:
    requests: list[Any]
    incoming: tuple[Any, ...]

    def wait(self) -> tuple[Any, ...]:
        for request in self.requests:
            request.wait()
        return self.incoming


class _Failure(Exception):
    """A rank's exception as it travels to the others (its type's name and message)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.kind = type(error).__name__

    def __reduce__(self) -> Any:
        return (_Failure._rebuilt, (self.kind, str(self)))

    @staticmethod
    def _rebuilt(kind: str, message: str) -> _Failure:
        failure = _Failure(Exception(message))
        failure.kind = kind
        return failure


def _agree_on(reports: list[Any], where: str, own: BaseException | None) -> None:
    """Raise on every rank if any rank's report (its first item) holds a failure."""
    failed = [(r, report[0]) for r, report in enumerate(reports) if report[0] is not None]
    if not failed:
        return
    first = failed[0][1]
    names = ", ".join(f"rank {r}" for r, _ in failed)
    raise ContextParallelError(f"{names} failed at {where}: {first.kind}: {first}") from own


def _check_shard(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array) -> None:
    if len(q.shape) != 4 or len(k.shape) != 4 or len(v.shape) != 4:
        raise ValueError(
            f"q, k and v must be 4-d (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    if tuple(q_pos.shape) != (B, Sq):
        raise ValueError(f"q_pos must have shape {(B, Sq)} (B, Sq); got {tuple(q_pos.shape)}")
    if tuple(k_pos.shape) != (B, Sk):
        raise ValueError(f"k_pos must have shape {(B, Sk)} (B, Sk); got {tuple(k_pos.shape)}")


def _shape_of(q: Array, k: Array, v: Array) -> dict[str, Any]:
    four_d = len(k.shape) == 4 == len(v.shape)
    kv = (k.shape[0], k.shape[1], k.shape[3], v.shape[3]) if four_d else ()
    length = k.shape[2] if len(k.shape) == 4 else 0
    q_shape = tuple(int(n) for n in q.shape)
    return {"kv": tuple(kv), "q": q_shape, "dtype": str(k.dtype), "length": int(length)}


def _gather_objects(group: Any, world_size: int, obj: Any) -> list[Any]:
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _to_wire(x: Any) -> Any:
    """A torch tensor holding ``x`` (itself if it is one), as torch.distributed sends it."""
    if isinstance(x, torch.Tensor):
        return x.contiguous()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"refattn.distributed takes NumPy arrays or torch tensors; got {type(x)}")


def _from_wire_for(like: Any) -> Callable[[Any], Array]:
    """Back from the wire to the library of ``like``."""
    if isinstance(like, torch.Tensor):
        return lambda t: t
    if isinstance(like, np.ndarray):
        return lambda t: t.numpy()
    raise TypeError(f"refattn.distributed takes NumPy arrays or torch tensors; got {type(like)}")


def _check_count(name: str, n: Any, *, minimum: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}")
