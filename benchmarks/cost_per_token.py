"""Time per generated token against position, with the KV cache and without, on NumPy.

For a small GPT-2 (``refattn.models.GPT``) and each position s of a
geometric sweep, this times the step that produces token s + 1:

* with a cache: one decode step, the new token against s cached keys, O(s);
* without: a full forward pass over all s + 1 tokens, O(s^2).

Each time is the median of ``--repeats`` calls. ``--plot PATH`` draws both
against s on log-log axes, with s and s^2 guide lines: the figure the docs
show for the O(s^2) to O(s) argument.

    OPENBLAS_NUM_THREADS=1 python benchmarks/cost_per_token.py \
        --plot docs/figures/cost_per_token.png
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

from refattn.bench import time_calls
from refattn.models import GPT, GPTConfig


def median_ms(step: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls, by ``time_calls``. No warm-up: a call
    with the cache appends a token, so each call must be one of the timed steps."""
    return time_calls(step, lambda: None, repeats=repeats, warmup=0)[0] * 1e3


def sweep(model: GPT, positions: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """(s, ms per token with the cache, ms per token without) for each position s."""
    rows = []
    for s in positions:
        prompt = [[(7 * i) % 256 for i in range(s)]]
        caches = model.new_caches("static", batch=1, max_len=s + repeats + 1)
        model(prompt, caches)  # the cache holds s tokens

        # Each call appends one token, so the calls see s to s + repeats - 1 keys.
        cached = median_ms(partial(model, [[1]], caches), repeats)
        uncached = median_ms(partial(model, [prompt[0] + [1]]), repeats)
        rows.append((s, cached, uncached))
        print(f"| {s} | {cached:.2f} | {uncached:.2f} | {uncached / cached:.1f}x |", flush=True)
    return rows


def plot(rows: list[tuple[int, float, float]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    s = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(s, [r[1] for r in rows], "o-", label="with the KV cache (one decode step)")
    ax.loglog(s, [r[2] for r in rows], "s-", label="without (a full pass over s tokens)")
    for power, name in ((1, "s"), (2, "s²")):
        anchor = rows[-1][2] if power == 2 else rows[-1][1]
        ax.loglog(s, [anchor * (x / s[-1]) ** power for x in s], ":", color="gray")
        ax.annotate(name, (s[len(s) // 2], anchor * (s[len(s) // 2] / s[-1]) ** power))
    ax.set_xlabel("position s of the generated token")
    ax.set_ylabel("time per token (ms)")
    ax.set_title("GPT-2 (d=64, 2 layers) on NumPy: cost per generated token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+",
                        default=[16, 32, 64, 128, 256, 512, 1024, 2048])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)
    longest = max(args.positions) + args.repeats + 2
    config = GPTConfig(vocab_size=256, n_positions=longest, d_model=64, n_layer=2, n_head=4)
    model = GPT.random(config, seed=0)
    print("| position s | with cache (ms/token) | without (ms/token) | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    rows = sweep(model, args.positions, args.repeats)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
