"""DFD (difference from default; the preprint that became DeepLIFT): multipliers and contributions.

Seed 004: delta_n = A_n - A_n^0 against a default input; summation-to-delta (eq. 1),
sum_i C_{x_i t} = delta_t; multipliers m_xt = C_xt / delta_x with the chain rule
m_xt = sum_y m_xy m_yt (eq. 4). Rules, keyed by op kind:

* affine ops (linear, conv, pooling by average, batchnorm, normalize, add, concat, reshape):
  m = w (eq. 7), i.e. the op's transpose applied to the incoming multipliers;
* elementwise nonlinearities: the rescale rule m = delta_y / delta_x (eq. 16), whose limit at
  delta_x -> 0 is f'(x) (eq. 17), from the activation's exact, stable multiplier routine;
* max pooling: the window maximum written as pairwise maxima, max(u, v) = u + relu(v - u), each
  relu by the rescale rule. This is exact for any defaults, including defaults that differ
  across the window (the case eq. 13 sets aside), and equals eq. 13's indicator when they agree;
* softmax and log-softmax: the mean-value Jacobian along the segment from default to input,
  J_bar = int_0^1 J(x0 + t (x - x0)) dt, so that J_bar delta_x = delta_y exactly. For an
  elementwise f this average is exactly the rescale multiplier, so the rule generalises eq. 16.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import InputError, UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.ops import OpKind
from pbxc.runtime.jacobian import Linearization, linearize
from pbxc.runtime.linearize import Point, vjp_rule
from pbxc.runtime.numpy_forward import pool_geometry, sample_axis

Array = np.ndarray

AFFINE_KINDS = frozenset({
    OpKind.LINEAR, OpKind.CONV1D, OpKind.CONV2D, OpKind.AVGPOOL2D, OpKind.GLOBAL_AVGPOOL,
    OpKind.FLATTEN, OpKind.RESHAPE, OpKind.ADD, OpKind.CONCAT, OpKind.BATCHNORM,
    OpKind.NORMALIZE,
})


@dataclass
class DfdContext:
    model: object
    at: Linearization        # the forward pass at the input
    default: Linearization   # the forward pass at the default (baseline)

    def point(self, node: OpNode) -> Point:
        return self.at.point(self.model, node)


DfdRule = Callable[[DfdContext, OpNode, Array], list[Array]]


def _affine(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    """Eq. 7: an affine op's multipliers are its weights; the bias cancels in delta."""
    return vjp_rule(node, "dfd")(ctx.point(node), m)


def _rescale(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    """Eq. 16-17: m = (f(x) - f(x0)) / (x - x0), the exact limit f'(x0) at x = x0."""
    table = ctx.model.activations  # type: ignore[attr-defined]
    z = ctx.at.values[node.inputs[0]]
    z0 = ctx.default.values[node.inputs[0]]
    return [m * table.multiplier(node.name, z0, z)[:, None]]


def relu_multiplier(d0: Array, d: Array) -> Array:
    """(relu(d) - relu(d0)) / (d - d0) without cancellation; relu'(0) = 0 where d == d0."""
    same = d == d0
    safe = np.where(same, 1.0, d - d0)
    secant = (np.maximum(d, 0) - np.maximum(d0, 0)) / safe
    return np.where(same, (d > 0).astype(d.dtype), secant)


def _maxpool(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    """Max pooling as a chain of pairwise maxima, max(u, v) = u + relu(v - u) (see module)."""
    kernel, stride, padding = pool_geometry(node)
    x = ctx.at.values[node.inputs[0]]
    x0 = ctx.default.values[node.inputs[0]]
    win = K.windows2d(x, kernel, stride, padding, pad_value=np.nan)
    win0 = K.windows2d(x0, kernel, stride, padding, pad_value=np.nan)
    flat = win.reshape(*win.shape[:4], -1)
    flat0 = win0.reshape(*win0.shape[:4], -1)
    size = flat.shape[-1]
    # forward: running maxima and each step's relu multiplier; padding never wins
    run, run0 = flat[..., 0].copy(), flat0[..., 0].copy()
    slopes = []
    for i in range(1, size):
        w, w0 = flat[..., i], flat0[..., i]
        pad = np.isnan(w)
        first_pad = np.isnan(run)
        d, d0 = w - run, w0 - run0
        s = relu_multiplier(np.nan_to_num(d0), np.nan_to_num(d))
        s = np.where(pad, 0.0, np.where(first_pad, 1.0, s))
        slopes.append(s)
        run = np.where(pad, run, np.where(first_pad, w, run + np.maximum(d, 0)))
        run0 = np.where(pad, run0, np.where(first_pad, w0, run0 + np.maximum(d0, 0)))
    # backward: multiplier of each window element, (B, K, C, OH, OW, size)
    g = m
    per_elem: list[Array] = []
    for i in range(size - 1, 0, -1):
        s = slopes[i - 1][:, None]
        per_elem.append(g * s)
        g = g * (1 - s)
    per_elem.append(g)
    stacked = np.stack(per_elem[::-1], axis=-1)
    kw = kernel[1]
    bsz, k = m.shape[:2]
    lead = stacked.reshape(bsz * k, *stacked.shape[2:])
    back = K._scatter_windows(lambda p, q: lead[..., p * kw + q], x.shape[2:], kernel, stride,
                              padding, m.dtype, lead.shape[:2])
    return [back.reshape(bsz, k, *x.shape[1:])]


def _gauss_legendre(n: int) -> tuple[Array, Array]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (nodes + 1) / 2, weights / 2


def _mean_value_vjp(ctx: DfdContext, node: OpNode, m: Array,
                    jvp: Callable[[Array, Array, int], Array],
                    vjp: Callable[[Array, Array, int], Array]) -> list[Array]:
    """v^T J_bar by Gauss-Legendre quadrature, refined until J_bar delta_x == delta_y."""
    x = ctx.at.values[node.inputs[0]]
    x0 = ctx.default.values[node.inputs[0]]
    dy = ctx.at.values[node.name] - ctx.default.values[node.name]
    axis = 1 + sample_axis(node, x.ndim - 1)
    dx = x - x0
    # J is analytic along the segment; its nearest complex singularity shrinks with the spread
    n = 8 + int(4 * float(np.max(np.abs(dx), initial=0.0)))
    tol = 64 * np.finfo(x.dtype).eps * max(1.0, float(np.max(np.abs(dy), initial=0.0)))
    result = np.zeros_like(m)
    for _ in range(6):
        ts, ws = _gauss_legendre(n)
        applied = np.zeros_like(dx)
        result = np.zeros_like(m)
        for t, w in zip(ts, ws):
            s = K.softmax(x0 + t * dx, axis)
            applied += w * jvp(s, dx, axis)
            result += w * vjp(s[:, None], m, axis + 1)
        if np.max(np.abs(applied - dy), initial=0.0) <= tol:
            break
        n *= 2
    return [result]


def _softmax(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    # softmax's Jacobian is symmetric: its VJP is its JVP
    return _mean_value_vjp(ctx, node, m, K.softmax_jvp, K.softmax_jvp)


def _log_softmax(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    return _mean_value_vjp(ctx, node, m, K.log_softmax_jvp, K.log_softmax_vjp)


DFD_RULES: dict[OpKind, DfdRule] = {
    **{kind: _affine for kind in AFFINE_KINDS},
    OpKind.ACTIVATION: _rescale,
    OpKind.MAXPOOL2D: _maxpool,
    OpKind.SOFTMAX: _softmax,
    OpKind.LOG_SOFTMAX: _log_softmax,
}


def dfd_rule(node: OpNode) -> DfdRule:
    rule = DFD_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the dfd pass has no rule for op '{node.kind.value}'", node.pos)
    return rule


def resolve_baseline(model: object, inputs: Mapping[str, Array], baseline: object,
                     data: Array | None = None) -> dict[str, Array]:
    """Defaults per input, broadcast to the batch: zeros, a constant, the mean of ``data``,
    or an array (one shared sample or one per sample); a dict gives one per input."""
    out: dict[str, Array] = {}
    for name, x in inputs.items():
        spec = baseline[name] if isinstance(baseline, Mapping) else baseline
        if spec is None or (isinstance(spec, str) and spec == "zeros"):
            b = np.zeros_like(x)
        elif isinstance(spec, str) and spec == "mean":
            if data is None:
                raise InputError("baseline 'mean' needs data to average (the training inputs)")
            arr = np.asarray(data, dtype=x.dtype)
            if arr.shape[1:] != x.shape[1:]:
                raise InputError(f"data for the mean baseline has shape {list(arr.shape)}; "
                                 f"expected [N, {', '.join(map(str, x.shape[1:]))}]")
            b = np.broadcast_to(arr.mean(axis=0), x.shape)
        elif isinstance(spec, (int, float)):
            b = np.full_like(x, float(spec))
        else:
            arr = np.asarray(spec, dtype=x.dtype)
            if arr.shape == x.shape[1:]:
                arr = arr[None]
            if arr.shape[1:] != x.shape[1:] or arr.shape[0] not in (1, x.shape[0]):
                raise InputError(f"baseline for input '{name}' has shape {list(arr.shape)}; "
                                 f"expected [{', '.join(map(str, x.shape[1:]))}] (shared) or "
                                 f"[{x.shape[0]}, {', '.join(map(str, x.shape[1:]))}]")
            b = np.broadcast_to(arr, x.shape)
        b = np.ascontiguousarray(b, dtype=x.dtype)
        if not np.isfinite(b).all():
            raise InputError(f"baseline for input '{name}' has non-finite values")
        out[name] = b
    return out


@dataclass
class DfdResult:
    """Contributions C = m * (x - x0) to the target output, shaped like each input.

    ``delta`` is f_c(x) - f_c(x0) per sample; ``summation_error`` is
    |sum C - delta| / max(|delta|, tiny), per sample (summation-to-delta, seed 004 eq. 1).
    """

    attributions: dict[str, Array]
    multipliers: dict[str, Array]
    baseline: dict[str, Array]
    outputs: Array
    baseline_outputs: Array
    targets: Array
    delta: Array

    @property
    def total(self) -> Array:
        return sum(c.reshape(c.shape[0], -1).sum(axis=1) for c in self.attributions.values())

    @property
    def summation_error(self) -> Array:
        scale = np.maximum(np.abs(self.delta), np.finfo(self.delta.dtype).tiny)
        return np.abs(self.total - self.delta) / scale


def dfd(model: object, inputs: Mapping[str, Array], default: Mapping[str, Array],
        output: str, seed: Array) -> tuple[dict[str, Array], Linearization, Linearization]:
    """Multipliers of every input for the output combination ``seed`` (B, *out_shape)."""
    at = linearize(model, inputs)
    base = linearize(model, default)
    ctx = DfdContext(model, at, base)
    graph = model.graph  # type: ignore[attr-defined]
    import networkx as nx

    needed = nx.ancestors(graph.digraph, output) | {output}
    mult: dict[str, Array] = {output: seed[:, None]}
    for node in reversed(model.nodes):  # type: ignore[attr-defined]
        if node.name not in needed or node.kind is OpKind.INPUT:
            continue
        m = mult.pop(node.name, None)
        if m is None:
            continue
        for i, g in zip(node.inputs, dfd_rule(node)(ctx, node, m)):
            mult[i] = mult[i] + g if i in mult else g
    result = {}
    for name, x in inputs.items():
        m = mult.get(name)
        result[name] = m[:, 0] if m is not None else np.zeros_like(x)
    return result, at, base
