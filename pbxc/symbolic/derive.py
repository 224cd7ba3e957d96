"""The public entry: ``derive(key, definitions) -> ActivationCalculus``, cached per expression.

Everything is derived from the activation's one sympy expression (``activations.py``) by
``calculus.derive_calculus``: f, f', f'', kinks, the DFD multiplier (seed 004, eq. 16-17). A
user-defined activation is also measured on a coarse accuracy grid when it is first derived;
where it misses the bar, pbxc compiles it anyway and warns (:class:`AccuracyWarning`) with the
accuracy it does reach.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import sympy

from pbxc.errors import UnsupportedOp
from pbxc.ops import BUILTIN_ACTIVATIONS
from pbxc.parse import ast
from pbxc.symbolic import budget
from pbxc.symbolic.accuracy import Measure, Reference, measure_multiplier, z0_grid
from pbxc.symbolic.activations import ActivationKey, Z, activation_expression, activation_key
from pbxc.symbolic.calculus import (
    DEFAULT_CONVENTION,
    Branch,
    Calculus,
    DerivationError,
    Kink,
    PieceCalculus,
    derive_calculus,
)
from pbxc.symbolic.routine import Routine, bind

#: z0 step of the accuracy check run when a user activation is first derived
CHECK_STEP = 1.0


class AccuracyWarning(UserWarning):
    """An activation compiles, but its multiplier misses the accuracy bar on the grid."""


@dataclass(frozen=True)
class ActivationCalculus:
    """Everything derived from one activation f(z), for the passes and the code generators.

    Expressions are sympy, in ``Z`` (and ``Z0``, ``DELTA`` for the multiplier); routines are
    what the printers print: ``value`` f(z), ``derivative`` f'(z), ``second_derivative``
    f''(z), ``multiplier`` m(z0, z) (seed 004, eq. 16; eq. 17 at z = z0). Elementwise, so the
    Jacobian is the diagonal f'(z): nothing here is ever a dense matrix.
    """

    key: ActivationKey
    calculus: Calculus
    check: tuple[Measure, ...] = ()  # the compile-time accuracy check (user activations)

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def f(self) -> sympy.Expr:
        return self.calculus.f

    @property
    def f_stable(self) -> sympy.Expr:
        return self.calculus.f_stable

    @property
    def df(self) -> sympy.Expr:
        return self.calculus.df

    @property
    def d2f(self) -> sympy.Expr:
        return self.calculus.d2f

    @property
    def kinks(self) -> tuple[Kink, ...]:
        return self.calculus.kinks

    @property
    def pieces(self) -> tuple[PieceCalculus, ...]:
        return self.calculus.pieces

    @property
    def convention(self) -> str:
        return self.calculus.convention

    @property
    def branches(self) -> tuple[Branch, ...]:
        return self.calculus.branches

    @property
    def value(self) -> Routine:
        return self.calculus.value

    @property
    def derivative(self) -> Routine:
        return self.calculus.derivative

    @property
    def second_derivative(self) -> Routine:
        return self.calculus.second_derivative

    @property
    def multiplier(self) -> Routine:
        return self.calculus.multiplier

    @property
    def slope_scale(self) -> float:
        return self.calculus.slope_scale

    @property
    def exact(self) -> bool:
        return self.calculus.exact

    def routines(self) -> dict[str, Routine]:
        return {"f": self.value, "df": self.derivative, "d2f": self.second_derivative,
                "m": self.multiplier}

    def reference(self) -> Reference:
        """50-digit mpmath f, f' and m, with this calculus's kink convention."""
        return Reference(self.f, self.calculus.point_slopes())


def resolve_key(name_or_key: str | ActivationKey,
                definitions: Mapping[str, ast.ActivationDef] | None = None) -> ActivationKey:
    """A key for an activation given by name (with default parameters) or a key."""
    if isinstance(name_or_key, ActivationKey):
        return name_or_key
    defs = definitions or {}
    if name_or_key in defs:
        definition = defs[name_or_key]
        return ActivationKey(name_or_key, tuple(definition.params), definition)
    if name_or_key in BUILTIN_ACTIVATIONS:
        return activation_key(name_or_key, BUILTIN_ACTIVATIONS[name_or_key].params, defs)
    known = sorted([*BUILTIN_ACTIVATIONS, *defs])
    raise UnsupportedOp(f"unknown activation '{name_or_key}'; known: {', '.join(known)}")


def _definitions_key(definitions: Mapping[str, ast.ActivationDef] | None
                     ) -> tuple[ast.ActivationDef, ...]:
    return tuple(sorted((definitions or {}).values(), key=lambda d: d.name))


def derive(name_or_key: str | ActivationKey,
           definitions: Mapping[str, ast.ActivationDef] | None = None,
           convention: str = DEFAULT_CONVENTION, warn_for: str | None = None
           ) -> ActivationCalculus:
    """The calculus of one activation (cached in-process, keyed by expression and convention).

    Raises :class:`UnsupportedOp` naming the activation and its definition's position when the
    expression cannot be analysed; warns with :class:`AccuracyWarning` when a user activation
    misses the accuracy bar on the check grid (only in dtype ``warn_for``, when given).
    """
    key = resolve_key(name_or_key, definitions)
    result = _guarded_derive(key, _definitions_key(definitions), convention)
    for measure in result.check:
        if not measure.passed and warn_for in (None, measure.dtype):
            where = f" ({key.pos})" if key.pos is not None else ""
            reached = ", ".join(f"{m.max_error:.3g} in {m.dtype} (bar {m.bar:g})"
                                for m in result.check)
            warnings.warn(AccuracyWarning(
                f"activation '{key.label}'{where} misses the accuracy bar: its DFD multiplier "
                f"reaches {reached} on the accuracy grid (z0 step {CHECK_STEP:g} on [-30, 30]);"
                " it compiles with that accuracy"), stacklevel=2)
            break
    return result


#: what sympy, mpmath and NumPy raise on expressions they cannot handle (a user activation
#: is arbitrary math): each becomes an error at the activation's definition, never a traceback
_SYMPY_FAILURES = (ArithmeticError, TypeError, ValueError, NameError, AttributeError,
                   NotImplementedError, KeyError, IndexError, RecursionError, AssertionError,
                   MemoryError, sympy.PolynomialError)


def _guarded_derive(key: ActivationKey, definitions: tuple[ast.ActivationDef, ...],
                    convention: str) -> ActivationCalculus:
    """``_derive`` within the limits of ``budget.py``; every failure names the activation."""
    hit = _derive_cache.get((key, definitions, convention))
    if hit is not None:
        return hit
    limits = budget.current_limits()
    try:
        with budget.deadline(limits.seconds):
            result = _derive(key, definitions, convention, limits)
    except budget.DerivationLimit as exc:
        raise UnsupportedOp(f"activation '{key.label}' cannot be derived: {exc}",
                            key.pos) from None
    except _SYMPY_FAILURES as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise UnsupportedOp(f"activation '{key.label}' cannot be derived: sympy failed on it "
                            f"({type(exc).__name__}{': ' if detail else ''}{detail})",
                            key.pos) from None
    if len(_derive_cache) >= 256:
        _derive_cache.pop(next(iter(_derive_cache)))
    _derive_cache[(key, definitions, convention)] = result
    return result


_derive_cache: dict[tuple[ActivationKey, tuple[ast.ActivationDef, ...], str],
                    ActivationCalculus] = {}


def _derive(key: ActivationKey, definitions: tuple[ast.ActivationDef, ...], convention: str,
            limits: budget.DerivationLimits) -> ActivationCalculus:
    defs = {d.name: d for d in definitions}
    expr = activation_expression(key, defs)
    budget.check_expression(expr, limits)
    budget.check_values(expr, Z)
    calculus = _derive_expression(expr, convention, key)
    check: tuple[Measure, ...] = ()
    if key.definition is not None:
        check = check_accuracy(ActivationCalculus(key, calculus), CHECK_STEP)
        calculus, check = _widen_if_needed(key, calculus, check)
    elif key.name in WIDENED_BUILTINS:
        calculus = _widen_all(calculus)
    return ActivationCalculus(key, calculus, check)


# Built-ins whose float32 routines cannot meet the float32 bar (1e-6 relative): computed in
# float64 and rounded once, as user activations that miss it are (_widen_if_needed).
# gelu_tanh: its inner cubic u = sqrt(2/pi) (z + 0.044715 z^3) rounds in float32 before the
# sigmoid, 2.5e-6 end to end (measured, tests/unit/symbolic/test_accuracy_bar.py).
WIDENED_BUILTINS = frozenset({"gelu_tanh"})


def _widen_all(calculus: Calculus) -> Calculus:
    """Every routine of ``calculus`` (value, derivatives, multiplier) widened for float32."""
    return dataclasses.replace(calculus, **{
        field: dataclasses.replace(getattr(calculus, field), widen_single=True)
        for field in ("value", "derivative", "second_derivative", "multiplier")})


def _widen_if_needed(key: ActivationKey, calculus: Calculus, check: tuple[Measure, ...]
                     ) -> tuple[Calculus, tuple[Measure, ...]]:
    """Where the float32 multiplier misses the float32 bar but the float64 one meets its own,
    the float32 multiplier is computed in float64 and rounded once (an error of half a float32
    unit on top of float64's): the float32 forms (secant, difference form) both lose too much
    to cancellation there, e.g. swish(beta=1.5) near z = -5, where f's own float32 error is
    about 5 units."""
    by_dtype = {m.dtype: m for m in check}
    single, double = by_dtype.get("float32"), by_dtype.get("float64")
    if single is None or double is None or single.passed or not double.passed:
        return calculus, check
    widened = dataclasses.replace(
        calculus, multiplier=dataclasses.replace(calculus.multiplier, widen_single=True))
    recheck = check_accuracy(ActivationCalculus(key, widened), CHECK_STEP, ("float32",))
    return widened, (double, *recheck)


@functools.lru_cache(maxsize=256)
def _derive_calculus_cached(expr: sympy.Expr, convention: str) -> Calculus:
    return derive_calculus(expr, convention)


def _derive_expression(expr: sympy.Expr, convention: str, key: ActivationKey) -> Calculus:
    try:
        return _derive_calculus_cached(expr, convention)
    except DerivationError as exc:
        raise UnsupportedOp(f"activation '{key.label}': {exc}", key.pos) from None
    except UnsupportedOp as exc:
        raise UnsupportedOp(f"activation '{key.label}': {exc.message}", key.pos) from None


def check_accuracy(calc: ActivationCalculus, step: float = CHECK_STEP,
                   dtypes: tuple[str, ...] = ("float64", "float32")) -> tuple[Measure, ...]:
    """The multiplier's largest error on the grid with z0 spaced ``step`` apart."""
    ref = calc.reference()
    z0 = z0_grid(step)
    out = []
    for name in dtypes:
        dt = np.dtype(name)
        out.append(measure_multiplier(bind(calc.multiplier, dt), ref, calc.slope_scale, dt, z0,
                                      value=bind(calc.value, dt)))
    return tuple(out)
