"""Layer normalisation (issue 12): torch.nn.LayerNorm over the trailing ``last`` per-sample axes.

y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var the biased variance (torch's
convention). Jacobian and DFD multipliers in closed form; never dense.

DFD (seed 004, Kolmogorov-Arnold-style decomposition into primitives, composed by eq. 4):
centring c = x - mean(x) (linear, eq. 7), square c^2 (exact secant c + c0), mean (linear),
r = rsqrt(v + eps) (a univariate activation with the exact secant multiplier
(r - r0) / (v - v0) = -r r0 / (sqrt(v + eps) + sqrt(v0 + eps)), free of cancellation and equal
to the derivative -r^3 / 2 where v == v0), the product n = c r by the two-player rule
d(ab) = ((b + b0) / 2) da + ((a + a0) / 2) db, then the affine weight and bias. Each step is an
exact difference identity, so the multipliers sum to the output's delta to rounding.
"""

import numpy as np


def layernorm_axes(ndim, last):
    return tuple(range(ndim - last, ndim))


def layernorm_parts(x, eps, last):
    """(centred x, 1 / sqrt(var + eps), sqrt(var + eps)) over the trailing ``last`` axes."""
    axes = layernorm_axes(x.ndim, last)
    c = x - x.mean(axis=axes, keepdims=True)
    root = np.sqrt((c * c).mean(axis=axes, keepdims=True) + eps)
    return c, 1.0 / root, root


def layernorm_affine(n, p):
    y = n * p["weight"]
    bias = p.get("bias") if hasattr(p, "get") else None
    return y if bias is None else y + bias


def layernorm_forward(xs, p, eps, last):
    c, r, _ = layernorm_parts(xs[0], eps, last)
    return layernorm_affine(c * r, p)


def layernorm_normalised_tangent(x, t, eps, last):
    """dn for n = c r along t (B, K, *shape): r (dc - n mean(n dc)), dc = t - mean(t)."""
    c, r, _ = layernorm_parts(x, eps, last)
    n, r = (c * r)[:, None], r[:, None]
    axes = layernorm_axes(t.ndim, last)
    dc = t - t.mean(axis=axes, keepdims=True)
    return r * (dc - n * (n * dc).mean(axis=axes, keepdims=True))


def layernorm_jvp(ts, xs, y, local, p, eps, last):
    return layernorm_normalised_tangent(xs[0], ts[0], eps, last) * p["weight"]


def layernorm_vjp(v, xs, y, local, p, eps, last):
    """v^T J: the Jacobian of the normalisation is symmetric, so the JVP of v w is it."""
    return [layernorm_normalised_tangent(xs[0], v * p["weight"], eps, last)]


def layernorm_dfd(m, xs, xs0, y, y0, local, p, eps, last):
    """m^T M through the primitives (module docstring): the exact DFD multipliers."""
    c, r, root = layernorm_parts(xs[0], eps, last)
    c0, r0, root0 = layernorm_parts(np.broadcast_to(xs0[0], xs[0].shape), eps, last)
    axes = layernorm_axes(m.ndim, last)
    count = int(np.prod(m.shape[m.ndim - last:]))
    m_n = m * p["weight"]
    # n = c r, two players: dn = ((r + r0)/2) dc + ((c + c0)/2) dr
    m_c = m_n * ((r + r0) / 2)[:, None]
    m_r = (m_n * ((c + c0) / 2)[:, None]).sum(axis=axes, keepdims=True)
    # r = rsqrt(v + eps): exact secant multiplier, cancellation-free
    m_v = m_r * (-(r * r0) / (root + root0))[:, None]
    # v = mean(c^2): secant of the square is c + c0
    m_c = m_c + m_v * ((c + c0) / count)[:, None]
    # c = x - mean(x): linear, its transpose
    return [m_c - m_c.mean(axis=axes, keepdims=True)]


# ---- LRP: AttnLRP's identity rule for the normalisation (Achtibat et al., ICML 2024, sec. 3.3):
# the divisor sqrt(var + eps) is held constant, so the layer is the linear map
# x -> diag(weight / sigma) (x - mean(x)) plus the bias, and takes the composite's epsilon rule
# (R_in = x * W^T (R / (z + eps)), z the layer's own output; the ledger books bias and stabiliser).
def layernorm_lrp_params(p, xs, eps, last):
    _, r, _ = layernorm_parts(xs[0], eps, last)
    bias = p.get("bias") if hasattr(p, "get") else None
    return r * p["weight"], bias


def layernorm_lrp_bias(b, z):
    return b[None]


def layernorm_lrp_forward(ins, w, eps, last):
    x = ins[0]
    axes = layernorm_axes(x.ndim, last)
    return (x - x.mean(axis=axes, keepdims=True)) * w


def layernorm_lrp_transpose(s, w, xs, eps, last):
    """The centring is symmetric, so W^T s = centre(w s)."""
    g = s * w
    return [g - g.mean(axis=layernorm_axes(g.ndim, last), keepdims=True)]


# ---- second order (the Hessian pass, pbxc/runtime/hessian.py). With n = c r, c = centre(x),
# r = (mean(c^2) + eps)^(-1/2): dc = centre(t), dr = -r^2 mean(n dc), and
# d2n(p, q) = dc_p dr_q + dc_q dr_p + c d2r(p, q),
# d2r(p, q) = 3 r^5 mean(c dc_p) mean(c dc_q) - r^3 mean(dc_p dc_q) (differentiating dr again).
def layernorm_jvp2(hs, ts, xs, y, local, curv, p, eps, last):
    c, r, _ = layernorm_parts(xs[0], eps, last)
    t = ts[0]
    batch, m = t.shape[:2]
    axes = layernorm_axes(t.ndim, last)
    dc = t - t.mean(axis=axes, keepdims=True)
    c, r = c[:, None], r[:, None]
    proj = (c * dc).mean(axis=axes, keepdims=True)          # mean(c dc_p), (B, M, ...)
    dr = -(r ** 3) * proj
    pair_dc = dc[:, :, None] * dr[:, None, :] + dc[:, None, :] * dr[:, :, None]
    cross = (dc[:, :, None] * dc[:, None, :]).mean(axis=tuple(a + 1 for a in axes),
                                                   keepdims=True)
    d2r = 3 * r[:, None] ** 5 * proj[:, :, None] * proj[:, None, :] - r[:, None] ** 3 * cross
    out = (pair_dc + c[:, None] * d2r) * p["weight"]
    out = out.reshape(batch, m * m, *t.shape[2:])
    if hs[0] is not None:
        out = out + layernorm_jvp([hs[0]], xs, y, local, p, eps, last)
    return out


def layernorm_hvp(v, vd, ts, xs, y, local, curv, p, eps, last):
    """The tangent along t of the VJP a = r (u - mean(u) - n mean(u n)), u = v w."""
    c, r, _ = layernorm_parts(xs[0], eps, last)
    n, r = (c * r)[:, None], r[:, None]
    t = ts[0]
    axes = layernorm_axes(t.ndim, last)
    u = v * p["weight"]
    dc = t - t.mean(axis=axes, keepdims=True)
    dn = r * (dc - n * (n * dc).mean(axis=axes, keepdims=True))
    dr = -(r ** 2) * (n * dc).mean(axis=axes, keepdims=True)
    un = (u * n).mean(axis=axes, keepdims=True)
    out = dr * (u - u.mean(axis=axes, keepdims=True) - n * un) \
        - r * (dn * un + n * (u * dn).mean(axis=axes, keepdims=True))
    if vd is not None:
        out = out + layernorm_vjp(vd, xs, y, local, p, eps, last)[0]
    return [out]
