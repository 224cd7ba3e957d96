"""The NumPy reference semantics of every op's forward pass: one rule per :class:`OpKind`.

Arrays are batched: shape (B, *per_sample_shape). The kernels themselves live in
``pbxc.codegen.numpy_kernels`` (also copied into compiled modules); rules adapt node
attributes to them. Every other backend is tested against these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.ops import OpKind

Array = np.ndarray
Params = Mapping[str, Array]  # role -> array
ForwardRule = Callable[[OpNode, list[Array], Params], Array]


def pool_geometry(node: OpNode) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = node.attr("kernel")
    return kernel, node.attr("stride") or kernel, node.attr("padding")


def conv_args(node: OpNode) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    return node.attr("stride"), node.attr("padding"), node.attr("dilation"), node.attr("groups")


def batchnorm_affine(node: OpNode, p: Params) -> tuple[Array, Array]:
    return K.batchnorm_scale_shift(p["weight"], p["bias"], p["running_mean"],
                                   p["running_var"], node.attr("eps"))


def broadcast_param(v: Array, sample_shape: tuple[int, ...]) -> Array:
    """A normalize parameter ([] scalar, [C] per channel, or per element) against (B, *shape)."""
    if v.shape == sample_shape:
        return v[None]
    if v.ndim == 0:
        return v
    return K.channel_view(v, len(sample_shape))


def sample_axis(node: OpNode, rank: int) -> int:
    """The per-sample ``axis`` attribute, made non-negative for a per-sample rank."""
    return int(node.attr("axis")) % rank


def _linear(node: OpNode, xs: list[Array], p: Params) -> Array:
    y = xs[0] @ p["weight"].T
    bias = p.get("bias")
    return y + bias if bias is not None else y


def _batchnorm(node: OpNode, xs: list[Array], p: Params) -> Array:
    x = xs[0]
    scale, shift = batchnorm_affine(node, p)
    rank = x.ndim - 1
    return x * K.channel_view(scale, rank) + K.channel_view(shift, rank)


def _normalize(node: OpNode, xs: list[Array], p: Params) -> Array:
    shape = xs[0].shape[1:]
    return (xs[0] - broadcast_param(p["mean"], shape)) / broadcast_param(p["std"], shape)


def _add(node: OpNode, xs: list[Array], p: Params) -> Array:
    out = xs[0] + xs[1]
    for x in xs[2:]:
        out = out + x
    return out


FORWARD_RULES: dict[OpKind, ForwardRule] = {
    OpKind.LINEAR: _linear,
    OpKind.CONV1D: lambda n, xs, p: K.conv1d(xs[0], p["weight"], p.get("bias"), *conv_args(n)),
    OpKind.CONV2D: lambda n, xs, p: K.conv2d(xs[0], p["weight"], p.get("bias"), *conv_args(n)),
    OpKind.MAXPOOL2D: lambda n, xs, p: K.maxpool2d(xs[0], *pool_geometry(n))[0],
    OpKind.AVGPOOL2D: lambda n, xs, p: K.avgpool2d(xs[0], *pool_geometry(n),
                                                   n.attr("count_include_pad")),
    OpKind.GLOBAL_AVGPOOL: lambda n, xs, p: K.global_avgpool(xs[0]),
    OpKind.FLATTEN: lambda n, xs, p: xs[0].reshape(xs[0].shape[0], -1),
    OpKind.RESHAPE: lambda n, xs, p: xs[0].reshape((xs[0].shape[0], *(n.shape or ()))),
    OpKind.ADD: _add,
    OpKind.CONCAT: lambda n, xs, p: np.concatenate(xs, axis=1 + sample_axis(n, xs[0].ndim - 1)),
    OpKind.BATCHNORM: _batchnorm,
    OpKind.NORMALIZE: _normalize,
    OpKind.SOFTMAX: lambda n, xs, p: K.softmax(xs[0], 1 + sample_axis(n, xs[0].ndim - 1)),
    OpKind.LOG_SOFTMAX: lambda n, xs, p: K.log_softmax(xs[0], 1 + sample_axis(n, xs[0].ndim - 1)),
}


def forward_rule(node: OpNode) -> ForwardRule:
    rule = FORWARD_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the forward pass (numpy backend) has no rule for op "
                            f"'{node.kind.value}'", node.pos)
    return rule
