"""What a candidate's kernel requires of a problem, so that only such problems are drawn.

Real kernels take a part of what attention means: flash-attn wants a head dim
of at most 256 and ``Dv == D``, some kernels only causal attention or
``Sq == Sk`` without it, a decode kernel at least as many keys in each row as
queries, an fp8 kernel a head dim that is a multiple of 16. A check that
draws everything and lets the candidate refuse most of it spends its budget
on refusals and tests the rest thinly. A candidate declares its
:class:`Constraints` instead (its ``constraints`` attribute, or the
``constraints`` argument of ``check_attention``), and the drawing makes only
problems that meet them: head dims, value dims, lengths and positions are
chosen inside them, and what cannot be chosen ahead (a row left with no key
by a random mask) is repaired or, rarely, redrawn.

>>> from refattn.testing.constraints import Constraints
>>> from refattn.testing.problems import ProblemSpec
>>> flash = Constraints(max_head_dim=256, same_value_dim=True)
>>> flash.allows(ProblemSpec(head_dim=64, value_dim=64)), flash.allows(ProblemSpec(value_dim=3))
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from refattn.options import check_integer
from refattn.testing.problems import ProblemSpec, build_problem, visible_keys


@dataclass(frozen=True)
class Constraints:
    """What a kernel requires; every field's default requires nothing.

    Attributes
    ----------
    head_dim_multiple : the head dim D (and Dv) is a multiple of this
    max_head_dim : D and Dv are at most this
    same_value_dim : Dv == D
    square_unless_causal : Sq == Sk for every problem that is not causal
    keys_cover_queries : every row holds at least Sq keys (and Sk >= Sq)
    causal_only : every problem is causal
    no_empty_rows : every query sees at least one key
    """

    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    same_value_dim: bool = False
    square_unless_causal: bool = False
    keys_cover_queries: bool = False
    causal_only: bool = False
    no_empty_rows: bool = False

    def __post_init__(self) -> None:
        check_integer("Constraints.head_dim_multiple", self.head_dim_multiple, minimum=1)
        if self.max_head_dim is not None:
            check_integer("Constraints.max_head_dim", self.max_head_dim,
                          minimum=self.head_dim_multiple,
                          why=" (head_dim_multiple: no head dim would be left)")  # fmt: skip
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"Constraints.{f.name} must be True or False; got {value!r}")

    def head_dims(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        """The head dims of ``dims`` these constraints allow, or (when none is) the
        multiples of ``head_dim_multiple`` closest to them, in the same order.

        >>> Constraints(head_dim_multiple=16, max_head_dim=64).head_dims((8, 1, 16, 40, 64, 80))
        (16, 64)
        >>> Constraints(head_dim_multiple=96).head_dims((8, 64, 128))
        (96,)
        """
        allowed = tuple(d for d in dims if self._allows_dim(d))
        if allowed:
            return allowed
        m, top = self.head_dim_multiple, self.max_head_dim or max(dims)
        rounded = dict.fromkeys(max(m, min(-(-d // m) * m, top // m * m)) for d in dims)
        return tuple(rounded)

    def _allows_dim(self, d: int) -> bool:
        return d % self.head_dim_multiple == 0 and (
            self.max_head_dim is None or d <= self.max_head_dim
        )

    def allows(self, spec: ProblemSpec) -> bool:
        """Whether ``spec``'s problem meets every constraint (the arrays are built for
        ``keys_cover_queries`` and ``no_empty_rows``, which depend on positions)."""
        s = spec
        if not (self._allows_dim(s.head_dim) and self._allows_dim(s.value_dim)):
            return False
        if self.same_value_dim and s.value_dim != s.head_dim:
            return False
        if self.causal_only and not s.causal:
            return False
        if self.square_unless_causal and not s.causal and s.q_len != s.k_len:
            return False
        if not (self.keys_cover_queries or self.no_empty_rows):
            return True
        problem = build_problem(spec)
        if self.keys_cover_queries:
            held = (problem.k_pos >= 0).sum(axis=-1)  # (B,)
            if s.k_len < s.q_len or bool((held < s.q_len).any()):
                return False
        if self.no_empty_rows:
            return bool(np.all(visible_keys(problem).any(axis=-1)))
        return True

    def requirements(self) -> dict[str, Any]:
        """The constraints that require something, by name (for a report)."""
        default = Constraints()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}  # fmt: skip


#: A kernel that takes every problem.
ANY = Constraints()


def constraints_of(candidate: Any, constraints: Constraints | None) -> Constraints:
    """The constraints a candidate is drawn under: the ones given, else the ones it declares
    as its ``constraints`` attribute, else none."""
    chosen = constraints if constraints is not None else getattr(candidate, "constraints", ANY)
    if not isinstance(chosen, Constraints):
        raise TypeError(
            f"constraints must be a refattn.testing.constraints.Constraints; got {chosen!r}"
        )
    return chosen
