"""Every implementation ``refattn conformance`` knows, and every defect found in one.

Each adapter module of :mod:`refattn.testing.adapters` lists its own
``IMPLEMENTATIONS`` and ``DEFECTS``; this module gathers them, in the order
of :data:`ADAPTER_MODULES`. The modules import no third-party library when
imported (each adapter imports its own when called), so gathering is cheap
wherever nothing is installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from refattn.testing.conformance.implementations import Defect, Implementation

#: The adapter modules, each with its ``IMPLEMENTATIONS`` and ``DEFECTS``, in the matrix's order.
ADAPTER_MODULES = (
    "refattn.testing.adapters.pytorch",
    "refattn.testing.adapters.hf",
    "refattn.testing.adapters.hf_caches",
    "refattn.testing.adapters.jax_attention",
    "refattn.testing.adapters.onnx_attention",
    "refattn.testing.adapters.onnxruntime_contrib",
    "refattn.testing.adapters.flash",
    "refattn.testing.adapters.flashinfer_kernels",
)


def implementations(modules: Iterable[str] | None = None) -> tuple[Implementation, ...]:
    """Every module's ``IMPLEMENTATIONS``, in order; two of one name are an error.

    >>> names = [i.name for i in implementations()]
    >>> "PyTorch SDPA (math)" in names, len(names) == len(set(names))
    (True, True)
    """
    found: dict[str, Implementation] = {}
    for module in ADAPTER_MODULES if modules is None else modules:
        for implementation in importlib.import_module(module).IMPLEMENTATIONS:
            if implementation.name in found:
                raise ValueError(f"two implementations are named {implementation.name!r}")
            found[implementation.name] = implementation
    return tuple(found.values())


def defects(modules: Iterable[str] | None = None) -> tuple[Defect, ...]:
    """Every module's ``DEFECTS``; each must name an implementation that exists."""
    chosen = tuple(ADAPTER_MODULES if modules is None else modules)
    names = {i.name for i in implementations(chosen)}
    every = tuple(d for module in chosen for d in importlib.import_module(module).DEFECTS)
    for defect in every:
        if defect.implementation not in names:
            raise ValueError(f"defect {defect.title!r} names {defect.implementation!r}, "
                             "which no adapter module lists")  # fmt: skip
    return every


def select(every: Iterable[Implementation], only: Iterable[str] | None) -> list[Implementation]:
    """The implementations ``--only`` names: each name, case aside, is an implementation's
    name, its library, or a part of its name; a name that matches none is an error.

    >>> every = implementations(["refattn.testing.adapters.pytorch"])
    >>> [i.name for i in select(every, ["flexattention (eager)"])]
    ['PyTorch FlexAttention (eager)']
    >>> select(every, ["nonesuch"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --only 'nonesuch' names no implementation; known: PyTorch SDPA, ...
    """
    every = list(every)
    if only is None:
        return every
    wanted = [name.strip() for name in only if name.strip()]
    if not wanted:
        raise ValueError("--only names nothing: nothing would be checked")
    chosen: list[Implementation] = []
    for name in wanted:
        key = name.lower()
        exact = [i for i in every if key in (i.name.lower(), i.library.lower())]
        matches = exact or [i for i in every if key in i.name.lower()]
        if not matches:
            known = ", ".join(i.name for i in every)
            raise ValueError(f"--only {name!r} names no implementation; known: {known}")
        chosen += [i for i in matches if i not in chosen]
    return chosen
