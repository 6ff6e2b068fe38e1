"""Which third-party libraries are installed, and their versions, asked without importing them.

The adapters import their library only when called, so that
``refattn.testing`` stays importable, and cheap, where none is installed;
what they ask first is whether it is there at all.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from refattn.testing.candidate import Unavailable


def require(library: str) -> None:
    """:class:`~refattn.testing.candidate.Unavailable` where ``library`` is not installed."""
    if importlib.util.find_spec(library) is None:
        raise Unavailable(f"{library} is not installed")


def version_of(distribution: str) -> str:
    """The installed version of ``distribution`` (its name on PyPI), or "" where it is absent.

    >>> version_of("numpy") != "", version_of("no-such-distribution-here")
    (True, '')
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""
