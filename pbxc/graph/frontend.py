"""The front end as one call: parse -> build -> bind weights -> infer shapes.

It lives in the graph stage (it needs only parse, weights and graph) so that later stages,
such as ``pbxc import`` checking the model it writes, can run it without importing the
pipeline; :mod:`pbxc.pipeline` re-exports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbxc.graph.build import build_graph
from pbxc.graph.ir import ModelGraph
from pbxc.graph.shapes import infer_shapes
from pbxc.parse.ast import Program
from pbxc.parse.parser import parse_file
from pbxc.weights.store import WeightStore, load_weight_files


def weight_paths(graph: ModelGraph) -> list[tuple[Path, Any]]:
    """The weight files a graph binds, relative to its .pbx file's folder."""
    base = Path(graph.path).parent if graph.path and not graph.path.startswith("<") else Path()
    return [(base / rel, pos) for rel, pos in graph.weight_files]


def frontend(program: Program) -> tuple[ModelGraph, WeightStore]:
    """AST -> checked graph with shapes, and the weights it binds."""
    graph = build_graph(program)
    store = load_weight_files(weight_paths(graph))
    infer_shapes(graph, store)
    return graph, store


def check_file(path: str | Path) -> tuple[ModelGraph, WeightStore]:
    """Parse, build, load weights and infer shapes; raise a :class:`PbxError` on any problem."""
    return frontend(parse_file(path))
