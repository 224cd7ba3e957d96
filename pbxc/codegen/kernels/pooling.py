"""Max and average pooling over 1-3 spatial axes, with dilation, padding and ``ceil_mode``.

PyTorch's geometry (``torch.nn.MaxPool{1,2,3}d``, ``AvgPool{1,2,3}d``): the output size is
floor((n + 2p - d(k-1) - 1) / s) + 1, or its ceiling with ``ceil_mode``, less one where the
last window would start in the right padding. ``ceil_mode`` is thus extra right padding that
no window maximum comes from and that the average never counts; with ``count_include_pad``
the divisor counts the symmetric padding, and not that extra. The maximum is the first in
row-major window order (as PyTorch's kernels, which compare with ``>``).

Kernels take ``out``, the output's spatial size, so that the extra padding follows from the
input's shape. Windows are visited offset by offset over strided views of the padded input:
no window array is built. The 2-d pools without ``ceil_mode`` or dilation keep their own fast
kernels in ``numpy_kernels`` (``maxpool2d_*``, ``avgpool2d_*``).
"""

import numpy as np


def pool_pads(in_size, kernel, stride, padding, dilation, out):
    """((left, right), ...) per spatial axis: the symmetric padding, plus on the right what
    ``ceil_mode`` adds (the last window may overhang the padded input)."""
    pads = []
    for n, k, s, p, d, o in zip(in_size, kernel, stride, padding, dilation, out):
        reach = (o - 1) * s + d * (k - 1) + 1
        pads.append((p, max(reach - n - p, p)))
    return tuple(pads)


def _pool_padded(x, pads, fill):
    nd = len(pads)
    if not any(lo or hi for lo, hi in pads):
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - nd) + list(pads), constant_values=fill)


def _pool_offsets(kernel, stride, dilation, out):
    """For each in-window offset (row-major), the slices of the padded input it reads."""
    for offset in np.ndindex(*kernel):
        yield tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                    for o, d, n, s in zip(offset, dilation, out, stride))


def _pool_view(a, index):
    full = [Ellipsis]
    full.extend(index)
    return a[tuple(full)]


def maxpool_argmax(x, kernel, stride, padding, dilation, out):
    """Window maxima over the last ``len(kernel)`` axes and the in-window offset (flat,
    row-major) of the first maximum. Padding is -inf and never wins (a window always holds
    an input element, as PyTorch requires padding <= kernel / 2)."""
    pads = pool_pads(x.shape[-len(kernel):], kernel, stride, padding, dilation, out)
    xp = _pool_padded(x, pads, -np.inf)
    offsets = list(_pool_offsets(kernel, stride, dilation, out))
    best = _pool_view(xp, offsets[0]).copy()
    index = np.zeros(best.shape, dtype=np.int64)
    for i, where in enumerate(offsets[1:], start=1):
        part = _pool_view(xp, where)
        better = part > best
        np.copyto(best, part, where=better)
        index[better] = i
    return best, index


def _pool_scatter(parts, in_size, kernel, stride, padding, dilation, out, dtype, lead):
    """Sum per-offset arrays (lead + out) back onto the input grid (lead + in_size)."""
    pads = pool_pads(in_size, kernel, stride, padding, dilation, out)
    full = np.zeros((*lead, *(n + lo + hi for n, (lo, hi) in zip(in_size, pads))), dtype=dtype)
    for where, part in zip(_pool_offsets(kernel, stride, dilation, out), parts):
        _pool_view(full, where)[...] += part
    crop = tuple(slice(lo, lo + n) for n, (lo, _) in zip(in_size, pads))
    return np.ascontiguousarray(_pool_view(full, crop))


def maxpool_gather(t, index, kernel, stride, padding, dilation, out):
    """The tangent of max pooling: each window's tangent at its maximum. ``index`` broadcasts
    against ``t``'s leading axes (one winner set serves every tangent row)."""
    pads = pool_pads(t.shape[-len(kernel):], kernel, stride, padding, dilation, out)
    tp = _pool_padded(t, pads, 0.0)
    result = None
    for i, where in enumerate(_pool_offsets(kernel, stride, dilation, out)):
        part = np.where(index == i, _pool_view(tp, where), 0)
        result = part if result is None else result + part
    return result


def maxpool_route(g, index, in_size, kernel, stride, padding, dilation, out):
    """The transpose: each window's cotangent to its maximum (winner takes all)."""
    lead = np.broadcast_shapes(g.shape[:-len(kernel)], index.shape[:-len(kernel)])
    count = int(np.prod(kernel))
    parts = (np.where(index == i, g, 0) for i in range(count))
    return _pool_scatter(parts, in_size, kernel, stride, padding, dilation, out, g.dtype, lead)


def _pool_spatial(x, kernel):
    return x.shape[-len(kernel):]


def maxpool_local(xs, p, kernel, stride, padding, dilation, out):
    return maxpool_argmax(xs[0], kernel, stride, padding, dilation, out)[1]


def maxpool_forward(xs, p, kernel, stride, padding, dilation, out):
    return maxpool_argmax(xs[0], kernel, stride, padding, dilation, out)[0]


def maxpool_jvp(ts, xs, y, local, p, kernel, stride, padding, dilation, out):
    return maxpool_gather(ts[0], local[:, None], kernel, stride, padding, dilation, out)


def maxpool_vjp(v, xs, y, local, p, kernel, stride, padding, dilation, out):
    return [maxpool_route(v, local[:, None], _pool_spatial(xs[0], kernel), kernel, stride,
                          padding, dilation, out)]


def maxpool_relevance(relevance, x, index, kernel, stride, padding, dilation, out):
    """LRP through max pooling: winner takes all (Montavon et al. 2019, sec. 10.2.1; Zennit
    passes relevance through the gradient, which is the same routing). Also returns how many
    windows with relevance had their maximum more than once (relevance went to the first)."""
    pads = pool_pads(_pool_spatial(x, kernel), kernel, stride, padding, dilation, out)
    xp = _pool_padded(x, pads, -np.inf)
    best = maxpool_argmax(x, kernel, stride, padding, dilation, out)[0]
    equal = np.zeros(best.shape, dtype=np.int64)
    for where in _pool_offsets(kernel, stride, dilation, out):
        equal += _pool_view(xp, where) == best
    ties = int(np.count_nonzero((equal > 1) & (relevance != 0)))
    r = maxpool_route(relevance, index, _pool_spatial(x, kernel), kernel, stride, padding,
                      dilation, out)
    return r, ties


def _pool_relu_multiplier(d0, d):
    """(relu(d) - relu(d0)) / (d - d0) without cancellation; relu'(0) = 0 where d == d0."""
    same = d == d0
    secant = (np.maximum(d, 0) - np.maximum(d0, 0)) / np.where(same, 1, d - d0)
    return np.where(same, (d > 0).astype(d.dtype), secant)


def maxpool_dfd(m, xs, xs0, y, y0, local, p, kernel, stride, padding, dilation, out):
    """DFD multipliers of max pooling (seed 004): the window maximum as a chain of pairwise
    maxima, max(u, v) = u + relu(v - u), each relu by the rescale rule (eq. 16-17). Sums to
    delta exactly for any defaults; equals eq. 13's indicator when the defaults are uniform.
    Padding (and ceil_mode's overhang) takes no part."""
    x, x0 = xs[0], xs0[0]
    spatial = _pool_spatial(x, kernel)
    pads = pool_pads(spatial, kernel, stride, padding, dilation, out)
    xp, x0p = _pool_padded(x, pads, 0.0), _pool_padded(x0, pads, 0.0)
    inside = _pool_padded(np.ones(spatial, dtype=bool), pads, False)
    offsets = list(_pool_offsets(kernel, stride, dilation, out))
    first = offsets[0]
    run, run0 = _pool_view(xp, first).copy(), _pool_view(x0p, first).copy()
    seen = _pool_view(inside, first).copy()
    slopes = []
    for where in offsets[1:]:
        w, w0, ok = _pool_view(xp, where), _pool_view(x0p, where), _pool_view(inside, where)
        d, d0 = w - run, w0 - run0
        s = _pool_relu_multiplier(d0, d)
        slope = np.where(ok, np.where(seen, s, 1.0), 0.0)   # the first element takes all
        slopes.append(slope)
        run = np.where(ok, np.where(seen, run + np.maximum(d, 0), w), run)
        run0 = np.where(ok, np.where(seen, run0 + np.maximum(d0, 0), w0), run0)
        seen = seen | ok
    g = m
    parts = []
    for s in reversed(slopes):
        parts.append(g * s[:, None])
        g = g * (1 - s[:, None])
    parts.append(g)
    return [_pool_scatter(parts[::-1], spatial, kernel, stride, padding, dilation, out,
                          m.dtype, m.shape[:-len(kernel)])]


# ---- average pooling: a constant linear map
def avgpool_counts(in_size, kernel, stride, padding, count_include_pad, out, dtype):
    """The divisor of every window, (*out): elements in the input (or, with
    ``count_include_pad``, in the symmetrically padded input), PyTorch's rule."""
    counts = np.ones((), dtype=np.int64)
    for axis, (n, k, s, p, o) in enumerate(zip(in_size, kernel, stride, padding, out)):
        start = np.arange(o) * s - p
        lo, hi = (-p, n + p) if count_include_pad else (0, n)
        per = np.minimum(start + k, hi) - np.maximum(start, lo)
        counts = counts[..., None] * per.reshape((1,) * axis + (o,))
    return counts.astype(dtype)


def avgpool_sum(x, kernel, stride, padding, out):
    ones = (1,) * len(kernel)
    pads = pool_pads(_pool_spatial(x, kernel), kernel, stride, padding, ones, out)
    xp = _pool_padded(x, pads, 0.0)
    total = None
    for where in _pool_offsets(kernel, stride, ones, out):
        part = _pool_view(xp, where)
        total = part.copy() if total is None else total + part
    return total


def avgpool_apply(x, kernel, stride, padding, count_include_pad, out):
    counts = avgpool_counts(_pool_spatial(x, kernel), kernel, stride, padding,
                            count_include_pad, out, x.dtype)
    return avgpool_sum(x, kernel, stride, padding, out) / counts


def avgpool_transpose(g, in_size, kernel, stride, padding, count_include_pad, out):
    share = g / avgpool_counts(in_size, kernel, stride, padding, count_include_pad, out,
                               g.dtype)
    count = int(np.prod(kernel))
    ones = (1,) * len(kernel)
    return _pool_scatter((share for _ in range(count)), in_size, kernel, stride, padding, ones,
                         out, g.dtype, g.shape[:-len(kernel)])


def avgpool_forward(xs, p, kernel, stride, padding, count_include_pad, out):
    return avgpool_apply(xs[0], kernel, stride, padding, count_include_pad, out)


def avgpool_jvp(ts, xs, y, local, p, kernel, stride, padding, count_include_pad, out):
    return avgpool_apply(ts[0], kernel, stride, padding, count_include_pad, out)


def avgpool_vjp(v, xs, y, local, p, kernel, stride, padding, count_include_pad, out):
    return [avgpool_transpose(v, _pool_spatial(xs[0], kernel), kernel, stride, padding,
                              count_include_pad, out)]


def avgpool_lrp_params(p, xs, **attrs):
    """Unit weights (Zennit's Norm for pooling): the rule's modifiers see one weight 1."""
    return np.ones((), dtype=xs[0].dtype), None


def avgpool_lrp_bias(b, z):
    return b


def avgpool_lrp_forward(ins, w, kernel, stride, padding, count_include_pad, out):
    return w * avgpool_apply(ins[0], kernel, stride, padding, count_include_pad, out)


def avgpool_lrp_transpose(s, w, xs, kernel, stride, padding, count_include_pad, out):
    return [w * avgpool_transpose(s, _pool_spatial(xs[0], kernel), kernel, stride, padding,
                                  count_include_pad, out)]
