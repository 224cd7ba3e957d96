"""Softmax and log_softmax: closed-form Jacobians and a DFD rule, never dense unless asked.

With s = softmax(z) (along one axis of n entries), sympy derives from the definitions

    d s_i / d z_j         = s_i (delta_ij - s_j)      J = diag(s) - s s^T
    d log s_i / d z_j     = delta_ij - s_j            J = I - 1 s^T

Both are ``diag(a) - c b^T``: a Jacobian-vector product is a v - c (b . v) and a
vector-Jacobian product a u - b (c . u), O(n) per sample (``DiagMinusOuter``).

DFD (the seed's section 2.3.4 is empty; this is pbxc's rule, see specs/activations.md). Write
softmax as s_i = exp(z_i - lse(z)) with lse(z) = log sum_k exp(z_k), and apply the seed's own
rules to the pieces: exp and log are individual nonlinearities (eq. 16-17), the sum and the
difference are affine (eq. 7), and multipliers compose by the chain rule (eq. 4):

    w_j  = [exp](z0_j, z_j) / [exp](lse0, lse)      multiplier of z_j on lse (sum w_j dz_j = dlse)
    L_i  = [exp](log s_i(z0), log s_i(z))            the logarithmic mean of s_i(z0) and s_i(z)
    M_ij = L_i (delta_ij - w_j)          softmax:     sum_j M_ij dz_j = L_i (dz_i - dlse) = ds_i
    M_ij = delta_ij - w_j                log_softmax: sum_j M_ij dz_j = dz_i - dlse = d log s_i

[exp](a, b) = (e^b - e^a) / (b - a), the logarithmic mean of e^a and e^b. Summation to delta
(eq. 1) holds exactly for every output, the rule reduces to the Jacobian as z -> z0 (eq. 17),
it is symmetric in (z0, z), continuous, and its contributions are bounded by the logit changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from pbxc.ops import OpKind
from pbxc.symbolic import numeric


@dataclass(frozen=True)
class DiagMinusOuter:
    """The per-sample matrices M = diag(a) - c b^T along ``axis``; ``c=None`` means ones."""

    a: np.ndarray | float
    c: np.ndarray | float
    b: np.ndarray
    axis: int = -1

    def jvp(self, v: np.ndarray) -> np.ndarray:
        """M v: the change of the outputs for input changes v (the Jacobian-vector product)."""
        return numeric._diag_minus_outer_jvp(self.a, self.c, self.b, v, self.axis)

    def vjp(self, u: np.ndarray) -> np.ndarray:
        """u^T M: output weights u pulled back to the inputs (the vector-Jacobian product)."""
        return numeric._diag_minus_outer_vjp(self.a, self.c, self.b, u, self.axis)

    def contributions(self, u: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """C_j = (u^T M)_j * delta_j: input j's contribution to u . (change of the outputs)."""
        return self.vjp(u) * delta

    def dense(self) -> np.ndarray:
        """The matrices themselves, shape (..., n, n) with the softmax axis moved last."""
        a = np.broadcast_to(np.asarray(self.a, dtype=self.b.dtype), self.b.shape)
        c = np.broadcast_to(np.asarray(self.c, dtype=self.b.dtype), self.b.shape)
        return numeric._diag_minus_outer_dense(a, c, self.b, self.axis)


def softmax_jacobian(z: np.ndarray, axis: int = -1) -> DiagMinusOuter:
    """J = diag(s) - s s^T at z."""
    s = numeric._softmax(np.asarray(z), axis)
    return DiagMinusOuter(s, s, s, axis)


def log_softmax_jacobian(z: np.ndarray, axis: int = -1) -> DiagMinusOuter:
    """J = I - 1 s^T at z."""
    s = numeric._softmax(np.asarray(z), axis)
    return DiagMinusOuter(1.0, 1.0, s, axis)


def softmax_dfd(z0: np.ndarray, z: np.ndarray, axis: int = -1) -> DiagMinusOuter:
    """The DFD multipliers M = diag(L) - L w^T from default logits z0 to logits z."""
    big, w = numeric._softmax_dfd_factors(z0, z, axis)
    return DiagMinusOuter(big, big, w, axis)


def log_softmax_dfd(z0: np.ndarray, z: np.ndarray, axis: int = -1) -> DiagMinusOuter:
    """The DFD multipliers M = I - 1 w^T from default logits z0 to logits z."""
    _, w = numeric._softmax_dfd_factors(z0, z, axis)
    return DiagMinusOuter(1.0, 1.0, w, axis)


JACOBIANS = {OpKind.SOFTMAX: softmax_jacobian, OpKind.LOG_SOFTMAX: log_softmax_jacobian}
DFD_RULES = {OpKind.SOFTMAX: softmax_dfd, OpKind.LOG_SOFTMAX: log_softmax_dfd}


# ---------------------------------------------------------------------------- derivations
def definitions(n: int) -> tuple[list[sympy.Symbol], list[sympy.Expr], list[sympy.Expr]]:
    """Symbols z_1..z_n and the sympy definitions of softmax and log_softmax."""
    z = list(sympy.symbols(f"z1:{n + 1}", real=True))
    total = sympy.Add(*[sympy.exp(x) for x in z])
    soft = [sympy.exp(x) / total for x in z]
    log_soft = [x - sympy.log(total) for x in z]
    return z, soft, log_soft


def derived_jacobians(n: int) -> dict[str, sympy.Matrix]:
    """sympy's Jacobians of the definitions, and the closed forms they must equal.

    Returns {"softmax": J, "softmax_closed": diag(s) - s s^T, "log_softmax": ...,
    "log_softmax_closed": I - 1 s^T}, all in terms of z_1..z_n; the closed forms are what the
    code uses, and ``simplify(J - closed) == 0`` is checked by the tests.
    """
    z, soft, log_soft = definitions(n)
    s = sympy.Matrix(soft)
    jac = sympy.Matrix(soft).jacobian(z)
    log_jac = sympy.Matrix(log_soft).jacobian(z)
    ones = sympy.ones(n, 1)
    return {
        "softmax": jac,
        "softmax_closed": sympy.diag(*soft) - s * s.T,
        "log_softmax": log_jac,
        "log_softmax_closed": sympy.eye(n) - ones * s.T,
    }


def dfd_rule_expressions(n: int) -> dict[str, Any]:
    """The DFD rule in sympy: multipliers M(z0, z) built from the definitions.

    Returns the symbols, M for softmax and log_softmax, and the changes of the outputs, so a
    test can check summation to delta (sum_j M_ij (z_j - z0_j) = s_i(z) - s_i(z0)) exactly.
    """
    z, soft, log_soft = definitions(n)
    z0 = list(sympy.symbols(f"y1:{n + 1}", real=True))
    at0 = dict(zip(z, z0))

    def log_mean(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        return (sympy.exp(b) - sympy.exp(a)) / (b - a)

    lse = sympy.log(sympy.Add(*[sympy.exp(x) for x in z]))
    lse0 = lse.xreplace(at0)
    w = [log_mean(y, x) / log_mean(lse0, lse) for x, y in zip(z, z0)]
    big = [log_mean(ls.xreplace(at0), ls) for ls in log_soft]
    m_soft = sympy.Matrix(n, n, lambda i, j: big[i] * (int(i == j) - w[j]))
    m_log = sympy.Matrix(n, n, lambda i, j: int(i == j) - w[j])
    return {"z": z, "z0": z0, "softmax": m_soft, "log_softmax": m_log,
            "softmax_delta": [s - s.xreplace(at0) for s in soft],
            "log_softmax_delta": [s - s.xreplace(at0) for s in log_soft]}


def derived_second_derivatives(n: int) -> dict[str, list[sympy.Matrix]]:
    """sympy's second-derivative tensors of the definitions, one (n, n) Hessian per output i,
    and the closed forms the Hessian pass uses (specs/hessian.md):

        d2 s_i / dz_j dz_k      = s_i [(delta_ij - s_j)(delta_ik - s_k) - s_j (delta_jk - s_k)]
        d2 log s_i / dz_j dz_k  = -s_j (delta_jk - s_k)        (the same for every i)

    Returns {"softmax": [H_1, ...], "softmax_closed": [...], "log_softmax": [...],
    "log_softmax_closed": [...]}; ``simplify(H - closed) == 0`` is checked by the tests.
    """
    z, soft, log_soft = definitions(n)

    def delta(a: int, b: int) -> int:
        return int(a == b)

    soft_h = [sympy.hessian(s, z) for s in soft]
    log_h = [sympy.hessian(s, z) for s in log_soft]
    soft_closed = [sympy.Matrix(n, n, lambda j, k, i=i: soft[i] * (
        (delta(i, j) - soft[j]) * (delta(i, k) - soft[k]) - soft[j] * (delta(j, k) - soft[k])))
        for i in range(n)]
    log_closed = [sympy.Matrix(n, n, lambda j, k: -soft[j] * (delta(j, k) - soft[k]))
                  for _ in range(n)]
    return {"softmax": soft_h, "softmax_closed": soft_closed, "log_softmax": log_h,
            "log_softmax_closed": log_closed}
