"""``refattn bench``: its command-line arguments, and the run they ask for."""

from __future__ import annotations

import argparse

from refattn.cli import comma_separated, comma_separated_ints

HELP = (
    "time decode steps, prefills and prefills' backward against PyTorch SDPA and the memory "
    "bandwidth"
)
DESCRIPTION = (
    "Time refattn.attention and refattn.attention_blockwise on each backend against PyTorch "
    "SDPA and a plain torch matmul-softmax-matmul, on the same data, and against the device's "
    "measured memory bandwidth (see refattn.bench). --mode backward times "
    "refattn.attention_backward and refattn.attention_backward_blockwise on the prefill shapes "
    "against torch's autograd of the same two peers. Every size option takes comma-separated "
    "values; the grid is every combination."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn bench``."""
    parser.add_argument(
        "--mode",
        default="decode,prefill",
        help="comma-separated: decode, prefill, backward (the prefill shapes' gradients, "
        "given the saved forward)",
    )
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes B")
    parser.add_argument("--q-heads", default="32", help="decode: query heads Hq")
    parser.add_argument("--kv-heads", default="8", help="decode: key/value heads Hkv")
    parser.add_argument("--head-dim", default="128", help="decode: head dimension D")
    parser.add_argument("--seq-lens", default="1024,4096,16384", help="decode: cache lengths S")
    parser.add_argument(
        "--prefill-heads", default="16", help="prefill and backward: heads (Hq = Hkv)"
    )
    parser.add_argument(
        "--prefill-head-dim", default="64", help="prefill and backward: head dimension D"
    )
    parser.add_argument(
        "--prefill-seq-lens", default="2048", help="prefill and backward: sequence lengths S"
    )
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes")
    parser.add_argument(
        "--backends",
        help="comma-separated backends (default: every available one but array_api_strict, "
        "which runs only when named)",
    )
    parser.add_argument(
        "--block-k",
        type=int,
        default=512,
        help="block_k of attention_blockwise and attention_backward_blockwise",
    )
    parser.add_argument(
        "--block-q",
        type=int,
        help="block_q of attention_blockwise and attention_backward_blockwise (default: --block-k)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bandwidth-mib",
        type=int,
        help="bandwidth buffer size (default: 4x the largest K+V, at least 64 MiB)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write rows, bandwidths and machine")
    parser.add_argument(
        "--plot", metavar="PATH", help="time per decode step against S (needs matplotlib)"
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the grid and the settings before anything is timed, then time them."""
    from refattn.backends import get
    from refattn.bench.run import main
    from refattn.bench.shapes import Grid, Settings

    try:
        grid = Grid(
            modes=comma_separated(args.mode),
            batch=comma_separated_ints(args.batch),
            q_heads=comma_separated_ints(args.q_heads),
            kv_heads=comma_separated_ints(args.kv_heads),
            head_dims=comma_separated_ints(args.head_dim),
            seq_lens=comma_separated_ints(args.seq_lens),
            prefill_heads=comma_separated_ints(args.prefill_heads),
            prefill_head_dims=comma_separated_ints(args.prefill_head_dim),
            prefill_seq_lens=comma_separated_ints(args.prefill_seq_lens),
            dtypes=comma_separated(args.dtypes),
        )
        grid.shapes()  # a bad grid or setting fails here, before anything is timed
        settings = Settings(
            block_q=args.block_q, block_k=args.block_k, repeats=args.repeats,
            warmup=args.warmup, seed=args.seed, bandwidth_mib=args.bandwidth_mib,
        )  # fmt: skip
        backends = comma_separated(args.backends)
        for name in backends or []:
            get(name)
    except ValueError as error:
        parser.error(str(error))
    return main(grid, settings, backends=backends, json_path=args.json, plot_path=args.plot)
