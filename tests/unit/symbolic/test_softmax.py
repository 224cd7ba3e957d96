"""Softmax and log_softmax: closed forms sympy derives, and the DFD rule's summation to delta."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxc.ops import OpKind
from pbxc.symbolic import numeric
from pbxc.symbolic.softmax import (
    DFD_RULES,
    JACOBIANS,
    derived_jacobians,
    dfd_rule_expressions,
    log_softmax_dfd,
    log_softmax_jacobian,
    softmax_dfd,
    softmax_jacobian,
)


def test_closed_forms_equal_sympys_jacobians() -> None:
    d = derived_jacobians(3)
    assert sympy.simplify(d["softmax"] - d["softmax_closed"]) == sympy.zeros(3, 3)
    assert sympy.simplify(d["log_softmax"] - d["log_softmax_closed"]) == sympy.zeros(3, 3)


def test_dfd_rule_sums_to_delta_exactly_in_sympy() -> None:
    r = dfd_rule_expressions(3)
    values = {**dict(zip(r["z"], [sympy.Rational(3, 10), sympy.Rational(-6, 5), 2])),
              **dict(zip(r["z0"], [sympy.Rational(1, 10), sympy.Rational(1, 2), -1]))}
    dz = sympy.Matrix([values[a] - values[b] for a, b in zip(r["z"], r["z0"])])
    for kind in ("softmax", "log_softmax"):
        total = (r[kind].subs(values) * dz - sympy.Matrix(r[f"{kind}_delta"]).subs(values))
        assert max(abs(x.evalf(60)) for x in total) < 1e-50, kind


# Summation to delta is exact in exact arithmetic. In floating point, the diagonal weight
# 1 - w_i of a class that dominates (s_i -> 1) is a difference of nearly equal numbers, so the
# sum carries about u / (1 - max s) relative to the contributions (specs/activations.md).
TOL = 1e-13


def slack(z0: np.ndarray, z: np.ndarray, contributions: np.ndarray, delta: np.ndarray
          ) -> np.ndarray:
    def rest(x: np.ndarray) -> np.ndarray:  # 1 - max_i s_i, as the sum of the others
        s = np.sort(numeric._softmax(x), axis=-1)
        return s[..., :-1].sum(axis=-1, keepdims=True)

    dominance = np.minimum(rest(z0), rest(z))
    magnitude = np.abs(contributions).sum(axis=-1) + np.abs(delta)
    return TOL * magnitude / np.minimum(1.0, 4 * dominance) + 1e-300


def _logits(seed: int, scale: float, shape: tuple[int, int] = (6, 7)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * scale


def exact_delta(z0: np.ndarray, z: np.ndarray, log: bool = False) -> np.ndarray:
    """softmax(z) - softmax(z0) (or of log_softmax) per row, from 40-digit mpmath."""
    out = np.empty(z.shape)
    with mpmath.workdps(40):
        for r in range(z.shape[0]):
            a = [mpmath.mpf(float(x)) for x in z0[r]]
            b = [mpmath.mpf(float(x)) for x in z[r]]
            la, lb = mpmath.log(mpmath.fsum(map(mpmath.exp, a))), mpmath.log(
                mpmath.fsum(map(mpmath.exp, b)))
            for i in range(z.shape[1]):
                if log:
                    out[r, i] = float((b[i] - lb) - (a[i] - la))
                else:
                    out[r, i] = float(mpmath.exp(b[i] - lb) - mpmath.exp(a[i] - la))
    return out


@pytest.mark.parametrize("scale, step", [(1.0, 1e-12), (3.0, 1e-4), (3.0, 1.0), (5.0, 40.0)])
def test_softmax_dfd_sums_to_delta(scale: float, step: float) -> None:
    z0 = _logits(0, scale)
    z = z0 + _logits(1, step)
    rule = softmax_dfd(z0, z)
    delta = exact_delta(z0, z)
    contributions = rule.dense() * (z - z0)[:, None, :]  # C[b, i, j]
    assert np.all(np.abs(contributions.sum(axis=-1) - delta) <= slack(z0, z, contributions,
                                                                       delta))
    np.testing.assert_allclose(rule.jvp(z - z0), contributions.sum(axis=-1), rtol=1e-12,
                               atol=1e-15)
    # contributions are bounded by the logit changes, never exponentially large
    assert np.abs(contributions).max() <= 4 * np.abs(z - z0).max() + 1


def test_log_softmax_dfd_sums_to_delta() -> None:
    z0, z = _logits(2, 3.0), _logits(3, 3.0)
    rule = log_softmax_dfd(z0, z)
    np.testing.assert_allclose(rule.jvp(z - z0), exact_delta(z0, z, log=True), rtol=1e-12,
                               atol=1e-14)


def test_dfd_tends_to_the_jacobian_and_is_symmetric() -> None:
    z0 = _logits(4, 2.0)
    np.testing.assert_allclose(softmax_dfd(z0, z0).dense(), softmax_jacobian(z0).dense(),
                               rtol=1e-14, atol=1e-17)
    np.testing.assert_allclose(log_softmax_dfd(z0, z0).dense(),
                               log_softmax_jacobian(z0).dense(), rtol=1e-14, atol=1e-17)
    z = z0 + _logits(5, 1.0)
    np.testing.assert_allclose(softmax_dfd(z0, z).dense(), softmax_dfd(z, z0).dense(),
                               rtol=1e-13, atol=1e-16)  # so C(z0 -> z) = -C(z -> z0)


def test_jacobian_products_never_need_the_dense_matrix() -> None:
    z = _logits(6, 2.0, (4, 5))
    v, u = _logits(7, 1.0, (4, 5)), _logits(8, 1.0, (4, 5))
    for jacobian in (softmax_jacobian(z), log_softmax_jacobian(z)):
        dense = jacobian.dense()
        assert dense.shape == (4, 5, 5)
        np.testing.assert_allclose(jacobian.jvp(v), np.einsum("bij,bj->bi", dense, v),
                                   rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(jacobian.vjp(u), np.einsum("bi,bij->bj", u, dense),
                                   rtol=1e-13, atol=1e-16)
    # against mpmath's numerical derivative of the definition
    with mpmath.workdps(40):
        row = [mpmath.mpf(float(x)) for x in z[0]]
        total = mpmath.fsum(mpmath.exp(x) for x in row)
        for j in range(5):
            column = mpmath.diff(lambda t, j=j: mpmath.exp(row[0] if j else t) / (
                total - mpmath.exp(row[j]) + mpmath.exp(t)), row[j])
            assert abs(softmax_jacobian(z).dense()[0, 0, j] - float(column)) < 1e-15


def test_other_axes_and_float32() -> None:
    z0 = _logits(9, 2.0, (5, 3)).astype(np.float32)
    z = z0 + np.float32(0.5)
    rule = softmax_dfd(z0, z, axis=0)
    assert rule.b.dtype == np.float32
    delta = numeric._softmax(z, 0) - numeric._softmax(z0, 0)
    assert np.allclose(rule.jvp(z - z0), delta, atol=2e-7)  # a pure shift changes nothing


def test_rule_tables_by_op_kind() -> None:
    assert set(JACOBIANS) == set(DFD_RULES) == {OpKind.SOFTMAX, OpKind.LOG_SOFTMAX}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(2, 9), st.floats(0.01, 20), st.floats(1e-9, 30), st.integers(0, 10**6))
def test_summation_to_delta_property(n: int, scale: float, step: float, seed: int) -> None:
    z0 = _logits(seed, scale, (3, n))
    z = z0 + _logits(seed + 1, step, (3, n))
    contributions = softmax_dfd(z0, z).dense() * (z - z0)[:, None, :]
    delta = exact_delta(z0, z)
    assert np.all(np.abs(contributions.sum(axis=-1) - delta) <= slack(z0, z, contributions,
                                                                       delta))
