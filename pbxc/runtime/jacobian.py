"""The exact Jacobian: forward accumulation (Algorithm 1 of the PBX paper), reverse
accumulation, and matrix-chain bracketings, executed as the plan from ``pbxc.lower.plan`` says.

Abe & Asai, arXiv 2502.14001, Algorithm 1: J[1] = I, J[l] = J_sigma(z[l]) W[l] J[l-1], with
every intermediate J[l] as a byproduct. Here every op's linearisation comes from the JVP/VJP
tables in ``linearize``; elementwise Jacobians are diagonal scalings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import kernel_attrs, kernel_name
from pbxc.lower.memory import forward_uses
from pbxc.lower.plan import JacobianPlan, path_nodes, plan_jacobian, size
from pbxc.ops import CONV_TRANSPOSED, CONVOLUTIONS, OpKind
from pbxc.runtime.linearize import Point, jvp_rule, vjp_rule
from pbxc.runtime.numpy_forward import forward_with_local
from pbxc.runtime.released import Released

Array = np.ndarray


@dataclass
class Linearization:
    """The forward pass at x, with what each op's Jacobian needs (f'(z), argmax indices)."""

    values: dict[str, Array]
    local: dict[str, Array]

    def point(self, model: object, node: OpNode) -> Point:
        params = model.params[node.name]  # type: ignore[attr-defined]
        return Point(node, [self.values[i] for i in node.inputs], self.values[node.name],
                     params, self.local.get(node.name))


def dense_matrix(model: object, node: OpNode, dtype: np.dtype) -> Array:
    """The (out, in) matrix of a constant linear op (conv, average pooling) without its bias,
    built once per model and dtype, on first use: a convolution's is scattered from its
    weights (``conv_dense_matrix``, one write per weight use); other ops push the identity
    through their JVP."""
    cache: dict[tuple[str, str], Array] = model.dense_cache  # type: ignore[attr-defined]
    key = (node.name, np.dtype(dtype).name)
    if key not in cache:
        graph = model.graph  # type: ignore[attr-defined]
        in_shape, out_shape = graph.shape_of(node.inputs[0]) or (), node.shape or ()
        if node.kind in CONVOLUTIONS:
            cache[key] = _conv_dense(node, model.params[node.name]["weight"].astype(  # type: ignore[attr-defined]
                dtype, copy=False), in_shape, out_shape)
            return cache[key]
        pt = Point(node, [np.zeros((1, *in_shape), dtype)], np.zeros((1, *out_shape), dtype),
                   model.params[node.name])  # type: ignore[attr-defined]
        t = jvp_rule(node)(pt, [identity_tangents(1, in_shape, dtype)])
        cache[key] = np.ascontiguousarray(t.reshape(size(in_shape), size(out_shape)).T)
    return cache[key]


def _conv_dense(node: OpNode, weight: Array, in_shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> Array:
    attrs = kernel_attrs(node)
    args = (attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
    if node.kind in CONV_TRANSPOSED:   # the transpose of the convolution it is the adjoint of
        return np.ascontiguousarray(
            K.conv_dense_matrix(weight, out_shape[1:], *args, out_spatial=in_shape[1:]).T)
    return K.conv_dense_matrix(weight, in_shape[1:], *args)


def linearize(model: object, inputs: Mapping[str, Array], derivatives: bool = True,
              keep: AbstractSet[str] | None = None,
              local_of: Callable[[OpNode, Array, Array], Array] | None = None
              ) -> Linearization:
    """Evaluate every node, keeping the local data of nonlinear ops: argmax indices of max
    pooling, and (with ``derivatives``) f'(z) of activations.

    ``keep``: the values the caller reads afterwards (None: all of them); every other value
    is released (``pbxc.runtime.released``) after its last forward consumer, which is the
    forward liveness of ``pbxc.lower.memory``. ``local_of(node, z, y)``: an activation's
    local data instead of f'(z) (a ReLU mask, a DFD multiplier).
    """
    values: dict[str, Array] = dict(inputs)
    local: dict[str, Array] = {}
    nodes: list[OpNode] = model.nodes  # type: ignore[attr-defined]
    uses = forward_uses(nodes) if keep is not None else {}

    def consumed(name: str) -> None:
        if keep is not None and uses.get(name, 0) == 0 and name not in keep:
            values[name] = Released.of(name, values[name])  # type: ignore[assignment]

    for node in nodes:
        if node.kind is OpKind.INPUT:
            continue
        xs = [values[i] for i in node.inputs]
        if node.kind is OpKind.ACTIVATION:
            table = model.activations  # type: ignore[attr-defined]
            values[node.name] = table(node.name, xs[0])
            if local_of is not None:
                local[node.name] = local_of(node, xs[0], values[node.name])
            elif derivatives:
                local[node.name] = table.derivative(node.name, xs[0])
        else:   # the ops' own kernels even where a dense matrix is cheaper: the forward
            # values stay those of Model.forward, bit for bit (LRP's 1/z amplifies any change)
            params = model.params[node.name]  # type: ignore[attr-defined]
            values[node.name], extra = forward_with_local(node, xs, params)
            if extra is not None:
                local[node.name] = extra
        del xs
        for i in node.inputs:
            if i in uses:
                uses[i] -= 1
            consumed(i)
        consumed(node.name)
    return Linearization(values, local)


def release(lin: Linearization, schedule: Mapping[str, tuple[Sequence[str], Sequence[str]]],
            node: str, keep: AbstractSet[str] = frozenset()) -> None:
    """Release what the backward walk reads for the last time at ``node``."""
    names, locals_ = schedule.get(node, ((), ()))
    for name in names:
        if name not in keep and name in lin.values:
            lin.values[name] = Released.of(name, lin.values[name])  # type: ignore[assignment]
    for name in locals_:
        lin.local.pop(name, None)


class OpMaps:
    """Each op's JVP and VJP at the linearisation point; ops the plan marks dense apply a
    dense matrix cached on the model (their Jacobian does not depend on the input)."""

    def __init__(self, model: object, lin: Linearization,
                 dense_ops: set[str] | frozenset[str] | None = None) -> None:
        self.model, self.lin = model, lin
        # by default the model's own choice (lower/plan's cost model)
        self.dense_ops: set[str] | frozenset[str] = (
            getattr(model, "dense_ops", frozenset()) if dense_ops is None else dense_ops)

    def matrix(self, node: OpNode) -> Array:
        return dense_matrix(self.model, node, self.lin.values[node.name].dtype)

    def jvp(self, node: OpNode, ts: list[Array]) -> Array:
        if node.name in self.dense_ops:
            t = ts[0]
            flat = t.reshape(*t.shape[:2], -1)
            out = self.lin.values[node.name].shape[1:]
            return matmul_rows(flat, self.matrix(node).T).reshape(*t.shape[:2], *out)
        return jvp_rule(node)(self.lin.point(self.model, node), ts)

    def vjp(self, node: OpNode, v: Array) -> list[Array]:
        if node.name in self.dense_ops:
            flat = v.reshape(*v.shape[:2], -1)
            shape = self.lin.values[node.inputs[0]].shape[1:]
            return [matmul_rows(flat, self.matrix(node)).reshape(*v.shape[:2], *shape)]
        return vjp_rule(node)(self.lin.point(self.model, node), v)


def matmul_rows(t: Array, m: Array) -> Array:
    """(B, K, n) @ (n, p) as one GEMM."""
    flat = np.ascontiguousarray(t).reshape(-1, t.shape[-1])
    return (flat @ m).reshape(*t.shape[:-1], m.shape[1])


def identity_tangents(batch: int, shape: tuple[int, ...], dtype: np.dtype) -> Array:
    n = size(shape)
    eye = np.broadcast_to(np.eye(n, dtype=dtype), (batch, n, n))
    return np.ascontiguousarray(eye).reshape(batch, n, *shape)


def forward_sweep(model: object, lin: Linearization, wrt: str, nodes: list[OpNode],
                  keep: bool, maps: OpMaps | None = None) -> dict[str, Array]:
    """Push identity tangents from ``wrt``: J of every node on the path, (B, n_in, *shape)."""
    maps = maps or OpMaps(model, lin)
    x = lin.values[wrt]
    tangents = {wrt: identity_tangents(x.shape[0], x.shape[1:], x.dtype)}
    n_in = size(x.shape[1:])
    remaining = {n.name: 0 for n in nodes}
    for node in nodes:
        for i in node.inputs:
            if i in remaining:
                remaining[i] += 1
    for node in nodes:
        ts = []
        for i in node.inputs:
            if i in tangents:
                ts.append(tangents[i])
            else:  # an input that does not depend on wrt
                v = lin.values[i]
                ts.append(np.zeros((v.shape[0], n_in, *v.shape[1:]), dtype=v.dtype))
        tangents[node.name] = maps.jvp(node, ts)
        if not keep:
            for i in node.inputs:
                if i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        del tangents[i]
    return tangents


def reverse_sweep(model: object, lin: Linearization, wrt: str, output: str,
                  nodes: list[OpNode], seed: Array | None = None,
                  maps: OpMaps | None = None,
                  schedule: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
                  in_place: bool = True) -> Array:
    """Pull cotangents from ``output`` back to ``wrt``: (B, K, *in_shape).

    ``seed`` is (B, K, *out_shape); by default the identity (K = output size). ``schedule``:
    what to release after each node (``pbxc.lower.memory.release_schedule``). ``in_place``:
    a cotangent the sweep owns (a sum it allocated, a convolution VJP's result) takes the
    next contribution and an activation's v * f'(z) in place, bit for bit the allocating
    form (tested), in less memory traffic and fewer allocations.
    """
    maps = maps or OpMaps(model, lin)
    y = lin.values[output]
    cot = {output: seed if seed is not None else identity_tangents(y.shape[0], y.shape[1:],
                                                                   y.dtype)}
    on_path = {n.name for n in nodes} | {wrt}
    # the cotangents that are a sum this sweep allocated, held by nothing else: those alone
    # are updated in place (a VJP's output may be its input or a view of it: add's shares v)
    owned: set[str] = set()
    for node in reversed(nodes):
        v = cot.pop(node.name, None)
        if v is None:
            continue
        if in_place and node.name in owned and _scales_in_place(node, maps, v):
            v *= maps.lin.local[node.name][:, None]   # activation_vjp's v * f'(z), bit for bit
            grads = [v]
        else:
            grads = maps.vjp(node, v)
        owned.discard(node.name)
        # a convolution's VJP returns an array of its own (conv_nd_transpose's or conv_nd's
        # result, or the dense matrix product), which nothing else holds
        fresh = (len(grads) == 1 and (node.kind in CONVOLUTIONS or node.kind in CONV_TRANSPOSED)
                 and not np.may_share_memory(grads[0], v))
        del v
        for i, g in zip(node.inputs, grads):
            if i not in on_path:
                continue
            if i not in cot:
                cot[i] = g
                if fresh:
                    owned.add(i)
            elif (in_place and i in owned and cot[i].shape == g.shape
                  and cot[i].dtype == g.dtype):
                cot[i] += g   # the same sum, into the sweep's own array
            else:
                cot[i] = cot[i] + g
                owned.add(i)
        del grads
        if schedule is not None:
            release(lin, schedule, node.name, {output, wrt})
    x = lin.values[wrt]
    if wrt not in cot:
        k = cot_seed_rows(seed, y)
        return np.zeros((x.shape[0], k, *x.shape[1:]), dtype=x.dtype)
    return cot[wrt]


def _scales_in_place(node: OpNode, maps: OpMaps, v: Array) -> bool:
    """Whether the node's VJP is activation_vjp's ``v * local[:, None]`` and that product has
    v's shape and dtype (then ``v *= local[:, None]`` gives it bit for bit)."""
    if node.kind is not OpKind.ACTIVATION or node.name in maps.dense_ops:
        return False
    if getattr(K, kernel_name(node, "vjp"), None) is not K.activation_vjp:
        return False
    local = maps.lin.local.get(node.name)
    if not isinstance(local, np.ndarray) or not v.flags.writeable:
        return False
    scale = local[:, None]
    return (np.broadcast_shapes(v.shape, scale.shape) == v.shape
            and np.result_type(v, scale) == v.dtype)


def cot_seed_rows(seed: Array | None, y: Array) -> int:
    return seed.shape[1] if seed is not None else size(y.shape[1:])


def _flat_matrix(t: Array) -> Array:
    """(B, K, *shape) -> (B, K, n)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def chain_execute(model: object, lin: Linearization, wrt: str, nodes: list[OpNode],
                  plan: JacobianPlan) -> Array:
    """Evaluate the chain plan's bracketing; returns (B, n_out, n_in) per sample."""
    maps = OpMaps(model, lin, plan.dense_ops)
    shapes = [lin.values[wrt].shape[1:]] + [lin.values[n.name].shape[1:] for n in nodes]
    batch = lin.values[wrt].shape[0]
    dtype = lin.values[wrt].dtype

    def dense(i: int) -> Array:
        node = nodes[i]
        if node.kind is OpKind.LINEAR and len(shapes[i]) == 1:
            w = model.params[node.name]["weight"]  # type: ignore[attr-defined]
            return np.broadcast_to(w, (batch, *w.shape))
        if node.name in maps.dense_ops:
            m = maps.matrix(node)
            return np.broadcast_to(m, (batch, *m.shape))
        if size(shapes[i]) <= size(shapes[i + 1]):
            t = maps.jvp(node, [identity_tangents(batch, shapes[i], dtype)])
            return np.swapaxes(_flat_matrix(t), 1, 2)
        v = maps.vjp(node, identity_tangents(batch, shapes[i + 1], dtype))[0]
        return _flat_matrix(v)

    def run(tree: tuple) -> Array:  # -> (B, d_out, d_in)
        i, j, action, children = tree
        if action == "dense":
            return dense(i)
        if action == "jvp":  # apply op j to the columns of M[i..j-1]
            m = run(children[0])
            t = np.swapaxes(m, 1, 2).reshape(batch, m.shape[2], *shapes[j])
            out = maps.jvp(nodes[j], [t])
            return np.swapaxes(_flat_matrix(out), 1, 2)
        if action == "vjp":  # apply op i's transpose to the rows of M[i+1..j]
            m = run(children[0])
            v = m.reshape(batch, m.shape[1], *shapes[i + 1])
            if nodes[i].kind is OpKind.ACTIVATION and v.flags.writeable:
                # diag(f'(z)) in place: a writeable block here is this plan's own temporary
                # (a chain has no fan-out; shared weights come broadcast, read-only)
                v *= lin.local[nodes[i].name][:, None]
                return _flat_matrix(v)
            return _flat_matrix(maps.vjp(nodes[i], v)[0])
        left, right = run(children[0]), run(children[1])
        return np.matmul(right, left)  # M[k+1..j] @ M[i..k]

    assert isinstance(plan.tree, tuple)
    return run(plan.tree)


@dataclass
class JacobianResult:
    """J of ``output`` with respect to ``wrt``: (B, *out_shape, *in_shape)."""

    jacobian: Array
    output: str
    wrt: str
    plan: JacobianPlan
    intermediates: dict[str, Array] | None = None   # node -> (B, *node_shape, *in_shape)
    kinks: dict[str, int] | None = None              # activation node -> units on a kink


def _plan(model: object, wrt: str, output: str, batch: int, mode: str
          ) -> tuple[JacobianPlan, list[OpNode]]:
    """The plan and its nodes, once per (wrt, output, batch, mode): at batch 1 planning costs
    a tenth of the pass."""
    cache = getattr(model, "plan_cache", {})
    key = (wrt, output, batch, mode)
    if key not in cache:
        graph = model.graph  # type: ignore[attr-defined]
        cache[key] = (plan_jacobian(graph, wrt, output, batch, mode),
                      path_nodes(graph, wrt, output))
    return cache[key]


def jacobian(model: object, inputs: Mapping[str, Array], output: str, wrt: str,
             mode: str = "auto", intermediates: bool = False) -> JacobianResult:
    lin = linearize(model, inputs)
    batch = lin.values[wrt].shape[0]
    in_shape, out_shape = lin.values[wrt].shape[1:], lin.values[output].shape[1:]
    if intermediates:
        mode = "forward"  # the paper's byproduct: every J[l] comes with the forward sweep
    plan, nodes = _plan(model, wrt, output, batch, mode)
    inter = None
    if output == wrt:
        flat = identity_tangents(batch, in_shape, lin.values[wrt].dtype)
        j = flat.reshape(batch, *out_shape, *in_shape)
    elif plan.mode == "forward":
        tangents = forward_sweep(model, lin, wrt, nodes, keep=intermediates,
                                 maps=OpMaps(model, lin, plan.dense_ops))
        t = tangents[output]  # (B, n_in, *out_shape)
        j = np.moveaxis(t.reshape(batch, size(in_shape), size(out_shape)), 1, 2)
        j = j.reshape(batch, *out_shape, *in_shape)
        if intermediates:
            inter = {}
            for name, tan in tangents.items():
                shape = lin.values[name].shape[1:]
                m = np.moveaxis(tan.reshape(batch, size(in_shape), size(shape)), 1, 2)
                inter[name] = m.reshape(batch, *shape, *in_shape)
    elif plan.mode == "reverse":
        v = reverse_sweep(model, lin, wrt, output, nodes, maps=OpMaps(model, lin, plan.dense_ops))
        j = v.reshape(batch, *out_shape, *in_shape)
    else:
        j = chain_execute(model, lin, wrt, nodes, plan).reshape(batch, *out_shape, *in_shape)
    return JacobianResult(np.ascontiguousarray(j), output, wrt, plan, inter,
                          kinks_hit(model, lin.values, nodes))


def kinks_hit(model: object, values: Mapping[str, Array], nodes: Sequence[OpNode]
              ) -> dict[str, int]:
    """Units whose preactivation sits exactly on a kink, per activation node on the path.

    There f' is the model's kink convention, not a derivative; a caller comparing with another
    library's gradient should know how many entries that concerns.
    """
    table = model.activations  # type: ignore[attr-defined]
    hits = {n.name: table.kinks_hit(n.name, values[n.inputs[0]])
            for n in nodes if n.kind is OpKind.ACTIVATION}
    for n in nodes:   # prelu's kink is at 0, where f' is the slope (PyTorch's choice)
        if n.kind is OpKind.PRELU:
            hits[n.name] = int(np.count_nonzero(values[n.inputs[0]] == 0))
    return hits
