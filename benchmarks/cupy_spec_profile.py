"""Where the spec's decode step spends its time on CuPy, stage by stage.

``refattn.attention`` on CuPy runs its formula as separate kernels: widen K
and V to the compute dtype (float16 only), the scores ``q k^T``, the
visibility and the softmax, then ``p v``. This script times each stage of one
decode step with CUDA events (median of ``--repeats``), counts the bytes each
allocates (a CuPy memory hook: a stage that copies K shows K's bytes), and
times the alternatives a plain CuPy decode step would use: the float16
product itself, and the same product on a contiguous ``k^T``.

    python benchmarks/cupy_spec_profile.py --json profile.json

It needs a GPU and CuPy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from refattn.bench import cuda_event_seconds


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, and the
    bytes one call allocates from CuPy's memory pool."""
    from cupy.cuda import memory_hook

    class Allocations(memory_hook.MemoryHook):
        name = "allocations"

        def __init__(self) -> None:
            self.bytes = 0

        def malloc_preprocess(self, **kwargs: Any) -> None:
            self.bytes += int(kwargs["size"])

    fn()
    hook = Allocations()
    with hook:
        fn()
    return cuda_event_seconds(fn, repeats=repeats, warmup=0), hook.bytes


def profile(
    batch: int, q_heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype: str, repeats: int
) -> list[dict[str, Any]]:
    import array_api_compat.cupy as xp
    import cupy

    import refattn
    from refattn.attention import block_visibility, prepare, weighted_sum
    from refattn.backends.cupy_kernels.decode import decode_attention
    from refattn.options import AttentionOptions
    from refattn.scores import scaled_scores
    from refattn.softmax import masked_softmax

    rng = cupy.random.default_rng(0)
    q = rng.standard_normal((batch, q_heads, 1, head_dim), dtype=cupy.float32).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, seq_len, head_dim), dtype=cupy.float32).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, seq_len, head_dim), dtype=cupy.float32).astype(dtype)
    kv_bytes = 2 * k.nbytes
    call = prepare(q, k, v, AttentionOptions())
    every = slice(None)
    k_c, v_c = call.keys(every), call.values(every)
    s = scaled_scores(xp, call.q, k_c, call.scale)
    visible = block_visibility(call, every, every)
    p, _ = masked_softmax(xp, s, visible, None)
    g = q_heads // kv_heads
    q_rows = cupy.reshape(q, (batch, kv_heads, g, head_dim))
    k_t = cupy.ascontiguousarray(cupy.swapaxes(k, -1, -2))

    def plain() -> Any:  # what a plain CuPy decode step does, in the cache's dtype
        scores = cupy.matmul(q_rows, cupy.swapaxes(k, -1, -2)) / np.sqrt(head_dim)
        weights = cupy.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return cupy.matmul(weights, v)

    stages: dict[str, Callable[[], Any]] = {
        "refattn.attention, whole step": lambda: refattn.attention(q, k, v),
        "fused decode kernel": lambda: decode_attention(q, k, v),
        "widen K and V to the compute dtype": lambda: (call.keys(every), call.values(every)),
        "scores q k^T (compute dtype)": lambda: scaled_scores(xp, call.q, k_c, call.scale),
        "visibility + masked softmax": lambda: masked_softmax(
            xp, s, block_visibility(call, every, every), None
        ),
        "weighted sum p v (compute dtype)": lambda: weighted_sum(xp, p, v_c, visible),
        f"plain cupy matmul-softmax-matmul ({dtype})": plain,
        f"cupy.matmul(q, k^T view) ({dtype})": lambda: cupy.matmul(
            q_rows, cupy.swapaxes(k, -1, -2)
        ),
        f"cupy.matmul(q, contiguous k^T) ({dtype})": lambda: cupy.matmul(q_rows, k_t),
        f"cupy.matmul(p, v) ({dtype})": lambda: cupy.matmul(q_rows @ k_t, v),
    }
    rows = []
    for name, fn in stages.items():
        seconds, allocated = timed(fn, repeats)
        rows.append({
            "stage": name, "dtype": dtype, "batch": batch, "q_heads": q_heads,
            "kv_heads": kv_heads, "seq_len": seq_len, "head_dim": head_dim,
            "median_s": seconds, "allocated_bytes": allocated, "kv_bytes": kv_bytes,
            "kv_tb_per_s": kv_bytes / seconds / 1e12,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        rows += profile(args.batch, args.q_heads, args.kv_heads, args.seq_len, args.head_dim,
                        dtype, args.repeats)  # fmt: skip
    print(f"{'stage':48} {'dtype':8} {'median':>10} {'K+V TB/s':>9} {'allocated':>12}")
    for row in rows:
        print(f"{row['stage']:48} {row['dtype']:8} {row['median_s'] * 1e3:8.3f}ms "
              f"{row['kv_tb_per_s']:9.3f} {row['allocated_bytes'] / 2**20:10.1f}MiB")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
