"""An independent forward-mode evaluator: one sample's value and its tangents, op by op.

The value and the n tangents of one sample travel together as "lanes" (an array of shape
``(1 + n, *shape)``, lane 0 the value): an affine op applies its linear part to every lane
and its offset to lane 0 only; an activation maps lane 0 through f and scales the tangents by
f'. Written with plain array arithmetic (no BLAS-only kernels), it runs on float64 arrays and
on object arrays of mpmath numbers alike, which gives

* the high-precision reference Jacobian of ``jacobian_mp`` (small models only), and
* one-sided Jacobians at kinks (``kinks``): the derivative at chosen units replaced by the
  left or right one-sided slope.

It shares nothing with the runtime's passes but the weights and the activation expressions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np
import sympy

from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import kernel_attrs
from pbxc.ops import CONV_STANDARD, CONV_TRANSPOSED, OpKind
from pbxc.symbolic.activations import Z, activation_expression
from pbxc.symbolic.mpeval import mp_function

Array = np.ndarray

#: jacobian_mp refuses models with more weight values than this (mpmath is slow)
MP_PARAM_LIMIT = 2000


@dataclass
class Kit:
    """The number system: conversion of constants, elementwise functions, activations."""

    name: str
    const: Callable[[Array], Array]
    exp: Callable[[Array], Array]
    sqrt: Callable[[Array], Array]
    neg_inf: Any
    activation: Callable[[OpNode, Array], Array]
    derivative: Callable[[OpNode, Array], Array]
    # node -> (mask, slope): replace f' where mask holds (one-sided Jacobians)
    slope_override: dict[str, tuple[Array, Array]] = field(default_factory=dict)


def float_kit(model: Any) -> Kit:
    table = model.activations
    return Kit("float64", lambda a: np.asarray(a, dtype=np.float64), np.exp, np.sqrt, -np.inf,
               lambda n, z: table(n.name, z), lambda n, z: table.derivative(n.name, z))


def mp_kit(model: Any, dps: int = 40) -> Kit:
    """mpmath numbers at ``dps`` digits (the caller sets ``mpmath.mp.dps``)."""
    table = model.activations
    defs = model.graph.user_activations
    cache: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {}

    def fns(node: OpNode) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        if node.name not in cache:
            expr = activation_expression(table.keys[node.name], defs)
            cache[node.name] = (mp_function(expr), mp_function(sympy.diff(expr, Z)))
        return cache[node.name]

    def vec(fn: Callable[[Any], Any]) -> Callable[[Array], Array]:
        return lambda a: np.vectorize(fn, otypes=[object])(a) if a.size else a

    def const(a: Array) -> Array:
        arr = np.asarray(a, dtype=np.float64)
        return np.vectorize(mpmath.mpf, otypes=[object])(arr) if arr.size else arr.astype(object)

    return Kit(f"mpmath-{dps}", const, vec(mpmath.exp), vec(mpmath.sqrt), mpmath.mpf("-inf"),
               lambda n, z: vec(fns(n)[0])(z), lambda n, z: vec(fns(n)[1])(z))


def parameter_count(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights.values()))


# ---------------------------------------------------------------- ops on lanes


def _windows(x: Array, kernel: tuple[int, ...], stride: tuple[int, ...],
             padding: tuple[int, ...], dilation: tuple[int, ...], fill: Any
             ) -> tuple[Array, tuple[int, ...]]:
    """(L, C, *spatial) -> (L, C, prod(kernel), *out_spatial) windows, padded with ``fill``;
    ``padding`` per axis is an int (both sides) or (begin, end)."""
    lanes, channels, *spatial = x.shape
    sides = [(p, p) if isinstance(p, (int, np.integer)) else tuple(p) for p in padding]
    padded_shape = (lanes, channels, *(s + b + e for s, (b, e) in zip(spatial, sides)))
    padded = np.empty(padded_shape, dtype=x.dtype)
    padded[...] = fill
    inner = tuple(slice(b, b + s) for (b, _), s in zip(sides, spatial))
    where = (slice(None), slice(None), *inner)
    padded[where] = x
    out = tuple((s + b + e - d * (k - 1) - 1) // st + 1
                for s, (b, e), d, k, st in zip(spatial, sides, dilation, kernel, stride))
    pieces = []
    for offset in np.ndindex(*kernel):
        index = tuple(slice(o * d, o * d + (n - 1) * st + 1, st)
                      for o, d, n, st in zip(offset, dilation, out, stride))
        window = (slice(None), slice(None), *index)
        pieces.append(padded[window])
    return np.stack(pieces, axis=2), out


def _conv(x: Array, w: Array, attrs: Mapping[str, Any], dims: int) -> Array:
    stride, padding, dilation = (tuple(attrs[k]) for k in ("stride", "padding", "dilation"))
    groups = int(attrs["groups"])
    zero = x.dtype.type(0) if x.dtype != object else 0
    win, out = _windows(x, tuple(w.shape[2:]), stride, padding, dilation, zero)
    lanes, channels = x.shape[:2]
    per_in, per_out = channels // groups, w.shape[0] // groups
    results = []
    for g in range(groups):
        cols = win[:, g * per_in:(g + 1) * per_in].reshape(lanes, per_in * win.shape[2], -1)
        wg = w[g * per_out:(g + 1) * per_out].reshape(per_out, -1)
        results.append(np.matmul(wg, cols))
    return np.concatenate(results, axis=1).reshape(lanes, w.shape[0], *out)


def _conv_transpose(x: Array, w: Array, attrs: Mapping[str, Any], out: tuple[int, ...]
                    ) -> Array:
    """Transposed convolution by its definition, independent of the kernels' col2im: input
    position i of channel c adds x[c, i] w[c, o, k] to output position i*stride + k*dilation
    - pad_begin (positions outside the output are dropped)."""
    stride, dilation = tuple(attrs["stride"]), tuple(attrs["dilation"])
    begins = [p[0] for p in attrs["padding"]]
    groups = int(attrs["groups"])
    lanes, channels, *spatial = x.shape
    per_in, per_out = channels // groups, w.shape[1]
    kernel = w.shape[2:]
    full = tuple((n - 1) * st + d * (k - 1) + 1 + b + o
                 for n, st, d, k, b, o in zip(spatial, stride, dilation, kernel, begins, out))
    zero = x.dtype.type(0) if x.dtype != object else 0
    acc = np.empty((lanes, groups * per_out, *full), dtype=x.dtype)
    acc[...] = zero
    for g in range(groups):
        xg = np.moveaxis(x[:, g * per_in:(g + 1) * per_in], 1, -1)       # (L, *in, Cg)
        for offset in np.ndindex(*kernel):
            which = (slice(g * per_in, (g + 1) * per_in), slice(None), *offset)
            wk = w[which]   # (Cg, Og)
            contrib = np.moveaxis(np.matmul(xg, wk), -1, 1)             # (L, Og, *in)
            index = tuple(slice(k * d, k * d + (n - 1) * st + 1, st)
                          for k, d, n, st in zip(offset, dilation, spatial, stride))
            where = (slice(None), slice(g * per_out, (g + 1) * per_out), *index)
            acc[where] = acc[where] + contrib
    crop = tuple(slice(b, b + n) for b, n in zip(begins, out))
    inner = (slice(None), slice(None), *crop)
    return acc[inner]


def _channel(v: Array, rank: int) -> Array:
    return v.reshape((1, -1) + (1,) * (rank - 1))


def _sample_param(v: Array, shape: tuple[int, ...]) -> Array:
    if v.shape == shape:
        return v[None]
    if v.ndim == 0:
        return v
    return _channel(v, len(shape))


def _offset(y: Array, b: Array) -> Array:
    y = y.copy()
    y[0] = y[0] + b
    return y


def apply(node: OpNode, xs: list[Array], params: Mapping[str, Array], kit: Kit) -> Array:
    """The node on lanes: ``xs[i]`` is ``(L, *input_shape)``; returns ``(L, *shape)``."""
    kind = node.kind
    attrs = kernel_attrs(node)
    x = xs[0]
    p = {k: kit.const(v) for k, v in params.items()}
    if kind is OpKind.LINEAR:
        y = np.matmul(x, p["weight"].T)
        return _offset(y, p["bias"]) if "bias" in p else y
    if kind in CONV_STANDARD:
        y = _conv(x, p["weight"], attrs, x.ndim - 2)
        return _offset(y, _channel(p["bias"], y.ndim - 1)[0]) if "bias" in p else y
    if kind in CONV_TRANSPOSED:
        y = _conv_transpose(x, p["weight"], attrs, tuple((node.shape or ())[1:]))
        return _offset(y, _channel(p["bias"], y.ndim - 1)[0]) if "bias" in p else y
    if kind is OpKind.MAXPOOL2D:
        win, _ = _windows(x, attrs["kernel"], attrs["stride"], attrs["padding"], (1, 1),
                            kit.neg_inf)
        values = win[0]                                   # (C, K, *out)
        first = np.argmax(values == _max_along(values), axis=1)  # the first maximum
        idx = np.broadcast_to(first[None, :, None], (x.shape[0], *first.shape[:1], 1,
                                                     *first.shape[1:]))
        return np.take_along_axis(win, idx, axis=2)[:, :, 0]
    if kind is OpKind.AVGPOOL2D:
        zero = x.dtype.type(0) if x.dtype != object else 0
        win, _ = _windows(x, attrs["kernel"], attrs["stride"], attrs["padding"], (1, 1), zero)
        total = win.sum(axis=2)
        if attrs["count_include_pad"]:
            return total / int(np.prod(attrs["kernel"]))
        ones = np.ones((1, 1, *x.shape[2:]))
        counts, _ = _windows(ones, attrs["kernel"], attrs["stride"], attrs["padding"], (1, 1),
                             0.0)
        return total / counts.sum(axis=2)[0, 0].astype(np.int64)
    if kind is OpKind.GLOBAL_AVGPOOL:
        axes = tuple(range(2, x.ndim))
        return x.sum(axis=axes) / int(np.prod(x.shape[2:]))
    if kind in (OpKind.FLATTEN, OpKind.RESHAPE):
        return x.reshape(x.shape[0], *(node.shape or ()))
    if kind is OpKind.ADD:
        total = xs[0]
        for other in xs[1:]:
            total = total + other
        return total
    if kind is OpKind.CONCAT:
        return np.concatenate(xs, axis=attrs["axis"] + 1)
    if kind is OpKind.BATCHNORM:
        scale = p["weight"] / kit.sqrt(p["running_var"] + kit.const(np.float64(attrs["eps"])))
        shift = p["bias"] - p["running_mean"] * scale
        rank = x.ndim - 1
        return _offset(x * _channel(scale, rank), _channel(shift, rank)[0])
    if kind is OpKind.NORMALIZE:
        shape = tuple(x.shape[1:])
        std, mean = _sample_param(p["std"], shape), _sample_param(p["mean"], shape)
        y = x / std
        return _offset(y, (-mean / std)[0] if np.ndim(mean) else -mean / std)
    if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        axis = attrs["axis"]
        v = x[0]
        shifted = v - _max_along(v, axis)
        e = kit.exp(shifted)
        s = e / e.sum(axis=axis, keepdims=True)
        t = x[1:]
        mean_t = (s[None] * t).sum(axis=axis + 1, keepdims=True)
        if kind is OpKind.SOFTMAX:
            return np.concatenate([s[None], s[None] * (t - mean_t)])
        logs = shifted - _log(kit, e.sum(axis=axis, keepdims=True))
        return np.concatenate([logs[None], t - mean_t])
    if kind is OpKind.ACTIVATION:
        z = x[0]
        slope = kit.derivative(node, z)
        if node.name in kit.slope_override:
            mask, override = kit.slope_override[node.name]
            slope = np.where(mask, override, slope)
        return np.concatenate([kit.activation(node, z)[None], slope[None] * x[1:]])
    raise UnsupportedOp(f"the verifier's reference evaluator has no rule for op "
                        f"'{kind.value}'", node.pos)


def _max_along(v: Array, axis: int = 1) -> Array:
    if v.dtype == object:
        return np.maximum.reduce(v, axis=axis, keepdims=True)
    return v.max(axis=axis, keepdims=True)


def _log(kit: Kit, v: Array) -> Array:
    if kit.name.startswith("mpmath"):
        return np.vectorize(mpmath.log, otypes=[object])(v)
    return np.log(v)


def forward_lanes(model: Any, sample: Mapping[str, Array], wrt: str, kit: Kit,
                  stop: str | None = None) -> dict[str, Array]:
    """Every node's lanes for one sample (inputs of per-sample shape); tangents d/d ``wrt``."""
    values: dict[str, Array] = {}
    for node in model.nodes:
        if node.kind is OpKind.INPUT:
            x = kit.const(np.asarray(sample[node.name], dtype=np.float64))
            n = int(np.size(sample[wrt]))
            tangents = (np.eye(n).reshape(n, *x.shape) if node.name == wrt
                        else np.zeros((n, *x.shape)))
            lanes = np.concatenate([x[None], kit.const(tangents)])
            values[node.name] = lanes
            continue
        values[node.name] = apply(node, [values[i] for i in node.inputs],
                                  model.params[node.name], kit)
        if stop is not None and node.name == stop:
            break
    return values


def reference_jacobian(model: Any, sample: Mapping[str, Array], output: str, wrt: str,
                       kit: Kit) -> tuple[Array, dict[str, Array]]:
    """d output / d wrt for one sample as float64 ``(*out_shape, *in_shape)``, and the lanes."""
    lanes = forward_lanes(model, sample, wrt, kit, stop=output)
    t = lanes[output][1:]                                   # (n_in, *out)
    in_shape = tuple(np.shape(sample[wrt]))
    jac = np.moveaxis(t.reshape(t.shape[0], -1), 0, -1)     # (n_out, n_in)
    jac = np.asarray(jac.astype(np.float64) if jac.dtype != object else
                     np.vectorize(float, otypes=[np.float64])(jac), dtype=np.float64)
    out_shape = tuple(lanes[output].shape[1:])
    return jac.reshape(*out_shape, *in_shape), lanes
