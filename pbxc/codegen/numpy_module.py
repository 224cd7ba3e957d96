"""Render a model as one standalone NumPy module: straight-line code for every pass.

The module holds, in order: the op kernels (``numpy_kernels``, copied verbatim), the
activation functions printed from sympy, the bound weights' loader, and one function per pass
(forward, gradient, input_x_gradient, jacobian, dfd) whose body calls the kernels node by
node, each call preceded by the .pbx line it comes from. It imports only numpy.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from pbxc.codegen import numpy_kernels
from pbxc.codegen.escape import identifier, py_literal, py_text
from pbxc.codegen.kernels import FAMILIES
from pbxc.codegen.kernels import conv as conv_kernels
from pbxc.errors import PbxError
from pbxc.errors import source_lines as split_source_lines
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.lower.calls import dfd_by_vjp, is_linear_form, kernel_attrs, kernel_base, kernel_name
from pbxc.ops import AFFINE, INDEXING, MAXPOOL, REDUCTIONS, SHAPE_ONLY, OpKind

#: ops whose second derivative is zero: the Hessian pass applies their VJP to the cotangent's
#: tangent (the runtime's deflinear rules, pbxc.runtime.hessian); max pooling is piecewise linear
HESSIAN_LINEAR = frozenset(AFFINE | SHAPE_ONLY | MAXPOOL | {OpKind.ADD, OpKind.CONCAT,
                                                             OpKind.PRELU}
                           | INDEXING | REDUCTIONS)  # issue 12 (helper tensor)

#: the stabiliser of the tensor ops' LRP rules (issue 12), as pbxc.runtime.lrp.TENSOR_EPSILON
TENSOR_EPSILON = 1e-6

#: the kernels' import of the numeric prelude, which the generated module holds verbatim
PRELUDE_IMPORT = re.compile(r"^from pbxc\.symbolic\.numeric import .*\n", re.M)
#: the kernels' imports of the op families, whose sources surround the kernels' verbatim
FAMILY_IMPORT = re.compile(r"^from pbxc\.codegen\.kernels\.\w+ import .*\n", re.M)


def kernel_source() -> str:
    """numpy_kernels' source and every family's listed in pbxc.codegen.kernels.FAMILIES, as one
    module text (the convolution family, which numpy_kernels uses at import, precedes it in
    the generated module)."""
    parts = [FAMILY_IMPORT.sub("", PRELUDE_IMPORT.sub("", inspect.getsource(numpy_kernels)))]
    for family in FAMILIES:
        module = importlib.import_module(f"pbxc.codegen.kernels.{family}")
        body = inspect.getsource(module).replace("import numpy as np\n", "", 1)
        parts.append(f"# ---- op family (pbxc.codegen.kernels.{family}) ----\n{body}")
    return "\n".join(parts)


def var(name: str, prefix: str = "v") -> str:
    """The Python identifier of a graph value name: ``h1`` -> ``v_h1``, ``h1/linear`` ->
    ``v_h1__linear``, ``h1__linear`` -> ``v0h1_u_ulinear``. Injective (see :func:`pbxc.codegen.escape.identifier`), so two graph
    names never share a variable; ``prefix`` is letters only (which pass the value is of)."""
    return prefix + identifier(name)


def check_symbols(graph: ModelGraph) -> None:
    """Refuse, rather than miscompile, a graph two of whose names would share a variable
    (impossible by construction of :func:`var`; the check keeps it so)."""
    seen: dict[str, str] = {}
    for name in graph.digraph.nodes:
        ident = var(name)
        if not ident.isidentifier() or seen.setdefault(ident, name) != name:
            raise PbxError(f"values {seen.get(ident)!r} and {name!r} would share the generated "
                           f"variable {ident!r}")


def source_lines(source_text: str | None) -> dict[int, str]:
    """The .pbx lines by number, split where the grammar's positions count lines
    (:func:`pbxc.errors.source_lines`)."""
    return dict(enumerate(split_source_lines(source_text or ""), start=1))


def _attrs(node: OpNode) -> str:
    return "".join(f", {k}={py_literal(v)}" for k, v in kernel_attrs(node).items())


def _comment(node: OpNode, source_lines: Mapping[int, str]) -> str:
    text = source_lines.get(node.pos.line, "").strip()
    return f"    # {py_text(f'{node.pos.file}:{node.pos.line}: {text}', 100)}"


@dataclass(frozen=True)
class LrpPlan:
    """What the generated ``lrp`` needs: where relevance starts, each composite's rules as
    data (node -> (groups, epsilon, placement)), and whose input range bounds z^B rules."""

    start: str
    rules: Mapping[str, Mapping[str, tuple[Any, float, str]]]
    bounds_from: str | None
    # per composite, the nodes whose z^B bounds are fixed numbers (from the .pbx lrp block)
    fixed_bounds: Mapping[str, frozenset[str]] = field(default_factory=dict)
    default: str = "epsilon"
    # composites the generated module does not implement (the transformer composites, whose
    # product and softmax rules run in pbxc only): name -> why; asking for one raises
    refused: Mapping[str, str] = field(default_factory=dict)


def _print_rules(rules: Mapping[str, tuple[Any, float, str]],
                 fixed: frozenset[str] = frozenset()) -> str:
    """Rules as Python literals; z^B bounds (const modifiers) print as ``low`` / ``high``
    (the caller's, by default the batch range), except on ``fixed`` nodes: numbers."""
    consts = iter(["low", "high"] * 10_000)

    def lit(x: Any, node: str = "") -> str:
        if isinstance(x, tuple) and len(x) == 2 and x[0] == "const":
            return (f"('const', {py_literal(float(x[1]))})" if node in fixed
                    else f"('const', {next(consts)})")
        if isinstance(x, tuple):
            inner = ", ".join(lit(v, node) for v in x)
            return f"({inner},)" if len(x) == 1 else f"({inner})"
        return py_literal(x)

    rows = [f"        {py_literal(name)}: {lit(rule, name)}," for name, rule in rules.items()]
    return "{\n" + "\n".join(rows) + "\n    }"


@dataclass(frozen=True)
class EntryCalls:
    """How a generated module's entry points reach its runtime: the lines that differ between
    the NumPy module and the CUDA launcher, whose entry points are otherwise the same."""

    prepare: str          # -> P, xs (and the CUDA context C)
    forward: str          # -> E, every value by name
    targets: str          # -> c, the target class per sample
    backward_params: str  # _lrp_backward's parameters before the relevance
    array_module: str     # where zeros_like and arange come from
    bad_argument: str     # the exception a wrong composite raises


NUMPY_ENTRY = EntryCalls("P, xs = _prepare(x, dtype)", "_forward(*xs, P)",
                         "_targets(logits, target)", "E, P", "np", "ValueError")


def render_lrp_entry(plan: LrpPlan, input_name: str,
                     lrp_body: Callable[[str, set[str]], list[str]], calls: EntryCalls
                     ) -> list[str]:
    """The generated module's ``_lrp_rules``, ``_lrp_backward`` and ``lrp`` (the ledger)."""
    names = sorted({n for rules in plan.rules.values() for n in rules})
    out = ["", "def _lrp_rules(composite, low, high):",
           '    """Each node\'s rule as (groups, epsilon, placement); see lrp_rule_step."""']
    for composite, why in plan.refused.items():
        out.append(f"    if composite == {py_literal(composite)}:")
        out.append(f"        raise {calls.bad_argument}({py_literal(why)})")
    for composite, rules in plan.rules.items():
        out.append(f"    if composite == {py_literal(composite)}:")
        fixed = plan.fixed_bounds.get(composite, frozenset())
        out.append(f"        return {_print_rules(rules, fixed)}".replace("\n", "\n    "))
    out.append(f"    raise {calls.bad_argument}('unknown composite %r; compiled: %s' % ("
               f"composite, {py_literal(', '.join(sorted(plan.rules)))}))")
    relevance = var(plan.start, 'R')
    out += ["", "", f"def _lrp_backward({calls.backward_params}, {relevance}, rules):",
            *lrp_body(plan.start, set(names)),
            f"    return {var(input_name, 'R')}, bias, stabiliser", "", ""]
    bounds = (f"    if low is None:\n        low = float(E[{var(plan.bounds_from, 'v')!r}]"
              f".min())\n    if high is None:\n        high = float(E["
              f"{var(plan.bounds_from, 'v')!r}].max())") if plan.bounds_from else ""
    xp = calls.array_module
    out += [
        f"def lrp(x, target=None, composite={py_literal(plan.default)}, low=None, high=None, "
        "dtype=None):",
        '    """Layer-wise relevance propagation of the target logit (predicted by default).',
        "",
        "    Returns (relevance shaped like x, ledger) with ledger = {'start': f_c(x),",
        "    'inputs': relevance reaching x, 'bias': absorbed by biases, 'stabiliser':",
        "    absorbed by the stabiliser}, per sample. z^B bounds default to the batch's range.",
        "    Composites: " + py_text(", ".join(sorted(plan.rules)), 400)
        + ("; 'model' is the .pbx lrp block." if "model" in plan.rules else "."),
        '    """',
        f"    {calls.prepare}",
        f"    E = {calls.forward}",
        f"    logits = E[{var(plan.start)!r}]",
        f"    c = {calls.targets}",
        "    flat = logits.reshape(len(logits), -1)",
        f"    rows = {xp}.arange(len(c))",
        f"    seed = {xp}.zeros_like(flat)",
        "    seed[rows, c] = flat[rows, c]",
        bounds,
        f"    relevance, bias, stabiliser = _lrp_backward({calls.backward_params}, "
        "seed.reshape(logits.shape),",
        "                                                 _lrp_rules(composite, low, high))",
        "    reached = relevance.reshape(len(relevance), -1).sum(axis=1)",
        "    return relevance, {'start': seed.sum(axis=1), 'inputs': reached, 'bias': bias,",
        "                       'stabiliser': stabiliser}",
    ]
    return out


class NumpyModuleRenderer:
    """Renders a model's passes as NumPy source; the CUDA renderer has the same method set."""

    def __init__(self, graph: ModelGraph, activation_source: str,
                 activation_names: Mapping[str, Mapping[str, str]],
                 source_text: str | None = None,
                 lrp: LrpPlan | None = None) -> None:
        self.graph = graph
        self.lrp = lrp
        self.nodes = [n for n in graph.topological() if n.kind is not OpKind.INPUT]
        self.activation_source = activation_source
        # node name -> generated routine names {"f": "act0_f", "df": ..., "m": ...}
        self.act = activation_names
        self.lines = source_lines(source_text)
        check_symbols(graph)

    def has_local(self, node: OpNode) -> bool:
        return node.kind is OpKind.ACTIVATION or hasattr(numpy_kernels,
                                                         kernel_name(node, "local"))

    # ---------------------------------------------------------------- forward
    def forward_body(self, value: str, local: str) -> list[str]:
        """Assignments of every node's value (prefix ``value``) and local data (``local``)."""
        out = []
        for node in self.nodes:
            out.append(_comment(node, self.lines))
            xs = ", ".join(var(i, value) for i in node.inputs)
            if node.kind is OpKind.ACTIVATION:
                fn = self.act[node.name]
                out.append(f"    {var(node.name, value)} = {fn['f']}({xs})")
                out.append(f"    {var(node.name, local)} = {fn['df']}({xs})")
                continue
            args = f"([{xs}], P[{py_literal(node.name)}]{_attrs(node)})"
            out.append(f"    {var(node.name, value)} = {kernel_name(node, 'forward')}{args}")
            if self.has_local(node):
                out.append(f"    {var(node.name, local)} = {kernel_name(node, 'local')}{args}")
        return out

    # ---------------------------------------------------------------- backward
    def backward_call(self, node: OpNode, pass_suffix: str) -> str:
        """Cotangents (or DFD multipliers) of the node's inputs from the node's own."""
        def env(name: str, prefix: str) -> str:
            return f"E[{var(name, prefix)!r}]"

        xs = "[" + ", ".join(env(i, "v") for i in node.inputs) + "]"
        g = var(node.name, "g")
        local = env(node.name, "l") if self.has_local(node) else "None"
        if pass_suffix == "dfd" and not dfd_by_vjp(node):
            xs0 = "[" + ", ".join(env(i, "b") for i in node.inputs) + "]"
            if node.kind is OpKind.ACTIVATION:
                fn = self.act[node.name]   # seed 004 eq. 16-17, cancellation-free
                local = f"{fn['m']}({env(node.inputs[0], 'b')}, {env(node.inputs[0], 'v')})"
            return (f"{kernel_name(node, 'dfd')}({g}, {xs}, {xs0}, {env(node.name, 'v')}, "
                    f"{env(node.name, 'b')}, {local}, P[{py_literal(node.name)}]{_attrs(node)})")
        return (f"{kernel_name(node, 'vjp')}({g}, {xs}, {env(node.name, 'v')}, {local}, "
                f"P[{py_literal(node.name)}]{_attrs(node)})")

    def backward_body(self, output: str, wrt: str, pass_suffix: str) -> list[str]:
        """Straight-line reverse accumulation from ``g_<output>`` to ``g_<wrt>``."""
        live = (nx.ancestors(self.graph.digraph, output) | {output}) & (
            nx.descendants(self.graph.digraph, wrt) | {wrt})
        out = []
        assigned = {output}
        for node in reversed(self.nodes):
            if node.name not in live:
                continue
            out.append(_comment(node, self.lines))
            temps = [f"_t{k}" for k in range(len(node.inputs))]
            out.append(f"    {', '.join(temps)}{',' if len(temps) == 1 else ''} = "
                       f"{self.backward_call(node, pass_suffix)}")
            for name, t in zip(node.inputs, temps):
                if name not in live:
                    continue
                g = var(name, "g")
                out.append(f"    {g} = {g} + {t}" if name in assigned else f"    {g} = {t}")
                assigned.add(name)
        return out

    def lrp_body(self, start: str, rule_nodes: set[str]) -> list[str]:
        """Straight-line relevance propagation from ``R_<start>`` to the first input."""
        live = nx.ancestors(self.graph.digraph, start) | {start}
        out = ["    bias = stabiliser = 0.0"]
        assigned = {start}
        for node in reversed(self.nodes):
            if node.name not in live:
                continue
            out.append(_comment(node, self.lines))
            r = var(node.name, "R")
            xs = "[" + ", ".join(f"E[{var(i, 'v')!r}]" for i in node.inputs) + "]"
            attrs = kernel_attrs(node)
            if node.name in rule_nodes:
                out.append(f"    _r, _b, _s = lrp_rule_step({kernel_base(node)!r}, {r}, {xs}, "
                           f"P[{py_literal(node.name)}], *rules[{py_literal(node.name)}], "
                           f"z_out=E[{var(node.name, 'v')!r}]{_attrs(node)})")
                out.append("    bias, stabiliser = bias + _b, stabiliser + _s")
            elif node.kind in MAXPOOL and kernel_base(node) == "maxpool":
                out.append(f"    _r0, _ = maxpool_relevance({r}, E[{var(node.inputs[0], 'v')!r}], "
                           f"E[{var(node.name, 'l')!r}]{_attrs(node)})")
                out.append("    _r = [_r0]")
            elif node.kind is OpKind.MUL:   # a product of two values (rules above take the rest)
                out.append(f"    _r = product_relevance({r}, {xs}{_attrs(node)})")
            elif node.kind in MAXPOOL:
                geometry = ", ".join(f"{k}={py_literal(attrs[k])}" for k in ("kernel", "stride",
                                                                    "padding"))
                out.append(f"    _r0, _ = lrp_maxpool({r}, E[{var(node.inputs[0], 'v')!r}], "
                           f"E[{var(node.name, 'l')!r}], {geometry})")
                out.append("    _r = [_r0]")
            # issue 12 (helper tensor): the runtime's rules (pbxc.runtime.lrp.tensor_relevance)
            elif node.kind is OpKind.MATMUL:
                out.append(f"    _ra, _rb, _s = matmul_relevance({r}, {xs}, "
                           f"E[{var(node.name, 'v')!r}], 'uniform', {TENSOR_EPSILON!r})")
                out.append("    _r = [_ra, _rb]")
                out.append("    stabiliser = stabiliser + _s")
            elif node.kind in REDUCTIONS:
                out.append(f"    _r0, _s = reduction_relevance({r}, {xs}{_attrs(node)}, "
                           f"epsilon={TENSOR_EPSILON!r})")
                out.append("    _r = [_r0]")
                out.append("    stabiliser = stabiliser + _s")
            elif node.kind in INDEXING:
                out.append(f"    _r = {node.kind.value}_relevance({r}, {xs}{_attrs(node)})")
            elif node.kind in SHAPE_ONLY:
                out.append(f"    _r = [{r}.reshape(E[{var(node.inputs[0], 'v')!r}].shape)]")
            elif node.kind in (OpKind.ACTIVATION, OpKind.PRELU):
                out.append(f"    _r = [{r}]")
            elif node.kind is OpKind.CONCAT:   # constant operands' blocks: the bias
                out.append(f"    _r, _b = concat_relevance({r}, {xs}, "
                           f"P[{py_literal(node.name)}]{_attrs(node)})")
                out.append("    bias = bias + _b")
            else:
                message = f"lrp has no rule for op {node.kind.value!r} (value {node.name!r})"
                out.append(f"    raise ValueError({py_literal(message)})")
                continue
            for k, name in enumerate(node.inputs):
                if name not in live and name not in self.graph.input_names:
                    continue
                target = var(name, "R")
                out.append(f"    {target} = {target} + _r[{k}]" if name in assigned
                           else f"    {target} = _r[{k}]")
                assigned.add(name)
        return out

    # ---------------------------------------------------------------- second order
    # (specs/hessian.md) Forward over reverse: tangents t_<node> along M directions, then the
    # cotangent g_<node> and its tangent d_<node> back; linear ops apply their VJP to d_,
    # nonlinear ones call their <op>_hvp kernel (numpy_kernels, second order).
    def _live(self, output: str, wrt: str) -> set[str]:
        return (nx.ancestors(self.graph.digraph, output) | {output}) & (
            nx.descendants(self.graph.digraph, wrt) | {wrt})

    def tangent_body(self, output: str, wrt: str) -> list[str]:
        """t_<node> = J t_<inputs> for every node between ``wrt`` and ``output``."""
        live = self._live(output, wrt)
        out = [f"    M = {var(wrt, 't')}.shape[1]"]
        for node in self.nodes:
            if node.name not in live:
                continue
            out.append(_comment(node, self.lines))
            ts = []
            for i in node.inputs:
                if i in live:
                    ts.append(var(i, "t"))
                else:   # an input the tangents do not reach
                    ts.append(f"np.zeros((E[{var(i, 'v')!r}].shape[0], M, "
                              f"*E[{var(i, 'v')!r}].shape[1:]), E[{var(i, 'v')!r}].dtype)")
            xs = "[" + ", ".join(f"E[{var(i, 'v')!r}]" for i in node.inputs) + "]"
            local = f"E[{var(node.name, 'l')!r}]" if self.has_local(node) else "None"
            out.append(f"    {var(node.name, 't')} = {kernel_name(node, 'jvp')}("
                       f"[{', '.join(ts)}], {xs}, E[{var(node.name, 'v')!r}], {local}, "
                       f"P[{py_literal(node.name)}]{_attrs(node)})")
        return out

    def hvp_body(self, output: str, wrt: str) -> list[str]:
        """g_ and d_ from ``g_<output>`` / ``d_<output>`` back to ``d_<wrt>``."""
        live = self._live(output, wrt)
        curved = {OpKind.ACTIVATION, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.MUL,
                  OpKind.MATMUL}
        out = []
        assigned = {output}
        for node in reversed(self.nodes):
            if node.name not in live:
                continue
            out.append(_comment(node, self.lines))
            k = len(node.inputs)
            temps = [f"_t{j}" for j in range(k)]
            dtemps = [f"_d{j}" for j in range(k)]
            comma = "," if k == 1 else ""
            out.append(f"    {', '.join(temps)}{comma} = {self.backward_call(node, 'vjp')}")
            g, d = var(node.name, "g"), var(node.name, "d")
            xs = "[" + ", ".join(f"E[{var(i, 'v')!r}]" for i in node.inputs) + "]"
            local = f"E[{var(node.name, 'l')!r}]" if self.has_local(node) else "None"
            linear = node.kind in HESSIAN_LINEAR or (node.kind is OpKind.MUL
                                                      and is_linear_form(node))
            if node.kind in curved and not linear:
                ts = "[" + ", ".join(f"T[{var(i, 't')!r}]" if i in live else "None"
                                     for i in node.inputs) + "]"
                curv = (f"{self.act[node.name]['d2f']}(E[{var(node.inputs[0], 'v')!r}])"
                        if node.kind is OpKind.ACTIVATION else "None")
                out.append(f"    {', '.join(dtemps)}{comma} = {kernel_name(node, 'hvp')}("
                           f"{g}, {d}, {ts}, {xs}, E[{var(node.name, 'v')!r}], {local}, "
                           f"{curv}, P[{py_literal(node.name)}]{_attrs(node)})")
            elif linear:
                out.append(f"    {', '.join(dtemps)}{comma} = ({kernel_name(node, 'vjp')}({d}, "
                           f"{xs}, E[{var(node.name, 'v')!r}], {local}, P[{py_literal(node.name)}]"
                           f"{_attrs(node)}) if {d} is not None else [None] * {k})")
            else:
                message = f"hessian has no rule for op {node.kind.value!r} (value {node.name!r})"
                out.append(f"    raise ValueError({py_literal(message)})")
                continue
            for name, t, dt in zip(node.inputs, temps, dtemps):
                if name not in live:
                    continue
                gi, di = var(name, "g"), var(name, "d")
                if name in assigned:
                    out.append(f"    {gi} = {gi} + {t}")
                    out.append(f"    {di} = _add_or_none({di}, {dt})")
                else:
                    out.append(f"    {gi}, {di} = {t}, {dt}")
                assigned.add(name)
        return out

    def render_second_order(self) -> list[str]:
        graph = self.graph
        wrt, output = graph.input_names[0], graph.output_names[0]
        return [
            f"def _tangents(E, P, {var(wrt, 't')}):",
            *self.tangent_body(output, wrt),
            "    return locals()",
            "",
            "",
            f"def _hvp_pullback(E, T, P, {var(output, 'g')}, {var(output, 'd')}):",
            *self.hvp_body(output, wrt),
            f"    if {var(wrt, 'd')} is None:",
            f"        return np.zeros_like(T[{var(wrt, 't')!r}])",
            f"    return {var(wrt, 'd')}",
            "",
            f"TANGENT_INPUT = {var(wrt, 't')!r}",
            SECOND_ORDER_PASSES,
        ]

    # ---------------------------------------------------------------- module
    def render(self, header: str) -> str:
        graph = self.graph
        wrt, output = graph.input_names[0], graph.output_names[0]
        inputs = {i.name: list(i.shape) for i in graph.inputs}
        outputs = {o.name: list(graph.shape_of(o.name)) for o in graph.outputs}
        classes = {o.name: list(o.classes) for o in graph.outputs if o.classes}
        params = {n.name: {role: key for role, key, _ in n.params} for n in self.nodes}
        parts = [
            header,
            "# ---- convolution kernels (pbxc.codegen.kernels.conv) ----",
            inspect.getsource(conv_kernels),
            "# ---- op kernels (pbxc.codegen.numpy_kernels) ----",
            kernel_source(),
            "# ---- activations, printed from sympy ----",
            self.activation_source.replace("import numpy as np\n", ""),
            "# ---- the model ----",
            f"MODEL = {py_literal(graph.name)}",
            f"INPUTS = {py_literal(inputs)}",
            f"OUTPUTS = {py_literal(outputs)}",
            f"CLASSES = {py_literal(classes)}",
            f"PARAMS = {py_literal(params)}",
            f"OUTPUT_VARS = {py_literal({o: var(o) for o in graph.output_names})}",
            f"OUTPUT_VALUE, BASELINE_VALUE = {var(output)!r}, {var(output, 'b')!r}",
            RUNTIME_HELPERS,
            f"def _forward({', '.join(var(i, 'v') for i in graph.input_names)}, P):",
            *self.forward_body("v", "l"),
            "    return locals()",
            "",
            "",
            f"def _baseline_forward({', '.join(var(i, 'b') for i in graph.input_names)}, P):",
            *self.forward_body("b", "bl"),
            "    return locals()",
            "",
            "",
            f"def _pullback(E, P, {var(output, 'g')}):",
            *self.backward_body(output, wrt, "vjp"),
            f"    return {var(wrt, 'g')}",
            "",
            "",
            f"def _dfd_pullback(E, P, {var(output, 'g')}):",
            *self.backward_body(output, wrt, "dfd"),
            f"    return {var(wrt, 'g')}",
            "",
            RUNTIME_PASSES,
            *self.render_second_order(),
            *self.render_lrp(),
        ]
        return "\n".join(parts) + "\n"

    def render_lrp(self) -> list[str]:
        if self.lrp is None:
            return []
        return render_lrp_entry(self.lrp, self.graph.input_names[0], self.lrp_body,
                                NUMPY_ENTRY)


RUNTIME_HELPERS = '''
_WEIGHTS = {}


def load_weights(path=None, dtype="float64"):
    """Load the weights saved beside this module (weights.npz), cast to ``dtype``."""
    import os
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.ascontiguousarray(data[k], dtype=dtype) for k in data.files}
    return {node: {role: arrays[key] for role, key in roles.items()}
            for node, roles in PARAMS.items()}


def _prepare(x, dtype):
    """Check the inputs as the pbxc runtime does (names, real numbers, shape, finite) and
    return (weights, inputs cast to the compute dtype)."""
    if isinstance(x, dict):
        missing = [n for n in INPUTS if n not in x]
        extra = [n for n in x if n not in INPUTS]
        if missing or extra:
            raise ValueError(f"model {MODEL!r} takes inputs {list(INPUTS)}; missing {missing}, "
                             f"unexpected {extra}")
    elif len(INPUTS) != 1:
        raise TypeError(f"model {MODEL!r} has inputs {list(INPUTS)}; pass a dict by name")
    else:
        x = {next(iter(INPUTS)): x}
    arrays = {}
    for name, value in x.items():
        a = np.asarray(value)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"input {name!r} has dtype {a.dtype}; expected real numbers")
        arrays[name] = a
    if dtype is None:
        dtype = next(iter(arrays.values())).dtype
        if dtype not in (np.float32, np.float64):
            dtype = np.float64
    elif np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    dtype = np.dtype(dtype)
    key = dtype.name
    if key not in _WEIGHTS:
        _WEIGHTS[key] = load_weights(dtype=key)
    xs = []
    batch = None
    for name, shape in INPUTS.items():
        a = np.ascontiguousarray(arrays[name], dtype=dtype)
        if a.ndim != len(shape) + 1 or a.shape[1:] != tuple(shape):
            raise ValueError(f"input {name!r} has shape {list(a.shape)}; expected [batch, "
                             + ", ".join(map(str, shape)) + "]")
        if batch is not None and len(a) != batch:
            raise ValueError(f"input {name!r} has batch size {len(a)}, but other inputs "
                             f"have {batch}")
        batch = len(a)
        if not np.isfinite(a).all():
            raise ValueError(f"input {name!r} has non-finite values")
        xs.append(a)
    return _WEIGHTS[key], xs


def _targets(y, target):
    flat = y.reshape(y.shape[0], -1)
    if target is None or (isinstance(target, str) and target == "predicted"):
        return flat.argmax(axis=1)
    t = np.broadcast_to(np.asarray(target), (y.shape[0],))
    if t.dtype.kind not in "iu" or (t < 0).any() or (t >= flat.shape[1]).any():
        raise ValueError(f"target must be 'predicted' or class indices in [0, "
                         f"{flat.shape[1]}), got {target!r}")
    return t.astype(np.int64)


def _one_hot(y, c):
    seed = np.zeros((y.shape[0], 1, y[0].size), dtype=y.dtype)
    seed[np.arange(y.shape[0]), 0, c] = 1
    return seed.reshape(y.shape[0], 1, *y.shape[1:])
'''

RUNTIME_PASSES = '''
def forward(x, dtype=None):
    """The forward pass on a batch: a dict of outputs by name."""
    P, xs = _prepare(x, dtype)
    env = _forward(*xs, P)
    return {name: env[value] for name, value in OUTPUT_VARS.items()}


def gradient(x, target=None, dtype=None):
    """d f_c / d x for the target class of each sample (predicted by default)."""
    P, xs = _prepare(x, dtype)
    env = _forward(*xs, P)
    y = env[OUTPUT_VALUE]
    return _pullback(env, P, _one_hot(y, _targets(y, target)))[:, 0]


def input_x_gradient(x, target=None, dtype=None):
    P, xs = _prepare(x, dtype)
    return xs[0] * gradient(x, target, dtype)


def jacobian(x, dtype=None):
    """The exact Jacobian (B, *out_shape, *in_shape), by reverse accumulation."""
    P, xs = _prepare(x, dtype)
    env = _forward(*xs, P)
    y = env[OUTPUT_VALUE]
    n = y[0].size
    seed = np.broadcast_to(np.eye(n, dtype=y.dtype), (y.shape[0], n, n))
    seed = np.ascontiguousarray(seed).reshape(y.shape[0], n, *y.shape[1:])
    g = _pullback(env, P, seed)
    return g.reshape(*y.shape, *xs[0].shape[1:])


def dfd(x, baseline=0.0, target=None, dtype=None):
    """DFD / DeepLIFT contributions C = m * (x - x0) to the target output, and delta."""
    P, xs = _prepare(x, dtype)
    x0 = np.broadcast_to(np.asarray(baseline, dtype=xs[0].dtype), xs[0].shape)
    env = _forward(*xs, P)
    env.update(_baseline_forward(np.ascontiguousarray(x0), P))
    y = env[OUTPUT_VALUE]
    y0 = env[BASELINE_VALUE]
    c = _targets(y, target)
    m = _dfd_pullback(env, P, _one_hot(y, c))[:, 0]
    flat, flat0 = y.reshape(len(y), -1), y0.reshape(len(y), -1)
    delta = flat[np.arange(len(c)), c] - flat0[np.arange(len(c)), c]
    return m * (xs[0] - x0), delta
'''

SECOND_ORDER_PASSES = '''

def _add_or_none(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _hvp_directions(P, xs, E, V, target):
    T = _tangents(E, P, V)
    y = E[OUTPUT_VALUE]
    return _hvp_pullback(E, T, P, _one_hot(y, _targets(y, target)), None)


def hvp(x, v, target=None, dtype=None):
    """Hessian-vector products H v of the target logit (predicted by default), by forward
    over reverse; v is (*in), (B, *in) or (B, K, *in) and the result has its shape."""
    P, xs = _prepare(x, dtype)
    E = _forward(*xs, P)
    shape = xs[0].shape[1:]
    v = np.asarray(v, dtype=xs[0].dtype)
    if v.shape == shape:
        v = np.broadcast_to(v, xs[0].shape)
    squeeze = v.shape[1:] == shape
    V = np.ascontiguousarray(v[:, None] if squeeze else v)
    if V.shape[0] != xs[0].shape[0] or V.shape[2:] != shape:
        raise ValueError(f"v has shape {list(v.shape)}; expected {list(shape)}, [batch, "
                         f"*{list(shape)}] or [batch, K, *{list(shape)}]")
    out = _hvp_directions(P, xs, E, V, target)
    return out[:, 0] if squeeze else out


def hessian(x, target=None, dtype=None):
    """The exact Hessian (B, *in, *in) of the target logit (predicted by default), by
    forward over reverse with the identity directions."""
    P, xs = _prepare(x, dtype)
    E = _forward(*xs, P)
    shape = xs[0].shape[1:]
    n = int(np.prod(shape))
    eye = np.broadcast_to(np.eye(n, dtype=xs[0].dtype), (xs[0].shape[0], n, n))
    V = np.ascontiguousarray(eye).reshape(xs[0].shape[0], n, *shape)
    return _hvp_directions(P, xs, E, V, target).reshape(xs[0].shape[0], *shape, *shape)
'''
