"""The fused CuPy decode kernel's settings, swept against torch SDPA on the same data.

For each shape (float16, Hq = 32, D = 128, one query per head) this times
``decode_attention`` for every combination of warps per block, keys per
worker step and number of splits (the heuristic's, and multiples of it),
and torch SDPA on the same arrays (shared through DLPack, no copy), each the
median of ``--repeats`` calls timed with CUDA events after a warm-up.

    python benchmarks/cupy_decode_sweep.py --json sweep.json

It needs a GPU, CuPy and torch built for CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from refattn.bench import cuda_event_seconds

SHAPES = [(1, 8, 8192), (1, 8, 32768), (8, 8, 32768), (8, 32, 8192), (8, 32, 32768)]


def sweep_shape(batch: int, kv_heads: int, seq_len: int, args: Any) -> list[dict[str, Any]]:
    import cupy
    import torch

    from refattn.backends.cupy_kernels import decode as cupy_decode

    rows = []
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    rng = cupy.random.default_rng(0)
    q = rng.standard_normal((batch, 32, 1, 128), dtype=cupy.float32).astype(cupy.float16)
    k = rng.standard_normal((batch, kv_heads, seq_len, 128), dtype=cupy.float32)
    k = k.astype(cupy.float16)
    v = rng.standard_normal((batch, kv_heads, seq_len, 128), dtype=cupy.float32)
    v = v.astype(cupy.float16)
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))

    def peer() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, enable_gqa=kv_heads != 32
        )

    sdpa = cuda_event_seconds(peer, repeats=args.repeats, warmup=3)
    want = peer()
    heuristic = cupy_decode.choose_splits(batch, kv_heads, 1, seq_len, multiprocessors=sms)
    # with more row groups the heuristic's split count is divided among them
    kv_bytes = 2 * k.nbytes
    print(f"B={batch} Hkv={kv_heads} S={seq_len}: {kv_bytes / 2**30:.2f} GiB, "
          f"SDPA {sdpa * 1e6:.1f} us ({kv_bytes / sdpa / 1e12:.2f} TB/s)")  # fmt: skip
    settings = (cupy_decode.WARPS, cupy_decode.KEYS_PER_STEP, cupy_decode.MAX_ROWS)
    for warps, keys, max_rows, factor in itertools.product(
        [int(w) for w in args.warps.split(",")],
        [int(kt) for kt in args.keys.split(",")],
        [int(r) for r in args.max_rows.split(",")],
        [int(f) for f in args.split_factors.split(",")],
    ):
        if max_rows > 1 and kv_heads == 32:
            continue  # one row per KV head: nothing to group
        cupy_decode.WARPS, cupy_decode.KEYS_PER_STEP, cupy_decode.MAX_ROWS = warps, keys, max_rows
        row_groups = -(-32 // kv_heads // max_rows)
        splits = max(1, heuristic * factor // row_groups)

        def step(splits: int = splits) -> Any:
            return cupy_decode.decode_attention(q, k, v, num_splits=splits)

        got = torch.from_dlpack(step())
        error = float((got.float() - want.float()).abs().max())
        seconds = cuda_event_seconds(step, repeats=args.repeats, warmup=3)
        rows.append({
            "batch": batch, "kv_heads": kv_heads, "seq_len": seq_len, "warps": warps,
            "keys_per_step": keys, "max_rows": max_rows, "splits": splits,
            "median_s": seconds, "sdpa_s": sdpa,
            "kv_bytes": kv_bytes, "max_abs_diff_vs_sdpa": error,
        })  # fmt: skip
        print(f"  warps {warps} keys {keys} rows {max_rows} splits {splits:4d}: "
              f"{seconds * 1e6:8.1f} us "
              f"{kv_bytes / seconds / 1e12:5.2f} TB/s  SDPA/fused {sdpa / seconds:5.2f}  "
              f"max|diff| {error:.1e}")  # fmt: skip
    cupy_decode.WARPS, cupy_decode.KEYS_PER_STEP, cupy_decode.MAX_ROWS = settings
    return rows


def main() -> None:
    import cupy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warps", default="4")
    parser.add_argument("--keys", default="1,2")
    parser.add_argument("--max-rows", default="1,2,4")
    parser.add_argument("--split-factors", default="1,2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        rows += sweep_shape(*shape, args)
        cupy.get_default_memory_pool().free_all_blocks()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
