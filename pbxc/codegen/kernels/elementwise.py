"""Elementwise ops with broadcasting: sums and differences of values, products of two
values, shifts and scalings by constants, and PReLU.

Per-sample shapes broadcast as in NumPy and PyTorch (aligned on the right), the batch axis
(and the tangent axis) aside: a squeeze-and-excitation gate [C, 1, 1] scales a [C, H, W]
signal. A transposed broadcast sums over the axes it repeated (``_ew_reduce``).
"""

import numpy as np


def _ew_align(a, lead, rank):
    """(lead..., *shape) -> (lead..., 1, ..., *shape) with ``rank`` per-sample axes."""
    per = a.shape[lead:]
    return a.reshape(*a.shape[:lead], *(1,) * (rank - len(per)), *per)


def _ew_rank(xs):
    return max(x.ndim - 1 for x in xs)


def _ew_reduce(g, lead, shape):
    """Sum a broadcast cotangent (lead..., *out) back to (lead..., *shape)."""
    extra = g.ndim - lead - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(lead, lead + extra)))
    axes = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(*g.shape[:lead], *shape)


# ---- sums with signs: add and sub of values of broadcastable shapes
def signed_sum_forward(xs, p, signs):
    rank = _ew_rank(xs)
    out = _ew_signed([_ew_align(x, 1, rank) for x in xs], signs)
    return np.ascontiguousarray(np.broadcast_to(out, np.broadcast_shapes(
        *(_ew_align(x, 1, rank).shape for x in xs))))


def _ew_signed(terms, signs):
    """terms[0] +- terms[1] +- ..., in order (a - b exactly as written, never a + (-b))."""
    out = terms[0] if signs[0] > 0 else -terms[0]
    for term, sign in zip(terms[1:], signs[1:]):
        out = out + term if sign > 0 else out - term
    return out


def signed_sum_jvp(ts, xs, y, local, p, signs):
    rank = _ew_rank(xs)
    out = _ew_signed([_ew_align(t, 2, rank) for t in ts], signs)
    return np.ascontiguousarray(np.broadcast_to(out, (*ts[0].shape[:2], *y.shape[1:])))


def signed_sum_vjp(v, xs, y, local, p, signs):
    return [_ew_reduce(v if sign > 0 else -v, 2, x.shape[1:]) for x, sign in zip(xs, signs)]


def signed_sum_lrp_params(p, xs, signs):
    """Weights +1 and -1 per input (a linear layer without bias): z+ keeps the +1 terms."""
    return np.asarray(signs, dtype=xs[0].dtype), None


def signed_sum_lrp_bias(b, z):
    return b


def signed_sum_lrp_forward(ins, w, signs):
    rank = _ew_rank(ins)
    out = w[0] * _ew_align(ins[0], 1, rank)
    for i, x in enumerate(ins[1:], start=1):
        out = out + w[i] * _ew_align(x, 1, rank)
    return np.broadcast_to(out, np.broadcast_shapes(*(_ew_align(x, 1, rank).shape
                                                      for x in ins)))


def signed_sum_lrp_transpose(s, w, xs, signs):
    return [_ew_reduce(w[i] * s, 1, x.shape[1:]) for i, x in enumerate(xs)]


# ---- x + c, x - c: a shift by a constant (a number or a weight tensor)
def _ew_constant(p, value, like):
    if value is not None:
        return like.dtype.type(value)
    return p["constant"].astype(like.dtype, copy=False)


def _ew_shape_for(c, x):
    """A per-sample constant broadcast against (B, ...) arrays of x's rank."""
    return c if np.ndim(c) == 0 else _ew_align(c[None], 1, x.ndim - 1)


def shift_forward(xs, p, sign, value):
    x = xs[0]
    c = _ew_constant(p, value, x)
    if np.ndim(c):
        rank = max(x.ndim - 1, c.ndim)
        x, c = _ew_align(x, 1, rank), _ew_align(c[None], 1, rank)
    return np.ascontiguousarray(x + c if sign > 0 else x - c)


def shift_jvp(ts, xs, y, local, p, sign, value):
    return np.ascontiguousarray(np.broadcast_to(_ew_align(ts[0], 2, y.ndim - 1),
                                                (*ts[0].shape[:2], *y.shape[1:])))


def shift_vjp(v, xs, y, local, p, sign, value):
    return [_ew_reduce(v, 2, xs[0].shape[1:])]


def shift_lrp_params(p, xs, sign, value):
    """A unit weight and the (signed) constant as the bias, which keeps its share s c."""
    c = _ew_constant(p, value, xs[0])
    return np.ones((), dtype=xs[0].dtype), c if sign > 0 else -c


def shift_lrp_bias(b, z):
    return b if np.ndim(b) == 0 else _ew_align(b[None], 1, z.ndim - 1)


def shift_lrp_forward(ins, w, sign, value):
    return w * ins[0]


def shift_lrp_transpose(s, w, xs, sign, value):
    return [_ew_reduce(w * s, 1, xs[0].shape[1:])]


# ---- x * c, x / c: a scaling by a constant
def scale_forward(xs, p, inverse, value):
    x = xs[0]
    c = _ew_constant(p, value, x)
    if np.ndim(c):
        rank = max(x.ndim - 1, c.ndim)
        x, c = _ew_align(x, 1, rank), _ew_align(c[None], 1, rank)
    return np.ascontiguousarray(x / c if inverse else x * c)


def _scale_factor(p, value, x, inverse):
    c = _ew_constant(p, value, x)
    return 1 / c if inverse else c


def scale_jvp(ts, xs, y, local, p, inverse, value):
    c = _ew_constant(p, value, xs[0])
    t = _ew_align(ts[0], 2, y.ndim - 1)
    if np.ndim(c):
        c = _ew_align(c[None, None], 2, y.ndim - 1)
    return np.ascontiguousarray(np.broadcast_to(t / c if inverse else t * c,
                                                (*ts[0].shape[:2], *y.shape[1:])))


def scale_vjp(v, xs, y, local, p, inverse, value):
    c = _ew_constant(p, value, xs[0])
    if np.ndim(c):
        c = _ew_align(c[None, None], 2, v.ndim - 2)
    return [_ew_reduce(v / c if inverse else v * c, 2, xs[0].shape[1:])]


def scale_lrp_params(p, xs, inverse, value):
    """The per-element weight c (1/c for a division), without bias: eps=0 hands each
    element its relevance unchanged; z+ and gamma see the sign of c."""
    c = _scale_factor(p, value, xs[0], inverse)
    return np.asarray(c, dtype=xs[0].dtype), None


def scale_lrp_bias(b, z):
    return b


def scale_lrp_forward(ins, w, inverse, value):
    x = ins[0]
    if np.ndim(w):
        rank = max(x.ndim - 1, w.ndim)
        return _ew_align(x, 1, rank) * _ew_align(w[None], 1, rank)
    return x * w


def scale_lrp_transpose(s, w, xs, inverse, value):
    if np.ndim(w):
        w = _ew_align(w[None], 1, s.ndim - 1)
    return [_ew_reduce(s * w, 1, xs[0].shape[1:])]


# ---- a * b: the product of two values
def product_forward(xs, p, lrp):
    rank = _ew_rank(xs)
    return np.ascontiguousarray(_ew_align(xs[0], 1, rank) * _ew_align(xs[1], 1, rank))


def product_jvp(ts, xs, y, local, p, lrp):
    """The product rule: d(ab) = b da + a db."""
    rank = y.ndim - 1
    a, b = (_ew_align(x[:, None], 2, rank) for x in xs)
    ta, tb = (_ew_align(t, 2, rank) for t in ts)
    return np.ascontiguousarray(np.broadcast_to(ta * b + a * tb,
                                                (*ts[0].shape[:2], *y.shape[1:])))


def product_vjp(v, xs, y, local, p, lrp):
    rank = y.ndim - 1
    a, b = (_ew_align(x[:, None], 2, rank) for x in xs)
    return [_ew_reduce(v * b, 2, xs[0].shape[1:]), _ew_reduce(v * a, 2, xs[1].shape[1:])]


def product_dfd(m, xs, xs0, y, y0, local, p, lrp):
    """DFD's exact two-player rule for a product (the Shapley value of a and b):
    ab - a0 b0 = ((b + b0) / 2) (a - a0) + ((a + a0) / 2) (b - b0), so m_a = m (b + b0) / 2
    and m_b = m (a + a0) / 2 sum to delta exactly (seed 004, eq. 1 and 4). It is the Shapley
    value of the two factors (Shapley 1953: each factor's change averaged over both orders);
    the preprint and DeepLIFT leave products open."""
    rank = y.ndim - 1
    a, b = (_ew_align(x[:, None], 2, rank) for x in xs)
    a0, b0 = (_ew_align(x[:, None], 2, rank) for x in xs0)
    return [_ew_reduce(m * ((b + b0) / 2), 2, xs[0].shape[1:]),
            _ew_reduce(m * ((a + a0) / 2), 2, xs[1].shape[1:])]


def product_relevance(relevance, xs, lrp):
    """LRP through a product of two values. ``"gate"`` (default): the factor of the output's
    own shape is the signal and the other (the squeeze-and-excitation gate) a constant that
    takes no relevance (Zennit and LXT treat a gate as part of the weight; Arras et al.
    2017, sec. 3.3, LRP for LSTM gates: "the gate ... gets no relevance"); if both have the
    output's shape, the first argument is the signal. ``"uniform"``: half to each factor,
    summed over what it was broadcast along (the uniform rule for products of AttnLRP,
    Achtibat et al. 2024, as LXT's ``mul2``). Both conserve relevance exactly."""
    out_shape = relevance.shape[1:]
    if lrp == "uniform":
        half = relevance / 2
        return [_ew_reduce(half, 1, x.shape[1:]) for x in xs]
    signal = 0 if xs[0].shape[1:] == out_shape or xs[1].shape[1:] != out_shape else 1
    parts = [np.zeros_like(x) for x in xs]
    parts[signal] = _ew_reduce(relevance, 1, xs[signal].shape[1:])
    return parts


def product_mode_relevance(relevance, xs, mode):
    """LRP through a product of two values under a composite's mode (pbxc.runtime.lrp's
    product_modes): ``"uniform"`` halves it (AttnLRP, Prop. 3.2 / eq. 7: one term per
    output, so there is no sum to stabilise; LXT's ``mul2``); ``"constant0"`` /
    ``"constant1"``: that factor is a constant (CP-LRP, Ali et al. ICML 2022) and the other
    takes all of it, summed over what it was broadcast along; ``"gate"``: product_relevance's
    gate rule (the op's own ``lrp=`` attribute, without a composite's policy). Conserves
    exactly."""
    if mode in ("uniform", "gate"):
        return product_relevance(relevance, xs, mode)
    keep = 1 if mode == "constant0" else 0
    parts = [np.zeros_like(x) for x in xs]
    parts[keep] = _ew_reduce(relevance, 1, xs[keep].shape[1:])
    return parts


# ---- PReLU: a learned slope per channel (He et al. 2015, eq. 1)
def _prelu_slope(p, x):
    a = p["weight"].astype(x.dtype, copy=False)
    if a.size == 1 or x.ndim < 2:
        return a.reshape(())
    return a.reshape(1, -1, *(1,) * (x.ndim - 2))


def prelu_forward(xs, p):
    x = xs[0]
    return np.where(x > 0, x, _prelu_slope(p, x) * x)


def prelu_local(xs, p):
    """f'(x): 1 for x > 0, the slope a for x <= 0 (PyTorch's choice at 0)."""
    x = xs[0]
    return np.where(x > 0, x.dtype.type(1), np.broadcast_to(_prelu_slope(p, x), x.shape))


def prelu_jvp(ts, xs, y, local, p):
    return ts[0] * local[:, None]


def prelu_vjp(v, xs, y, local, p):
    return [v * local[:, None]]


def prelu_dfd(m, xs, xs0, y, y0, local, p):
    """The rescale rule m = (f(x) - f(x0)) / (x - x0) (seed 004, eq. 16), exactly: 1 or a
    where x and x0 lie on one side of 0, the secant where they straddle it (there
    |x - x0| = |x| + |x0| cannot cancel), f'(x) where x == x0 (eq. 17)."""
    x, x0 = xs[0], xs0[0]
    a = np.broadcast_to(_prelu_slope(p, x), x.shape)
    up, up0 = x > 0, x0 > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        secant = (y - y0) / np.where(up == up0, 1, x - x0)
    mult = np.where(up & up0, x.dtype.type(1), np.where(~up & ~up0, a, secant))
    return [m * mult[:, None]]
