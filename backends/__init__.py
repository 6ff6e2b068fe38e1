"""One adapter per array library, installed as ``refattn.backends``.

The registry never imports a framework the user has not asked for: each
adapter names its library and imports it inside its methods, so listing the
backends, or importing refattn, costs nothing and cannot fail because a GPU
library is half-installed. Only testing, benchmarks and the CLI use this
module (the models, only its :func:`to_numpy`); the spec itself finds its
namespace from its inputs.

``REFATTN_BACKENDS=numpy,torch`` narrows the backends that :func:`selected`
and :func:`cases` return when they are not given names. :func:`to_numpy` is
the one way any library's array comes back to NumPy: through the adapter of
the library the array belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from refattn.backends.base import Backend
from refattn.backends.cupy import CupyBackend
from refattn.backends.jax import JaxBackend
from refattn.backends.numpy import NumpyBackend
from refattn.backends.strict import StrictBackend
from refattn.backends.torch import TorchBackend

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (NumpyBackend(), StrictBackend(), TorchBackend(), JaxBackend(), CupyBackend())
}

#: Backends that the test matrix runs only when named (``REFATTN_BACKENDS=jax``, a pass of
#: its own in ``make test``): JAX compiles every program anew for each shape it meets, and a
#: property test meets a new shape with almost every example, so a run over it takes minutes
#: where NumPy takes seconds. ``refattn verify`` runs them by default, on a part of its
#: problems (:attr:`~refattn.backends.base.Backend.verify_share`).
OPT_IN = ("jax",)

__all__ = [
    "BACKENDS",
    "OPT_IN",
    "Backend",
    "Case",
    "backend_of",
    "cases",
    "get",
    "selected",
    "to_numpy",
]


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


def selected(names: Iterable[str] | None = None, *, opt_in: bool = False) -> list[Backend]:
    """The backends ``names`` (default: ``REFATTN_BACKENDS``, or when it is unset all of
    them, but those of :data:`OPT_IN` only if ``opt_in``), available or not.

    >>> [b.name for b in selected(["numpy", "torch"])]
    ['numpy', 'torch']
    """
    if names is None:
        names = os.environ.get("REFATTN_BACKENDS", "").split(",")
    chosen = [get(n.strip()) for n in names if n.strip()]
    return chosen or [b for b in BACKENDS.values() if opt_in or b.name not in OPT_IN]


def cases(names: Iterable[str] | None = None, *, opt_in: bool = False) -> list[Case]:
    """Every (backend, device, dtype) the selected, available backends can run."""
    return [
        Case(b, device, dtype)
        for b in selected(names, opt_in=opt_in)
        if b.available()
        for device in b.devices()
        for dtype in b.dtypes(device)
    ]


def backend_of(x: Any) -> Backend | None:
    """The adapter of the library ``x`` belongs to, or None for a library refattn has none for."""
    library = type(x).__module__.split(".")[0]
    return next((b for b in BACKENDS.values() if b.module == library), None)


def to_numpy(x: Any) -> np.ndarray:
    """Any library's array as a NumPy array, through its adapter (bfloat16 comes back as
    float32, exactly); an array of another library goes through ``numpy.asarray``.

    >>> to_numpy([1.5, 2.0])
    array([1.5, 2. ])
    """
    backend = backend_of(x)
    return np.asarray(x) if backend is None else backend.to_numpy(x)
