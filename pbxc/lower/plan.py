"""The Jacobian accumulation plan: which order of products is cheapest for a model and batch.

Costs are multiply-adds per sample for applying one op's linearisation to one vector, plus a
fixed per-call overhead (Python and kernel launch) that does not scale with the batch. For a
chain, the matrix-chain dynamic program chooses among forward sweeps, reverse sweeps and any
bracketing in between; elementwise Jacobians count as diagonal scalings, never as matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.ops import ADAPTIVE_AVGPOOL, AVGPOOL, CONV_TRANSPOSED, CONVOLUTIONS, MAXPOOL, OpKind

# A kernel call costs about as much as this many multiply-adds, whatever the batch size.
CALL_OVERHEAD = 20_000
# Convolutions and pooling run as im2col and strided copies, several times slower per
# multiply-add than one plain GEMM (bench/passes.py, digits CNN). A constant linear op whose
# dense matrix is small may therefore be cheaper applied as that matrix.
GEMM_ADVANTAGE = 8
DENSE_LIMIT = 1 << 22  # entries of a dense op matrix worth caching
# entries of all of one model's cached dense matrices together (64 MiB in float32, 128 MiB in
# float64): the ops that gain most per entry are chosen first, the rest run their kernels
DENSE_TOTAL_LIMIT = 1 << 24
DENSABLE = frozenset({OpKind.AVGPOOL2D}) | CONVOLUTIONS


def size(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape)) if shape else 1


def vector_cost(node: OpNode, graph: ModelGraph) -> int:
    """Multiply-adds to apply the node's Jacobian (or its transpose) to one vector, per sample."""
    out = size(node.shape)
    ins = [size(graph.shape_of(i)) for i in node.inputs]
    kind = node.kind
    if kind is OpKind.LINEAR:
        return out * graph.shape_of(node.inputs[0])[-1]
    if kind in CONV_TRANSPOSED:
        weight = graph.param_shapes[node.param_key("weight") or ""]
        return ins[0] * size(weight[1:])  # each input scatters to out/groups x kernel outputs
    if kind in CONVOLUTIONS:
        weight = graph.param_shapes[node.param_key("weight") or ""]
        return out * size(weight[1:])  # each output sums in/groups x kernel products
    if kind in MAXPOOL | AVGPOOL:
        return out * int(np.prod(node.attr("kernel")))
    if kind in ADAPTIVE_AVGPOOL:   # one small 0/1 matrix per spatial axis, axis by axis
        shape = graph.shape_of(node.inputs[0])
        return sum(ins) * max(shape[1:]) + out * max((node.shape or (1, 1))[1:])
    if kind is OpKind.UPSAMPLE:   # two taps per output and axis
        return 2 * out * (len(node.shape or (1, 1)) - 1)
    if kind in (OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.PAD, OpKind.PRELU):
        return out + sum(ins)
    if kind in (OpKind.SQUEEZE, OpKind.UNSQUEEZE):
        return 0
    if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        return 3 * out
    if kind in (OpKind.GLOBAL_AVGPOOL, OpKind.ADD, OpKind.CONCAT):
        return sum(ins)
    if kind in (OpKind.FLATTEN, OpKind.RESHAPE, OpKind.INPUT):
        return 0
    if kind in (OpKind.ACTIVATION, OpKind.BATCHNORM, OpKind.NORMALIZE):
        return out
    # issue 12 (helper tensor): tensor ops
    if kind is OpKind.MATMUL:   # dA B + A dB: each output sums k products of each term
        a = graph.shape_of(node.inputs[0])
        return 2 * out * a[-1]
    if kind in (OpKind.TRANSPOSE, OpKind.SLICE, OpKind.SELECT):
        return out
    if kind in (OpKind.MEAN, OpKind.SUM):
        return sum(ins)
    raise UnsupportedOp(f"the jacobian plan has no cost rule for op '{kind.value}'", node.pos)


def dense_cost(node: OpNode, graph: ModelGraph) -> int | None:
    """Per-vector cost of applying a constant linear op as a cached dense matrix, or None."""
    if node.kind not in DENSABLE:
        return None
    entries = size(node.shape) * size(graph.shape_of(node.inputs[0]))
    if entries > DENSE_LIMIT:
        return None
    if node.kind in CONVOLUTIONS and _pointwise(node, graph):
        return entries   # its kernel is already one plain GEMM: no im2col to save
    return max(1, entries // GEMM_ADVANTAGE)


def _pointwise(node: OpNode, graph: ModelGraph) -> bool:
    """A 1x1 convolution with stride 1 and no padding: a plain GEMM over the channels."""
    weight = graph.param_shapes[node.param_key("weight") or ""]
    return (all(k == 1 for k in weight[2:]) and all(s == 1 for s in node.attr("stride"))
            and not any(node.attr("padding")))


def cheaper_dense(nodes: list[OpNode], graph: ModelGraph) -> frozenset[str]:
    """The constant linear ops (small convolutions, pooling) that every pass applies as their
    cached dense matrix, because that costs less than their native kernels; the most
    profitable first, within ``DENSE_TOTAL_LIMIT`` entries for the whole model."""
    gains = []
    for n in nodes:
        if n.kind in DENSABLE and (alt := dense_cost(n, graph)) is not None \
                and alt < (native := vector_cost(n, graph)):
            entries = size(n.shape) * size(graph.shape_of(n.inputs[0]))
            gains.append(((native - alt) / entries, entries, n.name))
    chosen, total = set(), 0
    for _, entries, name in sorted(gains, reverse=True):
        if total + entries <= DENSE_TOTAL_LIMIT:
            chosen.add(name)
            total += entries
    return frozenset(chosen)


def op_costs(nodes: list[OpNode], graph: ModelGraph) -> tuple[list[int], set[str]]:
    """Each op's cheapest per-vector cost, and which ops take their dense form for it."""
    dense = cheaper_dense(nodes, graph)
    costs = [dense_cost(n, graph) or 1 if n.name in dense else vector_cost(n, graph)
             for n in nodes]
    return costs, set(dense)


@dataclass
class ChainStep:
    """One step of a chain plan, in execution order."""

    action: str        # "dense" (materialise one op), "jvp", "vjp", "matmul"
    first: int         # the segment [first, last] of ops (0-based, inclusive)
    last: int
    flops: int         # per sample, multiply-adds


@dataclass
class JacobianPlan:
    mode: str                       # "forward", "reverse" or "chain"
    nodes: list[str]                # ops on the path from the input to the output, in order
    flops_per_sample: int
    calls: int
    batch: int
    alternatives: dict[str, int] = field(default_factory=dict)   # mode -> total cost
    steps: list[ChainStep] = field(default_factory=list)
    tree: object = None             # nested (i, j, how, children) for chain execution
    dense_ops: set[str] = field(default_factory=set)   # ops applied as cached dense matrices

    @property
    def total_cost(self) -> int:
        return self.flops_per_sample * self.batch + self.calls * CALL_OVERHEAD

    def explain(self) -> str:
        lines = [f"jacobian plan: {self.mode} accumulation over {len(self.nodes)} ops, "
                 f"batch {self.batch}",
                 f"  estimated {self.flops_per_sample * self.batch:,} multiply-adds "
                 f"({2 * self.flops_per_sample * self.batch / 1e9:.3f} GFLOP), "
                 f"{self.calls} kernel calls"]
        for mode, cost in sorted(self.alternatives.items(), key=lambda kv: kv[1]):
            chosen = "  <- chosen" if mode == self.mode else ""
            lines.append(f"  {mode:<8} cost {cost:>16,}{chosen}")
        if self.dense_ops:
            lines.append("  as cached dense matrices: " + ", ".join(sorted(self.dense_ops)))
        for step in self.steps:
            seg = self.nodes[step.first] if step.first == step.last else \
                f"{self.nodes[step.first]} .. {self.nodes[step.last]}"
            lines.append(f"    {step.action:<6} [{seg}]  {step.flops:,} cumulative per sample")
        return "\n".join(lines)


def path_nodes(graph: ModelGraph, wrt: str, output: str) -> list[OpNode]:
    """Ops that depend on ``wrt`` and feed ``output``, in topological order (wrt excluded)."""
    import networkx as nx

    downstream = nx.descendants(graph.digraph, wrt) | {wrt}
    upstream = nx.ancestors(graph.digraph, output) | {output}
    keep = (downstream & upstream) - {wrt}
    return [n for n in graph.topological() if n.name in keep]


def is_chain(graph: ModelGraph, wrt: str, nodes: list[OpNode]) -> bool:
    previous = wrt
    for node in nodes:
        if node.inputs != (previous,):
            return False
        previous = node.name
    return True


def plan_jacobian(graph: ModelGraph, wrt: str, output: str, batch: int,
                  mode: str = "auto") -> JacobianPlan:
    nodes = path_nodes(graph, wrt, output)
    costs, dense_ops = op_costs(nodes, graph)
    n_in, n_out = size(graph.shape_of(wrt)), size(graph.shape_of(output))
    calls = len(nodes)
    forward = JacobianPlan("forward", [n.name for n in nodes], n_in * sum(costs), calls, batch,
                           dense_ops=dense_ops)
    reverse = JacobianPlan("reverse", [n.name for n in nodes], n_out * sum(costs), calls, batch,
                           dense_ops=dense_ops)
    candidates = {"forward": forward, "reverse": reverse}
    if nodes and is_chain(graph, wrt, nodes):
        dims = [n_in] + [size(n.shape) for n in nodes]
        dense = [n.kind is OpKind.LINEAR for n in nodes]
        candidates["chain"] = _chain_plan([n.name for n in nodes], dims, costs, dense, batch)
        candidates["chain"].dense_ops = dense_ops
    alternatives = {m: p.total_cost for m, p in candidates.items()}
    if mode == "auto":
        # ties go to the plain sweeps, which need no dense intermediates
        chosen = min(candidates.values(), key=lambda p: (p.total_cost, p.mode == "chain"))
    elif mode in candidates:
        chosen = candidates[mode]
    else:
        raise UnsupportedOp(f"jacobian mode '{mode}' is not available here; choose from "
                            f"{sorted(candidates)} or 'auto'")
    chosen.alternatives = alternatives
    return chosen


def _chain_plan(names: list[str], dims: list[int], costs: list[int], dense: list[bool],
                batch: int) -> JacobianPlan:
    """Matrix-chain DP; op i maps R^dims[i] -> R^dims[i+1] at ``costs[i]`` per vector."""
    n = len(names)
    inf = float("inf")
    best = [[inf] * n for _ in range(n)]
    calls = [[0] * n for _ in range(n)]
    how: list[list[tuple[str, int]]] = [[("", -1)] * n for _ in range(n)]

    def total(flops: float, ncalls: int) -> float:
        return flops * batch + ncalls * CALL_OVERHEAD

    for i in range(n):
        best[i][i] = dims[i] * dims[i + 1] if dense[i] else min(dims[i], dims[i + 1]) * costs[i]
        calls[i][i] = 1
        how[i][i] = ("dense", -1)
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            options = [
                (best[i][j - 1] + dims[i] * costs[j], calls[i][j - 1] + 1, ("jvp", j)),
                (best[i + 1][j] + dims[j + 1] * costs[i], calls[i + 1][j] + 1, ("vjp", i)),
            ]
            for k in range(i, j):
                options.append((best[i][k] + best[k + 1][j] + dims[j + 1] * dims[k + 1] * dims[i],
                                calls[i][k] + calls[k + 1][j] + 1, ("matmul", k)))
            flops, ncalls, choice = min(options, key=lambda o: total(o[0], o[1]))
            best[i][j], calls[i][j], how[i][j] = flops, ncalls, choice

    steps: list[ChainStep] = []

    def build(i: int, j: int) -> tuple:
        action, k = how[i][j]
        if action == "dense":
            node: tuple = (i, j, "dense", ())
        elif action == "jvp":
            node = (i, j, "jvp", (build(i, j - 1),))
        elif action == "vjp":
            node = (i, j, "vjp", (build(i + 1, j),))
        else:
            node = (i, j, "matmul", (build(i, k), build(k + 1, j)))
        steps.append(ChainStep(action, i, j, int(best[i][j])))
        return node

    tree = build(0, n - 1)
    plan = JacobianPlan("chain", names, int(best[0][n - 1]), calls[0][n - 1], batch,
                        steps=steps, tree=tree)
    return plan
