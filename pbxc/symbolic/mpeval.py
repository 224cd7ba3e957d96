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
    return 1 / (1 + mpmath.exp(-x))


def _softplus(x: Any) -> Any:
    # real or complex (within |Im x| < pi the principal branch is the analytic continuation)
    return mpmath.log1p(mpmath.exp(x)) if mpmath.re(x) < 0 else x + mpmath.log1p(mpmath.exp(-x))


def _normal_cdf(x: Any) -> Any:
    return mpmath.erfc(-x / mpmath.sqrt(2)) / 2


def _gauss(x: Any) -> Any:
    return mpmath.exp(-x * x / 2)


_NAMESPACE = {
    "Sigmoid": _sigmoid, "Softplus": _softplus, "NormalCdf": _normal_cdf, "Gauss": _gauss,
    "expm1": mpmath.expm1, "log1p": mpmath.log1p,
}


@functools.lru_cache(maxsize=1024)
def mp_function(expr: sympy.Expr, var: sympy.Symbol = Z) -> Callable[[Any], Any]:
    """``expr`` as a function of ``var`` on mpmath numbers (precision from ``mpmath.mp``)."""
    fn = sympy.lambdify(var, expr, modules=[_NAMESPACE, "mpmath"])
    return fn
