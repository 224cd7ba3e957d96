"""The Hessian plan: forward second-order recursion or forward-over-reverse, and batch chunks.

Two ways to get second derivatives of an output with respect to an input of n entries
(specs/hessian.md):

* ``forward``: the second-order Algorithm 1. Every node carries its Jacobian J (n tangent
  rows) and its second-order tensor H (n^2 rows); affine ops apply their linear part to all
  n + n^2 rows, nonlinear ops add f''(z) (W J) (x) (W J). It yields the Hessians of every
  output (and of every intermediate node) at once, for about (n + n^2) sum(c) per sample.
* ``reverse`` (forward over reverse): push M tangent directions forward (M = n for the full
  Hessian, M = the number of vectors for a Hessian-vector product), then pull the target's
  cotangent back together with its tangent: about M sum(c) + K (1 + M) sum(c) per sample for
  K targets.

Here c is each op's per-vector cost (``pbxc.lower.plan.vector_cost``, the Jacobian's own cost
model, with its dense choices). The plan also sizes the batch chunks so that the tangent
blocks stay within a working-memory budget, and refuses a plan that cannot fit one sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pbxc.errors import InputError
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.lower.plan import CALL_OVERHEAD, op_costs, path_nodes, size

#: bytes of tangent blocks one chunk of the batch may hold (the result comes on top)
WORK_BYTES = 1 << 29
#: a plan needing more than this for one sample is refused before anything is allocated
SAMPLE_LIMIT_BYTES = 8 << 30

MODES = ("forward", "reverse")


@dataclass
class HessianPlan:
    mode: str                      # "forward" or "reverse"
    nodes: list[str]               # ops on the path, in order
    n_in: int                      # entries of the input
    directions: int                # M: tangent directions (n_in for a full Hessian)
    targets: int                   # K: outputs whose second derivatives are wanted
    flops_per_sample: int
    calls: int
    batch: int
    chunk: int                     # samples per chunk of the batch
    bytes_per_sample: int          # working memory of one sample (tangent blocks)
    alternatives: dict[str, int] = field(default_factory=dict)   # mode -> total cost
    dense_ops: set[str] = field(default_factory=set)
    curved: list[str] = field(default_factory=list)   # nodes with a nonzero f''

    @property
    def total_cost(self) -> int:
        return self.flops_per_sample * self.batch + self.calls * CALL_OVERHEAD

    def explain(self) -> str:
        what = ("Hessian-vector products" if self.directions != self.n_in
                else "full Hessians")
        lines = [f"hessian plan: {self.mode} ({'second-order forward recursion' if self.mode == 'forward' else 'forward over reverse'}) "
                 f"over {len(self.nodes)} ops, batch {self.batch}, {what}: "
                 f"{self.directions} direction(s), {self.targets} target(s), n = {self.n_in}",
                 f"  estimated {self.flops_per_sample * self.batch:,} multiply-adds "
                 f"({2 * self.flops_per_sample * self.batch / 1e9:.3f} GFLOP), "
                 f"{self.calls} kernel calls",
                 f"  working memory {self.bytes_per_sample / 2**20:.2f} MiB per sample; "
                 f"chunks of {self.chunk} sample(s)"]
        for mode, cost in sorted(self.alternatives.items(), key=lambda kv: kv[1]):
            chosen = "  <- chosen" if mode == self.mode else ""
            lines.append(f"  {mode:<8} cost {cost:>16,}{chosen}")
        if self.curved:
            lines.append("  second derivatives at: " + ", ".join(self.curved))
        if self.dense_ops:
            lines.append("  as cached dense matrices: " + ", ".join(sorted(self.dense_ops)))
        return "\n".join(lines)


def plan_hessian(graph: ModelGraph, wrt: str, output: str, batch: int, *, curved: set[str],
                 targets: int = 1, directions: int | None = None, itemsize: int = 8,
                 mode: str = "auto", intermediates: bool = False,
                 work_bytes: int | None = None) -> HessianPlan:
    """Choose how to compute second derivatives of ``targets`` outputs along ``directions``
    tangent directions (None: the full Hessian, n directions).

    ``curved`` names the nodes with a nonzero second derivative (the runtime's rule table
    says which). ``intermediates`` (every node's H) forces the forward recursion.
    """
    nodes = path_nodes(graph, wrt, output)
    costs, dense_ops = op_costs(nodes, graph)
    n = size(graph.shape_of(wrt))
    m = n if directions is None else directions
    total_c = sum(costs)
    curved_nodes = [node for node in nodes if node.name in curved]
    curved_size = sum(size(node.shape) for node in curved_nodes)
    sizes = [size(node.shape) for node in nodes] or [1]
    widest = max([*sizes, n])

    # forward: J rows (n) and H rows (n^2) through every op, the outer products at curved ops;
    # a Hessian-vector product contracts the full Hessian with the vectors afterwards
    fwd_flops = (n + n * n) * total_c + 3 * n * n * curved_size + (m * n * n if m != n else 0)
    fwd_calls = 2 * len(nodes) + len(curved_nodes)
    kept = sum(sizes) if intermediates else 3 * widest
    fwd_bytes = itemsize * (n + n * n) * kept
    # reverse: M tangents forward (kept at curved ops' inputs), then per target the cotangent
    # (1 row) and its tangent (M rows) back
    rev_flops = m * total_c + targets * ((1 + m) * total_c + 3 * m * curved_size)
    rev_calls = len(nodes) + 2 * targets * len(nodes)
    rev_bytes = itemsize * m * (curved_size + 3 * widest)

    candidates = {
        "forward": (fwd_flops, fwd_calls, fwd_bytes),
        "reverse": (rev_flops, rev_calls, rev_bytes),
    }
    alternatives = {k: f * batch + c * CALL_OVERHEAD for k, (f, c, _) in candidates.items()}
    if intermediates:
        if mode not in ("auto", "forward"):
            raise InputError("every intermediate H[l] comes with the forward recursion; "
                             f"mode '{mode}' cannot give them")
        chosen = "forward"
    elif mode == "auto":
        chosen = min(MODES, key=lambda k: alternatives[k])
    elif mode in MODES:
        chosen = mode
    else:
        raise InputError(f"hessian mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    flops, calls, per_sample = candidates[chosen]
    if per_sample > SAMPLE_LIMIT_BYTES:
        raise InputError(
            f"the {chosen} hessian plan needs {per_sample / 2**30:.1f} GiB of tangent blocks "
            f"for one sample (n = {n} inputs{', every intermediate kept' if intermediates else ''}); "
            "use mode 'reverse' or hvp() for large inputs")
    budget = WORK_BYTES if work_bytes is None else work_bytes
    chunk = max(1, min(batch, budget // max(per_sample, 1)))
    return HessianPlan(chosen, [node.name for node in nodes], n, m, targets, int(flops), calls,
                       batch, int(chunk), int(per_sample), alternatives, set(dense_ops),
                       [node.name for node in curved_nodes])


def curved_nodes(nodes: list[OpNode], curved_kinds: frozenset) -> set[str]:
    """The names of the nodes whose op kind has a nonzero second derivative."""
    return {node.name for node in nodes if node.kind in curved_kinds}
