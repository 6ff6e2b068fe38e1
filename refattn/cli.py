"""The ``refattn`` command line."""

from __future__ import annotations

import argparse
import os
import sys

import refattn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="refattn",
        description="The executable specification of attention with a KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"refattn {refattn.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="run the spec on every available backend and dtype against the loop oracle",
    )
    verify.add_argument(
        "--examples",
        type=int,
        help="problems per case (sets --problems; with --candidate, Hypothesis examples per "
        "dtype, default 200)",
    )
    verify.add_argument("--problems", type=int, default=100, help="attention problems per case")
    verify.add_argument("--sequences", type=int, default=30, help="chunked sequences per case")
    verify.add_argument(
        "--histories", type=int, default=10, help="decoding histories per cache kind and case"
    )
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument(
        "--backends",
        help="comma-separated backends to run (default: REFATTN_BACKENDS or all; "
        "with --candidate, numpy)",
    )
    verify.add_argument(
        "--dtypes", help="comma-separated dtypes (default: all; with --candidate, float32)"
    )
    verify.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    verify.add_argument(
        "--candidate",
        metavar="MODULE:FUNCTION",
        help="check a third-party attention function fn(problem) with check_attention "
        "instead of the spec (e.g. refattn.testing.adapters:torch_sdpa)",
    )
    verify.add_argument(
        "--features", help="with --candidate: comma-separated features to draw (default: all)"
    )
    bench = commands.add_parser(
        "bench",
        help="time decode steps and prefills against PyTorch SDPA and the memory bandwidth",
        description="Time refattn.attention and refattn.attention_blockwise on each backend "
        "against PyTorch SDPA and a plain torch matmul-softmax-matmul, on the same data, and "
        "against the device's measured memory bandwidth (see refattn.bench). Every size "
        "option takes comma-separated values; the grid is every combination.",
    )
    bench.add_argument("--mode", default="decode,prefill", help="decode, prefill or both")
    bench.add_argument("--batch", default="1", help="comma-separated batch sizes B")
    bench.add_argument("--q-heads", default="32", help="decode: query heads Hq")
    bench.add_argument("--kv-heads", default="8", help="decode: key/value heads Hkv")
    bench.add_argument("--head-dim", default="128", help="decode: head dimension D")
    bench.add_argument("--seq-lens", default="1024,4096,16384", help="decode: cache lengths S")
    bench.add_argument("--prefill-heads", default="16", help="prefill: heads (Hq = Hkv)")
    bench.add_argument("--prefill-head-dim", default="64", help="prefill: head dimension D")
    bench.add_argument("--prefill-seq-lens", default="2048", help="prefill: sequence lengths S")
    bench.add_argument("--dtypes", default="float32", help="comma-separated dtypes")
    bench.add_argument(
        "--backends",
        help="comma-separated backends (default: every available one but array_api_strict, "
        "which runs only when named)",
    )
    bench.add_argument("--block-k", type=int, default=512, help="attention_blockwise's block_k")
    bench.add_argument(
        "--block-q", type=int, help="attention_blockwise's block_q (default: --block-k)"
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--bandwidth-mib",
        type=int,
        help="bandwidth buffer size (default: 4x the largest K+V, at least 64 MiB)",
    )
    bench.add_argument("--json", metavar="PATH", help="also write rows, bandwidths and machine")
    bench.add_argument(
        "--plot", metavar="PATH", help="time per decode step against S (needs matplotlib)"
    )
    args = parser.parse_args(argv)

    if args.command == "verify":
        from refattn import verify as verify_module

        dtypes = _names(args.dtypes)
        if args.candidate:
            return verify_module.check_candidate(
                args.candidate,
                backends=_names(args.backends) or ["numpy"],
                dtypes=None if dtypes is None else tuple(dtypes),
                examples=args.examples or 200,
                features=_names(args.features),
                seed=args.seed,
                json_path=args.json,
            )
        if args.backends:
            os.environ["REFATTN_BACKENDS"] = args.backends
        return verify_module.main(
            problems=args.examples or args.problems,
            sequences=args.sequences,
            histories=args.histories,
            seed=args.seed,
            dtypes=None if dtypes is None else tuple(dtypes),
            json_path=args.json,
        )
    if args.command == "bench":
        from refattn import bench as bench_module
        from refattn.backends import get as get_backend

        try:
            grid = bench_module.Grid(
                modes=_names(args.mode) or [],
                batch=_ints(args.batch),
                q_heads=_ints(args.q_heads),
                kv_heads=_ints(args.kv_heads),
                head_dims=_ints(args.head_dim),
                seq_lens=_ints(args.seq_lens),
                prefill_heads=_ints(args.prefill_heads),
                prefill_head_dims=_ints(args.prefill_head_dim),
                prefill_seq_lens=_ints(args.prefill_seq_lens),
                dtypes=_names(args.dtypes) or [],
            )
            grid.shapes()  # a bad grid or setting fails here, before anything is timed
            settings = bench_module.Settings(
                block_q=args.block_q, block_k=args.block_k, repeats=args.repeats,
                warmup=args.warmup, seed=args.seed, bandwidth_mib=args.bandwidth_mib,
            )  # fmt: skip
            backends = _names(args.backends)
            for name in backends or []:
                get_backend(name)
        except ValueError as error:
            parser.error(str(error))
        return bench_module.main(
            grid, settings, backends=backends, json_path=args.json, plot_path=args.plot
        )
    parser.error(f"unknown command {args.command!r}")
    return 2


def _names(text: str | None) -> list[str] | None:
    """``"a, b"`` as ``["a", "b"]``; None stays None."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def _ints(text: str) -> list[int]:
    """``"1024, 4096"`` as ``[1024, 4096]``."""
    try:
        return [int(n) for n in _names(text) or []]
    except ValueError:
        raise ValueError(f"expected comma-separated integers; got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
