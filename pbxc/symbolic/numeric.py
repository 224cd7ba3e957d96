"""The numeric library of generated NumPy code: one definition of every helper it calls.

This module is the reference semantics of the named sympy functions (``functions.py``) on
arrays. It needs only numpy (scipy is used when present, for a faster erf/erfc). Its whole
source text is the prelude of every generated NumPy module (``codegen.numpy_printer`` embeds
it verbatim), and ``evaluate.py`` calls the same functions, so the in-process evaluator and a
standalone generated module compute with the same code. It must import nothing from pbxc.

Every helper keeps the floating-point type of its argument (float32 stays float32) and raises
no floating-point warnings: branches that ``np.where`` discards may overflow harmlessly.
"""

import importlib
import math

import numpy as np

try:
    _special = importlib.import_module("scipy.special")
    _scipy_erf = _special.erf
    _scipy_erfc = _special.erfc
    _scipy_erfcx = _special.erfcx
except ImportError:  # numpy-only fallback: math.erf/erfc, exact to double precision, slower
    _scipy_erf = None
    _scipy_erfc = None
    _scipy_erfcx = None


def _float_dtype(x):
    dtype = np.asarray(x).dtype
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def _split(x):
    # Veltkamp: x = hi + lo exactly, hi with half the significand (so hi*hi is exact)
    scale = 4097.0 if x.dtype == np.float32 else 134217729.0  # 2**12 + 1, 2**27 + 1
    t = x * scale
    hi = t - (t - x)
    return hi, x - hi


def _erf(x):
    if _scipy_erf is not None:
        return _scipy_erf(x)
    out = np.vectorize(math.erf, otypes=[np.float64])(x)
    return np.asarray(out).astype(_float_dtype(x))


def _erfc(x):
    if _scipy_erfc is None:
        out = np.vectorize(math.erfc, otypes=[np.float64])(x)
        return np.asarray(out).astype(_float_dtype(x))
    x = np.asarray(x)
    if x.dtype != np.float64:  # scipy's float32 loop computes in double: already exact
        return _scipy_erfc(x)
    # scipy's double erfc rounds x*x in exp(-x*x): a relative error of x**2 units in the tail
    # (5e-14 at x = 23). erfc = erfcx(x) exp(-x*x), with x*x split exactly, is good to 1e-15.
    with np.errstate(all="ignore"):
        hi, lo = _split(x)
        tail = _scipy_erfcx(x) * (np.exp(-(hi * hi)) * np.exp(-(2 * hi * lo + lo * lo)))
    return np.where(x < 0.5, _scipy_erfc(x), tail)


def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflow for either sign of x: 1 / (1 + e) for x >= 0 and
    # e / (1 + e) below, with e = exp(-|x|) <= 1, so the numerator is max(e, x >= 0) (1 or
    # e; NaN stays NaN). Branch-free: np.where on mixed signs costs 2-3.5x the whole routine.
    e = _neg_abs_exp(x)
    return _sigmoid_of(x, e, 1 + e)


def _neg_abs_exp(x):
    # exp(-|x|): the one exponential of sigmoid(x), sigmoid(-x) and softplus(x), softplus(-x)
    # (|-x| == |x| bit for bit), which generated routines compute once and share
    return np.exp(-np.abs(x))


def _sigmoid_of(x, e, one_plus_e):
    # sigmoid(x) from e = exp(-|x|) and 1 + e: bit for bit _sigmoid(x)
    return np.maximum(e, x >= 0) / one_plus_e   # one division, the same rounding


def _sigmoid_pair(e, one_plus_e):
    # sigmoid(x) sigmoid(-x) from e = exp(-|x|) and 1 + e: one factor is 1 / (1 + e), the
    # other e / (1 + e) (both 1 / 2 at x = 0, where e = 1), so the product is e / (1 + e)^2:
    # one square and one division for two divisions and a product (tanh', sigmoid',
    # softplus''). (1 + e)^2 <= 4: no overflow; NaN stays NaN; e = 0 (|x| = inf) gives 0.
    return e / (one_plus_e * one_plus_e)


def _softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))
    return _softplus_of(x, _neg_abs_exp(x))


def _softplus_of(x, e):
    # softplus(x) from e = exp(-|x|): bit for bit _softplus(x)
    return np.maximum(x, 0) + np.log1p(e)


# 1/sqrt(2) = _R2_HI + _R2_LO in each precision (the low part from a 40-digit value)
_R2 = {np.dtype(np.float64): (0.7071067811865476, -4.833646656726457e-17),
       np.dtype(np.float32): (0.7071067690849304, 1.2101617485882343e-08)}


def _normal_cdf(x):
    # Phi(x) = erfc(y) / 2 with y = -x / sqrt 2. Rounding y would cost a relative error of
    # x**2 units in the tail, so y is carried as y + e (Dekker's exact product) and
    # erfc(y + e) = erfc(y) - e 2/sqrt(pi) exp(-y*y) to first order.
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    r_hi, r_lo = _R2.get(x.dtype, _R2[np.dtype(np.float64)])
    with np.errstate(all="ignore"):
        y = -x * r_hi
        a_hi, a_lo = _split(-x)
        b_hi, b_lo = _split(np.asarray(r_hi, dtype=x.dtype))
        e = ((a_hi * b_hi - y) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
        e = e - x * r_lo
        out = 0.5 * (_erfc(y) - e * (1.1283791670955126 * np.exp(-y * y)))
    return np.where(np.isfinite(x), out, _erfc(y) * 0.5)


def _gauss(x):
    # exp(-x*x/2) with x split as hi + lo (Veltkamp), hi holding half the significand, so that
    # hi*hi is exact and only the small remainder hi*lo + lo*lo/2 is rounded
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    with np.errstate(all="ignore"):
        hi, lo = _split(x)
        g = np.exp(-0.5 * (hi * hi)) * np.exp(-(hi * lo + 0.5 * (lo * lo)))
    return np.where(np.abs(x) > 64, 0, g)


def _ratio(numerator, x):
    # numerator(x) / x, with the limit 1 at x == 0
    with np.errstate(all="ignore"):
        q = numerator(x) / x
    return np.where(x == 0, 1, q)


def _expm1_ratio(x):
    return _ratio(np.expm1, x)


def _log1p_ratio(x):
    return _ratio(np.log1p, x)


def _sinh_ratio(x):
    return _ratio(np.sinh, x)


def _sin_ratio(x):
    return _ratio(np.sin, x)


def _atan_ratio(x):
    return _ratio(np.arctan, x)


def _is_finite(x):
    return np.isfinite(x)


def _unit_roundoff(x):
    # half the machine epsilon of the argument's floating-point type
    return float(np.finfo(_float_dtype(x)).eps) / 2


def _is_single(x):
    return _float_dtype(x) == np.float32


# ---------------------------------------------------------------- double-word arithmetic
# Error-free transformations (Knuth's TwoSum, Dekker's TwoProduct): a value is carried as an
# unevaluated sum hi + lo of two numbers of the working type, about twice its precision.


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _sum_error(a, b):
    # (a + b) - fl(a + b), exactly
    with np.errstate(all="ignore"):
        s, e = _two_sum(np.asarray(a), np.asarray(b))
    return np.where(np.isfinite(s), e, 0)


def _fast_two_sum(a, b):
    # requires |a| >= |b| (or a == 0)
    s = a + b
    return s, b - (s - a)


def _two_prod(a, b):
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _dd_add(a_hi, a_lo, b_hi, b_lo):
    s, e = _two_sum(a_hi, b_hi)
    return _fast_two_sum(s, e + (a_lo + b_lo))


def _dd_mul(a_hi, a_lo, b_hi, b_lo):
    p, e = _two_prod(a_hi, b_hi)
    return _fast_two_sum(p, e + (a_hi * b_lo + a_lo * b_hi))


def _series_patch(z0, z, centre, radius, hi64, lo64, hi32, lo32):
    # sum_k a_k h_(k-1)(u0, u), u0 = z0 - c, u = z - c, by Clenshaw's recurrence
    # y_k = a_k + s y_(k+1) - p y_(k+2) (s = u0 + u, p = u0 u) in double-word arithmetic;
    # NaN outside the square |u0|, |u| <= radius. Only the elements inside are computed.
    z0, z = np.broadcast_arrays(np.asarray(z0), np.asarray(z))
    dtype = _float_dtype(z)
    z0, z = z0.astype(dtype), z.astype(dtype)
    hi, lo = (hi32, lo32) if dtype == np.float32 else (hi64, lo64)
    out = np.full(z.shape, np.nan, dtype=dtype)
    with np.errstate(all="ignore"):
        inside = (np.abs(z0 - centre) <= radius) & (np.abs(z - centre) <= radius)
        if not inside.any():
            return out
        a, b = z0[inside], z[inside]
        u0_hi, u0_lo = _two_sum(a, dtype.type(-centre))
        u_hi, u_lo = _two_sum(b, dtype.type(-centre))
        s_hi, s_lo = _dd_add(u0_hi, u0_lo, u_hi, u_lo)
        p_hi, p_lo = _dd_mul(u0_hi, u0_lo, u_hi, u_lo)
        zero = np.zeros_like(a)
        y1_hi, y1_lo, y2_hi, y2_lo = zero, zero, zero, zero
        for k in reversed(range(len(hi))):
            t_hi, t_lo = _dd_mul(s_hi, s_lo, y1_hi, y1_lo)
            q_hi, q_lo = _dd_mul(p_hi, p_lo, y2_hi, y2_lo)
            t_hi, t_lo = _dd_add(t_hi, t_lo, -q_hi, -q_lo)
            y_hi, y_lo = _dd_add(dtype.type(hi[k]), dtype.type(lo[k]), t_hi, t_lo)
            y2_hi, y2_lo, y1_hi, y1_lo = y1_hi, y1_lo, y_hi, y_lo
        out[inside] = y1_hi + y1_lo
    return out


# ---------------------------------------------------------------- softmax and log_softmax
# The Jacobians and DFD multipliers of softmax and log_softmax all have the form
# M = diag(a) - c b^T along the softmax axis (c = a for softmax, c = 1 for log_softmax), so
# they are applied in O(n) per sample and never stored as n x n matrices unless asked.


def _logsumexp(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    return top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _softmax_dfd_factors(z0, z, axis=-1):
    # (L, w) of the softmax DFD multiplier M = diag(L) - L w^T; log_softmax's is I - 1 w^T.
    # s_i = exp(z_i - lse(z)): w_j = [exp](z0_j, z_j) / [exp](lse0, lse) is the multiplier of
    # z_j on lse (a sum of exponentials, then a log), and L_i = [exp](log s_i(z0), log s_i(z))
    # the multiplier of the outer exp; [exp](a, b) = exp(max(a, b)) E1(-|b - a|).
    z0 = np.asarray(z0)
    z = np.asarray(z)
    with np.errstate(all="ignore"):
        lse0 = _logsumexp(z0, axis)
        lse1 = _logsumexp(z, axis)
        hi = np.maximum(lse0, lse1)
        lo = np.minimum(lse0, lse1)
        dz = z - z0
        top = np.maximum(z0, z)
        # lse - lse0 = +-log1p(|S - S0| / min(S, S0)), with S - S0 a sum of exp differences
        ratio = np.sum(np.sign(dz) * np.exp(top - lo) * -np.expm1(-np.abs(dz)), axis=axis,
                       keepdims=True)
        direct = lse1 - lse0
        dlse = np.where(np.abs(direct) < 0.5, np.sign(ratio) * np.log1p(np.abs(ratio)), direct)
        w = np.exp(top - hi) * (_expm1_ratio(-np.abs(dz)) / _expm1_ratio(-np.abs(dlse)))
        dls = dz - dlse  # change of log s_i
        log_s = np.maximum(z0 - lse0, z - lse1)
        big = np.exp(log_s) * _expm1_ratio(-np.abs(dls))
    return big, w


def _diag_minus_outer_jvp(a, c, b, v, axis=-1):
    # (diag(a) - c b^T) v
    return a * v - c * np.sum(b * v, axis=axis, keepdims=True)


def _diag_minus_outer_vjp(a, c, b, u, axis=-1):
    # u^T (diag(a) - c b^T)
    return a * u - b * np.sum(c * u, axis=axis, keepdims=True)


def _diag_minus_outer_dense(a, c, b, axis=-1):
    # the n x n matrices diag(a) - c b^T, as the last two axes (rows: outputs i, columns: j)
    a, c, b = (np.moveaxis(np.broadcast_to(t, np.broadcast_shapes(
        np.shape(a), np.shape(c), np.shape(b))), axis, -1) for t in (a, c, b))
    eye = np.eye(a.shape[-1], dtype=a.dtype)
    return a[..., :, None] * eye - c[..., :, None] * b[..., None, :]


# ---------------------------------------------------------------- generated routines
def _args(*xs):
    # arrays of one floating-point type (float32 only if every argument is float32)
    arrays = [np.asarray(x) for x in xs]
    single = all(a.dtype == np.float32 for a in arrays)
    dtype = np.dtype(np.float32) if single else np.dtype(np.float64)
    return tuple(a.astype(dtype, copy=False) for a in arrays)


def _finish(value, *like):
    # the routine's value broadcast to its arguments' shape, in their floating-point type; a
    # fresh array that already is that (no view, not an argument) is returned as it is,
    # without a copy
    shape = np.broadcast_shapes(*(np.shape(a) for a in like))
    if (type(value) is np.ndarray and value.base is None and value.shape == shape
            and value.dtype == like[0].dtype and not any(value is a for a in like)):
        return value
    return np.array(np.broadcast_to(np.asarray(value), shape), dtype=like[0].dtype)
