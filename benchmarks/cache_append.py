"""Time per appended token against position, for every cache kind.

Appends one token at a time (B=1, Hkv=8, D=64, float32, NumPy) up to
``--tokens`` positions and times each ``cache.append`` (the write alone; what
``update`` reads back is attention's cost, not the cache's). Prints, per
cache kind, the median time per token in the first and the last 10% of
positions and their ratio: flat (about 1) when an append costs O(1), growing
when it copies the cache.

    python benchmarks/cache_append.py --tokens 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from refattn.caches import KVCache, make_cache

B, H, D = 1, 8, 64


def make(kind: str, tokens: int) -> KVCache:
    """A cache of ``kind`` for ``tokens`` tokens; the sliding one keeps 1024 and 4 sinks."""
    own = {"sliding": {"window": 1024, "sink_tokens": 4}, "paged": {"block_size": 16}}
    return make_cache(kind, batch=B, kv_heads=H, head_dim=D, max_len=tokens, dtype=np.float32,
                      **own.get(kind, {}))  # fmt: skip


def append_times(kind: str, tokens: int) -> list[float]:
    """Seconds for each of ``tokens`` single-token appends."""
    cache = make(kind, tokens)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    v = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        cache.append(k, v)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument(
        "--kinds", default="static,dynamic,sliding,paged,quantized", help="comma-separated"
    )
    args = parser.parse_args()
    tenth = args.tokens // 10
    print(f"append cost per token, B={B} Hkv={H} D={D} float32, {args.tokens} tokens")
    print(f"{'cache':<10} {'first 10%':>12} {'last 10%':>12} {'last/first':>11}")
    for kind in args.kinds.split(","):
        times = append_times(kind, args.tokens)
        first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
        print(f"{kind:<10} {first * 1e6:>10.1f}us {last * 1e6:>10.1f}us {last / first:>11.2f}")


if __name__ == "__main__":
    main()
