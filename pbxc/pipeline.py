"""The named stages in order; the one module that knows every stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from pbxc.errors import PbxError
from pbxc.graph.frontend import check_file, frontend
from pbxc.graph.ir import ModelGraph
from pbxc.parse.parser import parse_text
from pbxc.runtime.model import Model
from pbxc.symbolic.calculus import DEFAULT_CONVENTION


def derive_activations(graph: ModelGraph, convention: str = DEFAULT_CONVENTION) -> int:
    """Derive every activation ``graph`` uses (within the limits of ``symbolic/budget.py``),
    so that ``pbxc check`` reports an activation that cannot be derived; returns how many."""
    import warnings

    from pbxc.ops import OpKind
    from pbxc.symbolic.activations import activation_key
    from pbxc.symbolic.derive import AccuracyWarning, derive

    keys = {activation_key(node.activation, node.activation_params, graph.user_activations)
            for node in graph.topological()
            if node.kind is OpKind.ACTIVATION and node.activation is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)  # a warning, reported where it runs
        for key in keys:
            derive(key, graph.user_activations, convention)
    return len(keys)


if TYPE_CHECKING:
    from pbxc.runtime.cupy_backend import CupyModel

BACKENDS = ("numpy", "cupy")


def _on_backend(model: Model, backend: str) -> Model | CupyModel:
    if backend == "numpy":
        return model
    if backend != "cupy":
        raise PbxError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
    from pbxc.runtime.cupy_backend import CupyModel, cupy_unavailable

    reason = cupy_unavailable()
    if reason is not None:
        raise PbxError(f"backend 'cupy' is unavailable: {reason}. Install it with "
                       "`pip install pbxc[cuda]` on a machine with an NVIDIA GPU")
    return CupyModel(model)


@overload
def load(path: str | Path, dtype: Any = ..., convention: str = ...,
         backend: Literal["numpy"] = ...) -> Model: ...
@overload
def load(path: str | Path, dtype: Any = ..., convention: str = ..., *,
         backend: Literal["cupy"]) -> CupyModel: ...
@overload
def load(path: str | Path, dtype: Any = ..., convention: str = ...,
         backend: str = ...) -> Model | CupyModel: ...


def load(path: str | Path, dtype: Any = None, convention: str = DEFAULT_CONVENTION,
         backend: str = "numpy") -> Model | CupyModel:
    """Load a .pbx model (with its weights) on the NumPy reference backend.

    ``dtype`` is float32 or float64; by default the inputs' declared dtype. ``convention`` is
    the derivative taken where a preactivation sits exactly on a kink: "owner" (the branch
    that owns the point, PyTorch's choice for relu), "left", "right" or "mean".
    ``backend="cupy"`` runs the passes on the generated CUDA kernels (a
    :class:`pbxc.runtime.cupy_backend.CupyModel`; needs cupy and a GPU).
    """
    graph, store = check_file(path)
    return _on_backend(Model(graph, store, dtype, convention), backend)


@overload
def loads(text: str, path: str = ..., dtype: Any = ..., convention: str = ...,
          backend: Literal["numpy"] = ...) -> Model: ...
@overload
def loads(text: str, path: str = ..., dtype: Any = ..., convention: str = ..., *,
          backend: Literal["cupy"]) -> CupyModel: ...
@overload
def loads(text: str, path: str = ..., dtype: Any = ..., convention: str = ...,
          backend: str = ...) -> Model | CupyModel: ...


def loads(text: str, path: str = "<string>", dtype: Any = None,
          convention: str = DEFAULT_CONVENTION, backend: str = "numpy") -> Model | CupyModel:
    """Load a model from .pbx source text; weight paths are relative to ``path``'s folder."""
    graph, store = frontend(parse_text(text, path))
    return _on_backend(Model(graph, store, dtype, convention), backend)
