"""Tokens per second of ``generate`` with and without the KV cache, on NumPy.

A small GPT-2 (``--d-model``, ``--layers``, ``--heads``) continues a
one-token prompt to each length in ``--lengths``, greedily, once with a
static cache (each step computes the new token alone: O(s) per token) and
once without (each step recomputes the whole sequence: O(s^2) per token).
Both runs produce the same tokens (checked); the speed-up should grow
roughly linearly with the length.

    python benchmarks/generate_speed.py --lengths 128 512 2048
"""

from __future__ import annotations

import argparse
import time

from refattn.models import GPT, GPTConfig


def tokens_per_second(model: GPT, length: int, *, use_cache: bool) -> tuple[float, list[int]]:
    start = time.perf_counter()
    (tokens,) = model.generate([[1]], length - 1, use_cache=use_cache)
    return (length - 1) / (time.perf_counter() - start), tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    config = GPTConfig(vocab_size=256, n_positions=max(args.lengths), d_model=args.d_model,
                       n_layer=args.layers, n_head=args.heads)  # fmt: skip
    model = GPT.random(config, seed=0)
    print(f"GPT-2 d_model={args.d_model}, {args.layers} layers, {args.heads} heads, float32, NumPy")
    print("| tokens | with cache (tok/s) | without (tok/s) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        cached, a = tokens_per_second(model, length, use_cache=True)
        plain, b = tokens_per_second(model, length, use_cache=False)
        if a != b:
            raise AssertionError(f"cached and uncached generation differ at length {length}")
        print(f"| {length} | {cached:.0f} | {plain:.1f} | {cached / plain:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
