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
    python benchmarks/context_parallel.py --agreement 100   # each plan against the spec
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


def sharded_strategy(payload: Any, rank: int, world_size: int) -> tuple[Any, Any, Any]:
    """One rank: its zigzag share of a drawn problem through a strategy; (index, out, lse)."""
    import refattn.distributed as cp

    name, arrays, scalars = payload
    index = cp.shard_indices(arrays["q"].shape[2], world_size, rank, layout="zigzag")
    keys = cp.shard_indices(arrays["k"].shape[2], world_size, rank, layout="zigzag")
    if name == "over_shards":  # a sharded cache: every rank holds every query
        index = np.arange(arrays["q"].shape[2])
    shard = {n: x for n, x in arrays.items() if n not in ("q", "k", "v", "q_pos", "k_pos")}
    shard.update(q=arrays["q"][:, :, index], q_pos=arrays["q_pos"][:, index],
                 k=arrays["k"][:, :, keys], v=arrays["v"][:, :, keys],
                 k_pos=arrays["k_pos"][:, keys])  # fmt: skip
    strategy = {"ring": cp.ring_attention, "all_gather": cp.all_gather_attention,
                "over_shards": cp.attention_over_shards}[name]  # fmt: skip
    out, lse = strategy(**shard, **scalars, return_lse=True)
    return index, out, lse


def agreement(problems: int, dtypes: list[str]) -> None:
    """Each strategy on 2 and 4 ranks over ``problems`` drawn problems (every option a
    sharded problem may take): how many pass the tolerance rule against the loop oracle,
    and the largest share of the allowance any used."""
    from refattn.backends import Case, get
    from refattn.testing.context_parallel import CONTEXT_PARALLEL_FEATURES, LocalGroup
    from refattn.testing.drawing import NumpyDraws, draw_spec
    from refattn.testing.oracle import oracle_attention
    from refattn.testing.problems import build_problem
    from refattn.testing.selfcheck.agreement import measure

    features = CONTEXT_PARALLEL_FEATURES - {"long", "unseen_nan"}
    rng = np.random.default_rng(0)
    specs = [draw_spec(NumpyDraws(rng), features) for _ in range(problems)]
    print(f"{problems} drawn problems per row, zigzag shards, against the float64 loop oracle")
    print()
    print("| ranks | strategy | dtype | passed | largest share of the allowance |")
    print("| ---: | --- | --- | ---: | ---: |")
    for world_size in (2, 4):
        with LocalGroup(world_size, timeout=600) as group:
            for name in ("ring", "all_gather", "over_shards"):
                for dtype in dtypes:

                    def gathered(q: Any, k: Any, v: Any, name: str = name, **options: Any) -> Any:
                        options.pop("return_lse")
                        arrays = {n: x for n, x in options.items() if hasattr(x, "shape")}
                        scalars = {n: x for n, x in options.items() if n not in arrays}
                        arrays.update(q=q, k=k, v=v)
                        parts = group.run(sharded_strategy, (name, arrays, scalars))
                        out = np.zeros((*q.shape[:3], v.shape[3]), q.dtype)
                        lse = np.zeros(q.shape[:3], parts[0][2].dtype)
                        for index, part_out, part_lse in parts:
                            out[:, :, index], lse[:, :, index] = part_out, part_lse
                        return out, lse

                    case = Case(get("numpy"), "cpu", dtype)
                    measured = [measure(build_problem(spec), case, oracle_attention, gathered)
                                for spec in specs]  # fmt: skip
                    passed = sum(m.passed for m in measured)
                    worst = max(m.ratio for m in measured)
                    print(f"| {world_size} | {name} | {dtype} | {passed}/{len(measured)} | "
                          f"{worst:.0%} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--agreement", type=int, metavar="N",
        help="instead of timing: each strategy's agreement with the spec on N drawn problems",
    )  # fmt: skip
    parser.add_argument("--dtypes", default="float32,float16", help="with --agreement")
    args = parser.parse_args()
    if args.agreement:
        agreement(args.agreement, args.dtypes.split(","))
        return

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
