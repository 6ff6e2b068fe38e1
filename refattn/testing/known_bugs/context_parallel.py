"""Context-parallel attentions with one realistic bug each, and correct ones, for
:func:`refattn.testing.check_context_parallel`.

Each is written the way a context-parallel layer is: every rank gathers the
other ranks' K/V shards (``all_gather_object``, simple rather than fast),
attends to each shard on its own and merges the partial states. The wrong ones
change one line the way such layers get it wrong:

- ``sink_logit_on_every_rank``: each partial keeps the sink logit, so the merged
  denominator counts it once per rank;
- ``local_positions``: positions counted from 0 within each shard, as if the
  shard were the whole sequence (a causal mask then lets early queries see late
  keys of another rank);
- ``later_ranks_skipped``: keys of higher ranks skipped as "in the future", which
  holds for contiguous shards under a causal mask and not for zigzag ones;
- ``unweighted_merge``: the partial outputs averaged by the number of keys each saw
  rather than by their softmax mass.

Importing this module imports ``torch`` (through :mod:`refattn.distributed`); the
candidates run on a rank of a :class:`~refattn.testing.context_parallel.LocalGroup`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist

from refattn.attention import attention
from refattn.distributed import all_gather_attention, ring_attention
from refattn.merge import merge_states_n
from refattn.testing.context_parallel import Shard


def _gathered(shard: Shard) -> list[tuple[Any, Any, Any]]:
    """Every rank's (k, v, k_pos), in rank order."""
    everyone: list[Any] = [None] * shard.world_size
    dist.all_gather_object(everyone, (shard.k, shard.v, shard.k_pos))
    return everyone


def _merged(shard: Shard, bug: str = "") -> Any:
    options = dict(shard.options)
    sink = options.pop("sink_logits", None)
    if bug == "sink_logit_on_every_rank" and sink is not None:
        options["sink_logits"] = sink
    q_pos = shard.q_pos
    q = shard.q.astype(np.float32) if shard.q.dtype == np.float16 else shard.q
    outs, lses, counts = [], [], []
    for source, (k, v, k_pos) in enumerate(_gathered(shard)):
        if bug == "later_ranks_skipped" and source > shard.rank:
            continue
        if bug == "local_positions":
            q_pos = np.broadcast_to(np.arange(q.shape[2]), shard.q_pos.shape)
            k_pos = np.broadcast_to(np.arange(k.shape[2]), k_pos.shape)
        out, lse = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_pos=q_pos, k_pos=k_pos,
                             return_lse=True, **options)  # fmt: skip
        outs.append(out)
        lses.append(lse)
        counts.append(k.shape[2])
    if bug == "unweighted_merge":
        weights = np.array(counts, dtype=np.float64) / max(1, sum(counts))
        out = sum(w * o for w, o in zip(weights, outs, strict=True))
        with np.errstate(divide="ignore"):  # a row that saw nothing: lse = -inf
            lse = np.log(np.sum([np.exp(s) for s in lses], axis=0))
    else:
        out, lse = merge_states_n(outs, lses)
    if sink is not None and bug != "sink_logit_on_every_rank":
        rows = np.broadcast_to(np.reshape(sink, (1, -1, 1)), lse.shape).astype(lse.dtype)
        out, lse = merge_states_n([out, np.zeros_like(out)], [lse, rows])
    out = np.asarray(out).astype(shard.q.dtype)
    return (out, lse) if shard.return_lse else out


def gathered_and_merged(shard: Shard) -> Any:
    """Correct: every shard attended to on its own, the states merged, the sink once."""
    return _merged(shard)


def sink_logit_on_every_rank(shard: Shard) -> Any:
    return _merged(shard, "sink_logit_on_every_rank")


def local_positions(shard: Shard) -> Any:
    return _merged(shard, "local_positions")


def later_ranks_skipped(shard: Shard) -> Any:
    return _merged(shard, "later_ranks_skipped")


def unweighted_merge(shard: Shard) -> Any:
    return _merged(shard, "unweighted_merge")


def refattn_ring(shard: Shard) -> Any:
    """Correct: :func:`refattn.distributed.ring_attention` on the shard."""
    return ring_attention(shard.q, shard.k, shard.v, q_pos=shard.q_pos, k_pos=shard.k_pos,
                          return_lse=shard.return_lse, **shard.options)  # fmt: skip


def refattn_all_gather(shard: Shard) -> Any:
    """Correct: :func:`refattn.distributed.all_gather_attention` on the shard."""
    return all_gather_attention(shard.q, shard.k, shard.v, q_pos=shard.q_pos,
                                k_pos=shard.k_pos, return_lse=shard.return_lse,
                                **shard.options)  # fmt: skip


#: Each wrong candidate and the features its bug needs (with the defaults).
WRONG = {
    "sink_logit_on_every_rank": (sink_logit_on_every_rank, {"sink_logits"}),
    "local_positions": (local_positions, {"causal"}),
    "later_ranks_skipped": (later_ranks_skipped, {"causal"}),
    "unweighted_merge": (unweighted_merge, set()),
}
CORRECT = {
    "gathered_and_merged": gathered_and_merged,
    "refattn_ring": refattn_ring,
    "refattn_all_gather": refattn_all_gather,
}
