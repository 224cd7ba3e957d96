"""AST -> :class:`ModelGraph`: name resolution, op and argument checking, cycle detection.

All semantic errors of a file are collected and raised together.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from pbxc.errors import DiagnosticBag, PbxValidationError, SourcePos, did_you_mean
from pbxc.graph.ir import InputInfo, ModelGraph, OpNode, OutputInfo
from pbxc.ops import (
    BUILTIN_ACTIVATIONS,
    LRP_COMPOSITES,
    LRP_RULE_KINDS,
    LRP_RULES,
    MATH_CONSTANTS,
    MATH_FUNCTIONS,
    SIGNATURES,
    AttrSpec,
    AttrType,
    OpKind,
    OpSignature,
    operand_role,
)
from pbxc.parse import ast


def _describe_value(value: ast.Value) -> str:
    if isinstance(value, ast.NumberLit):
        return f"number {value.value:g}"
    if isinstance(value, ast.BoolLit):
        return "true" if value.value else "false"
    if isinstance(value, ast.NoneLit):
        return "none"
    if isinstance(value, ast.ParamRef):
        return f"weight reference @{value.key}"
    if isinstance(value, ast.Ref):
        return f"value '{value.name}'"
    if isinstance(value, ast.Call):
        return f"call {value.op}(...)"
    if isinstance(value, ast.StrLit):
        return f"string {value.value!r}"
    return "a tuple" if value.bracket == "(" else "a list"


class _Builder:
    def __init__(self, program: ast.Program) -> None:
        self.program = program
        self.bag = DiagnosticBag()
        self.nodes: dict[str, OpNode] = {}
        self.defined_at: dict[str, SourcePos] = {}
        self.user_activations: dict[str, ast.ActivationDef] = {}
        self.reported_loops: set[frozenset[str]] = set()

    # ------------------------------------------------------------------ helpers
    def define(self, name: str, pos: SourcePos) -> bool:
        if name in self.defined_at:
            first = self.defined_at[name]
            self.bag.error(f"'{name}' is already defined at line {first.line}", pos,
                           [f"first definition: {first}"])
            return False
        self.defined_at[name] = pos
        return True

    def _collect_activations(self) -> None:
        for item in self.program.activations:
            if item.name in BUILTIN_ACTIVATIONS or item.name in SIGNATURES:
                self.bag.error(f"activation '{item.name}' redefines a built-in op", item.pos)
                continue
            if item.name in self.user_activations:
                first = self.user_activations[item.name].pos
                self.bag.error(f"activation '{item.name}' is already defined at line {first.line}",
                               item.pos)
                continue
            seen: set[str] = {item.variable}
            for pname, _ in item.params:
                if pname in seen:
                    self.bag.error(f"activation '{item.name}' names '{pname}' twice", item.pos)
                seen.add(pname)
            self.user_activations[item.name] = item
        for item in self.user_activations.values():
            self._check_expr(item, item.body, {item.variable, *(p for p, _ in item.params)},
                             stack=(item.name,))

    def _check_expr(self, owner: ast.ActivationDef, expr: ast.Expr, names: set[str],
                    stack: tuple[str, ...], allow_compare: bool = False) -> None:
        """Static checks of a user activation's math: names, functions, arities, recursion."""
        if isinstance(expr, ast.Num):
            return
        if isinstance(expr, ast.Var):
            if expr.name not in names and expr.name not in MATH_CONSTANTS:
                self.bag.error(
                    f"unknown name '{expr.name}' in activation '{owner.name}'"
                    + did_you_mean(expr.name, [*names, *MATH_CONSTANTS]), expr.pos,
                    [f"the variable is '{owner.variable}'; parameters: "
                     + (", ".join(p for p, _ in owner.params) or "none")])
            return
        if isinstance(expr, ast.Compare):
            if not allow_compare:
                self.bag.error("a comparison may appear only as the first argument of where()",
                               expr.pos)
            self._check_expr(owner, expr.left, names, stack)
            self._check_expr(owner, expr.right, names, stack)
            return
        if isinstance(expr, ast.Neg):
            self._check_expr(owner, expr.operand, names, stack)
            return
        if isinstance(expr, ast.BinOp):
            self._check_expr(owner, expr.left, names, stack)
            self._check_expr(owner, expr.right, names, stack)
            return
        # function call
        name, nargs = expr.name, len(expr.args)
        if name in MATH_FUNCTIONS:
            expected = MATH_FUNCTIONS[name]
            if nargs != expected:
                self.bag.error(f"{name}() takes {expected} argument{'s' * (expected != 1)}, "
                               f"got {nargs}", expr.pos)
        elif name in BUILTIN_ACTIVATIONS or name in self.user_activations:
            if name in stack:
                loop = frozenset(stack[stack.index(name):])
                if loop in self.reported_loops:
                    return
                self.reported_loops.add(loop)
                self.bag.error(f"activation '{stack[0]}' is defined in terms of itself "
                               f"(through {' -> '.join((*stack, name))})", expr.pos)
                return
            n_params = (len(BUILTIN_ACTIVATIONS[name].params) if name in BUILTIN_ACTIVATIONS
                        else len(self.user_activations[name].params))
            if not 1 <= nargs <= 1 + n_params:
                self.bag.error(f"{name}() takes 1 to {1 + n_params} arguments (the input, then "
                               f"its parameters), got {nargs}", expr.pos)
            if name in self.user_activations:
                callee = self.user_activations[name]
                self._check_expr(callee, callee.body,
                                 {callee.variable, *(p for p, _ in callee.params)},
                                 (*stack, name))
        else:
            known = [*MATH_FUNCTIONS, *BUILTIN_ACTIVATIONS, *self.user_activations]
            self.bag.error(f"unknown function '{name}' in activation '{owner.name}'"
                           + did_you_mean(name, known), expr.pos)
            return
        for i, arg in enumerate(expr.args):
            self._check_expr(owner, arg, names, stack, allow_compare=(name == "where" and i == 0))

    # ------------------------------------------------------------------ calls
    def build_call(self, name: str, call: ast.Call) -> None:
        """Make node ``name`` from ``call``; nested calls become nodes ``name/op``, ``name/op2``."""
        if call.op in SIGNATURES:
            self._build_op(name, call, SIGNATURES[call.op])
        elif call.op in BUILTIN_ACTIVATIONS or call.op in self.user_activations:
            self._build_activation(name, call)
        else:
            known = [*SIGNATURES, *BUILTIN_ACTIVATIONS, *self.user_activations]
            self.bag.error(f"unknown op '{call.op}'" + did_you_mean(call.op, known), call.pos)

    def _input_ref(self, owner: str, value: ast.Value, index: int) -> str | None:
        if isinstance(value, ast.Ref):
            return value.name
        if isinstance(value, ast.Call):
            nested = f"{owner}/{value.op}" if index == 0 else f"{owner}/{value.op}{index}"
            while nested in self.defined_at:
                nested += "'"
            self.define(nested, value.pos)
            self.build_call(nested, value)
            return nested
        return None

    def _split_positional(self, call: ast.Call, sig_inputs: tuple[int, int | None],
                          constants: bool = False
                          ) -> tuple[list[ast.Arg], list[ast.Arg], dict[str, ast.Arg]]:
        """Operands (leading values; with ``constants``, weight references ``@key`` among
        them too: concat's constant tensors), the remaining positional arguments, keywords."""
        positional: list[ast.Arg] = []
        keywords: dict[str, ast.Arg] = {}
        for arg in call.args:
            if arg.keyword is None:
                if keywords:
                    self.bag.error(f"positional argument after keyword arguments in {call.op}()",
                                   arg.pos)
                positional.append(arg)
            elif arg.keyword in keywords:
                self.bag.error(f"{call.op}() got '{arg.keyword}' twice", arg.pos)
            else:
                keywords[arg.keyword] = arg
        _, max_in = sig_inputs
        inputs: list[ast.Arg] = []
        for arg in positional:
            operand = (ast.Ref, ast.Call, ast.ParamRef) if constants else (ast.Ref, ast.Call)
            if isinstance(arg.value, operand) and (max_in is None or len(inputs) < max_in):
                inputs.append(arg)
            else:
                break
        rest = positional[len(inputs):]
        return inputs, rest, keywords

    def _resolve_inputs(self, name: str, call: ast.Call, inputs: list[ast.Arg],
                        min_in: int, max_in: int | None) -> tuple[str, ...] | None:
        if len(inputs) < min_in:
            want = f"{min_in}" if max_in == min_in else f"at least {min_in}"
            self.bag.error(f"{call.op}() takes {want} input value{'s' * (min_in != 1)}, "
                           f"got {len(inputs)}", call.pos,
                           [f"usage: {SIGNATURES[call.op].usage()}" if call.op in SIGNATURES
                            else f"usage: {call.op}(x, ...)"])
            return None
        refs = []
        for i, arg in enumerate(inputs):
            ref = self._input_ref(name, arg.value, i)
            if ref is not None:
                refs.append((ref, arg.pos))
        self.pending_refs.extend((name, r, p) for r, p in refs)
        return tuple(r for r, _ in refs)

    def _constant_operands(self, name: str, call: ast.Call, sig: OpSignature,
                           operands: list[ast.Arg]
                           ) -> tuple[tuple[str, ...] | None, list[tuple[str, str, SourcePos]]]:
        """concat's operands: values (resolved as inputs) and constant tensors ``@key``, bound
        as weights under ``operand_role(k)`` for their written position k."""
        values = [a for a in operands if not isinstance(a.value, ast.ParamRef)]
        constants = [(k, a) for k, a in enumerate(operands) if isinstance(a.value, ast.ParamRef)]
        if len(operands) < sig.min_inputs:
            self.bag.error(f"{call.op}() takes at least {sig.min_inputs} operands (values or "
                           f"constant tensors @key), got {len(operands)}", call.pos,
                           [f"usage: {sig.usage()}"])
            return None, []
        if not values:
            keys = ", ".join(f"@{a.value.key}" for _, a in constants)  # type: ignore[union-attr]
            self.bag.error(f"{call.op}() of constants only ({keys}): at least one operand must "
                           "be a value computed from the model's inputs", constants[0][1].pos,
                           [f"usage: {sig.usage()}"])
            return None, []
        refs = self._resolve_inputs(name, call, values, 0, None)
        bound = [(operand_role(k), a.value.key, a.value.pos)  # type: ignore[union-attr]
                 for k, a in constants]
        return refs, bound

    def _build_op(self, name: str, call: ast.Call, sig: OpSignature) -> None:
        inputs, rest, keywords = self._split_positional(call, (sig.min_inputs, sig.max_inputs),
                                                        sig.constant_operands)
        constant_operands: list[tuple[str, str, SourcePos]] = []
        if sig.constant_operands:
            refs, constant_operands = self._constant_operands(name, call, sig, inputs)
        else:
            refs = self._resolve_inputs(name, call, inputs, sig.min_inputs, sig.max_inputs)
        params: dict[str, tuple[str | None, SourcePos]] = {}
        prefix: ast.ParamRef | None = None
        if rest and isinstance(rest[0].value, ast.ParamRef):
            if not sig.params:
                self.bag.error(f"{call.op}() has no weights, but got @{rest[0].value.key}",
                               rest[0].pos)
            else:
                prefix = rest[0].value
            rest = rest[1:]
        attr_values: dict[str, Any] = {}
        positional_attrs = list(sig.attrs)
        for arg in rest:
            if isinstance(arg.value, (ast.Ref, ast.Call)):
                self.bag.error(f"{call.op}() got an input value where {_arg_kind(sig, len(attr_values))}"
                               " was expected", arg.pos, [f"usage: {sig.usage()}"])
                continue
            if not positional_attrs:
                self.bag.error(f"{call.op}() got too many arguments", arg.pos,
                               [f"usage: {sig.usage()}"])
                break
            spec = positional_attrs.pop(0)
            attr_values[spec.name] = (spec, arg)
        for key, arg in keywords.items():
            kw_spec = sig.attr(key)
            pspec = sig.param(key)
            if pspec is not None:
                if isinstance(arg.value, ast.ParamRef):
                    params[key] = (arg.value.key, arg.value.pos)
                elif isinstance(arg.value, (ast.NoneLit, ast.BoolLit)) and not (
                        isinstance(arg.value, ast.BoolLit) and arg.value.value):
                    if pspec.optional:
                        params[key] = (None, arg.pos)
                    else:
                        self.bag.error(f"{call.op}() needs its '{key}'", arg.pos)
                else:
                    self.bag.error(f"'{key}' of {call.op}() must be a weight reference (@key)"
                                   + (" or false" if pspec.optional else "")
                                   + f", got {_describe_value(arg.value)}", arg.pos)
            elif kw_spec is not None:
                if kw_spec.name in attr_values:
                    self.bag.error(f"{call.op}() got '{key}' both by position and by keyword",
                                   arg.pos)
                attr_values[kw_spec.name] = (kw_spec, arg)
            else:
                names = [a.name for a in sig.attrs] + [p.role for p in sig.params]
                self.bag.error(f"{call.op}() has no argument '{key}'" + did_you_mean(key, names),
                               arg.pos, [f"usage: {sig.usage()}"])
        # weights: explicit roles win over the prefix
        bound: list[tuple[str, str, SourcePos]] = []
        for pspec in sig.params:
            if pspec.role in params:
                key_or_none, ppos = params[pspec.role]
                if key_or_none is not None:
                    bound.append((pspec.role, key_or_none, ppos))
            elif prefix is not None:   # an empty suffix: the prefix is the key (mul(x, @scale))
                key = f"{prefix.key}.{pspec.suffix}" if pspec.suffix else prefix.key
                bound.append((pspec.role, key, prefix.pos))
            elif pspec.role == "constant":   # add/sub/mul/div take a constant or a value
                continue
            else:
                self.bag.error(f"{call.op}() needs weights: write {call.op}(x, @prefix) or "
                               f"{pspec.role}=@key", call.pos, [f"usage: {sig.usage()}"])
                break
        attrs: list[tuple[str, Any]] = []
        for spec in sig.attrs:
            if spec.name in attr_values:
                value = self._convert_attr(call.op, spec, attr_values[spec.name][1])
            elif spec.required:
                self.bag.error(f"{call.op}() needs '{spec.name}'", call.pos,
                               [f"usage: {sig.usage()}"])
                continue
            else:
                value = spec.default
                if spec.type is AttrType.INTS and value is not None:
                    value = (value,) * spec.arity
                elif spec.type is AttrType.PADS and value is not None:
                    value = (value,) * (2 * spec.arity)
            attrs.append((spec.name, value))
        if refs is None:
            return
        if sig.param("constant") is not None:   # add/sub/mul/div: two values, or a constant
            has_constant = any(r == "constant" for r, _, _ in bound) or dict(attrs).get(
                "value") is not None
            if len(refs) == 1 and not has_constant:
                self.bag.error(f"{call.op}() takes two input values, or one and a constant "
                               f"(a number or @tensor); got 1 value", call.pos,
                               [f"usage: {sig.usage()}"])
                return
            if len(refs) > 1 and has_constant:
                self.bag.error(f"{call.op}() takes two input values or one value and a "
                               "constant, not both", call.pos, [f"usage: {sig.usage()}"])
                return
        self.nodes[name] = OpNode(name, sig.kind, refs, call.pos,
                                  tuple(bound) + tuple(constant_operands), tuple(attrs))

    def _convert_attr(self, op: str, spec: AttrSpec, arg: ast.Arg) -> Any:
        value = arg.value
        where = f"'{spec.name}' of {op}()"

        def bad(expected: str) -> None:
            self.bag.error(f"{where} must be {expected}, got {_describe_value(value)}", arg.pos)

        def as_int(v: ast.Value) -> int | None:
            if isinstance(v, ast.NumberLit) and v.is_int:
                iv = int(v.value)
                if spec.minimum is not None and iv < spec.minimum:
                    self.bag.error(f"{where} must be at least {spec.minimum}, got {iv}", v.pos)
                return iv
            return None

        if spec.type is AttrType.INT:
            iv = as_int(value)
            if iv is None:
                bad("an integer")
            return iv
        if spec.type is AttrType.FLOAT:
            if not isinstance(value, ast.NumberLit):
                bad("a number")
                return None
            if spec.minimum is not None and value.value < spec.minimum:
                self.bag.error(f"{where} must be at least {spec.minimum}, got {value.value:g}",
                               arg.pos)
            return float(value.value)
        if spec.type is AttrType.BOOL:
            if not isinstance(value, ast.BoolLit):
                bad("true or false")
                return None
            return value.value
        if spec.type is AttrType.STRING:
            if not isinstance(value, ast.StrLit) or value.value not in spec.choices:
                bad("one of " + ", ".join(f'"{c}"' for c in spec.choices))
                return None
            return value.value
        if spec.type is AttrType.FLOATS:
            items_f = value.items if isinstance(value, ast.SeqLit) else (value,)
            if not items_f or not all(isinstance(v, ast.NumberLit) for v in items_f) or (
                    spec.arity and len(items_f) != spec.arity):
                bad("a number or numbers in parentheses")
                return None
            numbers = tuple(float(v.value) for v in items_f)  # type: ignore[union-attr]
            if spec.minimum is not None and min(numbers) <= spec.minimum:
                bad(f"greater than {spec.minimum:g}")
                return None
            return numbers
        if spec.type is AttrType.PADS:   # stored per side: (begin_1, end_1, begin_2, ...)
            expected = (f"an integer, {spec.arity} integers (both sides of each axis) or "
                        f"{2 * spec.arity} integers (begin, end of each axis) in parentheses")
            if isinstance(value, ast.SeqLit):
                items = [as_int(v) for v in value.items]
                if len(items) not in (spec.arity, 2 * spec.arity) or any(i is None for i in items):
                    bad(expected)
                    return None
                if len(items) == spec.arity:
                    return tuple(p for i in items for p in (i, i))
                return tuple(items)
            iv = as_int(value)
            if iv is None:
                bad(expected)
                return None
            return (iv,) * (2 * spec.arity)
        if spec.type is AttrType.INTS:
            if isinstance(value, ast.SeqLit):
                items = [as_int(v) for v in value.items]
                if (spec.arity and len(items) != spec.arity) or any(i is None for i in items):
                    bad(f"an integer or {spec.arity} integers in parentheses")
                    return None
                return tuple(items)
            iv = as_int(value)
            if iv is None:
                bad(f"an integer or {spec.arity or 'several'} integers in parentheses")
                return None
            return (iv,) * max(spec.arity, 1)
        # SHAPE
        if not isinstance(value, ast.SeqLit) or not value.items:
            bad("a list of dimensions such as [16, 4]")
            return None
        dims = []
        for item in value.items:
            if not (isinstance(item, ast.NumberLit) and item.is_int) or (
                    item.value < 1 and item.value != -1):
                self.bag.error(f"{where}: every dimension must be a positive integer or -1",
                               item.pos)
                return None
            dims.append(int(item.value))
        if dims.count(-1) > 1:
            self.bag.error(f"{where}: at most one dimension may be -1", arg.pos)
            return None
        return tuple(dims)

    def _build_activation(self, name: str, call: ast.Call) -> None:
        if call.op in BUILTIN_ACTIVATIONS:
            declared = BUILTIN_ACTIVATIONS[call.op].params
        else:
            declared = self.user_activations[call.op].params
        inputs, rest, keywords = self._split_positional(call, (1, 1))
        refs = self._resolve_inputs(name, call, inputs, 1, 1)
        values: dict[str, float] = dict(declared)
        given: set[str] = set()
        names = [p for p, _ in declared]
        for i, arg in enumerate(rest):
            if i >= len(names):
                self.bag.error(f"{call.op}() takes {len(names)} parameter"
                               f"{'s' * (len(names) != 1)} after its input, got {len(rest)}",
                               arg.pos)
                break
            if self._activation_number(call.op, names[i], arg, values):
                given.add(names[i])
        for key, arg in keywords.items():
            if key not in values:
                self.bag.error(f"{call.op}() has no parameter '{key}'" + did_you_mean(key, names),
                               arg.pos, [f"parameters: {', '.join(names) or 'none'}"])
                continue
            if key in given:
                self.bag.error(f"{call.op}() got '{key}' both by position and by keyword", arg.pos)
            self._activation_number(call.op, key, arg, values)
        if refs is None:
            return
        self.nodes[name] = OpNode(name, OpKind.ACTIVATION, refs, call.pos,
                                  activation=call.op,
                                  activation_params=tuple((p, values[p]) for p in names))

    def _activation_number(self, op: str, pname: str, arg: ast.Arg,
                           values: dict[str, float]) -> bool:
        if not isinstance(arg.value, ast.NumberLit):
            self.bag.error(f"parameter '{pname}' of {op}() must be a number, got "
                           f"{_describe_value(arg.value)}", arg.pos)
            return False
        values[pname] = float(arg.value.value)
        return True

    # ------------------------------------------------------------------ program
    def build(self) -> ModelGraph:
        program = self.program
        self.pending_refs: list[tuple[str, str, SourcePos]] = []
        self._collect_activations()
        inputs: list[InputInfo] = []
        outputs: list[OutputInfo] = []
        for decl in program.inputs:
            if not self.define(decl.name, decl.pos):
                continue
            if not decl.shape or any(d < 1 for d in decl.shape):
                self.bag.error(f"input '{decl.name}' needs at least one dimension, each positive, "
                               f"got [{', '.join(map(str, decl.shape))}]", decl.pos)
            if decl.features is not None:
                size = 1
                for d in decl.shape:
                    size *= d
                if len(decl.features) != size:
                    self.bag.error(f"input '{decl.name}' has {size} elements but "
                                   f"{len(decl.features)} feature names", decl.pos)
            inputs.append(InputInfo(decl.name, decl.dtype, decl.shape, decl.features, decl.pos))
            self.nodes[decl.name] = OpNode(decl.name, OpKind.INPUT, (), decl.pos,
                                           shape=decl.shape)
        if not inputs:
            self.bag.error(f"model '{program.name}' declares no input; add e.g. "
                           "'input x: float32[30]'", program.pos)
        for item in program.items:
            if isinstance(item, ast.Assign):
                if self.define(item.name, item.pos):
                    self.build_call(item.name, item.call)
            elif isinstance(item, ast.OutputDecl):
                if item.call is not None and self.define(item.name, item.pos):
                    self.build_call(item.name, item.call)
                if any(o.name == item.name for o in outputs):
                    self.bag.error(f"'{item.name}' is already an output", item.pos)
                    continue
                outputs.append(OutputInfo(item.name, item.classes, item.features, item.pos))
        if not outputs and self.nodes:
            self.bag.error(f"model '{program.name}' declares no output; add e.g. "
                           "'output logits = linear(h, @out)' or 'output h'", program.pos)
        graph = nx.DiGraph()
        for node in self.nodes.values():
            graph.add_node(node.name, op=node)
        for user, ref, pos in self.pending_refs:
            if ref not in self.defined_at:
                self.bag.error(f"undefined name '{ref}'" + did_you_mean(ref, self.defined_at), pos)
            elif ref in self.nodes and user in self.nodes:
                graph.add_edge(ref, user)
        for out in outputs:
            if out.name not in self.defined_at:
                self.bag.error(f"output '{out.name}' is not defined"
                               + did_you_mean(out.name, self.defined_at), out.pos)
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            names = [u for u, _ in cycle]
            first = self.nodes[names[0]]
            self.bag.error("cycle: " + " -> ".join([*names, names[0]]), first.pos,
                           [f"'{n}' is defined at {self.nodes[n].pos}" for n in names])
        weight_files: list[tuple[str, SourcePos]] = []
        for weights_decl in program.weights:
            weight_files.extend((lit.value, lit.pos) for lit in weights_decl.paths)
        self._check_verify_blocks(inputs)
        self._check_lrp_blocks()
        self.bag.raise_if_any(PbxValidationError)
        blocks = self.program.lrp_blocks
        return ModelGraph(program.name, program.path, graph, tuple(inputs), tuple(outputs),
                          tuple(weight_files), dict(self.user_activations),
                          verify_blocks=self.program.verify_blocks,
                          lrp_block=blocks[0] if blocks else None)

    def _check_lrp_blocks(self) -> None:
        """One ``lrp`` block with at most one composite; known rules and composites with
        parameters they take; targets are statements that hold an op taking a rule, each named
        once."""
        blocks = self.program.lrp_blocks
        for extra in blocks[1:]:
            self.bag.error(f"a second lrp block (the first is at line {blocks[0].pos.line}); "
                           "merge them", extra.pos)
        if not blocks:
            return
        block = blocks[0]
        for extra_composite in block.composites[1:]:
            self.bag.error(f"a second composite (the first is at line "
                           f"{block.composites[0].pos.line})", extra_composite.pos)
        for composite in block.composites:
            self._check_lrp_call("composite", composite.name, composite.args, composite.pos,
                                 LRP_COMPOSITES)
        seen: dict[str, SourcePos] = {}
        for assign in block.assignments:
            self._check_lrp_call("rule", assign.rule, assign.args, assign.rule_pos, LRP_RULES)
            if assign.target in seen:
                self.bag.error(f"'{assign.target}' already has a rule (line "
                               f"{seen[assign.target].line})", assign.pos)
                continue
            seen[assign.target] = assign.pos
            nodes = [n for n in self.nodes.values() if n.name == assign.target
                     or n.name.startswith(assign.target + "/")]
            if not nodes:
                self.bag.error(f"'{assign.target}' is not a statement of this model"
                               + did_you_mean(assign.target, self.defined_at), assign.pos)
            elif not any(n.kind in LRP_RULE_KINDS for n in nodes):
                kinds = ", ".join(sorted({n.kind.value for n in nodes}))
                self.bag.error(f"'{assign.target}' holds no op that takes an LRP rule (it holds "
                               f"{kinds}, which route relevance); rules apply to linear, conv, "
                               "pooling, add and batchnorm", assign.pos)

    def _check_lrp_call(self, what: str, name: str, args: tuple[ast.LrpArg, ...],
                        pos: SourcePos, table: dict[str, tuple[str, ...]]) -> None:
        """A rule or composite: a known name, then parameters it takes."""
        if name not in table:
            self.bag.error(f"unknown LRP {what} '{name}'" + did_you_mean(name, table), pos,
                           [f"{what}s: {', '.join(sorted(table))}"])
        else:
            self._check_lrp_args(f"{what} '{name}'", args, table[name])

    def _check_lrp_args(self, what: str, args: tuple[ast.LrpArg, ...],
                        params: tuple[str, ...]) -> None:
        given: set[str] = set()
        named = False
        for i, arg in enumerate(args):
            if arg.name is None and named:
                self.bag.error(f"{what}: a positional parameter after a named one", arg.pos)
                return
            named = named or arg.name is not None
            name = arg.name if arg.name is not None else (params[i] if i < len(params) else None)
            if name is None:
                self.bag.error(f"{what} takes {len(params)} parameter(s) "
                               f"({', '.join(params) or 'none'}), got {len(args)}", arg.pos)
                return
            if name not in params:
                self.bag.error(f"{what} has no parameter '{name}'" + did_you_mean(name, params),
                               arg.pos, [f"parameters: {', '.join(params) or 'none'}"])
            elif name in given:
                self.bag.error(f"{what}: parameter '{name}' given twice", arg.pos)
            given.add(name)

    def _check_verify_blocks(self, inputs: list[InputInfo]) -> None:
        """Names in ``verify`` domains are inputs, each with at most one domain; intervals are
        ordered. Property names and settings are checked by pbxc.verify, which knows them."""
        names = [i.name for i in inputs]
        seen: dict[str, SourcePos] = {}
        for block in self.program.verify_blocks:
            for domain in block.domains:
                if domain.input not in names:
                    self.bag.error(f"domain names '{domain.input}', which is not an input"
                                   + did_you_mean(domain.input, names), domain.pos,
                                   [f"inputs: {', '.join(names) or 'none'}"])
                    continue
                if domain.input in seen:
                    self.bag.error(f"input '{domain.input}' already has a domain (line "
                                   f"{seen[domain.input].line})", domain.pos)
                seen[domain.input] = domain.pos
                if isinstance(domain, ast.DomainBox) and not domain.low <= domain.high:
                    self.bag.error(f"empty domain [{domain.low:g}, {domain.high:g}]: the lower "
                                   "bound must not exceed the upper", domain.pos)
                if isinstance(domain, ast.DomainData) and not domain.k > 0:
                    self.bag.error(f"'within {domain.k:g} std' needs a positive number",
                                   domain.pos)


def _arg_kind(sig: OpSignature, index: int) -> str:
    if index < len(sig.attrs):
        return f"'{sig.attrs[index].name}'"
    return "no further argument"


def build_graph(program: ast.Program) -> ModelGraph:
    """Resolve names and arguments of ``program`` into a graph; raise all errors together."""
    return _Builder(program).build()
