"""The ``refattn`` command line: a dispatcher over the subcommands.

Each subcommand is a module that declares its own arguments (``HELP``,
``DESCRIPTION``, ``add_arguments``) and runs them (``run``); this module
finds it, and reads the comma-separated lists every subcommand takes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import overload

import refattn

#: Each subcommand and the module that declares and runs it.
COMMANDS = {
    "verify": "refattn.testing.verify_command",
    "bench": "refattn.bench.command",
    "conformance": "refattn.testing.conformance.command",
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the subcommand named."""
    parser = argparse.ArgumentParser(
        prog="refattn", description="The executable specification of attention with a KV cache."
    )
    parser.add_argument("--version", action="version", version=f"refattn {refattn.__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for name, module in modules.items():
        sub = subcommands.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    code: int = modules[args.command].run(args, subcommands.choices[args.command])
    return code


@overload
def comma_separated(text: str) -> list[str]: ...
@overload
def comma_separated(text: None) -> None: ...
def comma_separated(text: str | None) -> list[str] | None:
    """``"a, b"`` as ``["a", "b"]``; None (an option not given) stays None.

    >>> comma_separated("numpy, torch"), comma_separated(None)
    (['numpy', 'torch'], None)
    """
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def comma_separated_ints(text: str) -> list[int]:
    """``"1024, 4096"`` as ``[1024, 4096]``.

    >>> comma_separated_ints("1024, 4096")
    [1024, 4096]
    """
    try:
        return [int(n) for n in comma_separated(text)]
    except ValueError:
        raise ValueError(f"expected comma-separated integers; got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
