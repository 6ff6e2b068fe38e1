"""Where the spec's decode step spends its time on NumPy, stage by stage, beside torch.

The stages of ``refattn.attention`` for one decode step (q (B, Hq, 1, D)
over K and V (B, Hkv, S, D)), each timed alone on the same data (median of
``--repeats`` calls after a warm-up): checking and preparing the call, the
scores ``q k^T``, the visibility and masked softmax, and the weighted sum
``p v``. Beside them: the two bare ``np.matmul`` products, and the fastest
torch CPU path for the same step (a plain matmul-softmax-matmul, and SDPA),
in the same process.

    OPENBLAS_NUM_THREADS=2 python benchmarks/numpy_decode_profile.py --seq-lens 4096,16384
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as xp
import numpy as np

import refattn
from refattn.attention import prepare, scores, weighted_sum
from refattn.bench import time_calls
from refattn.softmax import masked_softmax


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up, by ``time_calls``."""
    return time_calls(fn, lambda: None, repeats=repeats, warmup=1)[0] * 1e3


def stages(seq_len: int, batch: int, q_heads: int, kv_heads: int, head_dim: int) -> dict:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, q_heads, 1, head_dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_len, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_len, head_dim), dtype=np.float32)
    options: dict[str, Any] = dict(
        causal=False, q_pos=None, k_pos=None, mask=None, bias=None, scale=None, window=None,
        sink_tokens=0, softcap=None, alibi_slopes=None, sink_logits=None, return_lse=False,
    )  # fmt: skip
    call = prepare(q, k, v, **options)
    every = slice(None)
    s, visible = scores(call, every, every)
    p, _ = masked_softmax(xp, s, visible, None)
    rows = np.reshape(q, (batch, kv_heads, q_heads // kv_heads, head_dim))
    weights = np.reshape(p, (batch, kv_heads, q_heads // kv_heads, seq_len))
    steps: dict[str, Callable[[], Any]] = {
        "refattn.attention, whole step": lambda: refattn.attention(q, k, v),
        "check and prepare the call": lambda: prepare(q, k, v, **options),
        "scores q k^T (with visibility)": lambda: scores(call, every, every),
        "masked softmax": lambda: masked_softmax(xp, s, visible, None),
        "weighted sum p v (with its NaN check)": lambda: weighted_sum(xp, p, v, visible),
        "bare np.matmul(q, k^T)": lambda: np.matmul(rows, np.swapaxes(k, -1, -2)),
        "bare np.matmul(p, v)": lambda: np.matmul(weights, v),
    }
    try:
        import torch

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        t_rows = tq.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)

        def torch_matmul() -> Any:
            t_s = torch.matmul(t_rows, tk.transpose(-1, -2)) / head_dim**0.5
            return torch.matmul(torch.softmax(t_s, dim=-1), tv)

        steps["torch matmul-softmax-matmul"] = torch_matmul
        steps["torch SDPA"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, enable_gqa=q_heads != kv_heads
        )
    except ImportError:
        pass
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="4096,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        kv_bytes = 2 * args.batch * args.kv_heads * seq_len * args.head_dim * 4
        print(f"S = {seq_len}: K+V {kv_bytes / 2**20:.0f} MiB, float32")
        steps = stages(seq_len, args.batch, args.q_heads, args.kv_heads, args.head_dim)
        for name, fn in steps.items():
            print(f"  {name:42} {median_ms(fn, args.repeats):8.2f} ms")


if __name__ == "__main__":
    main()
