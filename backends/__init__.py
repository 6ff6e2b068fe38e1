"""One adapter per array library, installed as ``refattn.backends``.

The registry never imports a framework the user has not asked for: each
adapter names its library and imports it inside its methods, so listing the
backends, or importing refattn, costs nothing and cannot fail because a GPU
library is half-installed. Only testing, benchmarks and the CLI use this
module; the spec itself finds its namespace from its inputs.

``REFATTN_BACKENDS=numpy,torch`` narrows the backends that :func:`selected`
and :func:`cases` return.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from refattn.backends.base import Backend
from refattn.backends.cupy import CupyBackend
from refattn.backends.numpy import NumpyBackend
from refattn.backends.strict import StrictBackend
from refattn.backends.torch import TorchBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (NumpyBackend(), StrictBackend(), TorchBackend(), CupyBackend())
}

__all__ = ["BACKENDS", "Backend", "Case", "cases", "get", "selected"]


class Case(NamedTuple):
    """One (backend, device, dtype) combination the spec can run in."""

    backend: Backend
    device: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.backend.name}-{self.device}-{self.dtype}"


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}; got {name!r}") from None


def selected() -> list[Backend]:
    """The backends named by ``REFATTN_BACKENDS`` (all when unset), available or not."""
    names = os.environ.get("REFATTN_BACKENDS", "").strip()
    if not names:
        return list(BACKENDS.values())
    return [get(n.strip()) for n in names.split(",") if n.strip()]


def cases() -> list[Case]:
    """Every (backend, device, dtype) the selected, available backends can run."""
    return [
        Case(b, device, dtype)
        for b in selected()
        if b.available()
        for device in b.devices()
        for dtype in b.dtypes(device)
    ]
