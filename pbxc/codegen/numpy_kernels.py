"""NumPy kernels for every op: forward, and the transposed (vector-Jacobian) linear maps.

This module is self-contained on purpose (numpy only, no pbxc imports): the runtime imports
it, and ``pbxc compile`` copies its source verbatim into standalone generated modules, so the
reference semantics exist once.

Batched layout: arrays are (N, *per_sample_shape). For linear maps N may be batch x tangents.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def windows2d(x, kernel, stride, padding, dilation=(1, 1), pad_value=0.0):
    """(N, C, H, W) -> (N, C, OH, OW, kh, kw) view of every window (a copy only for padding)."""
    (ph, pw), (kh, kw), (dh, dw), (sh, sw) = padding, kernel, dilation, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    win = sliding_window_view(x, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """PyTorch's conv2d (cross-correlation); weight [out, in/groups, kh, kw]."""
    n = x.shape[0]
    out_ch, in_per_group, kh, kw = weight.shape
    win = windows2d(x, (kh, kw), stride, padding, dilation)
    oh, ow = win.shape[2:4]
    if groups == 1:
        y = np.tensordot(win, weight, axes=([1, 4, 5], [1, 2, 3]))  # N, OH, OW, O
        y = np.moveaxis(y, 3, 1)
    else:
        win = win.reshape(n, groups, in_per_group, oh, ow, kh, kw)
        wg = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw)
        y = np.einsum("bgchwij,gocij->bgohw", win, wg, optimize=True)
        y = y.reshape(n, out_ch, oh, ow)
    if bias is not None:
        y = y + bias[None, :, None, None]
    return np.ascontiguousarray(y)


def conv2d_transpose(g, weight, in_hw, stride, padding, dilation, groups):
    """The adjoint of conv2d without bias: cotangent (N, O, OH, OW) -> (N, C, H, W).

    Computed as a stride-1 correlation of the zero-stuffed cotangent with the flipped,
    transposed kernel, then cropped to the unpadded input.
    """
    n, out_ch, oh, ow = g.shape
    _, in_per_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h, w = in_hw
    hp, wp = h + 2 * ph, w + 2 * pw
    stuffed = np.zeros((n, out_ch, (oh - 1) * sh + 1, (ow - 1) * sw + 1), dtype=g.dtype)
    stuffed[:, :, ::sh, ::sw] = g
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    # rows of the padded input that no window reached get zero gradient
    extra_h = hp - (stuffed.shape[2] + span_h - 1)
    extra_w = wp - (stuffed.shape[3] + span_w - 1)
    full = np.pad(stuffed, ((0, 0), (0, 0), (span_h - 1, span_h - 1 + extra_h),
                            (span_w - 1, span_w - 1 + extra_w)))
    opg = out_ch // groups
    flipped = weight[:, :, ::-1, ::-1].reshape(groups, opg, in_per_group, kh, kw)
    w_t = flipped.transpose(0, 2, 1, 3, 4).reshape(groups * in_per_group, opg, kh, kw)
    grad_padded = conv2d(full, w_t, None, (1, 1), (0, 0), dilation, groups)
    return np.ascontiguousarray(grad_padded[:, :, ph:ph + h, pw:pw + w])


def conv1d(x, weight, bias, stride, padding, dilation, groups):
    y = conv2d(x[:, :, None, :], weight[:, :, None, :], bias, (1, stride[0]), (0, padding[0]),
               (1, dilation[0]), groups)
    return y[:, :, 0, :]


def conv1d_transpose(g, weight, in_len, stride, padding, dilation, groups):
    out = conv2d_transpose(g[:, :, None, :], weight[:, :, None, :], (1, in_len),
                           (1, stride[0]), (0, padding[0]), (1, dilation[0]), groups)
    return out[:, :, 0, :]


def maxpool2d_gather(t, index, kernel, stride, padding):
    """The tangent of max pooling: each window's tangent at its (saved) maximum."""
    win = windows2d(t, kernel, stride, padding)
    flat = win.reshape(*win.shape[:4], -1)
    return np.ascontiguousarray(np.take_along_axis(flat, index[..., None], axis=4)[..., 0])


def maxpool2d(x, kernel, stride, padding):
    """Values and the flat in-window index of each maximum (the first in row-major order)."""
    win = windows2d(x, kernel, stride, padding, pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    index = flat.argmax(axis=4)
    values = np.take_along_axis(flat, index[..., None], axis=4)[..., 0]
    return np.ascontiguousarray(values), index


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


def maxpool2d_transpose(g, index, in_hw, kernel, stride, padding):
    """Route each cotangent to its window's maximum (winner takes all)."""
    kw = kernel[1]
    return _scatter_windows(lambda p, q: np.where(index == p * kw + q, g, 0), in_hw, kernel,
                            stride, padding, g.dtype, g.shape[:-2])


def avgpool2d_counts(in_hw, kernel, stride, padding, count_include_pad, dtype):
    if count_include_pad or padding == (0, 0):
        return np.asarray(kernel[0] * kernel[1], dtype=dtype)
    ones = np.ones((1, 1, *in_hw), dtype=dtype)
    return windows2d(ones, kernel, stride, padding).sum(axis=(4, 5))


def avgpool2d(x, kernel, stride, padding, count_include_pad):
    total = windows2d(x, kernel, stride, padding).sum(axis=(4, 5))
    return total / avgpool2d_counts(x.shape[2:], kernel, stride, padding, count_include_pad,
                                    x.dtype)


def avgpool2d_transpose(g, in_hw, kernel, stride, padding, count_include_pad):
    share = g / avgpool2d_counts(in_hw, kernel, stride, padding, count_include_pad, g.dtype)
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


def softmax_jvp(s, t, axis):
    """J t for y = softmax(x), J = diag(s) - s s^T along ``axis``; s broadcasts against t."""
    return s * (t - (s * t).sum(axis=axis, keepdims=True))


def log_softmax_jvp(s, t, axis):
    """J t for y = log_softmax(x), J = I - 1 s^T."""
    return t - (s * t).sum(axis=axis, keepdims=True)


def log_softmax_vjp(s, v, axis):
    """v^T J for y = log_softmax(x): v - s * sum(v)."""
    return v - s * v.sum(axis=axis, keepdims=True)
