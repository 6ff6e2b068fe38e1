"""Slot diagrams of every cache kind, drawn from the cache classes themselves.

Each figure drives a real cache through a short schedule of updates and draws
what its storage holds after each one: a row per update, a column per slot,
each cell the position the slot holds (blank when it holds none, ``k_pos =
-1``). Cells written by that update are outlined. Nothing is drawn by hand,
so a figure changes when a cache's layout does.

    python docs/figures/cache_figures.py OUT_DIR

``make docs`` runs it (from ``docs/conf.py``) before the pages are read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

import refattn

Step = tuple[int, list[int]]  # (T new tokens, real ones per row)
EMPTY = "#eeeeee"


def _update(cache: refattn.KVCache, T: int, n_new: Sequence[int]) -> None:
    B, H, D = cache.batch, cache.kv_heads, cache.head_dim
    x = np.ones((B, H, T, D), dtype=np.float32)
    cache.update(x, x, n_new=list(n_new))


def _storage_positions(cache: refattn.KVCache) -> np.ndarray:
    """(B, slots) position held by each storage slot, -1 for none."""
    return np.array(cache.positions, dtype=np.int64, copy=True)


def record(cache: refattn.KVCache, schedule: Sequence[Step]) -> list[tuple[str, np.ndarray]]:
    """Run the schedule; after each update, the label and the storage positions."""
    frames = []
    for T, n_new in schedule:
        _update(cache, T, n_new)
        frames.append((f"+{T} ({', '.join(map(str, n_new))})", _storage_positions(cache)))
    return frames


def draw_rows(
    ax: Axes, frames: list[tuple[str, np.ndarray]], row: int, width: int, title: str
) -> None:
    """One batch row's slots over time: update i is row i of the grid."""
    cmap = plt.get_cmap("viridis")
    top = max(int(f[row].max()) for _, f in frames) + 1
    previous = np.full(width, -1)
    for i, (_, positions) in enumerate(frames):
        held = np.full(width, -1)
        held[: positions.shape[1]] = positions[row]
        for slot, p in enumerate(held):
            colour = EMPTY if p < 0 else cmap(0.15 + 0.75 * p / max(top, 1))
            ax.add_patch(Rectangle((slot, i), 1, 1, facecolor=colour, edgecolor="white"))
            if p >= 0:
                ax.text(
                    slot + 0.5,
                    i + 0.5,
                    str(p),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if p < 0.6 * top else "black",
                )
            if p >= 0 and p != previous[slot]:  # written by this update
                ax.add_patch(
                    Rectangle(
                        (slot + 0.04, i + 0.04),
                        0.92,
                        0.92,
                        fill=False,
                        edgecolor="#d62728",
                        linewidth=1.6,
                    )
                )
        previous = held
    _axes(ax, [label for label, _ in frames], width, title)


def _axes(ax: Axes, labels: list[str], width: int, title: str) -> None:
    ax.set_xlim(0, width)
    ax.set_ylim(len(labels), 0)
    ax.set_xticks(np.arange(width) + 0.5, [str(s) for s in range(width)], fontsize=7)
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=7)
    ax.set_xlabel("slot")
    ax.set_title(title, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def figure_rows(
    name: str, out: Path, frames: list[tuple[str, np.ndarray]], rows: int, suptitle: str
) -> Path:
    width = max(f.shape[1] for _, f in frames)
    size = (max(6.4, 1.2 + 0.42 * width * rows), 1.1 + 0.3 * len(frames))
    fig, axes = plt.subplots(1, rows, figsize=size, squeeze=False, layout="constrained")
    for b in range(rows):
        draw_rows(axes[0, b], frames, b, width, f"row {b}")
    axes[0, 0].set_ylabel("update: +T (real tokens per row)", fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, out / f"{name}.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RAGGED: list[Step] = [(4, [4, 2]), (1, [1, 1]), (1, [1, 0]), (2, [2, 1]), (1, [1, 1])]


def static(out: Path) -> Path:
    cache = refattn.StaticCache(batch=2, kv_heads=1, head_dim=2, max_len=10)
    frames = record(cache, RAGGED)
    return figure_rows(
        "static", out, frames, 2, "StaticCache(max_len=10): position p in slot p, written in place"
    )


def dynamic(out: Path) -> Path:
    cache = refattn.DynamicCache(batch=2, kv_heads=1, head_dim=2)
    frames = record(cache, RAGGED)
    return figure_rows(
        "dynamic",
        out,
        frames,
        2,
        "DynamicCache: every update concatenates T slots; padding stays as holes",
    )


def sliding(out: Path) -> Path:
    cache = refattn.SlidingWindowCache(batch=1, kv_heads=1, head_dim=2, window=5, sink_tokens=2)
    frames = record(cache, [(3, [3])] + [(1, [1])] * 10)
    return figure_rows(
        "sliding",
        out,
        frames,
        1,
        "SlidingWindowCache(window=5, sink_tokens=2): slots 0-1 keep the sinks,\n"
        "slot 2 + (p - 2) mod 5 holds position p",
    )


def quantized(out: Path) -> Path:
    cache = refattn.QuantizedCache(batch=1, kv_heads=1, head_dim=64, max_len=10, bits=8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 6, 64)).astype(np.float32)
    x[0, 0, 3, 7] = 8.0  # one token with an outlier channel
    k, _, _ = cache.update(x, x)
    error = np.abs(np.asarray(k) - x).max(axis=-1)[0, 0]  # (6,)
    bound = np.abs(x).max(axis=-1)[0, 0] / (2 * cache.q_max)
    fig, ax = plt.subplots(figsize=(6.0, 2.8), layout="constrained")
    slots = np.arange(6)
    ax.bar(slots - 0.2, error, width=0.4, label=r"max$_d\,|x_d - \hat x_d|$ measured")
    ax.bar(slots + 0.2, bound, width=0.4, label=r"bound $\max_d |x_d| / (2 q_{max})$")
    ax.set_xticks(slots, [f"slot {s}\npos {s}" for s in slots], fontsize=7)
    ax.set_ylabel("abs. error of the key")
    ax.set_title(
        "QuantizedCache(bits=8): error per token, one scale per token and head\n"
        "(token 3 has an outlier channel: only its own scale, and error, grow)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return _save(fig, out / "quantized.png")


def cross(out: Path) -> Path:
    cache = refattn.CrossAttentionCache(batch=2, kv_heads=1, head_dim=2)
    x = np.ones((2, 1, 5, 2), dtype=np.float32)
    frames = []
    cache.update(x, x, n_new=[5, 3])
    frames.append(("store (5, 3)", _storage_positions(cache)))
    for step in range(3):
        cache.update(None, None)
        frames.append((f"decode {step + 1}: reuse", _storage_positions(cache)))
    return figure_rows(
        "cross",
        out,
        frames,
        2,
        "CrossAttentionCache: the encoder's keys, stored once, reused every step",
    )


def paged(out: Path) -> Path:
    """The block pool, slot by slot: which row and position each physical slot holds."""
    bs, n_blocks = 3, 8
    cache = refattn.PagedCache(
        batch=2,
        kv_heads=1,
        head_dim=2,
        block_size=bs,
        num_blocks=n_blocks,
        block_order=[2, 5, 0, 7, 1, 4, 6, 3],
    )
    labels, pools, tables = [], [], []

    def snap(label: str) -> None:
        pool = np.full((n_blocks * bs, 2), -1)  # (slot, (row, position))
        for b, table in enumerate(cache.block_table):
            length = int(cache.lengths[b])
            for i, block in enumerate(table):
                for offset in range(bs):
                    p = i * bs + offset
                    if p < length:  # a slot two rows hold is shared: drawn as row 2
                        held = pool[block * bs + offset, 0]
                        pool[block * bs + offset] = (b if held < 0 else 2, p)
        labels.append(label)
        pools.append(pool)
        tables.append(" ".join(str(t) for t in cache.block_table))

    _update(cache, 4, [4, 2])
    snap("+4 (4, 2)")
    _update(cache, 1, [1, 1])
    snap("+1 (1, 1)")
    cache.fork(0, 1)
    snap("fork(0, 1)")
    _update(cache, 1, [1, 1])
    snap("+1 (1, 1): copy on write")
    cache.release(0)
    snap("release(0)")
    _update(cache, 2, [0, 2])
    snap("+2 (0, 2)")
    return _save(_draw_pool(labels, pools, tables, bs, n_blocks), out / "paged.png")


def _draw_pool(
    labels: list[str], pools: list[np.ndarray], tables: list[str], bs: int, n_blocks: int
) -> plt.Figure:
    """The pool after each step: a row of slots per step, coloured by the row holding it."""
    width = n_blocks * bs
    fig, ax = plt.subplots(
        figsize=(1.6 + 0.42 * width, 1.2 + 0.36 * len(labels)), layout="constrained"
    )
    colours = ["#1f77b4", "#ff7f0e", "#9467bd"]
    for i, pool in enumerate(pools):
        for slot, (b, p) in enumerate(pool):
            face = EMPTY if b < 0 else colours[b]
            ax.add_patch(Rectangle((slot, i), 1, 1, facecolor=face, edgecolor="white"))
            if b >= 0:
                ax.text(
                    slot + 0.5, i + 0.5, str(p), ha="center", va="center", fontsize=8, color="white"
                )
        ax.text(width + 0.3, i + 0.5, f"tables {tables[i]}", va="center", fontsize=7)
    for block in range(1, n_blocks):
        ax.axvline(block * bs, color="black", linewidth=1.2)
    _axes(ax, labels, width, "")
    ax.set_xticks(
        [b * bs + bs / 2 for b in range(n_blocks)],
        [f"block {b}" for b in range(n_blocks)],
        fontsize=7,
    )
    ax.set_xlabel(
        "the pool, blocks of 3 slots: blue row 0, orange row 1, purple shared by both; "
        "the number is the position held"
    )
    ax.set_title(
        "PagedCache(block_size=3, num_blocks=8): each row's block table maps "
        "position p to slot p % 3 of block table[p // 3]",
        fontsize=9,
    )
    ax.set_xlim(0, width + 7)
    return fig


FIGURES = (static, dynamic, sliding, paged, quantized, cross)


def main(argv: Sequence[str]) -> list[Path]:
    if len(argv) != 1:
        raise SystemExit("usage: python docs/figures/cache_figures.py OUT_DIR")
    out = Path(argv[0])
    return [draw(out) for draw in FIGURES]


if __name__ == "__main__":
    for path in main(sys.argv[1:]):
        print(path)
