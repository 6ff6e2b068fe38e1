r"""What ``refattn conformance`` checks, and what it already knows about each thing checked.

An :class:`Implementation` is one attention function or KV cache of one
third-party library, as a user calls it: the adapter (or the cache factory)
that says refattn's problems in the library's terms, the dtypes it has, the
features it declares (what the check draws), and a probe that measures the
library's own conventions by calling it directly, without the adapter's
mapping. Each adapter module lists its own in ``IMPLEMENTATIONS``; the
registry (:mod:`refattn.testing.conformance.registry`) gathers them.

Every disagreement the check finds is classified where it is met:

- a **convention** the library takes on purpose (an alignment, an empty
  row's output, an lse base) is mapped by the adapter, and then passes;
- a **precision** the library documents is declared as the adapter's
  :class:`~refattn.testing.precision.Precision`, and judged by it;
- a **limit** the library states raises
  :class:`~refattn.testing.Unsupported` with its reason, and is counted;
- a **defect** is what is left: a :class:`Defect`, written up with a
  reproducer that needs only the library and NumPy, the library's own
  documentation or source line, and the float64 hand computation. A failure
  a defect explains is *known*: it is reported, and does not fail the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from refattn.testing.drawing import FEATURES
from refattn.testing.precision import DTYPES
from refattn.testing.report import Failure

#: What an implementation is: an attention function (``check_attention``) or a KV cache
#: (``check_cache``).
KINDS = ("attention", "cache")
#: The verdicts of one implementation in one dtype.
VERDICTS = ("passed", "failed", "unsupported", "unavailable")
#: The conventions a probe measures, each by calling the library directly:
#:
#: - ``alignment``: where causal queries sit when there are fewer queries than
#:   keys (``"bottom-right"``, the KV-cache alignment, or ``"top-left"``);
#: - ``empty_row``: what a query that sees no key gets (``"0"``, ``"NaN"``,
#:   ``"mean of V"``, ...);
#: - ``window``: what the library's window argument keeps, in its own terms;
#: - ``lse``: the log-sum-exp's base and dtype, or ``"not returned"``;
#: - ``scores``: the dtype :math:`q k^T` is formed in for float16 inputs.
CONVENTIONS = ("alignment", "empty_row", "window", "lse", "scores")


@dataclass(frozen=True)
class Implementation:
    """One attention function or KV cache of one library, as ``refattn conformance`` runs it.

    Attributes
    ----------
    name : str
        Unique, as the matrix shows it: ``"onnxruntime Attention (opset 23)"``.
    library : str
        The distribution (its name on PyPI) whose installed version is reported.
    kind : str
        ``"attention"``: ``target`` is an adapter ``fn(problem)`` for
        :func:`~refattn.testing.check_attention`; ``"cache"``: a cache factory
        for :func:`~refattn.testing.check_cache`.
    target : callable
        The adapter or factory. Its ``precision`` and ``constraints``
        attributes, where it has them, are what it is judged by.
    dtypes : tuple of str
        The dtypes the library has for it, each checked on its own.
    features : tuple of str
        For attention, the features (:data:`~refattn.testing.drawing.FEATURES`)
        the adapter declares it expresses: what the check draws. Caches draw
        their own histories; leave it empty.
    requires : tuple of str
        Import names that must be installed for it to run (default: none
        beyond what the adapter itself asks for).
    backend : str
        Where the problem's arrays are made (``"numpy"`` or ``"torch"``).
    gpu : bool
        It runs only on a CUDA GPU: unavailable without one.
    options : mapping
        More keyword arguments for ``check_attention`` or ``check_cache``
        (``window``, ``layers``, ``format``, ``config``, ``cache_kwargs``, ...).
    probe : callable or None
        ``probe()`` measures the library's conventions by calling it
        directly: a mapping from names in :data:`CONVENTIONS` to what it found.
    cannot_express : tuple of str
        What refattn cannot yet say about it (arguments no problem reaches,
        outputs no verdict reads), for the docs page.
    examples : int or None
        The most problems it is given per dtype, where each costs seconds (a
        kernel compiled per problem); None: as many as the run asks.
    """

    name: str
    library: str
    kind: str
    target: Callable[..., Any]
    dtypes: tuple[str, ...]
    features: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    backend: str = "numpy"
    gpu: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    probe: Callable[[], Mapping[str, str]] | None = None
    cannot_express: tuple[str, ...] = ()
    examples: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Implementation.name must not be empty")
        if self.kind not in KINDS:
            raise ValueError(f"Implementation.kind must be one of {KINDS}; got {self.kind!r}")
        if not self.dtypes:
            raise ValueError(f"{self.name}: dtypes must name at least one dtype; got none: "
                             "nothing would be checked")  # fmt: skip
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"{self.name}: dtypes must be among {DTYPES}; got {dtype!r}")
        if self.kind == "attention" and not self.features:
            raise ValueError(f"{self.name}: an attention implementation must declare its "
                             "features; got none")  # fmt: skip
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"{self.name}: unknown features {unknown}; known: {FEATURES}")


@dataclass(frozen=True)
class Defect:
    """A disagreement with the spec that no convention, precision or stated limit explains.

    Attributes
    ----------
    implementation : str
        The :attr:`Implementation.name` it shows in.
    title : str
        One line, as an upstream issue's title.
    matches : callable
        ``matches(failure)`` says whether a failure class
        (:class:`~refattn.testing.Failure`) the check found is this defect.
    reproducer : str
        A script, relative to the repository's ``docs/defects/``, that needs only
        the library and NumPy: it prints the library's output beside the
        float64 hand computation, and exits 1 while the defect is there.
    reference : str
        The library's documentation or source line that says what it should do.
    expected : str
        The float64 hand computation, in a sentence.
    dtypes : tuple of str
        The dtypes it shows in (empty: every dtype).
    """

    implementation: str
    title: str
    matches: Callable[[Failure], bool]
    reproducer: str
    reference: str
    expected: str
    dtypes: tuple[str, ...] = ()

    def explains(self, implementation: str, failure: Failure) -> bool:
        """Whether this defect is the cause of ``failure``, found in ``implementation``."""
        if implementation != self.implementation:
            return False
        if self.dtypes and failure.outcome.dtype not in self.dtypes:
            return False
        return bool(self.matches(failure))
