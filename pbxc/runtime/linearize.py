"""The linearisation of every op at a point: JVP and VJP rule tables keyed by :class:`OpKind`.

As in JAX's ``primitive_jvps`` / ``primitive_transposes``: one table per direction, one small
rule per op, and a missing rule is an error naming the pass and the op.

Tangents carry an extra axis after the batch: (B, K, *shape), K tangent (or cotangent)
directions per sample. Elementwise Jacobians are diagonal and never materialised; softmax uses
its closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.ops import OpKind
from pbxc.runtime.numpy_forward import (
    batchnorm_affine,
    broadcast_param,
    conv_args,
    pool_geometry,
    sample_axis,
)

Array = np.ndarray


@dataclass
class Point:
    """What a rule needs of the forward pass at the linearisation point."""

    node: OpNode
    inputs: list[Array]           # forward values of the inputs, (B, *in_shape)
    output: Array                 # forward value, (B, *out_shape)
    params: Mapping[str, Array]
    local: Array | None = None    # f'(z) for activations; argmax indices for max pooling


def _flat(t: Array) -> tuple[Array, tuple[int, int]]:
    """(B, K, *shape) -> (B*K, *shape), for kernels that take one leading axis."""
    b, k = t.shape[:2]
    return t.reshape(b * k, *t.shape[2:]), (b, k)


def _unflat(t: Array, bk: tuple[int, int]) -> Array:
    return t.reshape(*bk, *t.shape[1:])


def _repeat_index(index: Array, k: int) -> Array:
    return np.repeat(index, k, axis=0)


def _channel_scale(v: Array, t: Array) -> Array:
    """Multiply (B, K, C, ...) by a per-channel [C] vector."""
    return t * v.reshape((1, 1, -1) + (1,) * (t.ndim - 3))


def _param_view(v: Array, sample_shape: tuple[int, ...]) -> Array:
    """A normalize parameter against (B, K, *shape)."""
    b = broadcast_param(v, sample_shape)
    return b if b.ndim == 0 else b[:, None]


# ---------------------------------------------------------------- JVP: tangent in -> tangent out

JvpRule = Callable[[Point, list[Array]], Array]


def matmul_last(t: Array, m: Array) -> Array:
    """t @ m over the last axis as one GEMM (numpy loops over stacked 3-d products)."""
    lead = t.shape[:-1]
    flat = np.ascontiguousarray(t).reshape(-1, t.shape[-1])
    return (flat @ m).reshape(*lead, m.shape[1])


def _jvp_linear(pt: Point, ts: list[Array]) -> Array:
    return matmul_last(ts[0], pt.params["weight"].T)


def _jvp_conv2d(pt: Point, ts: list[Array]) -> Array:
    t, bk = _flat(ts[0])
    return _unflat(K.conv2d(t, pt.params["weight"], None, *conv_args(pt.node)), bk)


def _jvp_conv1d(pt: Point, ts: list[Array]) -> Array:
    t, bk = _flat(ts[0])
    return _unflat(K.conv1d(t, pt.params["weight"], None, *conv_args(pt.node)), bk)


def _jvp_maxpool(pt: Point, ts: list[Array]) -> Array:
    assert pt.local is not None
    t, bk = _flat(ts[0])
    return _unflat(K.maxpool2d_gather(t, _repeat_index(pt.local, bk[1]),
                                      *pool_geometry(pt.node)), bk)


def _jvp_avgpool(pt: Point, ts: list[Array]) -> Array:
    t, bk = _flat(ts[0])
    return _unflat(K.avgpool2d(t, *pool_geometry(pt.node), pt.node.attr("count_include_pad")),
                   bk)


def _jvp_global_avgpool(pt: Point, ts: list[Array]) -> Array:
    t = ts[0]
    return t.reshape(*t.shape[:3], -1).mean(axis=3)


def _jvp_reshape(pt: Point, ts: list[Array]) -> Array:
    t = ts[0]
    return t.reshape(*t.shape[:2], *pt.output.shape[1:])


def _jvp_add(pt: Point, ts: list[Array]) -> Array:
    out = ts[0] + ts[1]
    for t in ts[2:]:
        out = out + t
    return out


def _jvp_concat(pt: Point, ts: list[Array]) -> Array:
    return np.concatenate(ts, axis=2 + sample_axis(pt.node, pt.output.ndim - 1))


def _jvp_batchnorm(pt: Point, ts: list[Array]) -> Array:
    scale, _ = batchnorm_affine(pt.node, pt.params)
    return _channel_scale(scale, ts[0])


def _jvp_normalize(pt: Point, ts: list[Array]) -> Array:
    return ts[0] / _param_view(pt.params["std"], pt.output.shape[1:])


def _jvp_softmax(pt: Point, ts: list[Array]) -> Array:
    axis = 2 + sample_axis(pt.node, pt.output.ndim - 1)
    return K.softmax_jvp(pt.output[:, None], ts[0], axis)


def _jvp_log_softmax(pt: Point, ts: list[Array]) -> Array:
    axis = 2 + sample_axis(pt.node, pt.output.ndim - 1)
    return K.log_softmax_jvp(np.exp(pt.output)[:, None], ts[0], axis)


def _jvp_activation(pt: Point, ts: list[Array]) -> Array:
    assert pt.local is not None
    return ts[0] * pt.local[:, None]


JVP_RULES: dict[OpKind, JvpRule] = {
    OpKind.LINEAR: _jvp_linear,
    OpKind.CONV1D: _jvp_conv1d,
    OpKind.CONV2D: _jvp_conv2d,
    OpKind.MAXPOOL2D: _jvp_maxpool,
    OpKind.AVGPOOL2D: _jvp_avgpool,
    OpKind.GLOBAL_AVGPOOL: _jvp_global_avgpool,
    OpKind.FLATTEN: _jvp_reshape,
    OpKind.RESHAPE: _jvp_reshape,
    OpKind.ADD: _jvp_add,
    OpKind.CONCAT: _jvp_concat,
    OpKind.BATCHNORM: _jvp_batchnorm,
    OpKind.NORMALIZE: _jvp_normalize,
    OpKind.SOFTMAX: _jvp_softmax,
    OpKind.LOG_SOFTMAX: _jvp_log_softmax,
    OpKind.ACTIVATION: _jvp_activation,
}

# ---------------------------------------------------------------- VJP: cotangent out -> inputs

VjpRule = Callable[[Point, Array], list[Array]]


def _vjp_linear(pt: Point, v: Array) -> list[Array]:
    return [matmul_last(v, pt.params["weight"])]


def _vjp_conv2d(pt: Point, v: Array) -> list[Array]:
    g, bk = _flat(v)
    x = pt.inputs[0]
    return [_unflat(K.conv2d_transpose(g, pt.params["weight"], x.shape[2:],
                                       *conv_args(pt.node)), bk)]


def _vjp_conv1d(pt: Point, v: Array) -> list[Array]:
    g, bk = _flat(v)
    x = pt.inputs[0]
    return [_unflat(K.conv1d_transpose(g, pt.params["weight"], x.shape[2],
                                       *conv_args(pt.node)), bk)]


def _vjp_maxpool(pt: Point, v: Array) -> list[Array]:
    assert pt.local is not None
    g, bk = _flat(v)
    x = pt.inputs[0]
    return [_unflat(K.maxpool2d_transpose(g, _repeat_index(pt.local, bk[1]), x.shape[2:],
                                          *pool_geometry(pt.node)), bk)]


def _vjp_avgpool(pt: Point, v: Array) -> list[Array]:
    g, bk = _flat(v)
    x = pt.inputs[0]
    return [_unflat(K.avgpool2d_transpose(g, x.shape[2:], *pool_geometry(pt.node),
                                          pt.node.attr("count_include_pad")), bk)]


def _vjp_global_avgpool(pt: Point, v: Array) -> list[Array]:
    g, bk = _flat(v)
    return [_unflat(K.global_avgpool_transpose(g, pt.inputs[0].shape[2:]), bk)]


def _vjp_reshape(pt: Point, v: Array) -> list[Array]:
    return [v.reshape(*v.shape[:2], *pt.inputs[0].shape[1:])]


def _vjp_add(pt: Point, v: Array) -> list[Array]:
    return [v for _ in pt.inputs]


def _vjp_concat(pt: Point, v: Array) -> list[Array]:
    axis = 2 + sample_axis(pt.node, pt.output.ndim - 1)
    sizes = np.cumsum([x.shape[axis - 1] for x in pt.inputs])[:-1]
    return list(np.split(v, sizes, axis=axis))


def _vjp_softmax(pt: Point, v: Array) -> list[Array]:
    return [_jvp_softmax(pt, [v])]  # J is symmetric


def _vjp_log_softmax(pt: Point, v: Array) -> list[Array]:
    axis = 2 + sample_axis(pt.node, pt.output.ndim - 1)
    return [K.log_softmax_vjp(np.exp(pt.output)[:, None], v, axis)]


VJP_RULES: dict[OpKind, VjpRule] = {
    OpKind.LINEAR: _vjp_linear,
    OpKind.CONV1D: _vjp_conv1d,
    OpKind.CONV2D: _vjp_conv2d,
    OpKind.MAXPOOL2D: _vjp_maxpool,
    OpKind.AVGPOOL2D: _vjp_avgpool,
    OpKind.GLOBAL_AVGPOOL: _vjp_global_avgpool,
    OpKind.FLATTEN: _vjp_reshape,
    OpKind.RESHAPE: _vjp_reshape,
    OpKind.ADD: _vjp_add,
    OpKind.CONCAT: _vjp_concat,
    OpKind.BATCHNORM: lambda pt, v: [_jvp_batchnorm(pt, [v])],
    OpKind.NORMALIZE: lambda pt, v: [_jvp_normalize(pt, [v])],
    OpKind.SOFTMAX: _vjp_softmax,
    OpKind.LOG_SOFTMAX: _vjp_log_softmax,
    OpKind.ACTIVATION: lambda pt, v: [_jvp_activation(pt, [v])],
}


def jvp_rule(node: OpNode, pass_name: str = "jacobian (forward mode)") -> JvpRule:
    rule = JVP_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the {pass_name} pass has no rule for op '{node.kind.value}'",
                            node.pos)
    return rule


def vjp_rule(node: OpNode, pass_name: str = "jacobian (reverse mode)") -> VjpRule:
    rule = VJP_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the {pass_name} pass has no rule for op '{node.kind.value}'",
                            node.pos)
    return rule
