"""``refattn conformance``: every attention kernel and KV cache installed, checked against the spec.

:mod:`.implementations` says what is checked (:class:`Implementation`) and
what is known (:class:`Defect`); the adapter modules of
:mod:`refattn.testing.adapters` list their own implementations.
"""

from refattn.testing.conformance.implementations import (
    CONVENTIONS,
    KINDS,
    VERDICTS,
    Defect,
    Implementation,
)

__all__ = ["CONVENTIONS", "KINDS", "VERDICTS", "Defect", "Implementation"]
