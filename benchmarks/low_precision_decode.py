"""A float16 / bfloat16 decode step on NumPy, block by block, against the cost of widening.

NumPy has no float16 matrix kernels, so the spec computes low precision in
float32. Widening the whole cache per step costs time and triples its memory;
``attention_blockwise`` widens one block of keys and values at a time. This
script times, in one run and on the same data (B=1, Hq=32, Hkv=8, D=128, one
query, S keys):

- the float32 step (``attention`` on a float32 cache);
- the low-precision step (``attention_blockwise`` on a float16 or bfloat16 cache);
- the conversion floor: NumPy casting that cache's K and V to float32;
- the peak memory the low-precision step allocates (tracemalloc).

    python benchmarks/low_precision_decode.py --keys 4096 --block 512
"""

from __future__ import annotations

import argparse
import tracemalloc
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from refattn import attention, attention_blockwise
from refattn.bench import time_calls

B, HQ, HKV, D = 1, 32, 8, 128


def median_ms(step: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up, by ``time_calls``."""
    return time_calls(step, lambda: None, repeats=repeats, warmup=1)[0] * 1e3


def peak_mb(step: Callable[[], Any]) -> float:
    tracemalloc.start()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=4096)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
    k = rng.standard_normal((B, HKV, args.keys, D)).astype(np.float32)
    v = rng.standard_normal((B, HKV, args.keys, D)).astype(np.float32)
    f32 = median_ms(lambda: attention(q, k, v, causal=True), args.repeats)
    print(f"B={B} Hq={HQ} Hkv={HKV} D={D} S={args.keys}, block_k={args.block}, NumPy")
    print(f"float32 step (attention): {f32:.2f} ms")
    for name, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        ql, kl, vl = (x.astype(dtype) for x in (q, k, v))
        cache_mb = (kl.nbytes + vl.nbytes) / 2**20

        def step(ql: Any = ql, kl: Any = kl, vl: Any = vl) -> Any:
            return attention_blockwise(ql, kl, vl, block_q=1, block_k=args.block, causal=True)

        def floor(kl: Any = kl, vl: Any = vl) -> Any:
            return kl.astype(np.float32), vl.astype(np.float32)

        low, cast = median_ms(step, args.repeats), median_ms(floor, args.repeats)
        print(
            f"{name}: step {low:.2f} ms, conversion floor {cast:.2f} ms, "
            f"step/floor {low / cast:.2f}x, step/float32 {low / f32:.2f}x, "
            f"peak extra {peak_mb(step):.1f} MB (cache {cache_mb:.1f} MB)"
        )


if __name__ == "__main__":
    main()
