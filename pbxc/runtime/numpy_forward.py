"""The NumPy reference semantics of every op's forward pass: one rule per :class:`OpKind`.

Arrays are batched: shape (B, *per_sample_shape). Every other backend is tested against these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.ops import OpKind

Array = np.ndarray
Params = Mapping[str, Array]  # role -> array
ForwardRule = Callable[[OpNode, list[Array], Params], Array]


def windows2d(x: Array, kernel: tuple[int, int], stride: tuple[int, int],
              padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
              pad_value: float = 0.0) -> Array:
    """(B, C, H, W) -> (B, C, OH, OW, kh, kw) view of every window (a copy only for padding)."""
    (ph, pw), (kh, kw), (dh, dw), (sh, sw) = padding, kernel, dilation, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    win = sliding_window_view(x, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def conv2d(x: Array, weight: Array, bias: Array | None, stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Array:
    batch = x.shape[0]
    out_ch, in_per_group, kh, kw = weight.shape
    win = windows2d(x, (kh, kw), stride, padding, dilation)
    oh, ow = win.shape[2:4]
    if groups == 1:
        y = np.tensordot(win, weight, axes=([1, 4, 5], [1, 2, 3]))  # B, OH, OW, O
        y = np.moveaxis(y, 3, 1)
    else:
        win = win.reshape(batch, groups, in_per_group, oh, ow, kh, kw)
        wg = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw)
        y = np.einsum("bgchwij,gocij->bgohw", win, wg, optimize=True)
        y = y.reshape(batch, out_ch, oh, ow)
    if bias is not None:
        y = y + bias[None, :, None, None]
    return np.ascontiguousarray(y)


def _conv2d(node: OpNode, xs: list[Array], p: Params) -> Array:
    return conv2d(xs[0], p["weight"], p.get("bias"), node.attr("stride"), node.attr("padding"),
                  node.attr("dilation"), node.attr("groups"))


def _conv1d(node: OpNode, xs: list[Array], p: Params) -> Array:
    y = conv2d(xs[0][:, :, None, :], p["weight"][:, :, None, :], p.get("bias"),
               (1, *node.attr("stride")), (0, *node.attr("padding")),
               (1, *node.attr("dilation")), node.attr("groups"))
    return y[:, :, 0, :]


def _linear(node: OpNode, xs: list[Array], p: Params) -> Array:
    y = xs[0] @ p["weight"].T
    bias = p.get("bias")
    return y + bias if bias is not None else y


def pool_geometry(node: OpNode) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = node.attr("kernel")
    return kernel, node.attr("stride") or kernel, node.attr("padding")


def _maxpool2d(node: OpNode, xs: list[Array], p: Params) -> Array:
    kernel, stride, padding = pool_geometry(node)
    win = windows2d(xs[0], kernel, stride, padding, pad_value=-np.inf)
    return np.ascontiguousarray(win.max(axis=(4, 5)))


def _avgpool2d(node: OpNode, xs: list[Array], p: Params) -> Array:
    kernel, stride, padding = pool_geometry(node)
    x = xs[0]
    total = windows2d(x, kernel, stride, padding).sum(axis=(4, 5))
    if node.attr("count_include_pad") or padding == (0, 0):
        return total / (kernel[0] * kernel[1])
    ones = np.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    counts = windows2d(ones, kernel, stride, padding).sum(axis=(4, 5))
    return total / counts


def _global_avgpool(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)


def channel_view(v: Array, rank: int) -> Array:
    """A [C] parameter shaped to broadcast over (B, C, ...) of the given per-sample rank."""
    return v.reshape((1, -1) + (1,) * (rank - 1))


def batchnorm_affine(p: Params, eps: float) -> tuple[Array, Array]:
    """Inference batch norm as y = scale * x + shift, per channel."""
    scale = p["weight"] / np.sqrt(p["running_var"] + eps)
    return scale, p["bias"] - p["running_mean"] * scale


def _batchnorm(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    scale, shift = batchnorm_affine(p, node.attr("eps"))
    rank = x.ndim - 1
    return x * channel_view(scale, rank) + channel_view(shift, rank)


def broadcast_param(v: Array, sample_shape: tuple[int, ...]) -> Array:
    """A normalize parameter ([] scalar, [C] per channel, or per element) against (B, *shape)."""
    if v.shape == sample_shape:
        return v[None]
    if v.ndim == 0:
        return v
    return channel_view(v, len(sample_shape))


def _normalize(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    shape = x.shape[1:]
    return (x - broadcast_param(p["mean"], shape)) / broadcast_param(p["std"], shape)


def batch_axis(node: OpNode, x: Array) -> int:
    """The batched array axis of a per-sample ``axis`` attribute."""
    return int(node.attr("axis")) % (x.ndim - 1) + 1


def _softmax(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    axis = batch_axis(node, x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    axis = batch_axis(node, x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _concat(node: OpNode, xs: list[Array], p: Params) -> Array:
    return np.concatenate(xs, axis=batch_axis(node, xs[0]))


def _add(node: OpNode, xs: list[Array], p: Params) -> Array:
    out = xs[0] + xs[1]
    for x in xs[2:]:
        out = out + x
    return out


def _reshape(node: OpNode, xs: list[Array], p: Params) -> Array:
    assert node.shape is not None
    return xs[0].reshape((xs[0].shape[0], *node.shape))


FORWARD_RULES: dict[OpKind, ForwardRule] = {
    OpKind.LINEAR: _linear,
    OpKind.CONV1D: _conv1d,
    OpKind.CONV2D: _conv2d,
    OpKind.MAXPOOL2D: _maxpool2d,
    OpKind.AVGPOOL2D: _avgpool2d,
    OpKind.GLOBAL_AVGPOOL: _global_avgpool,
    OpKind.FLATTEN: lambda node, xs, p: xs[0].reshape(xs[0].shape[0], -1),
    OpKind.RESHAPE: _reshape,
    OpKind.ADD: _add,
    OpKind.CONCAT: _concat,
    OpKind.BATCHNORM: _batchnorm,
    OpKind.NORMALIZE: _normalize,
    OpKind.SOFTMAX: _softmax,
    OpKind.LOG_SOFTMAX: _log_softmax,
}


def forward_rule(node: OpNode) -> ForwardRule:
    rule = FORWARD_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the forward pass (numpy backend) has no rule for op "
                            f"'{node.kind.value}'", node.pos)
    return rule
