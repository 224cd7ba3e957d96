"""Tensor ops of issue 12 (transformers): matmul of two values, transpose, slice, select,
mean and sum over per-sample axes.

Arrays carry the batch axis first (forward: (B, ...); tangents and cotangents: (B, K, ...));
attributes name per-sample axes, already normalised to be non-negative by lowering.
"""

import numpy as np


def _tn_align(a, lead, rank):
    """(lead..., *shape) -> (lead..., 1, ..., *shape) with ``rank`` per-sample axes."""
    per = a.shape[lead:]
    return a.reshape(*a.shape[:lead], *(1,) * (rank - len(per)), *per)


def _tn_reduce(g, lead, shape):
    """Sum a broadcast cotangent (lead..., *out) back to (lead..., *shape)."""
    extra = g.ndim - lead - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(lead, lead + extra)))
    axes = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(*g.shape[:lead], *shape)


def _tn_swap(a):
    return np.swapaxes(a, -1, -2)


# ---- matmul(a, b) of two values: [..., n, k] @ [..., k, m], leading axes broadcast
def _tn_factors(xs, lead):
    """Both factors with ``lead`` leading axes (1: batch; 2: batch and a tangent axis of 1)
    and the same per-sample rank."""
    rank = max(x.ndim - 1 for x in xs)
    a, b = xs
    if lead == 2:
        a, b = a[:, None], b[:, None]
    return _tn_align(a, lead, rank), _tn_align(b, lead, rank)


def matmul_forward(xs, p):
    a, b = _tn_factors(xs, 1)
    return np.ascontiguousarray(np.matmul(a, b))


def matmul_jvp(ts, xs, y, local, p):
    """The product rule for a bilinear map: d(AB) = dA B + A dB."""
    a, b = _tn_factors(xs, 2)
    rank = a.ndim - 2
    ta, tb = _tn_align(ts[0], 2, rank), _tn_align(ts[1], 2, rank)
    out = np.matmul(ta, b) + np.matmul(a, tb)
    return np.ascontiguousarray(np.broadcast_to(out, (*ts[0].shape[:2], *y.shape[1:])))


def matmul_vjp(v, xs, y, local, p):
    """dL/dA = V B^T and dL/dB = A^T V, summed over the broadcast leading axes."""
    a, b = _tn_factors(xs, 2)
    return [_tn_reduce(np.matmul(v, _tn_swap(b)), 2, xs[0].shape[1:]),
            _tn_reduce(np.matmul(_tn_swap(a), v), 2, xs[1].shape[1:])]


def matmul_dfd(m, xs, xs0, y, y0, local, p):
    """DFD's exact two-player rule for a bilinear product (seed 004, eq. 1 and 4; the
    Shapley value of the two factors, Shapley 1953): AB - A0B0 = (A - A0)(B + B0)/2 +
    (A + A0)(B - B0)/2, so the multipliers are those of the VJP at the midpoints:
    m_A = m ((B + B0)/2)^T and m_B = ((A + A0)/2)^T m; they sum to delta exactly."""
    a, b = _tn_factors(xs, 2)
    a0, b0 = _tn_factors(xs0, 2)
    return [_tn_reduce(np.matmul(m, _tn_swap((b + b0) / 2)), 2, xs[0].shape[1:]),
            _tn_reduce(np.matmul(_tn_swap((a + a0) / 2), m), 2, xs[1].shape[1:])]


def _tn_stabilise(z, epsilon, placement):
    """The stabilised denominator: z + eps sign(z) (sign(0) = +1; Zennit, Captum) or, with
    ``placement="slides"``, z + eps (LXT's ``_stabilize``), as numpy_kernels.lrp_stabilise."""
    eps = z.dtype.type(epsilon)
    if placement == "slides":
        return z + eps
    return z + np.where(z >= 0, eps, -eps)


def _tn_share(relevance, den):
    """s = R / den, 0 where den is 0 (only possible with eps = 0 or the slides placement):
    that relevance is the stabiliser's, as numpy_kernels.lrp_divide."""
    return np.divide(relevance, den, out=np.zeros_like(relevance), where=den != 0)


def _tn_per_sample(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def matmul_relevance(relevance, xs, y, mode="uniform", epsilon=1e-6, placement="sign"):
    """LRP through C = A B (batched, relevance (B, ..., n, m)). Returns
    ``(r_a, r_b, stabiliser)``: the factors' relevance and, per sample, what the stabiliser
    absorbed, for the ledger: sum(r_a) + sum(r_b) + stabiliser = sum(relevance).

    The product is a sum of terms z_nkm = A_nk B_km. ``"uniform"``: AttnLRP's uniform epsilon
    rule for bilinear products (Achtibat et al. ICML 2024, Prop. 3.3 / eq. 14): each term
    hands z_nkm R_nm / (2 C_nm + eps sign(C_nm)) to A_nk and the same to B_km, i.e. half of
    its epsilon share to each factor (LXT's ``matmul_fn``, whose denominator is 2C + eps:
    ``placement="slides"``). ``"constant0"`` / ``"constant1"``: that operand is a constant
    (CP-LRP, attention weights as constants, Ali et al. ICML 2022), each term's whole epsilon
    share z_nkm R_nm / (C_nm + eps sign(C_nm)) (Bach et al. 2015, eq. 58) goes to the other.
    ``epsilon`` is the composite's (pbxc.runtime.lrp_rules.Composite.epsilon). The
    stabiliser is computed from its own formula, sum_nm (R_nm - c s_nm C_nm) with c = 2
    (uniform) or 1, not as a residual, so the ledger's identity checks this kernel.
    """
    a, b = _tn_factors(xs, 1)
    z = np.matmul(a, b)
    if mode == "uniform":
        coef = 2
    elif mode in ("constant0", "constant1"):
        coef = 1
    else:
        raise ValueError(f"matmul_relevance: unknown mode '{mode}'")
    s = _tn_share(relevance, _tn_stabilise(coef * z, epsilon, placement))
    ra = _tn_reduce(a * np.matmul(s, _tn_swap(b)), 1, xs[0].shape[1:])
    rb = _tn_reduce(b * np.matmul(_tn_swap(a), s), 1, xs[1].shape[1:])
    if mode == "constant0":
        ra = np.zeros_like(ra)
    elif mode == "constant1":
        rb = np.zeros_like(rb)
    rest = _tn_per_sample(relevance - coef * s * z)
    return ra, rb, rest


# ---- transpose(x, perm): a permutation of the per-sample axes
def transpose_forward(xs, p, perm):
    return np.ascontiguousarray(np.transpose(xs[0], (0, *(1 + i for i in perm))))


def transpose_jvp(ts, xs, y, local, p, perm):
    return np.ascontiguousarray(np.transpose(ts[0], (0, 1, *(2 + i for i in perm))))


def transpose_vjp(v, xs, y, local, p, perm):
    inverse = np.argsort(perm)
    return [np.ascontiguousarray(np.transpose(v, (0, 1, *(2 + int(i) for i in inverse))))]


def transpose_relevance(relevance, xs, perm):
    inverse = np.argsort(perm)
    return [np.ascontiguousarray(np.transpose(relevance, (0, *(1 + int(i) for i in inverse))))]


# ---- slice(x, axis, start, stop, step) and select(x, axis, index)
def _tn_index(lead, axis, key):
    return (slice(None),) * (lead + axis) + (key,)


def slice_forward(xs, p, axis, start, stop, step):
    return np.ascontiguousarray(xs[0][_tn_index(1, axis, slice(start, stop, step))])


def slice_jvp(ts, xs, y, local, p, axis, start, stop, step):
    return np.ascontiguousarray(ts[0][_tn_index(2, axis, slice(start, stop, step))])


def slice_vjp(v, xs, y, local, p, axis, start, stop, step):
    """Scatter the cotangent back into zeros (the transpose of a selection)."""
    out = np.zeros((*v.shape[:2], *xs[0].shape[1:]), dtype=v.dtype)
    out[_tn_index(2, axis, slice(start, stop, step))] = v
    return [out]


def slice_relevance(relevance, xs, axis, start, stop, step):
    out = np.zeros_like(xs[0], dtype=relevance.dtype)
    out[_tn_index(1, axis, slice(start, stop, step))] = relevance
    return [out]


def select_forward(xs, p, axis, index):
    return np.ascontiguousarray(xs[0][_tn_index(1, axis, index)])


def select_jvp(ts, xs, y, local, p, axis, index):
    return np.ascontiguousarray(ts[0][_tn_index(2, axis, index)])


def select_vjp(v, xs, y, local, p, axis, index):
    out = np.zeros((*v.shape[:2], *xs[0].shape[1:]), dtype=v.dtype)
    out[_tn_index(2, axis, index)] = v
    return [out]


def select_relevance(relevance, xs, axis, index):
    out = np.zeros_like(xs[0], dtype=relevance.dtype)
    out[_tn_index(1, axis, index)] = relevance
    return [out]


# ---- sum and mean over per-sample axes (linear maps)
def _tn_reduce_axes(lead, axes):
    return tuple(lead + a for a in axes)


def _tn_count(shape, axes):
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def sum_forward(xs, p, axes, keepdims):
    return np.ascontiguousarray(xs[0].sum(axis=_tn_reduce_axes(1, axes), keepdims=keepdims))


def sum_jvp(ts, xs, y, local, p, axes, keepdims):
    return np.ascontiguousarray(ts[0].sum(axis=_tn_reduce_axes(2, axes), keepdims=keepdims))


def _tn_expand(v, lead, shape, axes, keepdims):
    if not keepdims:
        v = np.expand_dims(v, _tn_reduce_axes(lead, axes))
    return np.ascontiguousarray(np.broadcast_to(v, (*v.shape[:lead], *shape)))


def sum_vjp(v, xs, y, local, p, axes, keepdims):
    return [_tn_expand(v, 2, xs[0].shape[1:], axes, keepdims)]


def mean_forward(xs, p, axes, keepdims):
    return np.ascontiguousarray(xs[0].mean(axis=_tn_reduce_axes(1, axes), keepdims=keepdims))


def mean_jvp(ts, xs, y, local, p, axes, keepdims):
    return np.ascontiguousarray(ts[0].mean(axis=_tn_reduce_axes(2, axes), keepdims=keepdims))


def mean_vjp(v, xs, y, local, p, axes, keepdims):
    n = _tn_count(xs[0].shape[1:], axes)
    return [_tn_expand(v / v.dtype.type(n), 2, xs[0].shape[1:], axes, keepdims)]


def reduction_relevance(relevance, xs, axes, keepdims, epsilon=0.0, placement="sign"):
    """LRP's epsilon rule for y_j = sum_i w x_i (sum: w = 1; mean: w = 1/n, which cancels in
    the shares; Bach et al. 2015, eq. 58): R_i = x_i R_j / (y'_j + eps sign(y'_j)) with
    y'_j = sum_i x_i (LXT's ``mean_fn``: y'_j + eps, ``placement="slides"``). Returns
    (r_x, stabiliser) with the stabiliser sum_j (R_j - s_j y'_j) for the ledger."""
    x = xs[0]
    z = x.sum(axis=_tn_reduce_axes(1, axes), keepdims=keepdims)
    s = _tn_share(relevance, _tn_stabilise(z, epsilon, placement))
    r = x * _tn_expand(s, 1, x.shape[1:], axes, keepdims)
    return r, _tn_per_sample(relevance - s * z)


# ---- second order (the Hessian pass, specs/hessian.md): matmul is bilinear, the rest linear
def _tn_pairs(ta, tb):
    """(B, M, M, *out): ta[p] @ tb[q] for every ordered pair, through matmul_forward."""
    batch, m = ta.shape[:2]
    a = np.broadcast_to(ta[:, :, None], (batch, m, m, *ta.shape[2:]))
    b = np.broadcast_to(tb[:, None, :], (batch, m, m, *tb.shape[2:]))
    out = matmul_forward([a.reshape(batch * m * m, *ta.shape[2:]),
                          b.reshape(batch * m * m, *tb.shape[2:])], None)
    return out.reshape(batch, m, m, *out.shape[1:])


def matmul_jvp2(hs, ts, xs, y, local, curv, p):
    """d2(AB)(t_p, t_q) = tA_p tB_q + tA_q tB_p, plus hA B + A hB (the bilinear product rule
    twice, as mul's: Abe & Asai's Algorithm 1 to second order, arXiv 2502.14001)."""
    cross = _tn_pairs(ts[0], ts[1])
    cross = cross + np.swapaxes(cross, 1, 2)
    m = ts[0].shape[1]
    out = cross.reshape(cross.shape[0], m * m, *cross.shape[3:])
    if hs[0] is not None or hs[1] is not None:
        full = [h if h is not None else np.zeros((t.shape[0], m * m, *t.shape[2:]), t.dtype)
                for h, t in zip(hs, ts)]
        out = out + matmul_jvp(full, xs, y, local, p)
    return out


def matmul_hvp(v, vd, ts, xs, y, local, curv, p):
    """The tangent of [v B^T, A^T v] along (tA, tB): [vd B^T + v tB^T, A^T vd + tA^T v],
    each summed back over the broadcast leading axes."""
    batch, m = ts[0].shape[:2]
    reps = np.broadcast_to(v, (batch, m, *v.shape[2:])).reshape(batch * m, 1, *v.shape[2:])
    fake = [t.reshape(batch * m, *t.shape[2:]) for t in ts]
    # matmul_vjp(v, [tA, tB]) = [v tB^T, tA^T v]: the a-slot's and the b-slot's tangents
    va, vb = matmul_vjp(reps, fake, y, local, p)
    out = [va.reshape(batch, m, *xs[0].shape[1:]), vb.reshape(batch, m, *xs[1].shape[1:])]
    if vd is not None:
        out = [o + g for o, g in zip(out, matmul_vjp(vd, xs, y, local, p))]
    return out
