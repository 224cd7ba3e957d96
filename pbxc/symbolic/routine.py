"""A routine: what a printer turns into one function (arguments, temporaries, one result).

The symbolic stage produces routines; the code generators print them (NumPy, C). A routine is
data, not text: a tuple of assignments ``symbol = expression`` in order, then the result.
Constants that differ between float32 and float64 (tolerances scaled to the unit roundoff)
are symbols bound per precision in ``precision_constants``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

_FRESH = itertools.count()


@dataclass(frozen=True)
class PrecisionConstant:
    """A symbol whose value depends on the floating-point type the routine runs in."""

    symbol: sympy.Symbol
    double: float
    single: float
    doc: str = ""


@dataclass(frozen=True)
class Routine:
    name: str
    args: tuple[sympy.Symbol, ...]
    assignments: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    result: sympy.Expr
    precision_constants: tuple[PrecisionConstant, ...] = ()
    doc: str = ""
    # float32 arguments are computed in float64 and the result rounded once to float32: set
    # where the float32 forms cannot meet the float32 accuracy bar (derive.widen_if_needed)
    widen_single: bool = False

    def free_symbols(self) -> set[sympy.Symbol]:
        bound = set(self.args) | {s for s, _ in self.assignments} | {
            c.symbol for c in self.precision_constants}
        used: set[sympy.Symbol] = set(self.result.free_symbols)
        for _, expr in self.assignments:
            used |= expr.free_symbols
        return {s for s in used - bound if isinstance(s, sympy.Symbol)}

    def inline(self, values: Mapping[sympy.Symbol, sympy.Expr], prefix: str = "t"
               ) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], sympy.Expr]:
        """This routine's body with its arguments replaced by ``values``; temporaries renamed."""
        mapping: dict[sympy.Basic, sympy.Expr] = dict(values)
        out: list[tuple[sympy.Symbol, sympy.Expr]] = []
        for sym, expr in self.assignments:
            fresh = sympy.Symbol(f"{prefix}{next(_FRESH)}_{sym.name}", real=True)
            out.append((fresh, expr.xreplace(mapping)))
            mapping[sym] = fresh
        return out, self.result.xreplace(mapping)

    def expand(self) -> sympy.Expr:
        """The result as one expression (temporaries substituted); for tests and reports."""
        mapping: dict[sympy.Basic, sympy.Expr] = {}
        for sym, expr in self.assignments:
            mapping[sym] = expr.xreplace(mapping)
        return self.result.xreplace(mapping)


def merge_constants(groups: Iterable[Iterable[PrecisionConstant]]
                    ) -> tuple[PrecisionConstant, ...]:
    seen: dict[sympy.Symbol, PrecisionConstant] = {}
    for group in groups:
        for c in group:
            seen.setdefault(c.symbol, c)
    return tuple(seen.values())


def bind(routine: Routine, dtype: Any) -> Callable[..., np.ndarray]:
    """``routine`` as a function of arrays, evaluated in ``dtype`` (see ``evaluate.py``)."""
    from pbxc.symbolic.evaluate import run_routine

    def call(*args: np.ndarray) -> np.ndarray:
        return run_routine(routine, args, dtype)

    return call
