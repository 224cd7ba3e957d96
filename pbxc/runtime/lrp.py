"""Layer-wise relevance propagation on the NumPy backend, with a conservation ledger.

``lrp(model, inputs, target, composite, rule, overrides, output)`` starts from the target
logit f_c(x) (zeros elsewhere) and walks the graph backwards. Layers with weights (linear,
conv), parameter-free linear maps (avgpool, global_avgpool, add) and per-channel affine maps
(batchnorm, normalize) run a :class:`~pbxc.runtime.lrp_rules.Rule` on one engine: forward
z with modified parameters, s = R / stab(z), backward c = rho(W)^T s through the same
transposed kernels as the reverse-mode Jacobian, R = a c. Other ops route relevance: max
pooling to each window's argmax (the first maximum in row-major order, as PyTorch),
flatten/reshape by reshaping, concat by splitting (a constant operand's block, a class
token, is absorbed and booked as the concat's bias), elementwise activations unchanged.
A softmax or log-softmax output is skipped: relevance starts at its input, the logits.

Every layer's ledger entry records the relevance it received, what it passed on, and what its
bias and its stabiliser absorbed; ``sum(R_in) + bias + stabiliser == R_out`` up to rounding,
per layer and for the whole network. See ``specs/lrp.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import is_linear_form, kernel_attrs, kernel_base
from pbxc.ops import INDEXING, LRP_COMPOSITES, MAXPOOL, REDUCTIONS, SHAPE_ONLY, OpKind
from pbxc.runtime.jacobian import dense_matrix, linearize, release
from pbxc.runtime.lrp_rules import (
    COMPOSITES,
    LRP0,
    RULE_KINDS,
    RULES_BY_NAME,
    WEIGHTED_KINDS,
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    LrpConfigError,
    Norm,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
    get_composite,
    register_composite,
)

Array = np.ndarray

__all__ = [
    "COMPOSITES", "LRP0", "AlphaBeta", "Composite", "Epsilon", "Flat", "Gamma", "LayerLedger",
    "Ledger", "LrpConfigError", "LrpResult", "Norm", "Rule", "WSquare", "ZBox", "ZPlus",
    "get_composite", "lrp", "register_composite",
]

PASS = "lrp"


# ---------------------------------------------------------------- the ledger

def _per_sample(a: Array) -> Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _relative(parts_in: Array, absorbed: list[Array], out: Array,
              magnitude: Array | None = None) -> Array:
    residual = parts_in + sum(absorbed) - out
    scale = np.maximum(np.abs(out), np.abs(parts_in) + sum(np.abs(a) for a in absorbed))
    if magnitude is not None:
        scale = np.maximum(scale, magnitude)
    return np.abs(residual) / np.where(scale > 0, scale, 1.0)


@dataclass
class LayerLedger:
    """One node's relevance budget, per sample (each field is shaped (B,)).

    ``relevance_out``: relevance at the node's output (received from above);
    ``relevance_in``: total relevance handed to its inputs; ``bias``: absorbed by the bias
    terms, sum_g coef_g sum_k s_gk rho(b)_k; ``stabiliser``: absorbed by the epsilon
    stabiliser, sum_g coef_g sum_k (R_k - s_gk z_gk); ``magnitude``: sum_k |R_k| +
    sum_j |R_j|, the size of the sums whose rounding the check allows for.
    """

    node: str
    op: str
    rule: str
    relevance_out: Array
    relevance_in: Array
    bias: Array
    stabiliser: Array
    magnitude: Array | None = None

    @property
    def absorbed(self) -> Array:
        return self.bias + self.stabiliser

    @property
    def conservation_error(self) -> Array:
        """|R_in + bias + stabiliser - R_out| / max(|R_out|, |R_in| + |bias| + |stabiliser|,
        magnitude)."""
        return _relative(self.relevance_in, [self.bias, self.stabiliser], self.relevance_out,
                         self.magnitude)


@dataclass
class Ledger:
    """Per-layer entries (reverse topological order) and the network's total budget."""

    layers: dict[str, LayerLedger]
    start: Array        # (B,) the starting relevance f_c(x)
    inputs: Array       # (B,) the relevance that reached the model inputs

    @property
    def bias(self) -> Array:
        return sum((e.bias for e in self.layers.values()), np.zeros_like(self.start))

    @property
    def stabiliser(self) -> Array:
        return sum((e.stabiliser for e in self.layers.values()), np.zeros_like(self.start))

    @property
    def conservation_error(self) -> Array:
        """Overall, per sample: |R_inputs + absorbed - f_c(x)| relative, as per layer."""
        return _relative(self.inputs, [self.bias, self.stabiliser], self.start)

    @property
    def max_layer_error(self) -> float:
        return max((float(e.conservation_error.max()) for e in self.layers.values()),
                   default=0.0)

    def table(self) -> str:
        """A plain-text summary, summed over the batch."""
        rows = [f"{'node':<12} {'op':<15} {'rule':<34} {'R_out':>12} {'R_in':>12} "
                f"{'bias':>12} {'stabiliser':>12} {'rel.err':>9}"]
        for e in self.layers.values():
            rows.append(f"{e.node:<12} {e.op:<15} {e.rule:<34} {e.relevance_out.sum():>12.5g} "
                        f"{e.relevance_in.sum():>12.5g} {e.bias.sum():>12.5g} "
                        f"{e.stabiliser.sum():>12.5g} {e.conservation_error.max():>9.2g}")
        rows.append(f"total: start {self.start.sum():.6g} = inputs {self.inputs.sum():.6g} + "
                    f"bias {self.bias.sum():.6g} + stabiliser {self.stabiliser.sum():.6g} "
                    f"(rel. error {self.conservation_error.max():.2g})")
        return "\n".join(rows)


@dataclass
class LrpResult:
    """``relevance``: input name -> (B, *input_shape); ``outputs``: forward outputs by name;
    ``targets``: (B,) flat indices of the explained logit; ``ledger``: the conservation
    ledger; ``rules``: node -> rule used; ``maxpool_ties``: max-pool node -> number of
    windows that received nonzero relevance while their maximum was attained more than once
    (relevance went to the first maximum in row-major order)."""

    relevance: dict[str, Array]
    outputs: dict[str, Array]
    targets: Array
    ledger: Ledger
    start: str
    rules: dict[str, str] = field(default_factory=dict)
    maxpool_ties: dict[str, int] = field(default_factory=dict)

    @property
    def conservation_error(self) -> Array:
        return self.ledger.conservation_error

    def ledger_arrays(self) -> dict[str, Array]:
        """Per-sample ledger totals, for saving beside the attributions."""
        ledger = self.ledger
        return {"relevance_start": ledger.start, "relevance_inputs": ledger.inputs,
                "absorbed_bias": ledger.bias, "absorbed_stabiliser": ledger.stabiliser,
                "conservation_error": ledger.conservation_error}


# ---------------------------------------------------------------- routing ops

def _pool_geometry(node: OpNode) -> dict[str, Any]:
    attrs = kernel_attrs(node)
    return {k: attrs[k] for k in ("kernel", "stride", "padding")}


def _route(node: OpNode, xs: list[Array], out: Array, relevance: Array) -> list[Array]:
    if node.kind in SHAPE_ONLY:
        return [relevance.reshape(xs[0].shape)]
    if node.kind in (OpKind.ACTIVATION, OpKind.PRELU):
        return [relevance]
    if node.kind is OpKind.MUL:   # a product of two values: K.product_relevance's rule
        return K.product_relevance(relevance, xs, kernel_attrs(node)["lrp"])  # (policies: lrp())
    raise unsupported(node)


# ---- issue 12 (helper tensor): matmul of two values, indexing, reductions
TENSOR_LRP = INDEXING | REDUCTIONS | frozenset({OpKind.MATMUL})
#: the default stabiliser of the product and reduction rules (LXT's default for matmul_fn
#: and mean); a composite's ``epsilon`` replaces it (Composite.epsilon)
TENSOR_EPSILON = 1e-6


@dataclass(frozen=True)
class TensorSetting:
    """How the rules that are not a Rule on the engine run under a composite: ``policy``,
    the composite's ``products`` ("" keeps each op's own rule); ``epsilon`` and
    ``placement``, the stabiliser of matmul and mean/sum."""

    policy: str = ""
    epsilon: float = TENSOR_EPSILON
    placement: str = "sign"

    def describe(self, rule: str) -> str:
        return f"{rule}(epsilon={self.epsilon:g}, placement={self.placement})"


def tensor_relevance(node: OpNode, xs: list[Array], out: Array, relevance: Array,
                     mode: str = "uniform", setting: TensorSetting | None = None
                     ) -> tuple[list[Array], Array, str]:
    """Relevance through a tensor op, what its stabiliser absorbed (per sample) and the label.

    matmul: AttnLRP's uniform epsilon rule (Achtibat et al. 2024, Prop. 3.3), or CP-LRP's
    ``constant0``/``constant1`` (K.matmul_relevance); mean/sum: the epsilon rule of a linear
    layer (Bach et al. 2015, eq. 58; the weights 1/n cancel); both with the composite's
    stabiliser (``setting``). transpose/slice/select route relevance (slice and select
    scatter it back into zeros)."""
    attrs = kernel_attrs(node)
    setting = setting or TensorSetting()
    zero = np.zeros(relevance.shape[0], dtype=relevance.dtype)
    if node.kind is OpKind.MATMUL:
        ra, rb, stab = K.matmul_relevance(relevance, xs, out, mode, setting.epsilon,
                                          setting.placement)
        return [ra, rb], stab, setting.describe(f"matmul-{mode}")
    if node.kind in REDUCTIONS:
        r, stab = K.reduction_relevance(relevance, xs, epsilon=setting.epsilon,
                                        placement=setting.placement, **attrs)
        return [r], stab, setting.describe("epsilon")
    routes: dict[OpKind, Callable[..., list[Array]]] = {
        OpKind.TRANSPOSE: K.transpose_relevance, OpKind.SLICE: K.slice_relevance,
        OpKind.SELECT: K.select_relevance}
    fn = routes[node.kind]
    return fn(relevance, xs, **attrs), zero, "route"


# ---- issue 12: the composites' treatment of products and the softmax rule (AttnLRP, CP-LRP)
def tensor_setting(composite: Composite | str | None, rule: Rule | None,
                   composite_args: Mapping[str, object] | None) -> TensorSetting:
    """The product policy and the tensor ops' stabiliser of the composite in use: a single
    ``rule`` gives its own epsilon and placement (and no policy); no composite is "epsilon"'s
    default."""
    if rule is not None:
        return TensorSetting("", rule.epsilon, rule.placement)
    if composite is None:
        return TensorSetting()
    if isinstance(composite, str):
        names = {"low", "high"} & set(composite_args or {})
        kwargs = {k: v for k, v in (composite_args or {}).items() if k not in names}
        try:
            composite = get_composite(composite, **kwargs)
        except (TypeError, LrpConfigError):   # reported by resolve_rules
            return TensorSetting()
    if not isinstance(composite, Composite):
        return TensorSetting()
    return TensorSetting(composite.products, composite.epsilon, composite.placement)


def _from_softmax(model: Any, name: str) -> bool:
    """Whether the value is a softmax's output, possibly reshaped, transposed or sliced
    (the attention weights of CP-LRP)."""
    node = model.graph.node(name)
    while node.kind in SHAPE_ONLY | INDEXING and node.inputs:
        node = model.graph.node(node.inputs[0])
    return node.kind is OpKind.SOFTMAX


def product_modes(model: Any, policy: str) -> dict[str, str]:
    """The relevance rule of every product of two values under the composite's policy:
    matmul "uniform" / "constant0" / "constant1" (K.matmul_relevance), mul "uniform" or
    "constant0" / "constant1" (the attention weights as constants, CP-LRP)."""
    modes: dict[str, str] = {}
    if not policy:
        return modes
    for node in model.nodes:
        if node.kind not in (OpKind.MATMUL, OpKind.MUL) or len(node.inputs) != 2:
            continue
        mode = "uniform"
        if policy == "cp":
            constant = [_from_softmax(model, i) for i in node.inputs]
            if constant[0] != constant[1]:
                mode = "constant0" if constant[0] else "constant1"
        modes[node.name] = mode
    return modes


def product_relevance_mode(relevance: Array, xs: list[Array], mode: str) -> list[Array]:
    """Relevance through an elementwise product of two values under a composite's mode
    (K.product_mode_relevance): "uniform" halves it (AttnLRP, Prop. 3.2); "constant0" /
    "constant1" hands all of it to the other factor (CP-LRP)."""
    return K.product_mode_relevance(relevance, xs, mode)


def softmax_relevance(relevance: Array, x: Array, s: Array, axis: int) -> tuple[Array, Array]:
    """AttnLRP's rule for an interior softmax (Achtibat et al., ICML 2024, Prop. 3.1,
    eq. 13): R_in_i = x_i (R_i - s_i sum_j R_j) along ``axis`` (of the whole array, batch
    axis included), x the logits and s the softmax; K.softmax_relevance. The rest,
    sum R - sum R_in per sample, is the relevance the softmax's linearisation absorbs in its
    bias term (the paper's b = s - J x), which the ledger records as ``bias``."""
    axis = axis % relevance.ndim
    (r_in,), absorbed = K.softmax_relevance(relevance, [x], s, axis - 1)
    return r_in, absorbed


def unsupported(node: OpNode, why: str = "") -> UnsupportedOp:
    return UnsupportedOp(f"the {PASS} pass has no rule for op '{node.kind.value}' "
                         f"(value '{node.name}'){why}", node.pos)


ROUTED = SHAPE_ONLY | MAXPOOL | frozenset({OpKind.ACTIVATION, OpKind.PRELU, OpKind.CONCAT,
                                         OpKind.MUL})


def takes_rule(node: OpNode) -> bool:
    """Whether the engine runs a rule on the node (a product of two values routes)."""
    return node.kind in RULE_KINDS and (node.kind is not OpKind.MUL or is_linear_form(node))
OUTPUT_ONLY = frozenset({OpKind.SOFTMAX, OpKind.LOG_SOFTMAX})


# ---------------------------------------------------------------- rules per node

def _first_weighted(model: Any) -> str | None:
    return next((n.name for n in model.nodes if n.kind in WEIGHTED_KINDS), None)


def resolve_rules(model: Any, values: Mapping[str, Array], composite: Composite | str | None,
                  rule: Rule | None, overrides: Mapping[str, Rule] | None,
                  composite_args: Mapping[str, float] | None = None) -> dict[str, Rule]:
    """The rule of every node the engine runs: overrides > rule > composite > "epsilon".

    An override names a node, or a statement of the .pbx: then it sets the rule of every op
    of that statement that takes one (``h = relu(linear(x, @w))``: ``h`` -> ``h/linear``).
    ``composite_args`` are the parameters of a composite given by name.
    """
    if rule is not None and composite is not None:
        raise LrpConfigError("give either rule= (one rule for every layer) or composite=, "
                             "not both")
    if rule is not None and not isinstance(rule, Rule):
        raise LrpConfigError(f"rule must be a pbxc LRP Rule, got {rule!r}")
    first = _first_weighted(model)
    if isinstance(composite, str):
        kwargs: dict[str, object] = dict(composite_args or {})
        if composite == "epsilon-gamma-box" and first is not None and not (
                {"low", "high"} <= set(kwargs)):
            # bounds from the batch itself: the range of the first weighted layer's input
            data = values[model.graph.node(first).inputs[0]]
            kwargs = {"low": float(data.min()), "high": float(data.max()), **kwargs}
        composite = get_composite(composite, **kwargs)
    elif composite is None:
        composite = get_composite("epsilon")
    elif not isinstance(composite, Composite):
        raise LrpConfigError(f"composite must be a name or a Composite, got {composite!r}")
    rules: dict[str, Rule] = {}
    for node in model.nodes:
        if takes_rule(node):
            rules[node.name] = rule if rule is not None else composite.rule_for(
                node.kind, node.name == first)
    for name, r in (overrides or {}).items():
        if not isinstance(r, Rule):
            raise LrpConfigError(f"override for '{name}' must be a Rule, got {r!r}")
        targets = [name] if name in rules else [
            n.name for n in model.graph.statement_nodes(name) if n.name in rules]
        if not targets:
            kind = model.graph.node(name).kind.value if name in model.graph.digraph else None
            what = f"a '{kind}' op, which routes relevance without a rule" if kind else \
                "not a value of this model"
            raise LrpConfigError(f"cannot override the LRP rule of '{name}': it is {what}")
        for target in targets:
            rules[target] = r
    return rules


def file_rules(block: Any) -> tuple[str | None, dict[str, float], dict[str, Rule]]:
    """The composite (name and parameters) and the overrides of a checked ``lrp`` block."""
    composite = block.composites[0] if block.composites else None
    name = composite.name if composite is not None else None
    args = named_args(composite.args, LRP_COMPOSITES[composite.name]) if composite else {}
    overrides = {}
    for assign in block.assignments:
        cls, params = RULES_BY_NAME[assign.rule]
        try:
            overrides[assign.target] = cls(**named_args(assign.args, params))  # type: ignore[arg-type]
        except LrpConfigError as exc:   # a value the rule rejects, e.g. alpha - beta != 1
            raise LrpConfigError(exc.message, assign.rule_pos) from None
    return name, args, overrides


def named_args(args: Any, params: tuple[str, ...]) -> dict[str, float]:
    """Positional and ``name=`` parameters (checked by the graph stage) by name."""
    return {a.name if a.name is not None else params[i]: a.value for i, a in enumerate(args)}


# ---------------------------------------------------------------- the pass

def lrp(model: Any, inputs: Any, target: Any = None, composite: Composite | str | None = None,
        rule: Rule | None = None, overrides: Mapping[str, Rule] | None = None,
        output: str | None = None, composite_args: Mapping[str, float] | None = None
        ) -> LrpResult:
    """Layer-wise relevance propagation of the target logit back to the model inputs.

    ``inputs``: a batch array (single-input models) or a dict by input name. ``target``: None
    (the predicted class), a class index, or one index per sample. ``composite``: a registered
    name ("epsilon" by default, "lrp0", "epsilon-plus", "epsilon-gamma-box") or a
    :class:`Composite`; ``rule``: one rule for every layer instead; ``overrides``: node name ->
    rule. ``output``: which model output (default the first); a softmax/log-softmax output
    starts relevance at its input.
    """
    prepared = model.prepare_inputs(inputs)
    output = output or model.output_names[0]
    if output not in model.graph.digraph:
        raise LrpConfigError(f"model '{model.name}' has no value '{output}'")
    out_node = model.graph.node(output)
    start = out_node.inputs[0] if out_node.kind in OUTPUT_ONLY else output
    # the memory plan: values the rules read (a, z) and argmax; the rest is released in the
    # forward pass, and each kept value after the last rule that reads it
    nodes = list(model.nodes)
    plan = model.pass_plan(PASS, start)
    keep, remat, schedule = frozenset(model.output_names) | {start}, plan.recompute, plan.schedule
    lin = linearize(model, prepared, derivatives=False, keep=plan.keep)
    values = lin.values

    def value(name: str) -> Array:
        if name in remat:
            node = model.graph.node(name)
            return model.activations(name, values[node.inputs[0]])
        return values[name]

    logits = values[start]
    batch = logits.shape[0]
    targets = model.targets(logits, target)
    flat = logits.reshape(batch, -1)
    seed = np.zeros_like(flat)
    rows = np.arange(batch)
    seed[rows, targets] = flat[rows, targets]
    relevance: dict[str, Array] = {start: seed.reshape(logits.shape)}
    first = _first_weighted(model)
    data = {} if first is None else {   # the box bounds of epsilon-gamma-box read this input
        i: value(i) for i in model.graph.node(first).inputs}
    rules = resolve_rules(model, data, composite, rule, overrides, composite_args)
    setting = tensor_setting(composite, rule, composite_args)
    modes = product_modes(model, setting.policy)
    del data
    layers: dict[str, LayerLedger] = {}
    ties: dict[str, int] = {}
    # per-sample sums of relevance arrays handed on unchanged (routed ops), by destination
    known: dict[str, tuple[Array, Array, Array]] = {}
    dense_ops: frozenset[str] = getattr(model, "dense_ops", frozenset())
    fused = getattr(model, "fused", None)
    if fused is not None:
        fused.forget()

    def dense_for(node: OpNode) -> Array | None:
        if node.name not in dense_ops:
            return None
        return dense_matrix(model, node, values[node.name].dtype)

    def sums(r: Array, name: str | None = None) -> tuple[Array, Array]:
        """Per-sample sum and absolute sum, once per array (routed ops pass theirs on)."""
        hit = known.pop(name, None) if name is not None else None
        if hit is None or hit[0] is not r:
            both = fused.sums(r) if fused is not None else None   # one pass, float64
            if both is None:
                both = _per_sample(r), _per_sample(np.abs(r))
            hit = (r, *both)
        return hit[1], hit[2]

    for node in reversed(nodes):
        r_out = relevance.pop(node.name, None) if node.kind is not OpKind.INPUT else None
        if r_out is None:
            continue
        # the ops whose rules read their inputs get them through value(): a cheap activation's
        # output the memory plan recomputes (memory.recomputed) is not in ``values``
        reads_inputs = node.kind in RULE_KINDS or node.kind in MAXPOOL or \
            node.kind in TENSOR_LRP or node.kind is OpKind.SOFTMAX
        xs = [value(i) if reads_inputs else values[i] for i in node.inputs]
        zero = np.zeros(batch, dtype=r_out.dtype)
        bias, stab = zero, zero
        label = "route"
        if node.name in rules:
            node_rule = rules[node.name]
            label = node_rule.describe()
            r_in, bias, stab = K.lrp_rule_step(kernel_base(node), r_out, xs,
                                               model.params[node.name],
                                               node_rule.groups_data(), node_rule.epsilon,
                                               node_rule.placement, values[node.name],
                                               dense_for(node), fused,
                                               **kernel_attrs(node))
        elif node.kind in MAXPOOL and kernel_base(node) == "maxpool2d":
            assert node.name in lin.local
            r0, ties[node.name] = K.lrp_maxpool(r_out, xs[0], lin.local[node.name],
                                                **_pool_geometry(node))
            r_in, label = [r0], "winner-take-all"
        elif node.kind in MAXPOOL:   # 1-d, 3-d, ceil_mode, dilation
            r0, ties[node.name] = K.maxpool_relevance(r_out, xs[0], lin.local[node.name],
                                                      **kernel_attrs(node))
            r_in, label = [r0], "winner-take-all"
        elif node.kind in TENSOR_LRP:   # issue 12 (helper tensor)
            r_in, stab, label = tensor_relevance(node, xs, values[node.name], r_out,
                                                 modes.get(node.name, "uniform"), setting)
        elif node.kind is OpKind.MUL and node.name in modes:   # a composite's product rule
            mode = modes[node.name]
            r_in, label = product_relevance_mode(r_out, xs, mode), f"product-{mode}"
        elif node.kind is OpKind.SOFTMAX:   # an interior softmax (attention weights)
            r_in, bias = K.softmax_relevance(r_out, xs, values[node.name],
                                             **kernel_attrs(node))
            label = "attnlrp-softmax"
        elif node.kind is OpKind.CONCAT:   # values route; constant operands absorb (bias)
            r_in, bias = K.concat_relevance(r_out, xs, model.params[node.name],
                                            **kernel_attrs(node))
            if len(r_in) < len(kernel_attrs(node)["slots"]):
                label = "route (constants: bias)"
        elif node.kind in ROUTED:
            r_in = _route(node, xs, values[node.name], r_out)
        elif node.kind in OUTPUT_ONLY:
            raise unsupported(node, "; log_softmax is supported only as the explained "
                                    "output, where relevance starts at the logits")
        else:
            raise unsupported(node)
        out_sum, out_abs = sums(r_out, node.name)
        in_sums = [(out_sum, out_abs) if r is r_out else sums(r) for r in r_in]
        layers[node.name] = LayerLedger(node.name, node.kind.value, label, out_sum,
                                        sum((t for t, _ in in_sums), zero), bias, stab,
                                        out_abs + sum((a for _, a in in_sums), zero))
        for name, r_i, (t, a) in zip(node.inputs, r_in, in_sums):
            if name in relevance:
                known.pop(name, None)
                relevance[name] = relevance[name] + r_i
            else:
                relevance[name] = r_i
                known[name] = (r_i, t, a)
        del r_out, r_in, xs
        release(lin, schedule, node.name, keep)
    if fused is not None:
        fused.forget()
    result = {name: relevance.get(name, np.zeros_like(x)) for name, x in prepared.items()}
    reached = sum((_per_sample(r) for r in result.values()), np.zeros(batch, logits.dtype))
    ledger = Ledger(layers, _per_sample(seed), reached)
    outputs = {name: values[name] for name in model.output_names}
    return LrpResult(result, outputs, targets, ledger, start,
                     {name: r.describe() for name, r in rules.items()}, ties)
