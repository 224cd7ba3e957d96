"""Evaluate sympy expressions and routines on NumPy arrays, in float32 or float64.

A tree walk with one rule per node type, calling the helpers of ``numeric.py``: the living
definition of what the printed code computes (the code generators are tested against it).
Shared subexpressions are computed once. Numbers are cast to the working type first, so a
float32 evaluation stays float32 end to end. An unknown node is an :class:`UnsupportedOp`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import sympy
from sympy.codegen.cfunctions import expm1, log1p

from pbxc.errors import UnsupportedOp
from pbxc.symbolic import numeric
from pbxc.symbolic.functions import (
    AtanRatio,
    Expm1Ratio,
    Gauss,
    IsFinite,
    Log1pRatio,
    NormalCdf,
    SeriesPatch,
    Sigmoid,
    SinhRatio,
    SinRatio,
    Softplus,
    SumError,
)
from pbxc.symbolic.routine import Routine

Array = np.ndarray

_UNARY: dict[type, Callable[[Any], Any]] = {
    sympy.exp: np.exp, sympy.log: np.log, sympy.sin: np.sin, sympy.cos: np.cos,
    sympy.tanh: np.tanh, sympy.sinh: np.sinh, sympy.cosh: np.cosh, sympy.atan: np.arctan,
    sympy.Abs: np.abs, sympy.sign: np.sign, expm1: np.expm1, log1p: np.log1p,
    sympy.erf: numeric._erf, sympy.erfc: numeric._erfc,
    Sigmoid: numeric._sigmoid, Softplus: numeric._softplus, NormalCdf: numeric._normal_cdf,
    Gauss: numeric._gauss,
    Expm1Ratio: numeric._expm1_ratio, Log1pRatio: numeric._log1p_ratio,
    SinhRatio: numeric._sinh_ratio, SinRatio: numeric._sin_ratio, AtanRatio: numeric._atan_ratio,
    IsFinite: numeric._is_finite,
}

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    sympy.StrictLessThan: np.less, sympy.LessThan: np.less_equal,
    sympy.StrictGreaterThan: np.greater, sympy.GreaterThan: np.greater_equal,
    sympy.Equality: np.equal, sympy.Unequality: np.not_equal,
}


class Evaluator:
    def __init__(self, env: Mapping[sympy.Symbol, Any], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.memo: dict[sympy.Basic, Any] = {}
        for sym, value in env.items():
            self.memo[sym] = value if np.ndim(value) else self.dtype.type(value)

    def __call__(self, expr: sympy.Basic) -> Any:
        hit = self.memo.get(expr)
        if hit is not None:
            return hit
        value = self._eval(expr)
        self.memo[expr] = value
        return value

    def _number(self, expr: sympy.Basic) -> Any:
        return self.dtype.type(float(expr))

    def _eval(self, e: sympy.Basic) -> Any:
        if isinstance(e, sympy.Symbol):
            raise UnsupportedOp(f"the evaluator has no value for symbol '{e}'")
        if e is sympy.true or e is sympy.false:
            return np.bool_(bool(e))
        if e.is_number and not isinstance(e, sympy.Piecewise):
            return self._number(e)
        if isinstance(e, sympy.Add):
            args = [self(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if isinstance(e, sympy.Mul):
            # x * y**-1 is a division, as the printers write it (1/y would round and overflow)
            num: list[Any] = []
            den: list[Any] = []
            for a in e.args:
                if isinstance(a, sympy.Pow) and a.exp.is_Number and a.exp < 0:
                    den.append(self(sympy.Pow(a.base, -a.exp)))
                else:
                    num.append(self(a))
            out = num[0] if num else self.dtype.type(1)
            for a in num[1:]:
                out = out * a
            if den:
                d = den[0]
                for a in den[1:]:
                    d = d * a
                out = out / d
            return out
        if isinstance(e, sympy.Pow):
            base, exponent = e.args
            b = self(base)
            if exponent == -1:
                return 1 / b
            if exponent == 2:
                return b * b
            if exponent == sympy.Rational(1, 2):
                return np.sqrt(b)
            if exponent == sympy.Rational(-1, 2):
                return 1 / np.sqrt(b)
            if exponent.is_Integer:
                return b ** int(exponent)
            return b ** self(exponent)
        func = type(e)
        if func is SeriesPatch:
            hi64, lo64 = e.coefficients(single=False)
            hi32, lo32 = e.coefficients(single=True)
            return numeric._series_patch(self(e.args[0]), self(e.args[1]), e.centre, e.radius,
                                         hi64, lo64, hi32, lo32)
        if func is SumError:
            return numeric._sum_error(self(e.args[0]), self(e.args[1]))
        if func in _UNARY:
            return _UNARY[func](self(e.args[0]))
        if isinstance(e, (sympy.Max, sympy.Min)):
            op = np.maximum if isinstance(e, sympy.Max) else np.minimum
            args = [self(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = op(out, a)
            return out
        if isinstance(e, sympy.Piecewise):
            *pieces, (last_value, last_cond) = e.args
            if last_cond is not sympy.true:
                raise UnsupportedOp(f"Piecewise without a default branch: {e}")
            out = self(last_value)
            for value, cond in reversed(pieces):
                out = np.where(self(cond), self(value), out)
            return out
        if func in _COMPARE:
            return _COMPARE[func](self(e.args[0]), self(e.args[1]))
        if isinstance(e, (sympy.And, sympy.Or)):
            logic: Callable[[Any, Any], Any] = (np.logical_and if isinstance(e, sympy.And)
                                                else np.logical_or)
            args = [self(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = logic(out, a)  # pairwise, so operands of different shapes broadcast
            return out
        if isinstance(e, sympy.Not):
            return np.logical_not(self(e.args[0]))
        raise UnsupportedOp(f"the evaluator has no rule for {type(e).__name__}: {e}")


def evaluate(expr: sympy.Basic, env: Mapping[sympy.Symbol, Any], dtype: Any = np.float64
             ) -> Array:
    """``expr`` at the arrays in ``env``, as an array of ``dtype`` broadcast to their shape."""
    dt = np.dtype(dtype)
    env = {k: np.asarray(v, dtype=dt) for k, v in env.items()}
    with np.errstate(all="ignore"):
        value = Evaluator(env, dt)(expr)
    shape = np.broadcast_shapes(*(np.shape(v) for v in env.values())) if env else ()
    out = np.broadcast_to(np.asarray(value), shape)
    return out.astype(dt) if out.dtype != np.bool_ else out.copy()


def run_routine(routine: Routine, args: Sequence[Any], dtype: Any = np.float64) -> Array:
    """Execute ``routine`` on arrays (broadcast together) in ``dtype``."""
    dt = np.dtype(dtype)
    if routine.widen_single and dt == np.float32:   # computed in float64, rounded once
        return run_routine(routine, [np.asarray(a, dtype=dt) for a in args],
                           np.float64).astype(dt)
    arrays = [np.asarray(a, dtype=dt) for a in args]
    env: dict[sympy.Symbol, Any] = dict(zip(routine.args, arrays))
    single = dt == np.float32
    for c in routine.precision_constants:
        env[c.symbol] = dt.type(c.single if single else c.double)
    with np.errstate(all="ignore"):
        ev = Evaluator(env, dt)
        for sym, expr in routine.assignments:
            ev.memo[sym] = ev(expr)
        value = ev(routine.result)
    shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
    return np.broadcast_to(np.asarray(value), shape).astype(dt)
