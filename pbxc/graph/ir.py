"""The computation graph: a networkx DiGraph whose nodes carry frozen :class:`OpNode` records.

Node keys are value names. Every node keeps the source position of the statement (or nested
call) that made it, so every later error and finding can cite a .pbx line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from pbxc.errors import SourcePos
from pbxc.ops import OpKind, operand_role
from pbxc.parse import ast


@dataclass(frozen=True)
class OpNode:
    name: str
    kind: OpKind
    inputs: tuple[str, ...]
    pos: SourcePos
    # weight role -> (store key, position of the reference)
    params: tuple[tuple[str, str, SourcePos], ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    activation: str | None = None                      # for ACTIVATION: built-in or user name
    activation_params: tuple[tuple[str, float], ...] = ()
    shape: tuple[int, ...] | None = None               # per sample; filled by shape inference

    def attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.attrs:
            if key == name:
                return value
        return default

    def param_key(self, role: str) -> str | None:
        for r, key, _ in self.params:
            if r == role:
                return key
        return None

    def param_pos(self, role: str) -> SourcePos:
        for r, _, pos in self.params:
            if r == role:
                return pos
        return self.pos

    def operand_slots(self) -> tuple[int | str, ...]:
        """concat's operands in written order: an int indexes ``inputs`` (a value), a str is
        the weight role (``operand<k>``, k the written position) of a constant tensor.
        ``inputs`` holds the values only, so graph edges and every pass see values alone."""
        roles = {r for r, _, _ in self.params if r.startswith("operand")}
        values = iter(range(len(self.inputs)))
        return tuple(operand_role(k) if operand_role(k) in roles else next(values)
                     for k in range(len(self.inputs) + len(roles)))

    @property
    def label(self) -> str:
        if self.kind is OpKind.ACTIVATION:
            args = "".join(f", {k}={v:g}" for k, v in self.activation_params)
            return f"{self.activation}{'(' + args[2:] + ')' if args else ''}"
        return self.kind.value

    def with_shape(self, shape: tuple[int, ...]) -> OpNode:
        return replace(self, shape=shape)


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] | None
    pos: SourcePos


@dataclass(frozen=True)
class OutputInfo:
    name: str
    classes: tuple[str, ...] | None
    features: tuple[str, ...] | None
    pos: SourcePos


@dataclass
class ModelGraph:
    """A model's graph plus what the graph alone does not say."""

    name: str
    path: str
    digraph: nx.DiGraph
    inputs: tuple[InputInfo, ...]
    outputs: tuple[OutputInfo, ...]
    weight_files: tuple[tuple[str, SourcePos], ...]
    user_activations: dict[str, ast.ActivationDef] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # bound weights
    # ``verify { ... }`` blocks, in file order (checked by pbxc.verify; see specs/verify.md)
    verify_blocks: tuple[ast.VerifyBlock, ...] = ()
    # the ``lrp { ... }`` block, checked: names, parameters, targets (see specs/lrp.md)
    lrp_block: ast.LrpBlock | None = None

    def statement_nodes(self, statement: str) -> list[OpNode]:
        """The ops a statement created: ``h`` and its nested calls ``h/linear``, ..."""
        return [n for n in self.topological()
                if n.name == statement or n.name.startswith(statement + "/")]

    def node(self, name: str) -> OpNode:
        op: OpNode = self.digraph.nodes[name]["op"]
        return op

    def topological(self) -> Iterator[OpNode]:
        for name in nx.lexicographical_topological_sort(
                self.digraph, key=lambda n: self._order(n)):
            yield self.node(name)

    def _order(self, name: str) -> tuple[int, int, str]:
        pos = self.node(name).pos
        return (pos.line, pos.column, name)

    def replace_node(self, op: OpNode) -> None:
        self.digraph.nodes[op.name]["op"] = op

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def shape_of(self, name: str) -> tuple[int, ...]:
        shape = self.node(name).shape
        if shape is None:
            raise ValueError(f"shape of '{name}' not inferred yet")
        return shape
