"""The divided-difference rules: each identity against 50-digit secants, at every scale of d."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy

from pbxc.symbolic.accuracy import Reference
from pbxc.symbolic.activations import Z
from pbxc.symbolic.difference import (
    DELTA,
    Z0,
    DividedDifference,
    normal_cdf_series,
    normal_cdf_switch,
)
from pbxc.symbolic.evaluate import evaluate
from pbxc.symbolic.functions import NormalCdf, Sigmoid, Softplus
from pbxc.symbolic.precision import BUDGET, UNIT

CASES = {
    "exp": sympy.exp(Z),
    "expm1": sympy.exp(Z / 3) - 1,
    "log": sympy.log(Z * Z + 1),
    "log1p": sympy.log(1 + Z * Z),
    "sqrt": sympy.sqrt(Z * Z + 2),
    "power": Z**3,
    "reciprocal": 1 / (Z * Z + 1),
    "real power": (Z * Z + 1) ** sympy.Rational(3, 2),
    "tanh": sympy.tanh(Z),
    "sigmoid": Sigmoid(Z),
    "softplus": Softplus(Z),
    "normal cdf": NormalCdf(Z),
    "erf": sympy.erf(Z / 2),
    "erfc": sympy.erfc(Z / 2),
    "sin": sympy.sin(Z),
    "cos": sympy.cos(Z),
    "sinh": sympy.sinh(Z / 4),
    "cosh": sympy.cosh(Z / 4),
    "atan": sympy.atan(Z),
    "product": Z * Sigmoid(Z),
}

# z0 in [-4, 4] and z - z0 from 1e-300 to 10, both signs, and z = z0
RNG = np.random.default_rng(7)
Z0S = np.concatenate([RNG.uniform(-4, 4, 120), [0.0, 1.0, -2.5]])
STEPS = np.concatenate([[0.0], 10.0 ** RNG.uniform(-300, 1, 60), 10.0 ** RNG.uniform(-12, 1, 60)])
PAIRS = np.array([(a, a + s * sign) for a in Z0S[:20] for s in STEPS[::12] for sign in (1, -1)]
                 + [(a, a + s) for a, s in zip(Z0S, STEPS[: len(Z0S)])])


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_is_exact_and_cancellation_free(name: str) -> None:
    expr = CASES[name]
    form = DividedDifference()(expr)
    a, b = PAIRS[:, 0], PAIRS[:, 1]
    got = evaluate(form, {Z0: a, Z: b, DELTA: b - a})
    reference = Reference(expr)
    worst = 0.0
    for x, y, v in zip(a, b, got):
        ref = reference.multiplier(float(x), float(y))
        worst = max(worst, float(abs((v - ref) / (abs(ref) + 1e-300))))
    # a product of a few accurately computed factors: a few dozen units in the last place
    assert worst < 64 * UNIT[np.dtype(np.float64)], (name, worst)


@pytest.mark.parametrize("name", sorted(CASES))
def test_diagonal_form_is_the_derivative(name: str) -> None:
    expr = CASES[name]
    diagonal = DividedDifference(diagonal=True)(expr)
    assert not diagonal.has(Z0, DELTA)
    x = np.linspace(-3.3, 3.7, 15)
    np.testing.assert_allclose(evaluate(diagonal, {Z: x}),
                               evaluate(sympy.diff(expr, Z), {Z: x}), rtol=1e-12, atol=1e-300)


def test_normal_cdf_switch_is_derived_from_the_error_bounds() -> None:
    theta, terms = normal_cdf_switch()
    assert 0.3 < theta < 4 and 3 < terms < 48
    # the series side: the truncated Hermite series against the exact ratio
    p, q = sympy.symbols("p q")
    series = normal_cdf_series(p, q, terms)
    with mpmath.workdps(40):
        for c in (0.0, 0.7, -1.9, 6.0, -30.0):
            for step in (theta / max(1.0, abs(c)), -theta / max(1.0, abs(c)), 1e-9):
                cm, sm = mpmath.mpf(c), mpmath.mpf(step)
                exact = (mpmath.ncdf(cm + sm) - mpmath.ncdf(cm)) / (sm * mpmath.npdf(cm))
                value = series.subs({p: sympy.Float(cm * sm, 40), q: sympy.Float(sm * sm, 40)})
                assert abs(value.evalf(40) / exact - 1) <= BUDGET[np.dtype(np.float64)] / 8
