"""Second order: exact Hessians, Hessian-vector products and finite-perturbation interactions.

PBX property (e) (seed 000, its closing open question): interactions between features when
several are perturbed at once. Two exact ways to second derivatives, chosen by the plan's cost
model (``pbxc.lower.hessian_plan``, specs/hessian.md):

* the second-order Algorithm 1 (Abe & Asai, arXiv 2502.14001, Algorithm 1 carried to second
  order): with z = W a + b and a = sigma(z), J[l] = sigma'(z) W J[l-1] and
  H[l] = sigma''(z) (W J[l-1]) (x) (W J[l-1]) + sigma'(z) W H[l-1], every intermediate H[l]
  on request;
* forward over reverse: the tangent of the reverse pass along M directions gives H V
  (Hessian-vector products, or the full Hessian with V = I) for large inputs.

One rule table keyed by :class:`OpKind` (``SECOND_ORDER_RULES``). Affine, shape and merge ops
get their rule by construction (``deflinear``: H passes through their linear part; their
second derivative is zero), max pooling too (piecewise linear: the linear map of the window
winners at x). Nonlinear ops have kernels ``<op>_jvp2`` and ``<op>_hvp`` in the second-order
section of ``pbxc.codegen.numpy_kernels``. A kind without a rule is an error naming the pass
("hessian") and the op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import InputError, UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import is_linear_form, kernel_attrs, kernel_base
from pbxc.lower.hessian_plan import HessianPlan, plan_hessian
from pbxc.lower.plan import path_nodes, size
from pbxc.ops import AFFINE, INDEXING, MAXPOOL, REDUCTIONS, SHAPE_ONLY, OpKind
from pbxc.runtime.jacobian import Linearization, OpMaps, identity_tangents, linearize

Array = np.ndarray
ON_CHOICES = ("logits", "probabilities")


# ---------------------------------------------------------------- the rule table


@dataclass(frozen=True)
class SecondOrderRule:
    """How one op kind carries second-order information.

    ``forward(maps, node, hs, ts, curv)``: the node's second-order tangents (B, M*M, *out) from
    its inputs' ``hs`` (None: zero) and tangents ``ts``; None when the result is zero.
    ``reverse(maps, node, v, vd, ts, curv)``: the tangents of the input cotangents (one per
    input, None: zero) from the cotangent ``v`` (B, 1, *out), its tangent ``vd`` and the
    inputs' tangents ``ts``. ``curved``: the op has a nonzero second derivative (it needs
    ``ts`` and, for activations, f''(z)).
    """

    forward: Callable[..., Array | None]
    reverse: Callable[..., list[Array | None]]
    curved: bool
    source: str


SECOND_ORDER_RULES: dict[OpKind, SecondOrderRule] = {}


def _zeros_like_rows(ref: Array, rows: int, shape: tuple[int, ...]) -> Array:
    return np.zeros((ref.shape[0], rows, *shape), dtype=ref.dtype)


def deflinear(kind: OpKind, source: str) -> None:
    """A linear (affine, shape, merge) op: H passes through its linear part, so its rule is
    its JVP applied to the n^2 second-order rows and its VJP applied to the cotangent's
    tangent. Its own second derivative is zero."""

    def forward(maps: OpMaps, node: OpNode, hs: list[Array | None], ts: list[Array],
                curv: Array | None) -> Array | None:
        if all(h is None for h in hs):
            return None
        ref = next(h for h in hs if h is not None)
        full = [h if h is not None else _zeros_like_rows(ref, ref.shape[1], t.shape[2:])
                for h, t in zip(hs, ts)]
        return maps.jvp(node, full)

    def reverse(maps: OpMaps, node: OpNode, v: Array, vd: Array | None, ts: list[Array],
                curv: Array | None) -> list[Array | None]:
        if vd is None:
            return [None] * len(node.inputs)
        return list(maps.vjp(node, vd))

    SECOND_ORDER_RULES[kind] = SecondOrderRule(forward, reverse, False, source)


def _linear_rule(kind: OpKind) -> SecondOrderRule:
    """The linear rule of ``deflinear``, for a kind whose rule is otherwise curved."""
    saved = SECOND_ORDER_RULES.get(kind)
    deflinear(kind, "")
    rule = SECOND_ORDER_RULES.pop(kind)
    if saved is not None:
        SECOND_ORDER_RULES[kind] = saved
    return rule


def defcurved(kind: OpKind, source: str, linear_form: Callable[[OpNode], bool] | None = None
              ) -> None:
    """A nonlinear op with kernels ``<base>_jvp2`` and ``<base>_hvp`` (numpy_kernels, second
    order; ``base`` is the node's kernel family). ``linear_form``: nodes of this kind that
    are linear (mul by a constant) take the linear rule instead."""
    linear = _linear_rule(kind)

    def kernels(node: OpNode) -> tuple[Any, Any]:
        base = kernel_base(node)
        jvp2, hvp = getattr(K, f"{base}_jvp2", None), getattr(K, f"{base}_hvp", None)
        if jvp2 is None or hvp is None:
            raise UnsupportedOp(f"the hessian pass has no rule for op '{node.kind.value}' "
                                f"(kernel family '{base}')", node.pos)
        return jvp2, hvp

    def forward(maps: OpMaps, node: OpNode, hs: list[Array | None], ts: list[Array],
                curv: Array | None) -> Array | None:
        if linear_form is not None and linear_form(node):
            return linear.forward(maps, node, hs, ts, curv)
        pt = maps.lin.point(maps.model, node)
        return kernels(node)[0](hs, ts, pt.inputs, pt.output, pt.local, curv, pt.params,
                                **kernel_attrs(node))

    def reverse(maps: OpMaps, node: OpNode, v: Array, vd: Array | None, ts: list[Array],
                curv: Array | None) -> list[Array | None]:
        if linear_form is not None and linear_form(node):
            return linear.reverse(maps, node, v, vd, ts, curv)
        pt = maps.lin.point(maps.model, node)
        return list(kernels(node)[1](v, vd, ts, pt.inputs, pt.output, pt.local, curv,
                                     pt.params, **kernel_attrs(node)))

    SECOND_ORDER_RULES[kind] = SecondOrderRule(forward, reverse, True, source)


for _kind in sorted(AFFINE | SHAPE_ONLY | {OpKind.ADD, OpKind.CONCAT}, key=lambda k: k.value):
    deflinear(_kind, "linear: the second derivative is zero, H passes through W "
                     "(Algorithm 1 of arXiv 2502.14001 with sigma'' = 0)")
# piecewise linear: at x, the linear map of the window winners (max pooling) or of the sign
# pattern (prelu); zero second derivative off the kinks, which are reported per sample
for _kind in sorted(MAXPOOL, key=lambda k: k.value):
    deflinear(_kind, "piecewise linear: the winners' gather at x, sigma'' = 0 off ties")
deflinear(OpKind.PRELU, "piecewise linear: f'(x) = 1 or a at x, f'' = 0 off x = 0")
defcurved(OpKind.MUL, "the product rule twice: d2(ab) = da db + db da + b d2a + a d2b; mul by "
                      "a constant is linear", linear_form=is_linear_form)
defcurved(OpKind.ACTIVATION, "H = f''(z) (W J) (x) (W J) + f'(z) W H (Algorithm 1, second "
                             "order); f'' derived by sympy (pbxc.symbolic.calculus)")
defcurved(OpKind.SOFTMAX, "d2 s_i(u, w) = s_i[(u_i - s.u)(w_i - s.w) - (s.(u w) - (s.u)(s.w))]"
                          " (specs/hessian.md, checked by sympy)")
defcurved(OpKind.LOG_SOFTMAX, "d2 log s_i(u, w) = -(s.(u w) - (s.u)(s.w)) (specs/hessian.md, "
                              "checked by sympy)")
# issue 12 (helper tensor): indexing and reductions are linear; matmul is bilinear
for _kind in sorted(INDEXING | REDUCTIONS, key=lambda k: k.value):
    deflinear(_kind, "linear: transpose/slice/select/mean/sum, zero second derivative")
defcurved(OpKind.MATMUL, "bilinear: d2(AB)(u, w) = uA wB + wA uB, plus hA B + A hB (the "
                         "product rule twice, as mul's)")
CURVED_KINDS = frozenset(k for k, r in SECOND_ORDER_RULES.items() if r.curved)


def second_order_rule(node: OpNode) -> SecondOrderRule:
    rule = SECOND_ORDER_RULES.get(node.kind)
    if rule is None:
        raise UnsupportedOp(f"the hessian pass has no rule for op '{node.kind.value}'",
                            node.pos)
    return rule


# ---------------------------------------------------------------- kinks


@dataclass
class KinkReport:
    """Where second derivatives are conventions, per sample.

    ``at_x[b]``: node -> how many units of sample b sit exactly on a kink (activations: f''
    there is the one-sided value of the convention; the true second derivative is a Dirac
    mass) or how many max-pool windows have a tied maximum. For interactions, ``crossed[b]``
    names the nodes where a kink lies between x and a perturbed point (a preactivation
    changes piece, or a max-pool window changes winner).
    """

    at_x: list[dict[str, int]]
    crossed: list[dict[str, int]] = field(default_factory=list)

    def any(self, b: int) -> bool:
        return bool(self.at_x[b]) or bool(self.crossed and self.crossed[b])

    def describe(self, b: int) -> str:
        parts = []
        if self.at_x[b]:
            parts.append("at x: " + ", ".join(f"{k} {v}" for k, v in self.at_x[b].items()))
        if self.crossed and self.crossed[b]:
            parts.append("between x and x + d: " + ", ".join(
                f"{k} ({v} pair(s))" for k, v in self.crossed[b].items()))
        return "; ".join(parts) if parts else "no kink"


def _maxpool_ties(node: OpNode, x: Array, index: Array) -> Array:
    """Per sample, windows whose maximum is attained more than once."""
    attrs = kernel_attrs(node)
    win = K.windows2d(x, attrs["kernel"], attrs["stride"], attrs["padding"], pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    equal = (flat == np.take_along_axis(flat, index[..., None], axis=4)).sum(axis=4)
    return (equal > 1).reshape(len(x), -1).sum(axis=1)


def kinks_per_sample(model: Any, lin: Linearization, nodes: list[OpNode]) -> list[dict[str, int]]:
    """The kink report of ``pbxc.runtime.jacobian.kinks_hit``, per sample, with max-pool ties."""
    table = model.activations
    batch = len(next(iter(lin.values.values())))
    out: list[dict[str, int]] = [{} for _ in range(batch)]
    for node in nodes:
        if node.kind is OpKind.ACTIVATION:
            z = lin.values[node.inputs[0]]
            hits = np.zeros(batch, dtype=np.int64)
            for c in table.kink_points[table.keys[node.name]]:
                hits += np.count_nonzero((z == z.dtype.type(c)).reshape(batch, -1), axis=1)
        elif node.kind is OpKind.PRELU:
            z = lin.values[node.inputs[0]]
            hits = np.count_nonzero((z == 0).reshape(batch, -1), axis=1)
        elif kernel_base(node) == "maxpool2d" and node.name in lin.local:
            hits = _maxpool_ties(node, lin.values[node.inputs[0]], lin.local[node.name])
        else:
            continue
        for b in np.flatnonzero(hits):
            out[b][node.name] = int(hits[b])
    return out


def piece_sides(model: Any, lin: Linearization, nodes: list[OpNode]) -> dict[str, Array]:
    """Per node, which smooth piece each unit is on (activations: how many kink points lie
    below z; max pooling: the winner): two points with equal sides lie on one smooth piece."""
    table = model.activations
    sides: dict[str, Array] = {}
    for node in nodes:
        if node.kind is OpKind.ACTIVATION:
            points = table.kink_points[table.keys[node.name]]
            if points:
                z = lin.values[node.inputs[0]]
                count = np.zeros(z.shape, dtype=np.int8)
                for c in points:
                    count += z > z.dtype.type(c)
                sides[node.name] = count.reshape(len(z), -1)
        elif node.kind is OpKind.PRELU:
            z = lin.values[node.inputs[0]]
            sides[node.name] = (z > 0).reshape(len(z), -1)
        elif node.kind in MAXPOOL and node.name in lin.local:
            idx = np.asarray(lin.local[node.name])
            sides[node.name] = idx.reshape(len(idx), -1)
    return sides


# ---------------------------------------------------------------- the two sweeps


def _curvatures(model: Any, lin: Linearization, nodes: list[OpNode]) -> dict[str, Array]:
    """f''(z) of every activation on the path."""
    table = model.activations
    return {n.name: table.second_derivative(n.name, lin.values[n.inputs[0]])
            for n in nodes if n.kind is OpKind.ACTIVATION}


def _consumers(nodes: list[OpNode]) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in nodes:
        for i in node.inputs:
            count[i] = count.get(i, 0) + 1
    return count


def forward_recursion(model: Any, lin: Linearization, wrt: str, nodes: list[OpNode],
                      maps: OpMaps, keep: bool = False
                      ) -> tuple[dict[str, Array], dict[str, Array | None]]:
    """The second-order Algorithm 1: J (B, n, *shape) and H (B, n*n, *shape) of every node on
    the path (only the last node's unless ``keep``); H is None where it is zero."""
    x = lin.values[wrt]
    batch, n = x.shape[0], size(x.shape[1:])
    curv = _curvatures(model, lin, nodes)
    jac: dict[str, Array] = {wrt: identity_tangents(batch, x.shape[1:], x.dtype)}
    hes: dict[str, Array | None] = {wrt: None}
    remaining = _consumers(nodes)
    for node in nodes:
        ts, hs = [], []
        for i in node.inputs:
            if i in jac:
                ts.append(jac[i])
                hs.append(hes[i])
            else:   # an input that does not depend on wrt
                v = lin.values[i]
                ts.append(np.zeros((batch, n, *v.shape[1:]), dtype=v.dtype))
                hs.append(None)
        rule = second_order_rule(node)
        hes[node.name] = rule.forward(maps, node, hs, ts, curv.get(node.name))
        jac[node.name] = maps.jvp(node, ts)
        if not keep:
            for i in node.inputs:
                if i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0 and i in jac:
                        del jac[i], hes[i]
    return jac, hes


def forward_tangents(model: Any, lin: Linearization, wrt: str, nodes: list[OpNode],
                     maps: OpMaps, directions: Array, keep: set[str]) -> dict[str, Array]:
    """Push ``directions`` (B, M, *in) forward; keeps the tangents named in ``keep``."""
    tangents = {wrt: directions}
    remaining = _consumers(nodes)
    m = directions.shape[1]
    for node in nodes:
        ts = []
        for i in node.inputs:
            if i in tangents:
                ts.append(tangents[i])
            else:
                v = lin.values[i]
                ts.append(np.zeros((v.shape[0], m, *v.shape[1:]), dtype=v.dtype))
        tangents[node.name] = maps.jvp(node, ts)
        for i in node.inputs:
            if i in remaining:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in keep and i in tangents:
                    del tangents[i]
    return tangents


def _add(a: Array | None, b: Array | None) -> Array | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def reverse_tangent_sweep(model: Any, lin: Linearization, wrt: str, output: str,
                          nodes: list[OpNode], maps: OpMaps, tangents: Mapping[str, Array],
                          seed: Array, seed_tangent: Array | None, m: int,
                          curv: Mapping[str, Array]) -> Array:
    """Forward over reverse: pull the cotangent ``seed`` (B, 1, *out) back together with its
    tangent along the M directions; returns the tangent of the input cotangent, H V, as
    (B, M, *in)."""
    cot: dict[str, Array] = {output: seed}
    dcot: dict[str, Array | None] = {output: seed_tangent}
    on_path = {n.name for n in nodes} | {wrt}
    for node in reversed(nodes):
        v = cot.pop(node.name, None)
        vd = dcot.pop(node.name, None)
        if v is None:
            continue
        rule = second_order_rule(node)
        ts = [tangents.get(i) for i in node.inputs]
        if rule.curved and any(t is None for t in ts):
            ts = [t if t is not None else np.zeros((v.shape[0], m, *lin.values[i].shape[1:]),
                                                   dtype=v.dtype)
                  for t, i in zip(ts, node.inputs)]
        grads = maps.vjp(node, v)
        dgrads = rule.reverse(maps, node, v, vd, ts, curv.get(node.name))
        for i, g, dg in zip(node.inputs, grads, dgrads):
            if i not in on_path:
                continue
            cot[i] = cot[i] + g if i in cot else g
            dcot[i] = _add(dcot.get(i), dg)
    x = lin.values[wrt]
    result = dcot.get(wrt)
    if result is None:
        return np.zeros((x.shape[0], m, *x.shape[1:]), dtype=x.dtype)
    return result


# ---------------------------------------------------------------- results


@dataclass
class HessianResult:
    """Second derivatives of ``output`` (or its softmax, ``on="probabilities"``) w.r.t. ``wrt``.

    ``hessian``: (B, *in, *in) for one target per sample, (B, *out, *in, *in) for all.
    ``intermediates``: node -> (B, *node_shape, *in, *in), the H[l] of Algorithm 1 (forward).
    """

    hessian: Array
    output: str
    wrt: str
    on: str
    targets: Array | None          # per-sample target index, None for all outputs
    plan: HessianPlan
    kinks: KinkReport
    values: Array                  # the output (logits or probabilities) at x, (B, *out)
    intermediates: dict[str, Array] | None = None


@dataclass
class HvpResult:
    """H v per sample: ``hvp`` is shaped like the vectors given, (B, *in) or (B, K, *in)."""

    hvp: Array
    output: str
    wrt: str
    on: str
    targets: Array
    plan: HessianPlan
    kinks: KinkReport


def _flat_output(lin: Linearization, output: str) -> Array:
    y = lin.values[output]
    return y.reshape(y.shape[0], -1)


def _softmax_of(y_flat: Array) -> Array:
    return K.softmax(y_flat, 1)


def _target_rows(model: Any, values: Array, target: Any) -> Array:
    """Per-sample target indices into the flattened output (the Jacobian's conventions)."""
    return np.asarray(model.targets(values, target))


def _check_on(on: str) -> None:
    if on not in ON_CHOICES:
        raise InputError(f"on must be 'logits' or 'probabilities', got {on!r}")


def _plan_for(model: Any, wrt: str, output: str, batch: int, targets: int,
              directions: int | None, mode: str, intermediates: bool, dtype: np.dtype
              ) -> tuple[HessianPlan, list[OpNode]]:
    nodes = path_nodes(model.graph, wrt, output)
    for node in nodes:
        second_order_rule(node)     # a missing rule fails before any work
    curved = {n.name for n in nodes if n.kind in CURVED_KINDS}
    cache = model.plan_cache
    key = ("hessian", wrt, output, batch, targets, directions, mode, intermediates,
           np.dtype(dtype).itemsize)
    if key not in cache:
        cache[key] = plan_hessian(model.graph, wrt, output, batch, curved=curved,
                                  targets=targets, directions=directions,
                                  itemsize=np.dtype(dtype).itemsize, mode=mode,
                                  intermediates=intermediates)
    return cache[key], nodes


def _chunks(batch: int, chunk: int) -> list[slice]:
    return [slice(s, min(s + chunk, batch)) for s in range(0, batch, chunk)]


def _slice_inputs(inputs: Mapping[str, Array], part: slice) -> dict[str, Array]:
    return {k: v[part] for k, v in inputs.items()}


def hessian(model: Any, inputs: Mapping[str, Array], output: str, wrt: str, target: Any = None,
            on: str = "logits", mode: str = "auto", intermediates: bool = False
            ) -> HessianResult:
    """Exact per-sample Hessians (see :class:`HessianResult`)."""
    _check_on(on)
    x = inputs[wrt]
    batch, in_shape = x.shape[0], x.shape[1:]
    n = size(in_shape)
    out_shape = tuple(model.graph.shape_of(output) or ())
    n_out = size(out_shape)
    every = isinstance(target, str) and target == "all"
    k = n_out if every else 1
    plan, nodes = _plan_for(model, wrt, output, batch, k, None, mode, intermediates, x.dtype)
    result = np.empty((batch, k, n, n), dtype=x.dtype)
    values = np.empty((batch, n_out), dtype=x.dtype)
    rows = None if every else np.empty(batch, dtype=np.int64)
    inter_parts: dict[str, list[Array]] = {}
    at_x: list[dict[str, int]] = []
    for part in _chunks(batch, plan.chunk):
        # one forward pass per chunk serves the targets, the kink report and the sweeps
        lin = linearize(model, _slice_inputs(inputs, part))
        maps = OpMaps(model, lin, plan.dense_ops)
        at_x += kinks_per_sample(model, lin, nodes)
        y = _flat_output(lin, output)
        values[part] = _softmax_of(y) if on == "probabilities" else y
        sub_rows = None
        if rows is not None:
            sub_rows = rows[part] = _target_rows(model, values[part],
                                                 _target_part(target, part, batch))
        if plan.mode == "forward":
            h_all, kept = _forward_hessians(model, lin, wrt, output, nodes, maps, on,
                                            intermediates)
            # h_all: (b, n_out, n, n)
            if sub_rows is None:
                result[part] = h_all
            else:
                result[part, 0] = h_all[np.arange(len(sub_rows)), sub_rows]
            for name, h in kept.items():
                inter_parts.setdefault(name, []).append(h)
        else:
            result[part] = _reverse_hessians(model, lin, wrt, output, nodes, maps, on,
                                             sub_rows, n_out)
    inter: dict[str, Array] | None = None
    if intermediates:
        inter = {}
        for name, parts in inter_parts.items():
            shape = tuple(model.graph.shape_of(name) or ())
            inter[name] = np.concatenate(parts).reshape(batch, *shape, *in_shape, *in_shape)
    if rows is None:
        hess = result.reshape(batch, *out_shape, *in_shape, *in_shape)
    else:
        hess = result.reshape(batch, *in_shape, *in_shape)
    return HessianResult(hess, output, wrt, on, rows, plan, KinkReport(at_x),
                         values.reshape(batch, *out_shape), inter)


def _target_part(target: Any, part: slice, batch: int) -> Any:
    """The chunk's share of a per-sample target array (a scalar or "predicted" as is)."""
    if isinstance(target, str) or target is None or np.ndim(target) == 0:
        return target
    arr = np.asarray(target)
    return arr[part] if arr.shape == (batch,) else arr


def _forward_hessians(model: Any, lin: Linearization, wrt: str, output: str,
                      nodes: list[OpNode], maps: OpMaps, on: str, keep: bool
                      ) -> tuple[Array, dict[str, Array]]:
    """(b, n_out, n, n) Hessians of every output entry, and each node's H if ``keep``."""
    x = lin.values[wrt]
    batch, n = x.shape[0], size(x.shape[1:])
    if output == wrt:
        n_out = n
        return np.zeros((batch, n_out, n, n), dtype=x.dtype), {}
    jac, hes = forward_recursion(model, lin, wrt, nodes, maps, keep)
    y = _flat_output(lin, output)
    j_out = jac[output].reshape(batch, n, -1)
    h_out = hes[output]
    h_flat = None if h_out is None else h_out.reshape(batch, n * n, -1)
    if on == "probabilities":
        s = _softmax_of(y)
        h_flat = K.softmax_jvp2([h_flat], [j_out], [y], s, None, None, {}, axis=0)
    n_out = y.shape[1]
    if h_flat is None:
        h_all = np.zeros((batch, n_out, n, n), dtype=x.dtype)
    else:
        h_all = np.moveaxis(h_flat.reshape(batch, n, n, n_out), 3, 1)
    kept: dict[str, Array] = {}
    if keep:
        for name, h in hes.items():
            if name == wrt:
                continue
            shape = lin.values[name].shape[1:]
            if h is None:
                kept[name] = np.zeros((batch, size(shape), n, n), dtype=x.dtype)
            else:
                kept[name] = np.moveaxis(h.reshape(batch, n, n, size(shape)), 3, 1)
    return h_all, kept


def _output_seeds(lin: Linearization, output: str, on: str, rows: Array,
                  tangent: Array | None) -> tuple[Array, Array | None]:
    """The cotangent at the output for target rows, and its tangent (probabilities: the
    softmax's own second derivative contracted with the target; logits: zero)."""
    y = _flat_output(lin, output)
    batch, n_out = y.shape
    onehot = np.zeros((batch, 1, n_out), dtype=y.dtype)
    onehot[np.arange(batch), 0, rows] = 1
    shape = lin.values[output].shape[1:]
    if on == "logits":
        return onehot.reshape(batch, 1, *shape), None
    s = _softmax_of(y)
    seed = K.softmax_vjp(onehot, [y], s, None, {}, axis=0)[0]
    assert tangent is not None
    t = tangent.reshape(batch, tangent.shape[1], n_out)
    seed_t = K.softmax_hvp(onehot, None, [t], [y], s, None, None, {}, axis=0)[0]
    return seed.reshape(batch, 1, *shape), seed_t.reshape(batch, t.shape[1], *shape)


def _hvp_directions(model: Any, lin: Linearization, wrt: str, output: str,
                    nodes: list[OpNode], maps: OpMaps, on: str, rows_list: list[Array],
                    directions: Array) -> list[Array]:
    """H V for each target row vector in ``rows_list``: each (b, M, *in)."""
    m = directions.shape[1]
    curv = _curvatures(model, lin, nodes)
    keep = {i for node in nodes if node.kind in CURVED_KINDS for i in node.inputs}
    if on == "probabilities":
        keep.add(output)
    if output == wrt:
        raise InputError("the hessian of an input with respect to itself is zero; choose an "
                         "output that depends on it")
    tangents = forward_tangents(model, lin, wrt, nodes, maps, directions, keep)
    out = []
    for rows in rows_list:
        seed, seed_t = _output_seeds(lin, output, on, rows, tangents.get(output))
        out.append(reverse_tangent_sweep(model, lin, wrt, output, nodes, maps, tangents,
                                         seed, seed_t, m, curv))
    return out


def _reverse_hessians(model: Any, lin: Linearization, wrt: str, output: str,
                      nodes: list[OpNode], maps: OpMaps, on: str, rows: Array | None,
                      n_out: int) -> Array:
    x = lin.values[wrt]
    batch, n = x.shape[0], size(x.shape[1:])
    eye = identity_tangents(batch, x.shape[1:], x.dtype)
    rows_list = ([np.full(batch, c) for c in range(n_out)] if rows is None else [rows])
    hv = _hvp_directions(model, lin, wrt, output, nodes, maps, on, rows_list, eye)
    return np.stack([h.reshape(batch, n, n) for h in hv], axis=1)


def hvp(model: Any, inputs: Mapping[str, Array], vectors: Array, output: str, wrt: str,
        target: Any = None, on: str = "logits", mode: str = "auto") -> HvpResult:
    """H v per sample for the target output; ``vectors`` is (*in), (B, *in) or (B, K, *in)."""
    _check_on(on)
    x = inputs[wrt]
    batch, in_shape = x.shape[0], x.shape[1:]
    v = np.asarray(vectors)
    if v.dtype.kind not in "fiu":
        raise InputError(f"hvp vectors must be real numbers, got dtype {v.dtype}")
    if v.shape == in_shape:
        v = np.broadcast_to(v, (batch, *in_shape))
    valid = v.shape[:1] == (batch,) and (v.shape[1:] == in_shape or (
        v.ndim == len(in_shape) + 2 and v.shape[2:] == in_shape))
    if not valid:
        raise InputError(f"hvp vectors have shape {list(v.shape)}; expected "
                         f"{list(in_shape)}, [batch, {', '.join(map(str, in_shape))}] or "
                         f"[batch, K, {', '.join(map(str, in_shape))}] with batch {batch}")
    squeeze = v.shape[1:] == in_shape
    v = np.ascontiguousarray(v[:, None] if squeeze else v, dtype=x.dtype)
    if not np.isfinite(v).all():
        raise InputError("hvp vectors have non-finite values")
    rows = np.empty(batch, dtype=np.int64)
    m = v.shape[1]
    plan, nodes = _plan_for(model, wrt, output, batch, 1, m, mode, False, x.dtype)
    result = np.empty_like(v)
    at_x: list[dict[str, int]] = []
    n = size(in_shape)
    for part in _chunks(batch, plan.chunk):
        lin = linearize(model, _slice_inputs(inputs, part))
        maps = OpMaps(model, lin, plan.dense_ops)
        at_x += kinks_per_sample(model, lin, nodes)
        y = _flat_output(lin, output)
        rows[part] = _target_rows(model, _softmax_of(y) if on == "probabilities" else y,
                                  _target_part(target, part, batch))
        if plan.mode == "forward":
            h_all, _ = _forward_hessians(model, lin, wrt, output, nodes, maps, on, False)
            h = h_all[np.arange(part.stop - part.start), rows[part]]     # (b, n, n)
            flat = v[part].reshape(len(h), m, n)
            result[part] = np.matmul(flat, h).reshape(len(h), m, *in_shape)  # H symmetric
        else:
            result[part] = _hvp_directions(model, lin, wrt, output, nodes, maps, on,
                                           [rows[part]], v[part])[0]
    out = result[:, 0] if squeeze else result
    return HvpResult(out, output, wrt, on, rows, plan, KinkReport(at_x))
