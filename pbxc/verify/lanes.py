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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np
import sympy

from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import kernel_attrs
from pbxc.ops import ADAPTIVE_AVGPOOL, AVGPOOL, CONV_STANDARD, CONV_TRANSPOSED, MAXPOOL, OpKind
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
    round2 = _round2(node, xs, p, kit, attrs)
    if round2 is not None:
        return round2
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
    if kind is OpKind.CONCAT:   # a constant operand: its value in lane 0, zero tangents
        parts = []
        for slot in node.operand_slots():
            if isinstance(slot, int):
                parts.append(xs[slot])
                continue
            block = np.empty((x.shape[0], *p[slot].shape), dtype=x.dtype)
            block[...] = x.dtype.type(0) if x.dtype != object else 0
            block[0] = p[slot]
            parts.append(block)
        return np.concatenate(parts, axis=attrs["axis"] + 1)
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
    if kind is OpKind.LAYERNORM:   # issue 12 (norm): the quotient rule, written independently
        return _layernorm_lanes(x, p, kit.const(np.float64(attrs["eps"])), attrs["last"], kit)
    if kind is OpKind.ACTIVATION:
        z = x[0]
        slope = kit.derivative(node, z)
        if node.name in kit.slope_override:
            mask, override = kit.slope_override[node.name]
            slope = np.where(mask, override, slope)
        return np.concatenate([kit.activation(node, z)[None], slope[None] * x[1:]])
    raise UnsupportedOp(f"the verifier's reference evaluator has no rule for op "
                        f"'{kind.value}'", node.pos)


def _layernorm_lanes(x: Array, p: Mapping[str, Array], eps: Any, last: int, kit: Kit) -> Array:
    """y = c / sigma * w + b, c = v - mean(v), sigma = sqrt(mean(c^2) + eps) on the value lane;
    dy = (dc / sigma - c dsigma / sigma^2) w with dsigma = mean(c dc) / sigma on the others."""
    axes = tuple(range(x.ndim - last, x.ndim))
    count = int(np.prod(x.shape[x.ndim - last:]))
    v, t = x[0], x[1:]
    c = v - v.sum(axis=tuple(a - 1 for a in axes), keepdims=True) / count
    sigma = kit.sqrt((c * c).sum(axis=tuple(a - 1 for a in axes), keepdims=True) / count + eps)
    dc = t - t.sum(axis=axes, keepdims=True) / count
    dsigma = (c[None] * dc).sum(axis=axes, keepdims=True) / count / sigma[None]
    y = c / sigma * p["weight"]
    if "bias" in p:
        y = y + p["bias"]
    dy = (dc / sigma[None] - c[None] * dsigma / (sigma * sigma)[None]) * p["weight"]
    return np.concatenate([y[None], dy])


def _index(whole: int, rest: list[Any]) -> tuple[Any, ...]:
    """``whole`` full slices, then ``rest``: an index for the trailing axes."""
    parts: list[Any] = [slice(None)] * whole
    parts.extend(rest)
    return tuple(parts)


def _zero(x: Array) -> Any:
    return x.dtype.type(0) if x.dtype != object else 0


def _ceil_extra(x: Array, node: OpNode, attrs: Mapping[str, Any], fill: Any) -> Array:
    """x padded on the right of each spatial axis by what ceil_mode's last window needs."""
    out = (node.shape or ())[1:]
    kernel, padding = tuple(node.attr("kernel")), tuple(node.attr("padding"))
    stride = tuple(node.attr("stride") or kernel)
    dilation = tuple(node.attr("dilation") or (1,) * len(kernel))
    extra = [max((o - 1) * s + d * (k - 1) + 1 - n - 2 * p, 0)
             for o, s, d, k, n, p in zip(out, stride, dilation, kernel, x.shape[2:], padding)]
    if not any(extra):
        return x
    grown = np.empty((*x.shape[:2], *(n + e for n, e in zip(x.shape[2:], extra))), dtype=x.dtype)
    grown[...] = fill
    grown[_index(2, [slice(0, n) for n in x.shape[2:]])] = x
    return grown


def _pool_lanes(node: OpNode, x: Array, kit: Kit) -> Array:
    """Max or average pooling of any rank from its windows, PyTorch's divisors counted
    element by element (the runtime counts them axis by axis)."""
    kernel, padding = tuple(node.attr("kernel")), tuple(node.attr("padding"))
    stride = tuple(node.attr("stride") or kernel)
    out = tuple((node.shape or ())[1:])
    if node.kind in MAXPOOL:
        dilation = tuple(node.attr("dilation") or (1,) * len(kernel))
        grown = _ceil_extra(x, node, {}, kit.neg_inf)
        win, _ = _windows(grown, kernel, stride, padding, dilation, kit.neg_inf)
        win = win[_index(3, [slice(0, o) for o in out])]
        values = win[0]
        first = np.argmax(values == _max_along(values), axis=1)
        idx = np.broadcast_to(first[None, :, None], (x.shape[0], first.shape[0], 1,
                                                     *first.shape[1:]))
        return np.take_along_axis(win, idx, axis=2)[:, :, 0]
    grown = _ceil_extra(x, node, {}, _zero(x))
    win, _ = _windows(grown, kernel, stride, padding, (1,) * len(kernel), _zero(x))
    total = win[_index(3, [slice(0, o) for o in out])].sum(axis=2)
    counts = np.ones(out, dtype=np.int64)
    for index in np.ndindex(*out):
        count = 1
        for i, n, k, s, p in zip(index, x.shape[2:], kernel, stride, padding):
            start = i * s - p
            lo, hi = (-p, n + p) if node.attr("count_include_pad") else (0, n)
            count *= min(start + k, hi) - max(start, lo)
        counts[index] = count
    return total / counts


def _adaptive_lanes(node: OpNode, x: Array) -> Array:
    """Each output the mean of its bin [floor(i n / m), ceil((i + 1) n / m)) per axis."""
    out = tuple((node.shape or ())[1:])
    y = np.empty((*x.shape[:2], *out), dtype=x.dtype)
    for index in np.ndindex(*out):
        box = tuple(slice(i * n // m, -(-(i + 1) * n // m))
                    for i, n, m in zip(index, x.shape[2:], out))
        part = x[_index(2, list(box))]
        size = int(np.prod(part.shape[2:]))
        y[_index(2, list(index))] = part.reshape(*x.shape[:2], -1).sum(axis=2) / size
    return y


def _upsample_lanes(node: OpNode, x: Array, attrs: Mapping[str, Any]) -> Array:
    """Resize axis by axis, each output from its source position (torch's interpolate)."""
    out, scale = attrs["out"], attrs["scale"]
    for a, m in enumerate(out):
        axis, n = 2 + a, x.shape[2 + a]
        s = None if scale is None else scale[a]
        pieces = []
        for j in range(m):
            if attrs["mode"] == "nearest":
                if m == n:
                    src = j
                elif m == 2 * n:
                    src = j // 2
                else:
                    step = np.float32(1) / np.float32(s) if s else np.float32(n) / np.float32(m)
                    src = min(int(np.floor(np.float32(j) * step)), n - 1)
                pieces.append(np.take(x, [src], axis=axis))
                continue
            if attrs["align_corners"]:
                pos = j * (n - 1) / (m - 1) if m > 1 else 0.0
            else:
                pos = max(((1.0 / s) if s else n / m) * (j + 0.5) - 0.5, 0.0)
            i0 = min(int(np.floor(pos)), n - 1)
            lam = min(max(pos - i0, 0.0), 1.0)
            i1 = i0 + 1 if i0 < n - 1 else i0
            w0, w1 = (1.0 - lam, lam)
            c0, c1 = (float(w0), float(w1))
            pieces.append(np.take(x, [i0], axis=axis) * c0 + np.take(x, [i1], axis=axis) * c1)
        x = np.concatenate(pieces, axis=axis)
    return x


def _lift(a: Array, rank: int, lead: int = 1) -> Array:
    per = a.shape[lead:]
    return a.reshape(*a.shape[:lead], *(1,) * (rank - len(per)), *per)


# ---- issue 12 (helper tensor): tensor ops on lanes, from their definitions (plain indexing,
# the product rule written out; attributes read from the node, not from the kernels' lowering)
def _tensor_lanes(node: OpNode, xs: list[Array], kit: Kit) -> Array | None:
    kind, x = node.kind, xs[0]
    if kind is OpKind.MATMUL:
        rank = len(node.shape or ())
        a, b = (_lift(v, rank) for v in xs)
        shape = (x.shape[0], *(node.shape or ()))
        value = np.broadcast_to(np.matmul(a[0], b[0])[None], (1, *shape[1:]))
        tangents = np.broadcast_to(np.matmul(a[1:], b[0]) + np.matmul(a[0], b[1:]),
                                   (shape[0] - 1, *shape[1:]))
        return np.concatenate([value, tangents]).copy()
    if kind is OpKind.TRANSPOSE:
        return np.ascontiguousarray(np.transpose(x, (0, *(1 + int(i) for i in node.attr("perm")))))
    if kind in (OpKind.SLICE, OpKind.SELECT):
        rank = x.ndim - 1
        axis = int(node.attr("axis")) % rank
        key: Any = int(node.attr("index")) if kind is OpKind.SELECT else slice(
            node.attr("start"), node.attr("stop"), node.attr("step"))
        return np.ascontiguousarray(x[(slice(None),) * (1 + axis) + (key,)])
    if kind in (OpKind.MEAN, OpKind.SUM):
        rank = x.ndim - 1
        axes = node.attr("axes")
        picked = tuple(range(rank)) if axes is None else tuple(int(a) % rank for a in axes)
        total = x.sum(axis=tuple(1 + a for a in picked), keepdims=bool(node.attr("keepdims")))
        if kind is OpKind.MEAN:
            total = total / kit.const(np.float64(math.prod(x.shape[1 + a] for a in picked)))
        return np.asarray(total).reshape(x.shape[0], *(node.shape or ()))
    return None


def _round2(node: OpNode, xs: list[Array], p: Mapping[str, Array], kit: Kit,
            attrs: Mapping[str, Any]) -> Array | None:
    """The round-2 ops (issue 11) on lanes, from their definitions."""
    kind, x = node.kind, xs[0]
    if kind in MAXPOOL | AVGPOOL and not (kind in (OpKind.MAXPOOL2D, OpKind.AVGPOOL2D)
                                          and not node.attr("ceil_mode")
                                          and tuple(node.attr("dilation") or (1, 1)) == (1, 1)):
        return _pool_lanes(node, x, kit)
    if kind in ADAPTIVE_AVGPOOL:
        return _adaptive_lanes(node, x)
    if kind is OpKind.UPSAMPLE:
        return _upsample_lanes(node, x, attrs)
    if kind in (OpKind.SQUEEZE, OpKind.UNSQUEEZE):
        return x.reshape(x.shape[0], *(node.shape or ()))
    if kind is OpKind.PAD:
        pairs = node.attr("pad_pairs")
        y = np.empty((x.shape[0], *(node.shape or ())), dtype=x.dtype)
        y[...] = _zero(x)
        y[0] = kit.const(np.float64(attrs["value"]))
        y[_index(1, [slice(lo, lo + n) for (lo, _), n in zip(pairs, x.shape[1:])])] = x
        return y
    if kind is OpKind.PRELU:
        z = x[0]
        a = p["weight"]
        a = a.reshape(()) if a.size == 1 or z.ndim < 1 else a.reshape(-1, *(1,) * (z.ndim - 1))
        slope = np.where(z > 0, kit.const(np.float64(1)), np.broadcast_to(a, z.shape))
        return np.concatenate([(slope * z)[None], slope[None] * x[1:]])
    tensor = _tensor_lanes(node, xs, kit)   # issue 12 (helper tensor)
    if tensor is not None:
        return tensor
    if kind not in (OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV):
        return None
    rank = len(node.shape or ())
    if len(xs) == 1:
        c = kit.const(np.float64(attrs["value"])) if "constant" not in p else _lift(
            p["constant"][None], rank)
        lifted = _lift(x, rank)
        shape = (x.shape[0], *(node.shape or ()))
        if kind is OpKind.MUL:
            return np.broadcast_to(lifted * c, shape).copy()
        if kind is OpKind.DIV:
            return np.broadcast_to(lifted / c, shape).copy()
        y = np.broadcast_to(lifted, shape).copy()
        y[0] = y[0] + (c[0] if np.ndim(c) else c) * (1 if kind is OpKind.ADD else -1)
        return y
    factors = [_lift(v, rank) for v in xs]
    shape = (x.shape[0], *(node.shape or ()))
    if kind is OpKind.MUL:   # value a b; tangents by the product rule
        a, b = factors
        value = (a[0] * b[0])[None]
        return np.broadcast_to(np.concatenate([np.broadcast_to(value, (1, *shape[1:])),
                                               np.broadcast_to(a[1:] * b[0] + a[0] * b[1:],
                                                               (shape[0] - 1, *shape[1:]))]),
                               shape).copy()
    total = np.broadcast_to(factors[0], shape)
    for v in factors[1:]:
        total = total + v if kind is OpKind.ADD else total - v
    return np.ascontiguousarray(total)


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
