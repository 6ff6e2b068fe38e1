"""Context-parallel attention against single-process attention, on this machine's cores.

For 2 and 4 ranks of a gloo group on this machine (``LocalGroup``), one causal
prefill sharded zigzag over the ranks runs through ``ring_attention`` and
``all_gather_attention``; each is timed on the ranks (barrier to barrier, the
median of ``--repeats``) and set against ``refattn.attention`` over the whole
sequence in this process, in the same run. Each rank's bytes sent are shown
against the analytic (P - 1)/P of the K/V bytes (keys, values and their
positions). The ranks share the machine's cores (each runs one thread), so on a
2-core machine 4 ranks cannot run faster than 2: the ratios here measure the
plans' overhead, not a cluster's speed-up.

    python benchmarks/context_parallel.py
    python benchmarks/context_parallel.py --seq 4096 --heads 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np


def timed_strategy(payload: Any, rank: int, world_size: int) -> dict[str, Any]:
    """One rank: its zigzag shard through a strategy ``repeats`` times, barrier to barrier."""
    import torch.distributed as dist

    import refattn.distributed as cp

    name, q, k, v, repeats = payload
    index = cp.shard_indices(q.shape[2], world_size, rank, layout="zigzag")
    positions = index[None, :]
    strategy = {"ring": cp.ring_attention, "all_gather": cp.all_gather_attention}[name]
    seconds, traffic = [], cp.Traffic()
    for _ in range(repeats):
        traffic = cp.Traffic()
        dist.barrier()
        start = time.perf_counter()
        strategy(q[:, :, index], k[:, :, index], v[:, :, index], q_pos=positions,
                 k_pos=positions, causal=True, traffic=traffic)  # fmt: skip
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    shard_bytes = k[:, :, index].nbytes + v[:, :, index].nbytes + positions.nbytes
    return {"seconds": statistics.median(seconds), "sent": traffic.sent, "shard": shard_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import refattn
    from refattn.testing.context_parallel import LocalGroup

    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq, args.dim)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    positions = np.arange(args.seq)[None, :]
    single = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        refattn.attention(q, k, v, causal=True)
        single.append(time.perf_counter() - start)
    base = statistics.median(single)
    kv_bytes = k.nbytes + v.nbytes + positions.nbytes
    print(f"causal prefill B=1 H={args.heads} S={args.seq} D={args.dim} float32, zigzag shards")
    print(f"single-process refattn.attention: {base * 1e3:.0f} ms")
    print()
    print("| ranks | strategy | ms | vs single process | sent per rank | (P-1)/P of K/V |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for world_size in (2, 4):
        with LocalGroup(world_size, timeout=600) as group:
            for name in ("ring", "all_gather"):
                parts = group.run(timed_strategy, (name, q, k, v, args.repeats))
                seconds = max(p["seconds"] for p in parts)
                sent = max(p["sent"] for p in parts)
                analytic = (world_size - 1) / world_size * kv_bytes
                print(f"| {world_size} | {name} | {seconds * 1e3:.0f} | {seconds / base:.2f}x | "
                      f"{sent / 2**20:.2f} MiB | {sent / analytic:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
