"""The numeric library of generated code: each helper against an independent mpmath value."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxc.symbolic import numeric
from pbxc.symbolic.activations import Z
from pbxc.symbolic.functions import Expm1Ratio, Gauss, NormalCdf, Sigmoid, SumError

mpmath.mp.dps = 40
U = {np.float64: 2.0**-53, np.float32: 2.0**-24}


def rel_err(values: np.ndarray, exact: list[mpmath.mpf]) -> float:
    return max(float(abs((mpmath.mpf(float(v)) - e) / e)) for v, e in zip(values, exact) if e)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normal_cdf_is_accurate_deep_in_the_tail(dtype: type) -> None:
    # erfc(-x / sqrt 2) with the rounded argument loses x**2 units; pbxc's carries the rounding
    x = np.linspace(-35 if dtype is np.float64 else -12, 6, 3001).astype(dtype)
    exact = [mpmath.ncdf(mpmath.mpf(float(v))) for v in x]
    got = numeric._normal_cdf(x)
    assert got.dtype == dtype
    assert rel_err(got, exact) < 8 * U[dtype]


def test_erfc_double_is_accurate_where_scipys_is_not() -> None:
    y = np.linspace(0.25, 26.5, 2001)
    exact = [mpmath.erfc(mpmath.mpf(v)) for v in y]
    assert rel_err(numeric._erfc(y), exact) < 8 * U[np.float64]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gauss_splits_the_square(dtype: type) -> None:
    x = np.linspace(-12, 12, 2001).astype(dtype)
    exact = [mpmath.exp(-mpmath.mpf(float(v)) ** 2 / 2) for v in x]
    got = numeric._gauss(x)
    assert got.dtype == dtype
    assert rel_err(got, exact) < 8 * U[dtype]
    naive = np.exp(-x * x / 2)
    assert rel_err(naive, exact) > rel_err(got, exact)  # the split is what makes the difference


@pytest.mark.parametrize("name, fn, exact", [
    ("expm1", numeric._expm1_ratio, lambda x: mpmath.expm1(x) / x),
    ("log1p", numeric._log1p_ratio, lambda x: mpmath.log1p(x) / x),
    ("sinh", numeric._sinh_ratio, lambda x: mpmath.sinh(x) / x),
    ("sin", numeric._sin_ratio, lambda x: mpmath.sin(x) / x),
    ("atan", numeric._atan_ratio, lambda x: mpmath.atan(x) / x),
])
def test_ratio_functions_are_one_at_zero_and_accurate_near_it(name: str, fn: object,
                                                              exact: object) -> None:
    x = np.array([0.0, 1e-300, -1e-200, 1e-17, 1e-8, -1e-3, 0.3, -0.9, 5.0])
    got = fn(x)  # type: ignore[operator]
    assert got[0] == 1.0
    ref = [exact(mpmath.mpf(v)) for v in x[1:]]  # type: ignore[operator]
    assert rel_err(got[1:], ref) < 4 * U[np.float64], name


# products that underflow are not error-free (the low part is lost below the subnormals)
_normal = st.floats(-1e6, 1e6).filter(lambda x: x == 0 or abs(x) > 1e-100)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_normal, _normal)
def test_error_free_transformations_are_exact(a: float, b: float) -> None:
    s, e = numeric._two_sum(np.float64(a), np.float64(b))
    assert Fraction(float(s)) + Fraction(float(e)) == Fraction(a) + Fraction(b)
    p, e = numeric._two_prod(np.float64(a), np.float64(b))
    assert Fraction(float(p)) + Fraction(float(e)) == Fraction(a) * Fraction(b)
    assert float(numeric._sum_error(np.float64(a), np.float64(b))) == float(
        Fraction(a) + Fraction(b) - Fraction(a + b))


def test_helpers_keep_float32() -> None:
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    for fn in (numeric._sigmoid, numeric._softplus, numeric._normal_cdf, numeric._gauss,
               numeric._expm1_ratio, numeric._log1p_ratio, numeric._sinh_ratio,
               numeric._erfc, numeric._erf):
        assert fn(x).dtype == np.float32, fn.__name__


def test_named_functions_differentiate_stably() -> None:
    # sigma' = sigma(x) sigma(-x): no 1 - sigma(x) to cancel for x >> 0
    assert sympy.diff(Sigmoid(Z), Z) == Sigmoid(Z) * Sigmoid(-Z)
    assert sympy.diff(NormalCdf(Z), Z) == Gauss(Z) / sympy.sqrt(2 * sympy.pi)
    assert Expm1Ratio(0) == 1
    assert SumError(Z / 2, Z / 2) == 0  # x + x is exact
    assert abs(float(Gauss(sympy.Float(3)).evalf(30)) - float(mpmath.exp(-4.5))) < 1e-18
