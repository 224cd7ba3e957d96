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
* softmax and log-softmax: pbxc's rule M = diag(L) - L w^T (I - 1 w^T for log_softmax),
  built from the seed's own rules for exp, log and sums (specs/activations.md); it sums to
  delta exactly and equals the Jacobian at x = x0.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import InputError
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import dfd_by_vjp, kernel_attrs, require_kernel
from pbxc.ops import WEIGHTED, OpKind
from pbxc.runtime.jacobian import Linearization, OpMaps, linearize, release
from pbxc.runtime.released import Released

Array = np.ndarray

@dataclass
class DfdContext:
    model: object
    at: Linearization        # the forward pass at the input
    default: Linearization   # the forward pass at the default (baseline)


def dfd_step(ctx: DfdContext, node: OpNode, m: Array) -> list[Array]:
    """Multipliers of the node's inputs from its own (seed 004, eq. 4: the chain rule)."""
    params = ctx.model.params[node.name]  # type: ignore[attr-defined]
    xs = [ctx.at.values[i] for i in node.inputs]
    y = ctx.at.values[node.name]
    if dfd_by_vjp(node):  # eq. 7: an affine op's multipliers are its weights
        if node.name in getattr(ctx.model, "dense_ops", ()):   # a small conv: one GEMM
            return OpMaps(ctx.model, ctx.at).vjp(node, m)
        vjp = require_kernel(K, node, "vjp", "dfd")
        return vjp(m, xs, y, ctx.at.local.get(node.name), params, **kernel_attrs(node))
    kernel = require_kernel(K, node, "dfd", "dfd")
    local: Array | None
    if node.kind is OpKind.ACTIVATION and node.name in ctx.at.local:
        local = ctx.at.local[node.name]   # the multiplier, computed in the forward pass
    elif node.kind is OpKind.ACTIVATION:
        table = ctx.model.activations  # type: ignore[attr-defined]
        z0 = ctx.default.values[node.inputs[0]]
        z = ctx.at.values[node.inputs[0]]
        local = table.multiplier(node.name, z0, z,   # eq. 16-17, the rescale rule
                                 ctx.default.values[node.name], y)
    else:
        local = ctx.at.local.get(node.name)
    xs0 = [ctx.default.values[i] for i in node.inputs]
    return kernel(m, xs, xs0, y, ctx.default.values[node.name], local, params,
                  **kernel_attrs(node))


def reveal_cancel_step(ctx: DfdContext, act: OpNode, layer: OpNode, m: Array) -> Array:
    """RevealCancel (Shrikumar et al. 2017, DeepLIFT section 3.5.3) for ``act(layer(a))``.

    The layer's change splits into positive and negative parts, dz+ = sum of w_j da_j > 0
    and dz- = the rest; with M(u, v) the activation's exact secant multiplier,
    m+ = (M(z0, z0 + dz+) + M(z0 + dz-, z)) / 2 and m- = (M(z0, z0 + dz-) + M(z0 + dz+, z)) / 2,
    so m+ dz+ + m- dz- = f(z) - f(z0) and summation-to-delta still holds exactly. Each input
    term w_j da_j then takes the multiplier of its sign. Returns the multipliers of ``a``.
    """
    table = ctx.model.activations  # type: ignore[attr-defined]
    attrs = kernel_attrs(layer)
    forward = getattr(K, f"{layer.kind.value}_lrp_forward")
    transpose = getattr(K, f"{layer.kind.value}_lrp_transpose")
    w = ctx.model.params[layer.name]["weight"]  # type: ignore[attr-defined]
    w_pos, w_neg = np.maximum(w, 0), np.minimum(w, 0)
    a, a0 = ctx.at.values[layer.inputs[0]], ctx.default.values[layer.inputs[0]]
    da = a - a0
    da_pos, da_neg = np.maximum(da, 0), np.minimum(da, 0)
    dz_pos = forward([da_pos], w_pos, **attrs) + forward([da_neg], w_neg, **attrs)
    dz_neg = forward([da_neg], w_pos, **attrs) + forward([da_pos], w_neg, **attrs)
    z, z0 = ctx.at.values[layer.name], ctx.default.values[layer.name]
    mult = table.multiplier
    m_pos = (mult(act.name, z0, z0 + dz_pos) + mult(act.name, z0 + dz_neg, z)) / 2
    m_neg = (mult(act.name, z0, z0 + dz_neg) + mult(act.name, z0 + dz_pos, z)) / 2
    bk = m.shape[:2]

    def back(g: Array, weight: Array) -> Array:
        flat = g.reshape(bk[0] * bk[1], *g.shape[2:])
        out = transpose(flat, weight, [np.repeat(a, bk[1], axis=0)], **attrs)[0]
        return out.reshape(*bk, *out.shape[1:])

    g_pos, g_neg = m * m_pos[:, None], m * m_neg[:, None]
    up = (da >= 0)[:, None]
    # a term w_j da_j is positive when w_j and da_j share a sign
    return np.where(up, back(g_pos, w_pos) + back(g_neg, w_neg),
                    back(g_pos, w_neg) + back(g_neg, w_pos))


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


NONLINEAR_RULES = ("rescale", "revealcancel")


def reveal_cancel_pairs(model: object) -> dict[str, OpNode]:
    """Activations whose input is a linear or conv layer that feeds nothing else: the pairs
    RevealCancel treats together (other activations keep the rescale rule)."""
    graph = model.graph  # type: ignore[attr-defined]
    pairs = {}
    for node in model.nodes:  # type: ignore[attr-defined]
        if node.kind is OpKind.ACTIVATION:
            layer = graph.node(node.inputs[0])
            if layer.kind in WEIGHTED and list(graph.digraph.successors(layer.name)) == [
                    node.name]:
                pairs[node.name] = layer
    return pairs


#: the largest default forward pass a model keeps for the next call (bytes of its values)
DEFAULT_CACHE_BYTES = 128 << 20


def _same_rows(a: Mapping[str, Array], b: Mapping[str, Array]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        and np.array_equal(np.ascontiguousarray(a[k]).view(np.uint8),
                           np.ascontiguousarray(b[k]).view(np.uint8)) for k in a)


def _nbytes(lin: Linearization) -> int:
    return sum(v.nbytes for v in (*lin.values.values(), *lin.local.values())
               if isinstance(v, np.ndarray))


def default_point(model: object, rows: Mapping[str, Array],
                  keep: AbstractSet[str] | None) -> Linearization:
    """The forward pass at a single default row (what DFD reads of it: the plan's ``keep``,
    and every activation's input z0, from which f(z0) and the multipliers are computed),
    kept on the model for the next call with the same default bits and plan, up to
    ``DEFAULT_CACHE_BYTES``: the default's forward pass does not depend on the input, and at
    batch 1 it is half of DFD's forward work. Its arrays are read-only."""
    cache: dict[object, tuple[dict[str, Array], Linearization]] = \
        model.default_points  # type: ignore[attr-defined]
    key = None if keep is None else frozenset(keep)
    hit = cache.get(key)
    if hit is not None and _same_rows(hit[0], rows):
        return hit[1]
    wanted = None
    if keep is not None:
        acts = [n for n in model.nodes if n.kind is OpKind.ACTIVATION]  # type: ignore[attr-defined]
        wanted = set(keep) | {n.inputs[0] for n in acts}
    lin = linearize(model, dict(rows), derivatives=False, keep=wanted)
    for v in (*lin.values.values(), *lin.local.values()):
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    if _nbytes(lin) <= DEFAULT_CACHE_BYTES:
        cache[key] = ({k: v.copy() for k, v in rows.items()}, lin)
    return lin


def linearize_both(model: object, inputs: Mapping[str, Array], default: Mapping[str, Array],
                   keep: AbstractSet[str] | None = None) -> tuple[Linearization, Linearization]:
    """The forward passes at the inputs and at the defaults. A default shared by the whole
    batch (zeros, a constant, the mean; any default at batch 1) is one row, evaluated once
    (``default_point``, kept for the next call) and broadcast back to the batch; defaults
    that differ per sample run in one batch with the inputs, so that each weight is read
    once.

    With ``keep`` (the memory plan: the values the caller reads afterwards), the other values
    are released in the forward pass, and each activation's multiplier (seed 004 eq. 16-17)
    is computed there, as its ``local`` at the input point, while z and f(z) still exist.
    """
    batch = len(next(iter(inputs.values())))
    shared = batch == 1 or all(bool((d == d[:1]).all()) for d in default.values())
    table = model.activations  # type: ignore[attr-defined]

    def split(v: Array, start: int, stop: int, spread: bool) -> Array:
        if isinstance(v, Released):
            return v.rows(start, stop, batch if spread else None)  # type: ignore[return-value]
        return np.broadcast_to(v[start:stop], (batch, *v.shape[1:])) if spread else v[start:stop]

    def part(arrays: Mapping[str, Array], start: int, stop: int, spread: bool
             ) -> dict[str, Array]:
        return {k: split(v, start, stop, spread) for k, v in arrays.items()}

    if shared:
        one = default_point(model, {k: np.ascontiguousarray(d[:1], dtype=inputs[k].dtype)
                                    for k, d in default.items()}, keep)
        spread = batch > 1
        base = Linearization(part(one.values, 0, 1, spread), part(one.local, 0, 1, spread))

        def at_multiplier(node: OpNode, z: Array, y: Array) -> Array:
            z0, y0 = one.values[node.inputs[0]], one.values[node.name]
            if isinstance(y0, Released):   # f(z0) again: bit for bit the forward value
                y0 = table(node.name, z0)
            return table.multiplier(node.name, split(z0, 0, 1, spread), z,
                                    split(y0, 0, 1, spread), y)

        at = linearize(model, dict(inputs), derivatives=False, keep=keep,
                       local_of=at_multiplier if keep is not None else None)
        return at, base

    def multiplier(node: OpNode, z: Array, y: Array) -> Array:
        return table.multiplier(node.name, z[batch:], z[:batch], y[batch:], y[:batch])

    joint = linearize(model, {k: np.concatenate([x, default[k].astype(x.dtype)])
                              for k, x in inputs.items()}, derivatives=False, keep=keep,
                      local_of=multiplier if keep is not None else None)
    computed = {n for n in joint.local if n in table.keys} if keep is not None else set()
    at_local = part({k: v for k, v in joint.local.items() if k not in computed}, 0, batch, False)
    at_local.update({k: joint.local[k] for k in computed})   # already (B, ...) at the input
    base_local = {k: v for k, v in joint.local.items() if k not in computed}
    at = Linearization(part(joint.values, 0, batch, False), at_local)
    base = Linearization(part(joint.values, batch, 2 * batch, False),
                         part(base_local, batch, 2 * batch, False))
    return at, base


def dfd(model: object, inputs: Mapping[str, Array], default: Mapping[str, Array],
        output: str, seed: Array, rule: str = "rescale",
        points: tuple[Linearization, Linearization] | None = None
        ) -> tuple[dict[str, Array], Linearization, Linearization]:
    """Multipliers of every input for the output combination ``seed`` (B, *out_shape).

    ``rule``: "rescale" (seed 004, eq. 16-17) or "revealcancel" for the nonlinearities.
    ``points``: the forward passes at the inputs and the defaults, from ``linearize_both``.
    """
    if rule not in NONLINEAR_RULES:
        raise InputError(f"DFD rule must be one of {NONLINEAR_RULES}, got {rule!r}")
    # multipliers need values at both points (and max-pool windows), never f'
    plan = model.pass_plan("dfd", output)  # type: ignore[attr-defined]
    at, base = points or linearize_both(model, inputs, default,
                                        plan.keep if rule == "rescale" else None)
    ctx = DfdContext(model, at, base)
    graph = model.graph  # type: ignore[attr-defined]
    import networkx as nx

    pairs = reveal_cancel_pairs(model) if rule == "revealcancel" else {}
    nodes = model.nodes  # type: ignore[attr-defined]
    # release as the plan says only where the forward pass computed the multipliers (else the
    # activations read z and f(z) at both points here)
    planned = not pairs and all(n.name in at.local for n in nodes
                                if n.kind is OpKind.ACTIVATION)
    schedule = plan.schedule if planned else {}
    keep = frozenset({output, *graph.output_names})
    needed = nx.ancestors(graph.digraph, output) | {output}
    mult: dict[str, Array] = {output: seed[:, None]}
    for node in reversed(model.nodes):  # type: ignore[attr-defined]
        if node.name not in needed or node.kind is OpKind.INPUT:
            continue
        m = mult.pop(node.name, None)
        if m is None:
            continue
        if node.name in pairs:
            layer = pairs[node.name]
            target, g = layer.inputs[0], reveal_cancel_step(ctx, node, layer, m)
            mult[target] = mult[target] + g if target in mult else g
            continue
        for i, g in zip(node.inputs, dfd_step(ctx, node, m)):
            mult[i] = mult[i] + g if i in mult else g
        del m
        release(at, schedule, node.name, keep)
        release(base, schedule, node.name, keep)
    result = {}
    for name, x in inputs.items():
        m = mult.get(name)
        result[name] = m[:, 0] if m is not None else np.zeros_like(x)
    return result, at, base
