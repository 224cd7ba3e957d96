"""Activation expressions as mpmath functions: the high-precision references.

``lambdify`` prints our own sympy trees (never user text) into mpmath calls; the named
functions get their defining formulas, evaluated at the working precision of ``mpmath.mp``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import mpmath
import sympy

from pbxc.symbolic.activations import Z


def _sigmoid(x: Any) -> Any:
    return 1 / (1 + _exp(-x))


def _softplus(x: Any) -> Any:
    # real or complex (within |Im x| < pi the principal branch is the analytic continuation)
    return mpmath.log1p(_exp(x)) if mpmath.re(x) < 0 else x + mpmath.log1p(_exp(-x))


def _normal_cdf(x: Any) -> Any:
    return mpmath.erfc(-x / mpmath.sqrt(2)) / 2


def _gauss(x: Any) -> Any:
    return _exp(-x * x / 2)


#: beyond this |argument| exp, sinh and cosh saturate to inf (or 0): exp(1e4) is 10^4343, far
#: past every float, while mpmath would compute exp(exp(130)) to all of its 10^56 digits
SATURATE = 10_000
#: non-empty after an evaluation in which one of them saturated (the caller clears it)
SATURATED: set[str] = set()


def _exp(x: Any) -> Any:
    if mpmath.re(x) > SATURATE:
        SATURATED.add("exp")
        return mpmath.inf
    if mpmath.re(x) < -SATURATE:
        return mpmath.mpf(0)
    return mpmath.exp(x)


def _expm1(x: Any) -> Any:
    return _exp(x) if mpmath.re(x) > SATURATE else mpmath.expm1(x)


def _sinh(x: Any) -> Any:
    if abs(mpmath.re(x)) > SATURATE:
        SATURATED.add("sinh")
        return mpmath.inf if mpmath.re(x) > 0 else -mpmath.inf
    return mpmath.sinh(x)


def _cosh(x: Any) -> Any:
    return _exp(abs(mpmath.re(x))) if abs(mpmath.re(x)) > SATURATE else mpmath.cosh(x)


def _dirac_delta(x: Any, *order: Any) -> Any:
    # the derivative of a step: 0 away from it (kinks are handled by the pieces, never here)
    return mpmath.mpf(0) if x != 0 else mpmath.nan


def _heaviside(x: Any, at_zero: Any = 0.5) -> Any:
    return mpmath.mpf(1) if x > 0 else mpmath.mpf(0) if x < 0 else mpmath.mpf(at_zero)


_NAMESPACE = {
    "Sigmoid": _sigmoid, "Softplus": _softplus, "NormalCdf": _normal_cdf, "Gauss": _gauss,
    "expm1": _expm1, "log1p": mpmath.log1p, "exp": _exp, "sinh": _sinh, "cosh": _cosh,
    "DiracDelta": _dirac_delta, "Heaviside": _heaviside,
}


@functools.lru_cache(maxsize=1024)
def mp_function(expr: sympy.Expr, var: sympy.Symbol = Z) -> Callable[[Any], Any]:
    """``expr`` as a function of ``var`` on mpmath numbers (precision from ``mpmath.mp``)."""
    fn = sympy.lambdify(var, expr, modules=[_NAMESPACE, "mpmath"])
    return fn
