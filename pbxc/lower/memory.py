"""The memory plan of a pass: which forward values it keeps, when it frees them, its peak.

A pass runs the forward pass and then walks the graph backwards (gradient, LRP, DFD). Its
backward step at a node reads some of the forward pass: the node's input values, its output
value, its local data (a ReLU mask or f'(z), max-pool argmax indices, DFD multipliers), or
only their shapes. ``BACKWARD_READS`` says which, per pass and op kind; an op kind it does
not list keeps everything (the safe default for ops added later). From it and the graph:

* during the forward pass, a value is released after its last forward consumer unless the
  backward walk reads it (forward liveness);
* during the backward walk, a value or local is released after the last backward step that
  reads it (the earliest such node in topological order), and a cotangent or relevance
  array after the node it belongs to has consumed it.

``predict`` simulates the same schedule on the shapes alone and reports the peak, the moment
it happens and the arrays that hold it (``pbxc explain --explain-plan``); ``batch_for_limit``
inverts it to choose a batch size from a memory limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pbxc.errors import InputError
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.ops import AFFINE, LRP_RULE_KINDS, SHAPE_ONLY, OpKind

PASSES = ("gradient", "lrp", "dfd")


@dataclass(frozen=True)
class Reads:
    """What one backward step reads of the forward pass (beyond shapes and dtypes)."""

    inputs: bool = False   # the values of the node's inputs
    output: bool = False   # the node's own value
    local: bool = False    # its local data: mask / f'(z), argmax, DFD multiplier


NOTHING = Reads()
EVERYTHING = Reads(True, True, True)
LOCAL = Reads(local=True)

# the reverse-mode VJP kernels (pbxc.codegen.numpy_kernels.<op>_vjp): what each one reads
_VJP_READS: dict[OpKind, Reads] = {
    **{k: NOTHING for k in AFFINE | SHAPE_ONLY | {OpKind.ADD, OpKind.CONCAT}},
    OpKind.MAXPOOL2D: LOCAL,
    OpKind.ACTIVATION: LOCAL,
    OpKind.SOFTMAX: Reads(output=True),
    OpKind.LOG_SOFTMAX: Reads(output=True),
    # issue 12 (helper tensor): matmul's VJP reads both factors; transpose only permutes;
    # slice/select/mean/sum read their input's shape (scatter into, or expand to, it)
    OpKind.MATMUL: Reads(inputs=True),
    OpKind.TRANSPOSE: NOTHING,
    **{k: Reads(inputs=True) for k in (OpKind.SLICE, OpKind.SELECT, OpKind.MEAN, OpKind.SUM)},
}

BACKWARD_READS: dict[str, dict[OpKind, Reads]] = {
    "gradient": _VJP_READS,
    # rules read a (the inputs) and z (the output); max pooling routes by argmax and counts
    # ties on its input; activations, reshapes and concat route relevance unchanged
    "lrp": {
        **{k: Reads(inputs=True, output=True) for k in LRP_RULE_KINDS},
        OpKind.MAXPOOL2D: Reads(inputs=True, local=True),
        **{k: NOTHING for k in SHAPE_ONLY | {OpKind.ACTIVATION, OpKind.CONCAT,
                                             OpKind.LOG_SOFTMAX}},
        # an interior softmax takes AttnLRP's rule, which reads its logits and its output
        OpKind.SOFTMAX: Reads(inputs=True, output=True),
        # issue 12 (helper tensor): matmul's epsilon rules read a, b (z is recomputed);
        # reductions and the scatters read their input; transpose only permutes
        **{k: Reads(inputs=True) for k in (OpKind.MATMUL, OpKind.SLICE, OpKind.SELECT,
                                           OpKind.MEAN, OpKind.SUM)},
        OpKind.TRANSPOSE: NOTHING,
    },
    # affine ops by their VJP (seed 004 eq. 7); activations by the multiplier computed in the
    # forward pass; max pooling and softmax read the values at both points
    "dfd": {
        **_VJP_READS,
        OpKind.ACTIVATION: LOCAL,
        OpKind.MAXPOOL2D: Reads(inputs=True),
        OpKind.SOFTMAX: Reads(inputs=True),
        OpKind.LOG_SOFTMAX: Reads(inputs=True),
    },
}


def backward_reads(pass_name: str, node: OpNode) -> Reads:
    return BACKWARD_READS[pass_name].get(node.kind, EVERYTHING)


def forward_uses(nodes: Sequence[OpNode]) -> dict[str, int]:
    """How many times each value is an input of a later op (``add(x, x)`` counts twice)."""
    uses: dict[str, int] = {n.name: 0 for n in nodes}
    for node in nodes:
        for i in node.inputs:
            uses[i] = uses.get(i, 0) + 1
    return uses


def backward_needs(pass_name: str, nodes: Sequence[OpNode]) -> tuple[set[str], set[str]]:
    """The values and the locals the backward walk reads."""
    values: set[str] = set()
    locals_: set[str] = set()
    for node in nodes:
        if node.kind is OpKind.INPUT:
            continue
        reads = backward_reads(pass_name, node)
        if reads.inputs:
            values.update(node.inputs)
        if reads.output:
            values.add(node.name)
        if reads.local:
            locals_.add(node.name)
    return values, locals_


# piecewise-linear built-ins: recomputing f(z) costs about one copy (tanh would cost more
# than the memory it saves is worth on small models)
CHEAP_BUILTINS = frozenset({"relu", "leaky_relu", "hardtanh"})


def recomputed(pass_name: str, nodes: Sequence[OpNode],
               user_activations: Iterable[str] = ()) -> frozenset[str]:
    """Activations whose output the backward walk recomputes from their kept input instead of
    keeping it: f(z) is one elementwise pass and bit for bit the forward value, and z stays
    alive until every reader of f(z) has run (z's earliest backward reader comes before the
    activation in topological order). LRP only, cheap built-ins only: there a, the next
    layer's input, is f(z) with z the previous layer's own output."""
    if pass_name != "lrp":
        return frozenset()
    user = set(user_activations)
    index = {n.name: k for k, n in enumerate(nodes)}
    needed, _ = backward_needs(pass_name, nodes)
    first_reader: dict[str, int] = {}
    for k, node in enumerate(nodes):
        if node.kind is OpKind.INPUT:
            continue
        reads = backward_reads(pass_name, node)
        for v in (list(node.inputs) if reads.inputs else []) + (
                [node.name] if reads.output else []):
            first_reader.setdefault(v, k)
    out: set[str] = set()
    for node in nodes:
        if node.kind is not OpKind.ACTIVATION or node.name not in needed or \
                node.activation not in CHEAP_BUILTINS or node.activation in user:
            continue
        z = node.inputs[0]
        if z in needed and z not in out and first_reader.get(z, len(nodes)) < index[node.name]:
            out.add(node.name)
    return frozenset(out)


def release_schedule(pass_name: str, nodes: Sequence[OpNode]
                     ) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Node -> (values, locals) that no backward step after it reads: release them there.

    ``nodes`` in topological order; the backward walk visits them reversed, so a value's last
    reader is its first reader in topological order.
    """
    last_value: dict[str, str] = {}
    last_local: dict[str, str] = {}
    for node in reversed(nodes):
        if node.kind is OpKind.INPUT:
            continue
        reads = backward_reads(pass_name, node)
        names = (list(node.inputs) if reads.inputs else []) + ([node.name] if reads.output
                                                               else [])
        for v in names:
            last_value[v] = node.name   # overwritten by earlier nodes: the last reader wins
        if reads.local:
            last_local[node.name] = node.name
    out: dict[str, tuple[list[str], list[str]]] = {}
    for v, n in last_value.items():
        out.setdefault(n, ([], []))[0].append(v)
    for v, n in last_local.items():
        out.setdefault(n, ([], []))[1].append(v)
    return {n: (tuple(vs), tuple(ls)) for n, (vs, ls) in out.items()}


@dataclass(frozen=True)
class PassPlan:
    """What a pass keeps after the forward pass, recomputes, and releases after each node."""

    keep: frozenset[str]
    recompute: frozenset[str]
    schedule: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


def pass_plan(graph: ModelGraph, pass_name: str, nodes: Sequence[OpNode],
              keep: Iterable[str]) -> PassPlan:
    """The runtime's liveness plan: ``keep`` names what the caller reads after the pass."""
    keep_set = frozenset(keep) | frozenset(graph.output_names)
    needed, _ = backward_needs(pass_name, nodes)
    remat = recomputed(pass_name, nodes, graph.user_activations) - keep_set
    return PassPlan(frozenset((needed - remat) | keep_set), remat,
                    release_schedule(pass_name, nodes))


# ---------------------------------------------------------------- the memory limit

DEFAULT_LIMIT = 2 << 30       # 2 GiB: what a pass may hold at once, unless configured
LIMIT_ENV = "PBXC_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512M', '2GiB', '1.5g', '1000000' -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise InputError(f"memory size must be a number with an optional unit (K, M, G), "
                         f"e.g. 512M or 2G; got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return value


def memory_limit(text: str | None = None) -> int:
    """The limit given, else ``$PBXC_MEMORY_LIMIT``, else 2 GiB."""
    if text is None:
        text = os.environ.get(LIMIT_ENV)
    return DEFAULT_LIMIT if text is None else parse_bytes(text)


# ---------------------------------------------------------------- the prediction

def _size(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape)) if shape else 1


def _local_bytes(pass_name: str, node: OpNode, elements: int, itemsize: int) -> int:
    if node.kind is OpKind.MAXPOOL2D:
        return elements * 8                       # int64 argmax per window
    if node.kind is OpKind.ACTIVATION:
        if pass_name == "gradient" and node.activation == "relu":
            return elements                       # a bool mask
        return elements * itemsize                # f'(z) or the DFD multiplier
    return 0


WORKSPACE_ENV = "PBXC_WORKSPACE_MB"   # the convolution kernels' tile limit (256 MB default)


def conv_workspace_limit() -> int:
    """The byte limit of one convolution tile's temporaries, as the conv kernels read it
    from ``$PBXC_WORKSPACE_MB`` (a limit set in-process with ``set_conv_workspace`` is not
    seen here: the prediction then errs on the side of the default)."""
    try:
        mb = float(os.environ.get(WORKSPACE_ENV, "") or 256)
    except ValueError:
        mb = 256.0
    return max(1, int((mb if mb > 0 else 256.0) * (1 << 20)))


def _conv_columns(node: OpNode, graph: ModelGraph, rows: int, itemsize: int) -> int:
    """Transient bytes of a convolution's columns, forward (im2col then GEMM) or transposed
    (GEMM then col2im): (in channels x kernel) x output pixels per sample, tiled to at most
    the workspace limit; 0 for other ops."""
    key = node.param_key("weight") if node.kind.value.startswith("conv") else None
    if not key or key not in graph.param_shapes or node.kind is OpKind.ACTIVATION:
        return 0
    weight = graph.param_shapes[key]
    in_shape = graph.shape_of(node.inputs[0])
    out_shape = node.shape or ()
    pixels = max(_size(out_shape[1:]), _size(tuple(in_shape[1:])))
    full = rows * int(in_shape[0]) * _size(weight[2:]) * pixels * itemsize
    return min(full, 2 * conv_workspace_limit())   # columns and the GEMM result of a tile


def _workspace(node: OpNode, graph: ModelGraph, rows: int, itemsize: int) -> int:
    """Transient bytes of one forward kernel call beyond its result."""
    return _conv_columns(node, graph, rows, itemsize)


@dataclass
class Holder:
    name: str
    what: str        # "value", "local", "cotangent", "relevance", "multiplier", "workspace"
    nbytes: int


@dataclass
class _Peak:
    nbytes: int = 0
    where: str = ""
    holders: list[Holder] = field(default_factory=list)


@dataclass
class MemoryPlan:
    """A pass's predicted memory: its peak, when it happens and what holds it."""

    pass_name: str
    batch: int
    dtype: str
    peak: int                                   # bytes
    peak_at: str                                # "forward at <node>" / "backward at <node>"
    holders: list[Holder] = field(default_factory=list)
    forward_peak: int = 0
    backward_peak: int = 0
    kept: int = 0                               # bytes the forward pass keeps for backward
    kept_all: int = 0                           # bytes every value and local would take

    def explain(self, top: int = 6) -> str:
        mib = 1 << 20
        lines = [f"memory plan: {self.pass_name}, batch {self.batch}, {self.dtype}",
                 f"  predicted peak {self.peak / mib:,.1f} MiB ({self.peak_at}); forward "
                 f"{self.forward_peak / mib:,.1f} MiB, backward {self.backward_peak / mib:,.1f} MiB",
                 f"  kept from the forward pass {self.kept / mib:,.1f} MiB (every value and "
                 f"local: {self.kept_all / mib:,.1f} MiB)"]
        if self.holders:
            lines.append("  held at the peak:")
            ranked = sorted(self.holders, key=lambda h: -h.nbytes)
            for h in ranked[:top]:
                lines.append(f"    {h.nbytes / mib:>10,.1f} MiB  {h.what:<10} {h.name}")
            rest = sum(h.nbytes for h in ranked[top:])
            if rest:
                lines.append(f"    {rest / mib:>10,.1f} MiB  {len(ranked) - top} more arrays")
        return "\n".join(lines)


def predict(graph: ModelGraph, pass_name: str, batch: int, dtype: object = np.float64,
            nodes: Sequence[OpNode] | None = None) -> MemoryPlan:
    """Simulate the pass's allocations on shapes: the forward pass with forward liveness,
    then the backward walk with its release schedule, cotangents and kernel workspaces.

    The weights and caches the model holds anyway are not counted; neither are NumPy's
    few-element temporaries. DFD runs its forward pass on batch + 1 rows (a shared default).
    """
    if pass_name not in PASSES:
        raise InputError(f"no memory plan for pass '{pass_name}'; choose from {PASSES}")
    itemsize = np.dtype(dtype).itemsize  # type: ignore[call-overload]
    nodes = list(nodes if nodes is not None else graph.topological())
    rows = batch + 1 if pass_name == "dfd" else batch
    per_value = {n.name: _size(n.shape if n.kind is not OpKind.INPUT else graph.shape_of(n.name))
                 for n in nodes}
    keep_values, keep_locals = backward_needs(pass_name, nodes)
    remat = recomputed(pass_name, nodes, graph.user_activations)
    keep_values = (keep_values - remat) | set(graph.output_names)
    uses = forward_uses(nodes)
    live: dict[tuple[str, str], int] = {}
    best = _Peak()
    kept_all = 0

    def note(where: str, transient: list[Holder]) -> None:
        total = sum(live.values()) + sum(h.nbytes for h in transient)
        if total > best.nbytes:
            best.nbytes, best.where = total, where
            best.holders = [Holder(n, w, b) for (w, n), b in live.items()] + transient

    # forward
    for node in nodes:
        out_bytes = rows * per_value[node.name] * itemsize
        kept_all += out_bytes
        if node.kind is OpKind.INPUT:
            live[("value", node.name)] = out_bytes
            continue
        ws = _workspace(node, graph, rows, itemsize)
        if node.kind is OpKind.ACTIVATION and pass_name != "lrp":
            # f'(z) and the mask tests (gradient); the secant's differences and bounds (DFD)
            ws = (16 if pass_name == "dfd" else 2) * batch * per_value[node.name] * itemsize
        live[("value", node.name)] = out_bytes
        note(f"forward at {node.name}", [Holder(node.name, "workspace", ws)] if ws else [])
        local_elems = batch * per_value[node.name]
        local = _local_bytes(pass_name, node, local_elems, itemsize)
        kept_all += local
        if node.name in keep_locals and local:
            live[("local", node.name)] = local
        for i in node.inputs:
            uses[i] -= 1
            if uses[i] == 0 and i not in keep_values:
                live.pop(("value", i), None)
        if uses.get(node.name, 0) == 0 and node.name not in keep_values:
            live.pop(("value", node.name), None)
    forward_peak = best.nbytes
    kept = sum(live.values())
    # DFD's values of the two points are views of the joint arrays: nothing to add
    schedule = release_schedule(pass_name, nodes)
    what = {"gradient": "cotangent", "lrp": "relevance", "dfd": "multiplier"}[pass_name]
    start = graph.output_names[0]
    live[(what, start)] = batch * per_value[start] * itemsize
    backward_best = 0
    for node in reversed(nodes):
        if node.kind is OpKind.INPUT:
            continue
        if (what, node.name) not in live:
            continue
        in_bytes = [batch * per_value[i] * itemsize for i in node.inputs]
        out_bytes = batch * per_value[node.name] * itemsize
        transient = [Holder(node.name, "workspace",
                            _backward_workspace(pass_name, node, graph, batch, itemsize,
                                                out_bytes, sum(in_bytes)))]
        reads = backward_reads(pass_name, node)
        transient += [Holder(i, "recomputed", b) for i, b in zip(node.inputs, in_bytes)
                      if reads.inputs and i in remat]
        for i, b in zip(node.inputs, in_bytes):
            if (what, i) not in live:
                live[(what, i)] = b      # a sum into an existing array reuses it
        note(f"backward at {node.name}", transient)
        total = sum(live.values()) + sum(h.nbytes for h in transient)
        backward_best = max(backward_best, total)
        live.pop((what, node.name), None)
        values, locals_ = schedule.get(node.name, ((), ()))
        for v in values:
            if v not in graph.output_names:
                live.pop(("value", v), None)
        for v in locals_:
            live.pop(("local", v), None)
    holders = [h for h in best.holders if h.nbytes]
    return MemoryPlan(pass_name, batch, np.dtype(dtype).name,  # type: ignore[call-overload]
                      best.nbytes, best.where, holders, forward_peak, backward_best, kept, kept_all)


def _backward_workspace(pass_name: str, node: OpNode, graph: ModelGraph, batch: int,
                        itemsize: int, out_bytes: int, in_bytes: int) -> int:
    """Transient bytes of one backward step: the transposed kernel's columns, and for LRP the
    stabilised z, s and the term a * c."""
    ws = _conv_columns(node, graph, batch, itemsize)
    if pass_name == "lrp" and node.kind in LRP_RULE_KINDS:
        ws += 2 * out_bytes + in_bytes
    return ws


def jacobian_bytes(graph: ModelGraph, batch: int, dtype: object) -> int:
    """A bound for the Jacobian pass: the result, a tangent block of the widest node for
    every input direction, and the forward values with their f'(z)."""
    itemsize = np.dtype(dtype).itemsize  # type: ignore[call-overload]
    n_in = sum(_size(i.shape) for i in graph.inputs)
    n_out = sum(_size(graph.shape_of(o)) for o in graph.output_names)
    nodes = list(graph.topological())
    widest = max((_size(n.shape) for n in nodes if n.kind is not OpKind.INPUT), default=1)
    values = sum(2 * _size(n.shape or graph.shape_of(n.name)) for n in nodes)
    return batch * itemsize * (n_in * n_out + 2 * min(n_in, n_out) * widest + values)


def peak_bytes(graph: ModelGraph, pass_name: str, batch: int, dtype: object) -> int:
    """The predicted peak of ``pass_name`` (a memory-planned pass or "jacobian")."""
    if pass_name == "jacobian":
        return jacobian_bytes(graph, batch, dtype)
    return predict(graph, pass_name, batch, dtype).peak


def batch_for_limit(graph: ModelGraph, pass_name: str, limit: int, dtype: object,
                    most: int) -> int:
    """The largest batch (1 to ``most``) whose predicted peak fits ``limit`` bytes; 1 when
    even one sample does not fit (the pass then runs one sample at a time)."""
    lo, hi = 1, max(1, most)
    if peak_bytes(graph, pass_name, hi, dtype) <= limit:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak_bytes(graph, pass_name, mid, dtype) <= limit:
            lo = mid
        else:
            hi = mid
    return lo
