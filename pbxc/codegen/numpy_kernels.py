"""NumPy kernels for every op: forward, and the transposed (vector-Jacobian) linear maps.

This module is self-contained on purpose (numpy only; its one pbxc import is the numeric
prelude, ``pbxc.symbolic.numeric``, which every generated module already holds verbatim): the
runtime imports it, and ``pbxc compile`` copies its source, less that import line, into
standalone generated modules, so the reference semantics exist once.

Batched layout: arrays are (N, *per_sample_shape). For linear maps N may be batch x tangents.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pbxc.codegen.kernels.conv import *  # noqa: F403  the conv family, copied before this module
from pbxc.codegen.kernels.conv import _ALL, _conv_slices, _kernel_offsets, conv_out_size
from pbxc.symbolic.numeric import _diag_minus_outer_vjp, _softmax_dfd_factors  # prelude


def windows2d(x, kernel, stride, padding, dilation=(1, 1), pad_value=0.0):
    """(N, C, H, W) -> (N, C, OH, OW, kh, kw) view of every window (a copy only for padding)."""
    (ph, pw), (kh, kw), (dh, dw), (sh, sw) = padding, kernel, dilation, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    win = sliding_window_view(x, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def maxpool2d_gather(t, index, kernel, stride, padding):
    """The tangent of max pooling: each window's tangent at its (saved) maximum."""
    win = windows2d(t, kernel, stride, padding)
    flat = win.reshape(*win.shape[:4], -1)
    return np.ascontiguousarray(np.take_along_axis(flat, index[..., None], axis=4)[..., 0])


def _tile_offsets(x, kernel):
    """Tiling windows: one strided view per in-window offset, in row-major order."""
    kh, kw = kernel
    oh, ow = x.shape[-2] // kh, x.shape[-1] // kw
    return [x[..., p:p + kh * oh:kh, q:q + kw * ow:kw] for p in range(kh) for q in range(kw)]


def _pad2d_with(x, ph, pw, pad_value):
    """x padded by (ph, pw) on both sides of its last two axes (np.pad is slower)."""
    out = np.full((*x.shape[:-2], x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw), pad_value,
                  dtype=x.dtype)
    out[..., ph:ph + x.shape[-2], pw:pw + x.shape[-1]] = x
    return out


def _pool2d_offsets(x, kernel, stride, padding, pad_value):
    """One strided (N, C, OH, OW) view per in-window offset, in row-major order (the input
    padded once with ``pad_value``): the windows of ``windows2d``, offset by offset."""
    (ph, pw), (kh, kw), (sh, sw) = padding, kernel, stride
    if ph or pw:
        x = _pad2d_with(x, ph, pw, pad_value)
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return [x[:, :, p:p + sh * (oh - 1) + 1:sh, q:q + sw * (ow - 1) + 1:sw]
            for p in range(kh) for q in range(kw)]


def _maxpool2d_windows(x, kernel, stride, padding):
    """maxpool2d by argmax over a copy of every window (the reference; NaN-aware)."""
    win = windows2d(x, kernel, stride, padding, pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    index = flat.argmax(axis=4)
    values = np.take_along_axis(flat, index[..., None], axis=4)[..., 0]
    return np.ascontiguousarray(values), index


def _has_negative_zero(x):
    """Whether a (finite) float array holds -0.0: as signed integers its bits are the most
    negative value (one integer min-reduction)."""
    if x.dtype.kind != "f" or not x.flags.c_contiguous:
        return bool(np.signbit(x[x == 0]).any())
    ints = np.dtype(f"i{x.dtype.itemsize}")
    return bool(x.size) and int(x.view(ints).min()) == int(np.iinfo(ints).min)


def maxpool2d(x, kernel, stride, padding):
    """Values and the flat in-window index of each maximum (the first in row-major order).

    Offset by offset, each on the output rectangle whose windows read inside x (padding is
    -inf and never materialised): a running maximum, and the index raised to the offset's
    where it is strictly larger, so the first maximum wins, as argmax picks it. Branch-free
    (np.where on random masks is several times slower). Bit for bit the window argmax
    (``_maxpool2d_windows``, tested); an x with a NaN, an infinity or a negative zero (where
    np.maximum's choice between equal zeros would show) takes that reference."""
    if not np.isfinite(np.add.reduce(x, axis=None)) or _has_negative_zero(x):
        return _maxpool2d_windows(x, kernel, stride, padding)
    (kh, kw), pads = kernel, ((padding[0],) * 2, (padding[1],) * 2)
    out = tuple(conv_out_size(s, k, st, p, 1) for s, k, st, p in
                zip(x.shape[2:], kernel, stride, pads))
    values = np.full((*x.shape[:2], *out), -np.inf, dtype=x.dtype)
    index = np.zeros(values.shape, dtype=np.uint8 if kh * kw < 256 else np.intp)
    plan = [(i, offset, _conv_slices(offset, x.shape[2:], out, stride, pads, (1, 1),
                                     (0, out[0])))
            for i, offset in enumerate(_kernel_offsets((kh, kw)))]
    # a block of planes at a time, so that its maxima and indices stay in cache over the
    # offsets (each element's operations are the same, in the same order)
    xp, vp, ip, ranges = _plane_blocks(x, values, index)
    for p0, p1 in ranges:
        xb, vb, ib = xp[p0:p1], vp[p0:p1], ip[p0:p1]
        for i, _offset, found in plan:
            if found is None:
                continue
            src, dst = found
            into, start = (_ALL, _ALL, *dst), (_ALL, _ALL, *src)
            part, best = xb[start], vb[into]
            if i:
                larger = np.greater(part, best).astype(index.dtype)
                larger *= index.dtype.type(i)
                sub = ib[into]
                np.maximum(sub, larger, out=sub)
            np.maximum(best, part, out=best)
    return values, index.astype(np.intp)


POOL_BLOCK_BYTES = 1 << 20


def _plane_blocks(x, *outs):
    """x (n, C, H, W) and arrays of x's leading shape, each seen as (n*C, 1, ...) planes (views),
    with ranges of planes of about POOL_BLOCK_BYTES of x; where a reshape would copy (x not
    C-contiguous), the arrays themselves and one range."""
    arrays = (x, *outs)
    if x.ndim != 4 or not all(a.flags.c_contiguous for a in arrays):
        return (*arrays, [(0, x.shape[0])])
    views = tuple(a.reshape(-1, 1, *a.shape[2:]) for a in arrays)
    per = max(1, POOL_BLOCK_BYTES // max(1, x.shape[2] * x.shape[3] * x.itemsize))
    total = views[0].shape[0]
    return (*views, [(p, min(p + per, total)) for p in range(0, total, per)])


def _scatter_windows(per_offset, in_hw, kernel, stride, padding, dtype, lead):
    """Sum window contributions back onto the input grid: per_offset(p, q) -> (*lead, OH, OW)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, w = in_hw
    out = np.zeros((*lead, h + 2 * ph, w + 2 * pw), dtype=dtype)
    for p in range(kh):
        for q in range(kw):
            part = per_offset(p, q)
            oh, ow = part.shape[-2:]
            out[..., p:p + sh * (oh - 1) + 1:sh, q:q + sw * (ow - 1) + 1:sw] += part
    return out[..., ph:ph + h, pw:pw + w]


def _tiles(kernel, stride, padding):
    """Windows that tile the input (stride = kernel, no padding): each input in at most one."""
    return tuple(stride) == tuple(kernel) and tuple(padding) == (0, 0)


def _untile(grid, in_hw):
    """(*lead, OH, kh, OW, kw) per-window values -> (*lead, H, W), zero outside every window."""
    *lead, oh, kh, ow, kw = grid.shape
    flat = np.reshape(grid, (*lead, oh * kh, ow * kw))   # a view when grid is contiguous
    if flat.shape[-2:] == tuple(in_hw):
        return flat
    out = np.zeros((*lead, *in_hw), dtype=grid.dtype)
    out[..., :oh * kh, :ow * kw] = flat
    return out


def _winner_positions(index, kernel, width):
    """Tiling windows: each window's maximum as a flat position in its (H, W) plane."""
    (kh, kw), (oh, ow) = kernel, index.shape[-2:]
    rows = (np.arange(oh) * kh)[:, None] + index // kw
    cols = np.arange(ow) * kw + index % kw
    return (rows * width + cols).reshape(*index.shape[:-2], -1)


def maxpool2d_transpose(g, index, in_hw, kernel, stride, padding):
    """Route each cotangent to its window's maximum (winner takes all)."""
    if _tiles(kernel, stride, padding):   # one scatter: each input is in at most one window
        oh, ow = index.shape[-2:]
        h, w = in_hw
        dest = _winner_positions(index, kernel, w)
        lead = np.broadcast_shapes(g.shape[:-2], index.shape[:-2])
        out = np.zeros((*lead, h * w), dtype=g.dtype)
        values = np.broadcast_to(g, (*lead, oh, ow)).reshape(*lead, -1)
        np.put_along_axis(out, dest, values, axis=-1)   # index may broadcast over a tangent axis
        return out.reshape(*lead, h, w)
    if g.shape == index.shape and g.ndim >= 3 and g.flags.c_contiguous and \
            index.flags.c_contiguous:
        return _maxpool_scatter_blocks(g, index, in_hw, kernel, stride, padding)
    kw = kernel[1]
    return _scatter_windows(lambda p, q: np.where(index == p * kw + q, g, 0), in_hw, kernel,
                            stride, padding, g.dtype, g.shape[:-2])


def _maxpool_scatter_blocks(g, index, in_hw, kernel, stride, padding):
    """maxpool2d_transpose's window scatter (_scatter_windows) a block of planes at a time
    (about POOL_BLOCK_BYTES of the padded result each, which stays in cache over the
    offsets): each element gets the same additions in the same order, bit for bit."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    (h, w), (oh, ow) = in_hw, g.shape[-2:]
    gp, ip = g.reshape(-1, oh, ow), index.reshape(-1, oh, ow)
    total = gp.shape[0]
    out = np.zeros((total, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    per = max(1, POOL_BLOCK_BYTES // max(1, out[0].nbytes))
    for p0 in range(0, total, per):
        gb, ib, ob = gp[p0:p0 + per], ip[p0:p0 + per], out[p0:p0 + per]
        for p in range(kh):
            for q in range(kw):
                ob[:, p:p + sh * (oh - 1) + 1:sh, q:q + sw * (ow - 1) + 1:sw] += \
                    np.where(ib == p * kw + q, gb, 0)
    return out[:, ph:ph + h, pw:pw + w].reshape(*g.shape[:-2], h, w)


def avgpool2d_counts(in_hw, kernel, stride, padding, count_include_pad, dtype):
    if count_include_pad or padding == (0, 0):
        return np.asarray(kernel[0] * kernel[1], dtype=dtype)
    ones = np.ones((1, 1, *in_hw), dtype=dtype)
    return windows2d(ones, kernel, stride, padding).sum(axis=(4, 5))


def avgpool2d(x, kernel, stride, padding, count_include_pad):
    if _tiles(kernel, stride, padding):   # offset by offset: far faster than a window reduce
        parts = _tile_offsets(x, kernel)
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
    else:
        total = windows2d(x, kernel, stride, padding).sum(axis=(4, 5))
    return total / avgpool2d_counts(x.shape[2:], kernel, stride, padding, count_include_pad,
                                    x.dtype)


def avgpool2d_transpose(g, in_hw, kernel, stride, padding, count_include_pad):
    share = g / avgpool2d_counts(in_hw, kernel, stride, padding, count_include_pad, g.dtype)
    if _tiles(kernel, stride, padding):
        *lead, oh, ow = share.shape
        grid = np.broadcast_to(share[..., :, None, :, None], (*lead, oh, kernel[0], ow, kernel[1]))
        return _untile(np.ascontiguousarray(grid), in_hw)
    return _scatter_windows(lambda p, q: share, in_hw, kernel, stride, padding, g.dtype,
                            g.shape[:-2])


def global_avgpool(x):
    return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)


def global_avgpool_transpose(g, spatial):
    size = int(np.prod(spatial))
    out = np.broadcast_to((g / size).reshape(*g.shape, *(1,) * len(spatial)),
                          (*g.shape, *spatial))
    return np.ascontiguousarray(out)


def channel_view(v, rank):
    """A [C] vector shaped to broadcast over (N, C, ...) with the given per-sample rank."""
    return v.reshape((1, -1) + (1,) * (rank - 1))


def batchnorm_scale_shift(weight, bias, mean, var, eps):
    """Inference batch norm as y = scale * x + shift, per channel."""
    scale = weight / np.sqrt(var + eps)
    return scale, bias - mean * scale


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_tangent(s, t, axis):
    """J t for y = softmax(x), J = diag(s) - s s^T along ``axis``; s broadcasts against t."""
    return s * (t - (s * t).sum(axis=axis, keepdims=True))


def log_softmax_tangent(s, t, axis):
    """J t for y = log_softmax(x), J = I - 1 s^T."""
    return t - (s * t).sum(axis=axis, keepdims=True)


def log_softmax_cotangent(s, v, axis):
    """v^T J for y = log_softmax(x): v - s * sum(v)."""
    return v - s * v.sum(axis=axis, keepdims=True)


# =============================================================================== op kernels
# One set per op kind, with uniform signatures, so that the interpreter and generated code
# call them the same way (attributes are keyword arguments with literal values):
#   <op>_forward(xs, p, **attrs) -> y                       xs: inputs (B, *shape), p: weights
#   <op>_jvp(ts, xs, y, local, p, **attrs) -> t             ts: tangents (B, K, *in_shape)
#   <op>_vjp(v, xs, y, local, p, **attrs) -> [v_in, ...]    v: cotangents (B, K, *out_shape)
#   <op>_dfd(m, xs, xs0, y, y0, local, p, **attrs) -> [...] DFD multipliers (seed 004)
# ``local`` is f'(z) for activations (the multiplier for _dfd), argmax indices for max pooling.
# Affine ops use their VJP as their DFD rule (seed 004, eq. 7: m = w).


def flat_bk(t):
    """(B, K, *shape) -> (B*K, *shape), for kernels with one leading axis."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unflat_bk(t, like):
    return t.reshape(like.shape[0], like.shape[1], *t.shape[1:])


def matmul_last(t, m):
    """t @ m over the last axis as one GEMM (numpy loops over stacked 3-d products)."""
    flat = np.ascontiguousarray(t).reshape(-1, t.shape[-1])
    return (flat @ m).reshape(*t.shape[:-1], m.shape[1])


def _tangent_view(v, sample_rank):
    """A per-sample parameter broadcast against (B, *shape) -> against (B, K, *shape)."""
    return v if np.ndim(v) == 0 else v.reshape(v.shape[0], 1, *v.shape[1:])


def _sample_param(v, sample_shape):
    """normalize's mean/std: per element, per channel [C] or scalar, against (B, *shape)."""
    if v.shape == tuple(sample_shape):
        return v[None]
    if v.ndim == 0:
        return v
    return channel_view(v, len(sample_shape))


# ---- linear
def linear_forward(xs, p):
    y = matmul_last(xs[0], p["weight"].T)
    if "bias" in p:
        y += p["bias"]   # in place: y is the product's own fresh array
    return y


def linear_jvp(ts, xs, y, local, p):
    return matmul_last(ts[0], p["weight"].T)


def linear_vjp(v, xs, y, local, p):
    return [matmul_last(v, p["weight"])]


# ---- convolutions: pbxc.codegen.kernels.conv (imported above, copied before this module)


# ---- pooling
def maxpool2d_local(xs, p, kernel, stride, padding):
    return maxpool2d(xs[0], kernel, stride, padding)[1]


def maxpool2d_forward(xs, p, kernel, stride, padding):
    return maxpool2d(xs[0], kernel, stride, padding)[0]


def maxpool2d_forward_local(xs, p, kernel, stride, padding):
    """(values, argmax) from one pooling pass: the forward and the local data together
    (``<op>_forward_local``: what a linearization computes, instead of two passes)."""
    return maxpool2d(xs[0], kernel, stride, padding)


def maxpool2d_jvp(ts, xs, y, local, p, kernel, stride, padding):
    t = ts[0]
    if _tiles(kernel, stride, padding):   # one gather at the sample's winners, for all K rows
        dest = _winner_positions(local[:, None], kernel, t.shape[-1])
        picked = np.take_along_axis(t.reshape(*t.shape[:-2], -1), dest, axis=-1)
        return picked.reshape(*t.shape[:-2], *local.shape[-2:])
    index = np.repeat(local, t.shape[1], axis=0)
    return unflat_bk(maxpool2d_gather(flat_bk(t), index, kernel, stride, padding), t)


def maxpool2d_vjp(v, xs, y, local, p, kernel, stride, padding):
    if _tiles(kernel, stride, padding):   # the sample's winners serve all its K rows
        return [maxpool2d_transpose(v, local[:, None], xs[0].shape[2:], kernel, stride, padding)]
    index = np.repeat(local, v.shape[1], axis=0)
    g = maxpool2d_transpose(flat_bk(v), index, xs[0].shape[2:], kernel, stride, padding)
    return [unflat_bk(g, v)]


def _relu_multiplier_where(d0, d):
    """relu_multiplier with np.where (the reference)."""
    same = d == d0
    secant = (np.maximum(d, 0) - np.maximum(d0, 0)) / np.where(same, 1, d - d0)
    return np.where(same, (d > 0).astype(d.dtype), secant)


def relu_multiplier(d0, d):
    """(relu(d) - relu(d0)) / (d - d0) without cancellation; relu'(0) = 0 where d == d0.

    The quotient everywhere, then the d == d0 entries (0 / 0 there) replaced: bit for bit
    ``_relu_multiplier_where`` (tested), without its two branchy np.where passes."""
    same = np.equal(d, d0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.maximum(d, 0)
        out -= np.maximum(d0, 0)
        out /= np.subtract(d, d0)
    if same.any():
        out[same] = np.greater(d[same], 0)
    return out


def maxpool2d_dfd(m, xs, xs0, y, y0, local, p, kernel, stride, padding):
    """The window maximum as pairwise maxima, max(u, v) = u + relu(v - u), each relu by the
    rescale rule: exact summation-to-delta for any defaults, eq. 13 when they are uniform.

    Offset by offset on strided views; which offsets fall in the padding is a property of
    the (OH, OW) grid alone, so it is fixed up through 2-d masks instead of NaN padding.
    Bit for bit ``_maxpool2d_dfd_windows`` (tested); inputs within a factor 4 of overflow
    (where a difference could reach infinity) or not finite take that reference.

    A block of samples and channels at a time, about ``POOL_BLOCK_BYTES`` of x (times the
    multipliers' rows K) each: a block's slopes and per-element shares, some twenty arrays of
    its output's size, then stay in cache and take memory in proportion to the block, not to
    the batch. Every element's operations are the same, in the same order (tested). Measured
    on ResNet-18's stem pool (64x112x112, 3x3 stride 2): float32 batch 16, 299 -> 180 ms and
    355 -> 55 MiB peak (the result is 49 MiB); float64 batch 8, 300 -> 170 ms, 359 -> 55 MiB;
    batch 1, float32 13.5 -> 12.0 ms and 27 -> 12 MiB, float64 38 -> 22 ms and 55 -> 15 MiB."""
    x, x0 = xs[0], xs0[0]
    big = np.finfo(m.dtype).max / 4
    if not (np.abs(x).max() < big and np.abs(x0).max() < big):
        return _maxpool2d_dfd_windows(m, xs, xs0, y, y0, local, p, kernel, stride, padding)
    if x0.ndim and x0.shape[0] > 1 and x0.strides[0] == 0:
        x0 = x0[:1]   # a default shared by the batch: its running maxima on one row
    n, c = x.shape[:2]
    plane = x.shape[2] * x.shape[3] * x.itemsize * max(1, m.shape[1])
    planes = max(1, POOL_BLOCK_BYTES // max(1, plane))
    rows, channels = (n, min(c, planes // n)) if planes >= n else (planes, 1)
    if (rows, channels) == (n, c):
        return [_maxpool2d_dfd_block(m, x, x0, kernel, stride, padding)]
    out = np.empty((*m.shape[:3], *x.shape[2:]), dtype=m.dtype)
    for b0 in range(0, n, rows):
        b1 = min(b0 + rows, n)
        default = x0 if x0.shape[0] == 1 else x0[b0:b1]
        for c0 in range(0, c, channels):
            c1 = min(c0 + channels, c)
            out[b0:b1, :, c0:c1] = _maxpool2d_dfd_block(
                m[b0:b1, :, c0:c1], x[b0:b1, c0:c1], default[:, c0:c1], kernel, stride,
                padding)
    return [out]


def _maxpool2d_dfd_block(m, x, x0, kernel, stride, padding):
    """maxpool2d_dfd's multipliers (B, K, C, H, W) of x, for a finite x and default x0."""
    parts = _pool2d_offsets(x, kernel, stride, padding, 0.0)
    parts0 = _pool2d_offsets(x0, kernel, stride, padding, 0.0)
    inside = _pool2d_offsets(np.ones((1, 1, *x.shape[2:]), dtype=bool), kernel, stride,
                           padding, False)
    pads = [~v[0, 0] for v in inside]        # (OH, OW): this offset reads padding
    run, run0 = parts[0].copy(), parts0[0].copy()   # the running maxima, updated in place
    run_pad = pads[0]                          # every offset so far was padding
    d, d0 = np.empty_like(run), np.empty_like(run0)
    slopes = []
    for i in range(1, len(parts)):
        w, w0, pad = parts[i], parts0[i], pads[i]
        first = run_pad & ~pad                 # the window's first element inside
        np.subtract(w, run, out=d)
        np.subtract(w0, run0, out=d0)
        rise, rise0 = np.maximum(d, 0), np.maximum(d0, 0)
        # relu_multiplier(d0, d), its max(d, 0) and max(d0, 0) shared with the maxima's update
        s = rise - rise0
        with np.errstate(invalid="ignore", divide="ignore"):
            s /= np.subtract(d, d0)
        same = np.equal(d, d0)
        if same.any():
            s[same] = np.greater(d[same], 0)
        held, held0 = (run[..., pad], run0[..., pad]) if pad.any() else (None, None)
        run += rise                             # run + max(w - run, 0)
        run0 += rise0
        if held is not None:                   # padding never wins a window
            s[..., pad] = 0
            run[..., pad] = held
            run0[..., pad] = held0
        if first.any():
            s[..., first] = 1
            run[..., first] = w[..., first]
            run0[..., first] = w0[..., first]
        slopes.append(s)
        run_pad = run_pad & pad
    g = m
    per_element = [None] * len(parts)
    for i in range(len(parts) - 1, 0, -1):
        s = slopes[i - 1][:, None]
        per_element[i] = g * s
        g = g * (1 - s)
    per_element[0] = g
    kw = kernel[1]
    back = _scatter_windows(lambda a, b: flat_bk(per_element[a * kw + b]), x.shape[2:],
                            kernel, stride, padding, m.dtype, (m.shape[0] * m.shape[1],
                                                               m.shape[2]))
    return unflat_bk(back, m)


def _maxpool2d_dfd_windows(m, xs, xs0, y, y0, local, p, kernel, stride, padding):
    """maxpool2d_dfd over copies of every window, padding as NaN (the reference)."""
    win = windows2d(xs[0], kernel, stride, padding, pad_value=np.nan)
    win0 = windows2d(xs0[0], kernel, stride, padding, pad_value=np.nan)
    flat = win.reshape(*win.shape[:4], -1)
    flat0 = win0.reshape(*win0.shape[:4], -1)
    size = flat.shape[-1]
    run, run0 = flat[..., 0].copy(), flat0[..., 0].copy()
    slopes = []
    for i in range(1, size):
        w, w0 = flat[..., i], flat0[..., i]
        pad, first_pad = np.isnan(w), np.isnan(run)  # padding never wins a window
        d, d0 = w - run, w0 - run0
        s = _relu_multiplier_where(np.nan_to_num(d0), np.nan_to_num(d))
        slopes.append(np.where(pad, 0.0, np.where(first_pad, 1.0, s)))
        run = np.where(pad, run, np.where(first_pad, w, run + np.maximum(d, 0)))
        run0 = np.where(pad, run0, np.where(first_pad, w0, run0 + np.maximum(d0, 0)))
    g = m
    per_element = []
    for i in range(size - 1, 0, -1):
        s = slopes[i - 1][:, None]
        per_element.append(g * s)
        g = g * (1 - s)
    per_element.append(g)
    stacked = flat_bk(np.stack(per_element[::-1], axis=-1))
    kw = kernel[1]
    back = _scatter_windows(lambda a, b: stacked[..., a * kw + b], xs[0].shape[2:], kernel,
                            stride, padding, m.dtype, stacked.shape[:2])
    return [unflat_bk(back, m)]


def avgpool2d_forward(xs, p, kernel, stride, padding, count_include_pad):
    return avgpool2d(xs[0], kernel, stride, padding, count_include_pad)


def avgpool2d_jvp(ts, xs, y, local, p, kernel, stride, padding, count_include_pad):
    t = ts[0]
    return unflat_bk(avgpool2d(flat_bk(t), kernel, stride, padding, count_include_pad), t)


def avgpool2d_vjp(v, xs, y, local, p, kernel, stride, padding, count_include_pad):
    g = avgpool2d_transpose(flat_bk(v), xs[0].shape[2:], kernel, stride, padding,
                            count_include_pad)
    return [unflat_bk(g, v)]


def global_avgpool_forward(xs, p):
    return global_avgpool(xs[0])


def global_avgpool_jvp(ts, xs, y, local, p):
    t = ts[0]
    return t.reshape(*t.shape[:3], -1).mean(axis=3)


def global_avgpool_vjp(v, xs, y, local, p):
    return [unflat_bk(global_avgpool_transpose(flat_bk(v), xs[0].shape[2:]), v)]


# ---- shape and merge ops
def flatten_forward(xs, p):
    return xs[0].reshape(xs[0].shape[0], -1)


def flatten_jvp(ts, xs, y, local, p):
    return ts[0].reshape(*ts[0].shape[:2], -1)


def flatten_vjp(v, xs, y, local, p):
    return [v.reshape(*v.shape[:2], *xs[0].shape[1:])]


def reshape_forward(xs, p, shape):
    return xs[0].reshape(xs[0].shape[0], *shape)


def reshape_jvp(ts, xs, y, local, p, shape):
    return ts[0].reshape(*ts[0].shape[:2], *shape)


def reshape_vjp(v, xs, y, local, p, shape):
    return [v.reshape(*v.shape[:2], *xs[0].shape[1:])]


def add_forward(xs, p):
    out = xs[0] + xs[1]
    for x in xs[2:]:
        out = out + x
    return out


def add_jvp(ts, xs, y, local, p):
    return add_forward(ts, p)


def add_vjp(v, xs, y, local, p):
    return [v for _ in xs]


def _concat_sizes(xs, p, axis, slots):
    """Each operand's extent along the joined axis: values are (N, *shape) (or stand-ins that
    keep their shape), constants (*shape) of one sample."""
    return [xs[s].shape[1 + axis] if isinstance(s, int) else p[s].shape[axis] for s in slots]


def concat_forward(xs, p, axis, slots):
    """Operands in written order; ``slots``: an int picks a value of ``xs``, a str the constant
    tensor ``p[role]`` (one sample's, the same for every sample: broadcast over the batch)."""
    n = xs[0].shape[0]
    parts = [xs[s] if isinstance(s, int) else np.broadcast_to(p[s], (n, *p[s].shape))
             for s in slots]
    return np.concatenate(parts, axis=1 + axis)


def concat_jvp(ts, xs, y, local, p, axis, slots):
    """A constant operand's block has zero tangent."""
    lead = ts[0].shape[:2]
    parts = [ts[s] if isinstance(s, int) else np.zeros((*lead, *p[s].shape), dtype=ts[0].dtype)
             for s in slots]
    return np.concatenate(parts, axis=2 + axis)


def concat_vjp(v, xs, y, local, p, axis, slots):
    """The cotangent split by operand; the constants' blocks are dropped."""
    cuts = np.cumsum(_concat_sizes(xs, p, axis, slots))[:-1]
    pieces = np.split(v, cuts, axis=2 + axis)
    return [piece for s, piece in zip(slots, pieces) if isinstance(s, int)]


def concat_relevance(relevance, xs, p, axis, slots):
    """LRP through concat: each value keeps the relevance of its block (routing); a constant
    operand's block is absorbed like a bias (Bach et al. 2015, eq. 58: relevance of a term that
    does not depend on the input stays there), returned per sample for the ledger's ``bias``."""
    cuts = np.cumsum(_concat_sizes(xs, p, axis, slots))[:-1]
    pieces = np.split(relevance, cuts, axis=1 + axis)
    absorbed = np.zeros(relevance.shape[0], dtype=relevance.dtype)
    for s, piece in zip(slots, pieces):
        if not isinstance(s, int):
            absorbed = absorbed + piece.reshape(piece.shape[0], -1).sum(axis=1)
    return [piece for s, piece in zip(slots, pieces) if isinstance(s, int)], absorbed


# ---- per-channel and per-element affine maps
def batchnorm_forward(xs, p, eps):
    x = xs[0]
    scale, shift = batchnorm_scale_shift(p["weight"], p["bias"], p["running_mean"],
                                         p["running_var"], eps)
    return x * channel_view(scale, x.ndim - 1) + channel_view(shift, x.ndim - 1)


def batchnorm_jvp(ts, xs, y, local, p, eps):
    t = ts[0]
    scale, _ = batchnorm_scale_shift(p["weight"], p["bias"], p["running_mean"],
                                     p["running_var"], eps)
    return t * scale.reshape((1, 1, -1) + (1,) * (t.ndim - 3))


def batchnorm_vjp(v, xs, y, local, p, eps):
    return [batchnorm_jvp([v], xs, y, local, p, eps)]


def normalize_forward(xs, p):
    shape = xs[0].shape[1:]
    return (xs[0] - _sample_param(p["mean"], shape)) / _sample_param(p["std"], shape)


def normalize_jvp(ts, xs, y, local, p):
    std = _sample_param(p["std"], xs[0].shape[1:])
    return ts[0] / _tangent_view(std, xs[0].ndim - 1)


def normalize_vjp(v, xs, y, local, p):
    return [normalize_jvp([v], xs, y, local, p)]


# ---- softmax family: closed-form Jacobians and DFD multipliers, never dense
def softmax_forward(xs, p, axis):
    return softmax(xs[0], 1 + axis)


def softmax_jvp(ts, xs, y, local, p, axis):
    return softmax_tangent(y[:, None], ts[0], 2 + axis)


def softmax_vjp(v, xs, y, local, p, axis):
    return [softmax_tangent(y[:, None], v, 2 + axis)]  # the Jacobian is symmetric


def softmax_relevance(relevance, xs, y, axis):
    """AttnLRP's rule for an interior softmax (Achtibat et al., ICML 2024, Prop. 3.1,
    eq. 13): R_in_i = x_i (R_i - s_i sum_j R_j) along the per-sample ``axis``, x the logits
    and s = y the softmax. Not conservative: returns ([R_in], absorbed) with absorbed =
    sum R - sum R_in per sample, the relevance of the bias term of the softmax's
    linearisation (the paper's b = s - J x), which the ledger books as the layer's bias."""
    x = xs[0]
    r_in = x * (relevance - y * relevance.sum(axis=1 + axis, keepdims=True))
    absorbed = (relevance.reshape(len(relevance), -1).sum(axis=1)
                - r_in.reshape(len(r_in), -1).sum(axis=1))
    return [r_in], absorbed


def log_softmax_forward(xs, p, axis):
    return log_softmax(xs[0], 1 + axis)


def log_softmax_jvp(ts, xs, y, local, p, axis):
    return log_softmax_tangent(np.exp(y)[:, None], ts[0], 2 + axis)


def log_softmax_vjp(v, xs, y, local, p, axis):
    return [log_softmax_cotangent(np.exp(y)[:, None], v, 2 + axis)]


def softmax_dfd(m, xs, xs0, y, y0, local, p, axis):
    """m^T M with pbxc's softmax rule M = diag(L) - L w^T (specs/activations.md): exp and log
    by eq. 16-17, sums by eq. 7, composed by eq. 4; sums to delta exactly in exact arithmetic."""
    big, w = _softmax_dfd_factors(xs0[0], xs[0], 1 + axis)
    return [_diag_minus_outer_vjp(big[:, None], big[:, None], w[:, None], m, 2 + axis)]


def log_softmax_dfd(m, xs, xs0, y, y0, local, p, axis):
    """m^T (I - 1 w^T), the log_softmax rule of specs/activations.md."""
    _, w = _softmax_dfd_factors(xs0[0], xs[0], 1 + axis)
    return [_diag_minus_outer_vjp(1.0, 1.0, w[:, None], m, 2 + axis)]


# ---- elementwise activations: local is f'(z) (JVP/VJP) or the DFD multiplier (dfd)
def activation_jvp(ts, xs, y, local, p):
    return ts[0] * local[:, None]


def activation_vjp(v, xs, y, local, p):
    return [v * local[:, None]]


def activation_dfd(m, xs, xs0, y, y0, local, p):
    return [m * local[:, None]]


# =============================================================================== LRP engine
# Layer-wise relevance propagation (slides, seed 003): the generic rule
#   R_j = sum_k a_j rho(w_jk) / stab(sum_j a_j rho(w_jk) + rho(b_k)) R_k
# in four steps: z forward with modified parameters, s = R / stab(z), c = rho(W)^T s, R = a c.
# A rule is data: groups (coef, terms), each term (sign, input modifier, weight modifier,
# bias modifier or None); see pbxc.runtime.lrp_rules. Each op with a rule supplies
# <op>_lrp_params (W and b as the engine sees them), <op>_lrp_forward, <op>_lrp_transpose and
# <op>_lrp_bias (how a bias vector broadcasts onto z).


def lrp_modify(mod, a):
    """Apply a modifier (name, parameter) to an activation, weight or bias array."""
    name, param = mod
    if name == "same":
        return a
    if name == "pos":
        return np.maximum(a, 0)
    if name == "neg":
        return np.minimum(a, 0)
    if name == "ones":
        return np.ones_like(a)
    if name == "square":
        return a * a
    if name == "gamma":
        return a + param * np.maximum(a, 0)
    if name == "const":
        return np.broadcast_to(np.asarray(param, dtype=a.dtype), a.shape)
    raise ValueError(f"unknown LRP modifier {name!r}")


def lrp_stabilise(z, epsilon, placement):
    """z + eps (the slides) or z + eps sign(z) with sign(0) = +1 (Zennit, Captum)."""
    if placement == "slides":
        return z + epsilon
    eps = z.dtype.type(epsilon)
    stab = (z >= 0) * (eps + eps)  # 2 eps or 0; np.where is 4x slower on mixed signs
    stab -= eps                    # exactly +eps or -eps (Sterbenz)
    stab += z
    return stab


def lrp_divide(relevance, zs, epsilon, placement):
    """s = R / stab(z), 0 where the stabilised z is 0 (only possible without a sign-placed eps)."""
    if zs.dtype.type(epsilon) > 0 and placement != "slides":   # eps may underflow in float32
        return relevance / zs      # |stab(z)| >= eps > 0
    return np.divide(relevance, zs, out=np.zeros_like(relevance), where=zs != 0)


def _per_sample_dot(a, b):
    """sum over each sample of a * b, without the product array."""
    axes = "abcdefgh"[:a.ndim]
    return np.einsum(f"{axes},{axes}->a", a, b)


def _per_sample_sum(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


UNMODIFIED = ((1.0, ("same", None), ("same", None), ("same", None)),)


def lrp_rule_step(op, relevance, xs, p, rule_groups, epsilon, placement, z_out=None,
                  dense=None, fused=None, **attrs):
    """Relevance at the op's output -> (relevance per input, absorbed by bias, by stabiliser).

    ``z_out``, the op's forward output, stands in for z where a group leaves inputs, weights
    and bias unmodified (LRP-0, epsilon): that z *is* the forward pass, so the step costs one
    transposed product instead of two. ``dense``, the op's (out, in) matrix when it is
    cheaper than its kernel (a small convolution), takes the transposed products with the
    unmodified weights. ``fused``: the runtime's fused elementwise kernels
    (``pbxc.codegen.fused_kernels``: these lines' elementwise results bit for bit, their
    per-sample sums in float64), or None."""
    table = globals()
    w, b = table[f"{op}_lrp_params"](p, xs, **attrs)
    forward, transpose = table[f"{op}_lrp_forward"], table[f"{op}_lrp_transpose"]
    bias_view = table[f"{op}_lrp_bias"]
    r_in = [None] * len(xs)
    batch = relevance.shape[0]
    bias_abs = np.zeros(batch, dtype=relevance.dtype)
    stab_abs = np.zeros(batch, dtype=relevance.dtype)
    for coef, terms in rule_groups:
        z = zb = relevance.dtype.type(0)  # a scalar of the relevance dtype, no upcast
        zb_small = None   # zb before broadcasting (the fused step reads it)
        passes = []
        if z_out is not None and tuple(terms) == UNMODIFIED:
            z = z_out
            if b is not None:
                zb_small = bias_view(b, z)
                zb = np.broadcast_to(zb_small, z.shape)
            passes.append((1.0, xs, w))
            terms = ()
        for sign, in_mod, w_mod, b_mod in terms:
            ins = [lrp_modify(in_mod, x) for x in xs]
            wt = lrp_modify(w_mod, w)
            zt = forward(ins, wt, **attrs)
            if b_mod is not None and b is not None:
                bt = np.broadcast_to(bias_view(lrp_modify(b_mod, b), zt), zt.shape)
                zt = zt + bt
                zb = zb + sign * bt
            z = z + sign * zt
            passes.append((sign, ins, wt))
        step = None
        if fused is not None and placement != "slides" and relevance.dtype.type(epsilon) > 0:
            # stabilise, divide and both per-sample shares in one pass (None: not suited)
            step = fused.epsilon_step(relevance, z, epsilon,
                                      zb_small if zb_small is not None
                                      else (zb if np.ndim(zb) else None))
        if step is not None:
            s, stab_part, bias_part = step
        else:
            z = np.broadcast_to(z, relevance.shape)
            zs = lrp_stabilise(z, epsilon, placement)
            s = lrp_divide(relevance, zs, epsilon, placement)
        alone = fused is not None and len(rule_groups) == 1 and len(passes) == 1
        for sign, ins, wt in passes:
            if dense is not None and wt is w:   # c = W^T s depends on the weights alone
                cs = [(s.reshape(len(s), -1) @ dense).reshape(xs[0].shape)]
            else:
                cs = transpose(s, wt, xs, **attrs)
            for i, c in enumerate(cs):
                term = None
                if alone and coef * sign == 1:   # x c and the ledger's sums of it, one pass
                    term = fused.product_sums(ins[i], c)
                if term is None:
                    term = ins[i] * c if coef * sign == 1 else (coef * sign) * ins[i] * c
                r_in[i] = term if r_in[i] is None else r_in[i] + term
        if step is not None:
            if np.ndim(zb):
                bias_abs += coef * bias_part
            stab_abs += coef * stab_part
            continue
        if np.ndim(zb):
            bias_abs += coef * _per_sample_dot(s, zb)
        if epsilon == 0:   # no stabiliser: exactly the relevance of units with z = 0 is lost
            dead = zs == 0
            if dead.any():
                stab_abs += coef * _per_sample_sum(relevance * dead)
        else:   # per element: sum(R) - sum(s z) would cancel badly in float32
            share = relevance - s * z
            stab_abs += coef * _per_sample_sum(share)
    r_in = [np.zeros_like(x) if r is None else r for r, x in zip(r_in, xs)]
    return r_in, bias_abs, stab_abs


def lrp_maxpool(relevance, x, index, kernel, stride, padding):
    """Winner takes all: each window's relevance to its argmax (the first maximum in row-major
    order, as PyTorch). Also returns how many windows with relevance had a tied maximum.

    The ties are counted offset by offset on strided views (the input padded once with -inf
    where windows overlap its edge), not on a copy of every window: that copy, kernel-size
    times the output, was the LRP pass's peak at ResNet's stem pool (ResNet-18, batch 16,
    float32: 384 MiB against 314 anywhere else). Each window's count of elements equal to its
    maximum is the window form's count of elements equal to the value at its argmax: the
    same value, or NaN where the window holds one (no element equals it either way)."""
    equal = np.zeros(index.shape, dtype=np.int32)
    tiles = _tiles(kernel, stride, padding)
    # a block of planes at a time (POOL_BLOCK_BYTES of x), in cache over the offsets
    xp, ep, ranges = _plane_blocks(x, equal)
    for p0, p1 in ranges:
        xb, eb = xp[p0:p1], ep[p0:p1]
        parts = _tile_offsets(xb, kernel) if tiles else \
            _pool2d_offsets(xb, kernel, stride, padding, -np.inf)
        best = parts[0].copy()   # the value at ``index``: the window maximum (NaN if any)
        for part in parts[1:]:
            np.maximum(best, part, out=best)
        for part in parts:
            eb += part == best
    ties = int(np.count_nonzero((equal > 1) & (relevance != 0)))
    return maxpool2d_transpose(relevance, index, x.shape[2:], kernel, stride, padding), ties


def _weight_bias(p, xs, **attrs):
    return p["weight"], p.get("bias")


def _unit_weight(p, xs, **attrs):
    return np.ones((), dtype=xs[0].dtype), None


def _bias_as_is(b, z):
    return b


def _bias_per_channel(b, z):
    return channel_view(b, z.ndim - 1)


def _bias_per_sample(b, z):
    return b[None]


linear_lrp_params = _weight_bias
linear_lrp_bias = _bias_as_is


def linear_lrp_forward(ins, w):
    return matmul_last(ins[0], w.T)


def linear_lrp_transpose(s, w, xs):
    return [matmul_last(s, w)]


avgpool2d_lrp_params = _unit_weight
avgpool2d_lrp_bias = _bias_as_is


def avgpool2d_lrp_forward(ins, w, kernel, stride, padding, count_include_pad):
    return w * avgpool2d(ins[0], kernel, stride, padding, count_include_pad)


def avgpool2d_lrp_transpose(s, w, xs, kernel, stride, padding, count_include_pad):
    return [w * avgpool2d_transpose(s, xs[0].shape[2:], kernel, stride, padding,
                                    count_include_pad)]


global_avgpool_lrp_params = _unit_weight
global_avgpool_lrp_bias = _bias_as_is


def global_avgpool_lrp_forward(ins, w):
    return w * global_avgpool(ins[0])


def global_avgpool_lrp_transpose(s, w, xs):
    return [w * global_avgpool_transpose(s, xs[0].shape[2:])]


add_lrp_params = _unit_weight
add_lrp_bias = _bias_as_is


def add_lrp_forward(ins, w):
    return w * add_forward(ins, None)


def add_lrp_transpose(s, w, xs):
    return [w * s for _ in xs]


def batchnorm_lrp_params(p, xs, eps):
    scale, shift = batchnorm_scale_shift(p["weight"], p["bias"], p["running_mean"],
                                         p["running_var"], eps)
    rank = xs[0].ndim - 1
    return channel_view(scale, rank)[0], channel_view(shift, rank)[0]


batchnorm_lrp_bias = _bias_per_sample


def batchnorm_lrp_forward(ins, w, eps):
    return ins[0] * w[None]


def batchnorm_lrp_transpose(s, w, xs, eps):
    return [s * w[None]]


def normalize_lrp_params(p, xs):
    full = (1, *xs[0].shape[1:])
    inv = 1.0 / np.broadcast_to(_sample_param(p["std"], full[1:]), full)[0]
    mean = np.broadcast_to(_sample_param(p["mean"], full[1:]), full)[0]
    return inv, -mean * inv


normalize_lrp_bias = _bias_per_sample


def normalize_lrp_forward(ins, w):
    return ins[0] * w[None]


def normalize_lrp_transpose(s, w, xs):
    return [s * w[None]]


# =============================================================================== second order
# The Hessian pass (specs/hessian.md, issue 15). Only the ops whose local map is nonlinear have
# kernels here; every affine, shape and merge op (and max pooling, piecewise linear) reuses its
# <op>_jvp / <op>_vjp, because its second derivative is zero. Two kernels per nonlinear op:
#   <op>_jvp2(hs, ts, xs, y, local, curv, p, **attrs) -> h
#       forward second order: hs[i] (B, M*M, *in) second tangents (None: zero), ts[i]
#       (B, M, *in) tangents;
#       h (B, M*M, *out) = sum_pq d2f(t_p, t_q) + J h  (the second-order Algorithm 1)
#   <op>_hvp(v, vd, ts, xs, y, local, curv, p, **attrs) -> [vd_in, ...]
#       forward over reverse: the tangent of the VJP v^T J along ts; v (B, 1, *out) is the
#       cotangent, vd (B, M, *out) its tangent (None: zero); vd_in = vd^T J + v^T d2f(t, .)
# ``curv`` is f''(z) for activations (None for the others).


def _outer_pairs(ts):
    """(B, M, *s) -> (B, M*M, *s): t_p * t_q for every ordered pair (p, q)."""
    t = ts
    outer = t[:, :, None] * t[:, None, :]
    return outer.reshape(t.shape[0], t.shape[1] * t.shape[1], *t.shape[2:])


def activation_jvp2(hs, ts, xs, y, local, curv, p):
    """h = f''(z) t_p t_q + f'(z) h_pq, elementwise (Abe & Asai, Algorithm 1 to second order)."""
    out = _outer_pairs(ts[0])
    out *= curv[:, None]
    if hs[0] is not None:   # None: zero (the first curved op after the input)
        out += hs[0] * local[:, None]
    return out


def activation_hvp(v, vd, ts, xs, y, local, curv, p):
    """d/de [v f'(z + e t)] plus the tangent of v: vd f'(z) + v f''(z) t."""
    out = ts[0] * (v * curv[:, None])
    if vd is not None:
        out += vd * local[:, None]
    return [out]


def _softmax_centred(s, t, axis):
    """u = t - <s, t> along ``axis``: softmax's tangent divided by s."""
    return t - (s * t).sum(axis=axis, keepdims=True)


def softmax_jvp2(hs, ts, xs, y, local, curv, p, axis):
    """d2 s_i(t_p, t_q) = s_i (u_pi u_qi - <s, u_p u_q>) with u = t - <s, t>; plus J h."""
    s = y[:, None]
    u = _softmax_centred(s, ts[0], 2 + axis)
    pairs = _outer_pairs(u)
    pairs -= (s * pairs).sum(axis=2 + axis, keepdims=True)
    pairs *= s
    if hs[0] is not None:
        pairs += softmax_tangent(s, hs[0], 2 + axis)
    return pairs


def log_softmax_jvp2(hs, ts, xs, y, local, curv, p, axis):
    """d2 log s_i(t_p, t_q) = -<s, u_p u_q> (the same for every i); plus J h."""
    s = np.exp(y)[:, None]
    u = _softmax_centred(s, ts[0], 2 + axis)
    out = -(s * _outer_pairs(u)).sum(axis=2 + axis, keepdims=True)
    if hs[0] is None:
        return np.broadcast_to(out, (*out.shape[:2], *s.shape[2:])).copy()
    return out + log_softmax_tangent(s, hs[0], 2 + axis)


def softmax_hvp(v, vd, ts, xs, y, local, curv, p, axis):
    """The tangent of s (v - <s, v>) along ds = s (t - <s, t>)."""
    s = y[:, None]
    ax = 2 + axis
    ds = softmax_tangent(s, ts[0], ax)
    out = ds * (v - (s * v).sum(axis=ax, keepdims=True))
    out -= s * (ds * v).sum(axis=ax, keepdims=True)
    if vd is not None:
        out += softmax_tangent(s, vd, ax)
    return [out]


def log_softmax_hvp(v, vd, ts, xs, y, local, curv, p, axis):
    """The tangent of v - s sum(v) along ds = s (t - <s, t>)."""
    s = np.exp(y)[:, None]
    ax = 2 + axis
    ds = softmax_tangent(s, ts[0], ax)
    out = ds * -v.sum(axis=ax, keepdims=True)
    if vd is not None:
        out += log_softmax_cotangent(s, vd, ax)
    return [out]
# =============================================================================== op families
# Round 2 (issue 11): one module per family under pbxc/codegen/kernels; ``pbxc compile``
# copies their source after this module's (pbxc.codegen.kernels.FAMILIES).
from pbxc.codegen.kernels.elementwise import *  # noqa: E402,F403  family
from pbxc.codegen.kernels.norm import *  # noqa: E402,F403  family (issue 12: norm)
from pbxc.codegen.kernels.pooling import *  # noqa: E402,F403  family
from pbxc.codegen.kernels.resize import *  # noqa: E402,F403  family
from pbxc.codegen.kernels.shape import *  # noqa: E402,F403  family
from pbxc.codegen.kernels.tensor import *  # noqa: E402,F403  family (issue 12)


def _pairs_product(ta, tb, lrp):
    """(B, M, M, *out): ta[p] * tb[q] with product broadcasting, through product_forward."""
    batch, m = ta.shape[:2]
    a = np.broadcast_to(ta[:, :, None], (batch, m, m, *ta.shape[2:]))
    b = np.broadcast_to(tb[:, None, :], (batch, m, m, *tb.shape[2:]))
    out = product_forward([a.reshape(batch * m * m, *ta.shape[2:]),  # noqa: F405  family
                           b.reshape(batch * m * m, *tb.shape[2:])], None, lrp)
    return out.reshape(batch, m, m, *out.shape[1:])


def product_jvp2(hs, ts, xs, y, local, curv, p, lrp):
    """d2(ab)(t_p, t_q) = ta_p tb_q + tb_p ta_q, plus b ha + a hb (the product rule twice)."""
    cross = _pairs_product(ts[0], ts[1], lrp)
    cross = cross + np.swapaxes(cross, 1, 2)
    m = ts[0].shape[1]
    out = cross.reshape(cross.shape[0], m * m, *cross.shape[3:])
    if hs[0] is not None or hs[1] is not None:
        full = [h if h is not None else np.zeros((t.shape[0], m * m, *t.shape[2:]), t.dtype)
                for h, t in zip(hs, ts)]
        out = out + product_jvp(full, xs, y, local, p, lrp)  # noqa: F405  family
    return out


def product_hvp(v, vd, ts, xs, y, local, curv, p, lrp):
    """The tangent of [v b, v a]: [vd b + v tb, vd a + v ta], each summed back over what it
    was broadcast along."""
    batch, m = ts[0].shape[:2]
    reps = np.broadcast_to(v, (batch, m, *v.shape[2:])).reshape(batch * m, 1, *v.shape[2:])
    fake = [t.reshape(batch * m, *t.shape[2:]) for t in ts]
    # product_vjp(v, [ta, tb]) = [v tb, v ta], reduced to each factor's shape
    vt_b, vt_a = product_vjp(reps, fake, y, local, p, lrp)  # noqa: F405  family
    out = [vt_b.reshape(batch, m, *xs[0].shape[1:]),
           vt_a.reshape(batch, m, *xs[1].shape[1:])]
    if vd is not None:
        out = [o + g for o, g in zip(out, product_vjp(vd, xs, y, local, p, lrp))]  # noqa: F405
    return out
