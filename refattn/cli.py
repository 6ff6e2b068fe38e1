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
    parser.error(f"unknown command {args.command!r}")
    return 2


def _names(text: str | None) -> list[str] | None:
    """``"a, b"`` as ``["a", "b"]``; None stays None."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


if __name__ == "__main__":
    sys.exit(main())
