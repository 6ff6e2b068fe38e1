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
    verify.add_argument("--problems", type=int, default=100, help="attention problems per case")
    verify.add_argument("--sequences", type=int, default=30, help="chunked sequences per case")
    verify.add_argument(
        "--histories", type=int, default=10, help="decoding histories per cache kind and case"
    )
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument(
        "--backends", help="comma-separated backends to run (default: REFATTN_BACKENDS or all)"
    )
    args = parser.parse_args(argv)

    if args.command == "verify":
        from refattn import verify as verify_module

        if args.backends:
            os.environ["REFATTN_BACKENDS"] = args.backends
        return verify_module.main(
            problems=args.problems,
            sequences=args.sequences,
            histories=args.histories,
            seed=args.seed,
        )
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
