"""ONNX -> .pbx: a readable model file and its weights (.npz), from the ``onnx`` package's
protobuf reader (never pickle, never executed). See specs/onnx.md for the op table.

ONNX tensors carry the batch as axis 0; pbxc shapes and axes are per sample. Axis attributes
move down by one (ONNX axis 1 is pbxc axis 0; negative axes are kept); an op on the batch axis
is refused. Weight layouts are rewritten into PyTorch's (Gemm with transB=0 and MatMul
weights are transposed to [out, in]; Gemm's alpha and beta are folded in).

The import runs in three steps: the file is validated (tensor types, sizes against their data,
finite attributes) before anything is allocated from it; subgraphs that compute only constants
or shapes (``Shape -> Gather -> Concat -> Reshape``, ``Identity`` of an initializer,
``ConstantOfShape``) are folded by onnx's reference evaluator, node by node, with the batch
size set to two different values so that a result that depends on it is recognised; then every
remaining node is mapped to a .pbx op. Errors are collected over the whole graph and reported
together. No dtype is changed: the model computes in its input's dtype, a weight of another
dtype is an error naming it unless ``dtype=`` asks for the conversion explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pbxc.errors import Diagnostic, InputError, UnsupportedOp
from pbxc.interop.onnx_layout import Layout, LayoutOps
from pbxc.interop.onnx_transformers import TransformerOps
from pbxc.outputs import write_files

SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Dropout", "Elu", "Flatten", "Gelu",
    "Gemm", "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu",
    "LogSoftmax", "MatMul", "MaxPool", "Mish", "Mul", "Pad", "PRelu", "ReduceMean", "Relu",
    "Reshape", "Resize", "Selu", "Shape", "Sigmoid", "Softmax", "Softplus", "Squeeze", "Sub",
    "Tanh", "Unsqueeze", "ai.onnx.ml.Scaler", "ai.onnx.ml.ZipMap",
    # issue 12 (transformers, pbxc/interop/onnx_transformers.py)
    "Transpose", "Gather", "Slice", "Split", "ReduceSum", "LayerNormalization",
    # patterns: x * Sigmoid(x), x * Sigmoid(b x) (silu, swish); the erf and tanh forms of
    # GELU; x * Tanh(Softplus(x)) (mish); Where(Greater(x, t), x, Softplus(x)) (thresholded
    # softplus); any node computing constants or shapes only (folded)
)

KEYWORDS = {"model", "weights", "input", "output", "activation", "verify", "features",
            "classes", "true", "false", "none", "domain", "in", "within", "std", "of", "key",
            "lrp", "composite"}
DTYPES = {1: "float32", 11: "float64"}
ONNX_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16",
                   6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
                   12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
                   16: "BFLOAT16"}
# tensor types an initializer or Constant may hold: numbers pbxc can read exactly
READABLE_TYPES = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13}
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
SWISH = "activation swish(z, beta = 1.0) = z * sigmoid(beta * z)"
SOFTPLUS_THRESHOLD = ("activation softplus_threshold(z, beta = 1.0, threshold = 20.0) = "
                      "where(beta * z > threshold, z, softplus(z, beta))")
PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
MAX_ELEMENTS = 1 << 31          # one tensor, initializer or folded constant
MAX_TOTAL_ELEMENTS = 1 << 32    # all initializers together
# the two batch sizes shape subgraphs are evaluated at; a result that differs between them
# depends on the batch
BATCH_PROBES = (2, 3)
# ops the folder never evaluates: random, stateful or with subgraphs
NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan",
                "SequenceMap", "Optional"}


@dataclass
class Value:
    """An ONNX tensor as pbxc sees it: a .pbx name and its per-sample shape. ``onnx_shape``
    is the shape ONNX gives it (without the batch); it differs from ``shape`` after ops that
    only reshape (Flatten, Reshape, Squeeze, Unsqueeze, a pooling to [C] that ONNX keeps as
    [C, 1, 1]): the reshape is written only when a consumer needs the ONNX layout."""

    name: str
    shape: tuple[int, ...]
    onnx_shape: tuple[int, ...]
    # issue 12: the batch is not (alone) at ONNX axis 0 (pbxc/interop/onnx_layout.py)
    layout: Layout | None = None


@dataclass
class ImportResult:
    text: str
    weights: dict[str, np.ndarray]
    statements: list[str] = field(default_factory=list)
    pbx_path: Path | None = None
    weights_path: Path | None = None
    notes: list[str] = field(default_factory=list)


class NodeError(Exception):
    """One node that cannot be imported; collected, then reported with the others."""


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        if len(v) and len(set(v)) == 1:
            return _fmt(v[0])
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"non-finite number {f}")
        return repr(f)
    return str(int(v))


def _shortest(value: Any) -> float:
    """The shortest decimal that rounds to this float32 (numpy's repr of it), as a float."""
    f = np.float32(value)
    return float(repr(float(f))) if not np.isfinite(f) else float(str(f))


def _attr_text(value: Any) -> str:
    if isinstance(value, bytes):
        return repr(value.decode(errors="replace"))
    if hasattr(value, "dims"):
        return f"<tensor {list(value.dims)}>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ...]"
    return repr(value)


def validate_model(model: Any) -> None:
    """Every tensor the file holds has a readable type and as much data as its dims say;
    every float attribute is finite. Raises :class:`InputError` naming the tensor or node;
    nothing is allocated from the file before this passes."""
    import onnx

    g = model.graph
    diags: list[Diagnostic] = []
    total = 0
    if len(g.sparse_initializer):
        diags.append(Diagnostic("ONNX sparse initializers are not supported"))

    def check_tensor(t: Any, where: str) -> int:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            diags.append(Diagnostic(f"{where}: external tensor data is not supported (pbxc "
                                    "reads only what the .onnx file holds)"))
            return 0
        name = ONNX_TYPE_NAMES.get(t.data_type, str(t.data_type))
        if t.data_type not in READABLE_TYPES:
            diags.append(Diagnostic(f"{where}: element type {name} is not supported "
                                    "(numbers only: float32/float64, float16, integers, bool)"))
            return 0
        dims = [int(d) for d in t.dims]
        if any(d < 0 for d in dims):
            diags.append(Diagnostic(f"{where}: negative dimension in {dims}"))
            return 0
        count = math.prod(dims)
        if count > MAX_ELEMENTS:
            diags.append(Diagnostic(f"{where}: {count} elements exceed the limit of "
                                    f"{MAX_ELEMENTS}"))
            return 0
        if t.HasField("raw_data"):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            have, unit = len(t.raw_data), "bytes"
            want = count * itemsize
        else:
            field_name = onnx.helper.tensor_dtype_to_field(t.data_type)
            have, unit = len(getattr(t, field_name)), "values"
            want = count
            if t.data_type == 10:  # float16 in int32_data: one value per entry
                want = count
        if have != want:
            diags.append(Diagnostic(f"{where}: dims {dims} need {want} {unit} of data, the "
                                    f"file holds {have}"))
        return count

    for t in g.initializer:
        total += check_tensor(t, f"ONNX initializer '{t.name}'")
    for n in g.node:
        label = f"ONNX node '{n.name or (n.output[0] if n.output else '?')}' ({n.op_type})"
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += check_tensor(a.t, f"{label}: attribute '{a.name}'")
            elif a.type == onnx.AttributeProto.FLOAT and not math.isfinite(a.f):
                diags.append(Diagnostic(f"{label}: attribute {a.name}={a.f} is not finite"))
            elif a.type == onnx.AttributeProto.FLOATS and \
                    not all(math.isfinite(f) for f in a.floats):
                diags.append(Diagnostic(f"{label}: attribute '{a.name}' holds non-finite "
                                        "values"))
            elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                diags.append(Diagnostic(f"{label}: control flow (subgraph attribute "
                                        f"'{a.name}') is not supported"))
    if total > MAX_TOTAL_ELEMENTS:
        diags.append(Diagnostic(f"the ONNX file's tensors hold {total} elements, over the "
                                f"limit of {MAX_TOTAL_ELEMENTS}"))
    if diags:
        raise InputError(diags)


class Converter(TransformerOps, LayoutOps):
    def __init__(self, model: Any, name: str, dtype: str | None = None,
                 outputs: Sequence[str] | None = None) -> None:
        import onnx
        from onnx import numpy_helper

        validate_model(model)
        self.onnx = onnx
        self.np_helper = numpy_helper
        self.name = _ident(name)
        self.dtype_override = dtype
        with contextlib.suppress(Exception):   # shape inference helps; it is not required
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        self.model = model
        g = model.graph
        self.graph = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          13)
        self.consts: dict[str, np.ndarray] = {}
        for t in g.initializer:
            self.consts[t.name] = self.read_tensor(t, f"initializer '{t.name}'")
        # tensors whose value depends on the batch size: name -> value at each BATCH_PROBES
        self.batch_consts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.values: dict[str, Value] = {}
        self.inferred: dict[str, tuple[int, ...] | None] = {}
        self.inferred_full: dict[str, tuple[int | None, ...]] = {}
        self.elem_type: dict[str, int] = {}
        for vi in [*g.value_info, *g.output, *g.input]:
            tt = vi.type.tensor_type
            self.elem_type[vi.name] = tt.elem_type
            dims = tt.shape.dim
            if tt.HasField("shape"):
                self.inferred_full[vi.name] = tuple(
                    int(d.dim_value) if d.HasField("dim_value") else None for d in dims)
            if tt.HasField("shape") and len(dims) and all(d.HasField("dim_value")
                                                          for d in dims[1:]):
                self.inferred[vi.name] = tuple(int(d.dim_value) for d in dims[1:])
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.notes: list[str] = []
        self.outputs = self.select_outputs(outputs)
        self.used_names: set[str] = set()
        self.used_prefixes: set[str] = set()
        self.weights: dict[str, np.ndarray] = {}
        self.statements: list[str] = []
        #: statement index -> the ONNX node it was converted from ("name (OpType)"), written
        #: as the statement's trailing ``# onnx:`` comment
        self.sources: dict[int, str] = {}
        self.source_node: str | None = None
        self.defined_at: dict[str, int] = {}   # .pbx name -> index of its statement
        self.header: list[str] = []
        self.declarations: list[str] = []
        self.skip: set[int] = set()           # ids of nodes folded into a pattern
        self.alias_out: dict[str, str] = {}    # ONNX tensor -> tensor whose value it takes
        self.classes: dict[str, list[str]] = {}
        self.failed: set[str] = set()          # tensors of nodes that could not be imported
        self.errors: list[Diagnostic] = []
        self.batch: int | None = None          # the ONNX input's batch size, if fixed
        self.dtype = "float32"

    # ------------------------------------------------------------ helpers

    def label(self, node: Any) -> str:
        return f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"

    def fail(self, node: Any, message: str) -> NodeError:
        return NodeError(f"{self.label(node)}: {message}")

    def read_tensor(self, t: Any, where: str) -> np.ndarray:
        try:
            return np.asarray(self.np_helper.to_array(t))
        except Exception as err:   # validated above; any remaining decoding problem
            raise InputError(f"ONNX {where}: cannot be read: {err}") from None

    def attrs(self, node: Any) -> dict[str, Any]:
        """The node's attributes. ONNX stores float attributes as float32; each is read as the
        shortest decimal that rounds to it (``eps=0.001``, not 0.0010000000474974513): the
        value the exporter was given, whenever that was such a decimal, and the same float32
        in any case."""
        out = {}
        for a in node.attribute:
            v = self.onnx.helper.get_attribute_value(a)
            if a.type == self.onnx.AttributeProto.FLOAT:
                v = _shortest(v)
            elif a.type == self.onnx.AttributeProto.FLOATS:
                v = [_shortest(f) for f in v]
            out[a.name] = v
        return out

    def check_attrs(self, node: Any, allowed: dict[str, Any]) -> dict[str, Any]:
        """The node's attributes; one outside ``allowed`` (name -> None for any value, or a
        tuple of accepted values) is an error naming it."""
        found = self.attrs(node)
        for key, value in found.items():
            if key not in allowed:
                raise self.fail(node, f"attribute {key}={_attr_text(value)} is not supported "
                                f"(supported: {', '.join(sorted(allowed)) or 'none'})")
            ok = allowed[key]
            v = value.decode() if isinstance(value, bytes) else value
            if ok is not None and v not in ok:
                raise self.fail(node, f"attribute {key}={v!r} is not supported "
                                f"(supported: {', '.join(repr(o) for o in ok)})")
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in found.items()}

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, node: Any, name: str) -> np.ndarray:
        if name in self.batch_consts:
            raise self.fail(node, f"input '{name}' depends on the batch size, which pbxc "
                            "keeps implicit")
        if name not in self.consts:
            raise self.fail(node, f"input '{name}' must be a constant (an initializer, or "
                            "computed from constants and shapes only)")
        return self.consts[name]

    def scalar(self, node: Any, name: str) -> float:
        c = self.const(node, name)
        if c.size != 1:
            raise self.fail(node, f"input '{name}' must be a scalar constant, got shape "
                            f"{list(c.shape)}")
        f = _shortest(c.reshape(())) if c.dtype == np.float32 else float(c.reshape(()))
        if not math.isfinite(f):
            raise self.fail(node, f"input '{name}' is not finite ({f})")
        return f

    def weight(self, node: Any, name: str) -> np.ndarray:
        """A constant used as a weight, in the model's dtype; another float dtype is kept
        only if the user asked (``--dtype``), anything else is an error naming it."""
        w = self.const(node, name)
        want = np.dtype(self.dtype)
        if w.dtype.kind == "f" and not np.all(np.isfinite(w)):
            raise self.fail(node, f"constant '{name}' holds non-finite values")
        if w.dtype == want:
            return w
        if w.dtype.kind != "f" and w.dtype.kind not in "iub":
            raise self.fail(node, f"constant '{name}' has dtype {w.dtype}")
        if self.dtype_override is None and w.dtype.kind == "f":
            raise self.fail(node, f"constant '{name}' is {w.dtype} but the model computes in "
                            f"{want}; pbxc keeps one dtype and does not convert silently "
                            f"(pass --dtype {want} to convert it explicitly)")
        if not np.all(np.isfinite(w.astype(np.float64))):
            raise self.fail(node, f"constant '{name}' holds non-finite values")
        return w.astype(want)

    def value(self, node: Any, name: str, layout: str = "onnx") -> Value:
        name = self.alias_out.get(name, name)
        if name in self.failed:
            raise _Cascade()
        if name not in self.values:
            if name in self.consts or name in self.batch_consts:
                raise self.fail(node, f"input '{name}' is a constant where pbxc needs a value "
                                "computed from the model's input")
            raise self.fail(node, f"input '{name}' is not defined")
        v = self.values[name]
        if v.layout is not None:
            raise self.fail(node, f"input '{name}' has its batch moved to ONNX axis "
                            f"{v.layout.bax} ({v.layout.describe()}, N the batch, after a "
                            "Transpose or Reshape); this op needs the batch alone at axis 0")
        if layout == "onnx" and v.shape != v.onnx_shape:
            if len(v.onnx_shape) == 1:
                new = Value(self.fresh(v.name + "_flat"), v.onnx_shape, v.onnx_shape)
                self.emit(new.name, f"flatten({v.name})")
            else:
                new = Value(self.fresh(v.name + "_r"), v.onnx_shape, v.onnx_shape)
                self.emit(new.name, f"reshape({v.name}, [{', '.join(map(str, v.onnx_shape))}])")
            self.values[name] = new
            return new
        return v

    def fresh(self, base: str) -> str:
        name = _ident(base)
        if name in KEYWORDS:
            name += "_"
        out, k = name, 1
        while out in self.used_names:
            k += 1
            out = f"{name}_{k}"
        self.used_names.add(out)
        return out

    def out_name(self, node: Any, tensor: str) -> str:
        if tensor in self.outputs:
            return self.fresh(tensor)
        base = node.name.strip("/").replace("/", "_") if node.name else \
            f"{node.op_type.lower()}_{len(self.statements)}"
        return self.fresh(base)

    def prefix(self, node: Any, weight_name: str | None, stem: str) -> str:
        cand = None
        if weight_name and weight_name.endswith(".weight"):
            cand = weight_name[: -len(".weight")]
        if not cand or not PARAM_RE.match(cand) or cand in self.used_prefixes:
            parts = [q for q in node.name.split("/") if q]
            if len(parts) > 1 and re.fullmatch(rf"{node.op_type}(_\d+)?", parts[-1]):
                parts = parts[:-1]    # '/scaler/Sub' -> 'scaler'
            base = _ident("_".join(parts)) if parts else stem
            cand, k = base, 1
            while cand in self.used_prefixes or not PARAM_RE.match(cand):
                k += 1
                cand = f"{base}_{k}"
        self.used_prefixes.add(cand)
        return cand

    def emit(self, name: str, expr: str) -> None:
        self.defined_at[name] = len(self.statements)
        if self.source_node is not None:   # `pbxc graph` shows it beside the recognised op
            self.sources[len(self.statements)] = self.source_node
        self.statements.append(f"{name} = {expr}")

    def define(self, node: Any, expr: str, shape: Sequence[int],
               onnx_shape: Sequence[int] | None = None, tensor: str | None = None) -> None:
        tensor = tensor or node.output[0]
        name = self.out_name(node, tensor)
        self.emit(name, expr)
        self.values[tensor] = Value(name, tuple(shape), tuple(onnx_shape or shape))

    def alias(self, tensor: str, v: Value, onnx_shape: Sequence[int] | None = None) -> None:
        self.values[tensor] = Value(v.name, v.shape, tuple(v.onnx_shape if onnx_shape is None
                                                           else onnx_shape), v.layout)

    def per_sample_const(self, node: Any, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A constant operand broadcast to one sample's shape (a leading batch axis of size 1
        is dropped), in the model's dtype."""
        if c.ndim == len(shape) + 1:
            if c.shape[0] != 1:
                raise self.fail(node, f"a constant of shape {list(c.shape)} varies along the "
                                "batch axis")
            c = c[0]
        try:
            out = np.array(np.broadcast_to(c, shape))
        except ValueError:
            raise self.fail(node, f"constant of shape {list(c.shape)} does not broadcast to "
                            f"the per-sample shape {list(shape)}") from None
        return out

    def axis(self, node: Any, axis: int, rank: int) -> int:
        """An ONNX axis of a (batch + ``rank``)-dimensional tensor as a per-sample axis."""
        full = rank + 1
        a = axis + full if axis < 0 else axis
        if not 0 <= a < full:
            raise self.fail(node, f"axis {axis} is out of range for rank {full}")
        if a == 0:
            raise self.fail(node, "ops along the batch axis (axis 0) are not supported")
        return a - 1 - rank  # negative: counts from the end, the same in both conventions

    def shape_of(self, node: Any, computed: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample output shape pbxc computed; onnx's shape inference must agree."""
        got = self.inferred.get(node.output[0])
        if got is not None and tuple(got) != tuple(computed):
            raise self.fail(node, f"output shape {list(computed)} disagrees with onnx's shape "
                            f"inference {list(got)}")
        if any(d <= 0 for d in computed):
            raise self.fail(node, f"output shape {list(computed)} is empty")
        return computed

    # ------------------------------------------------------------ outputs and pruning

    def select_outputs(self, wanted: Sequence[str] | None) -> set[str]:
        """The graph outputs to import. Without a choice, outputs that are not float tensors
        (sklearn's integer label, computed by ArgMax) are left out, with a note."""
        names = [o.name for o in self.graph.output]
        if wanted:
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise InputError(f"--outputs names {', '.join(map(repr, unknown))}, which "
                                 f"the ONNX graph does not output (outputs: "
                                 f"{', '.join(map(repr, names))})")
            return set(wanted)
        keep = set()
        for o in self.graph.output:
            t = o.type
            is_float = t.HasField("tensor_type") and t.tensor_type.elem_type in FLOAT_TYPES
            via_zipmap = (self.producer.get(o.name) is not None
                          and self.producer[o.name].op_type == "ZipMap")
            if is_float or via_zipmap:
                keep.add(o.name)
            else:
                kind = (ONNX_TYPE_NAMES.get(t.tensor_type.elem_type, "?")
                        if t.HasField("tensor_type") else "not a tensor")
                self.notes.append(f"output '{o.name}' ({kind}, computed by "
                                  f"{self.ops_behind(o.name)}) is not imported: pbxc outputs "
                                  "are float tensors; choose outputs with --outputs")
        if not keep:
            raise InputError("the ONNX graph has no float tensor output")
        return keep

    def ops_behind(self, tensor: str, limit: int = 6) -> str:
        seen: list[str] = []
        stack = [tensor]
        visited = set()
        while stack and len(seen) < limit:
            t = stack.pop()
            n = self.producer.get(t)
            if n is None or id(n) in visited:
                continue
            visited.add(id(n))
            seen.append(n.op_type)
            stack.extend(i for i in n.input if i)
        return " <- ".join(seen)

    def needed_nodes(self) -> set[int]:
        need: set[int] = set()
        stack = list(self.outputs)
        while stack:
            t = stack.pop()
            n = self.producer.get(t)
            if n is None or id(n) in need:
                continue
            need.add(id(n))
            stack.extend(i for i in n.input if i)
        return need

    # ------------------------------------------------------------ folding

    def foldable(self, node: Any) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in NOT_FOLDABLE:
            return False
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            src = self.alias_out.get(ins[0], ins[0]) if ins else ""
            # a value's shape, or the shape of a constant that depends on the batch size (the
            # TorchScript exporter's `cls.expand(x.shape[0], -1, -1)`: Shape of a Reshape of it)
            return src in self.values or src in self.consts or src in self.batch_consts
        if node.op_type == "CastLike" and len(ins) == 2:   # reads only the dtype of its second
            src = self.alias_out.get(ins[1], ins[1])
            return (ins[0] in self.consts or ins[0] in self.batch_consts) and \
                (src in self.values or src in self.consts)
        return all(i in self.consts or i in self.batch_consts for i in ins)

    def fold(self, node: Any) -> None:
        """Evaluate a node of constants (or of a value's shape) with onnx's reference
        evaluator, at both probe batch sizes when an input depends on the batch."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        if node.op_type == "ConstantOfShape" or node.op_type == "Expand":
            shp = node.input[1 if node.op_type == "Expand" else 0]
            for arr in self.batch_consts.get(shp, (self.consts.get(shp, np.zeros(0)),)):
                if arr.size and (np.any(arr < 0) or
                                 math.prod(int(v) for v in arr.reshape(-1)) > MAX_ELEMENTS):
                    raise self.fail(node, f"shape {arr.tolist()} is negative or over the limit "
                                    f"of {MAX_ELEMENTS} elements")
        variants = []
        batch_dependent = node.op_type in ("Shape", "Size") or any(
            i in self.batch_consts for i in node.input)
        probes = BATCH_PROBES if batch_dependent and self.batch is None else (self.batch or 2,)
        for k, b in enumerate(probes):
            feeds: dict[str, np.ndarray] = {}
            for i in node.input:
                if not i or i in feeds:
                    continue
                if i in self.batch_consts:
                    feeds[i] = self.batch_consts[i][min(k, 1)]
                elif i in self.consts:
                    feeds[i] = self.consts[i]
                else:  # the value a Shape (or CastLike) reads: only its shape and dtype
                    v = self.values[self.alias_out.get(i, i)]
                    full = v.layout.full(b) if v.layout is not None else (b, *v.onnx_shape)
                    feeds[i] = np.broadcast_to(np.zeros((), self.dtype), full)
            inputs = [helper.make_tensor_value_info(
                k2, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                for k2, a in feeds.items()]
            outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
            graph = helper.make_graph([node], "fold", inputs, outs)
            model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            try:
                results = ReferenceEvaluator(model).run(None, feeds)
            except Exception as err:  # the reference evaluator raises many types
                raise self.fail(node, f"cannot evaluate this node of constants: "
                                f"{type(err).__name__}: {str(err)[:200]}") from None
            for r in results:
                if np.asarray(r).size > MAX_ELEMENTS:
                    raise self.fail(node, "a folded constant exceeds the size limit")
            variants.append([np.asarray(r) for r in results])
        outs_names = [o for o in node.output if o]
        for j, o in enumerate(outs_names):
            first = variants[0][j]
            if len(variants) == 1 or (variants[1][j].shape == first.shape
                                      and np.array_equal(variants[1][j], first)):
                self.consts[o] = first
            else:
                self.batch_consts[o] = (first, variants[1][j])

    # ------------------------------------------------------------ patterns

    def only_consumer(self, tensor: str) -> Any:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def producer_of(self, tensor: str, op: str) -> Any:
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def const_near(self, name: str, target: float, rel: float = 1e-6) -> bool:
        c = self.consts.get(name)
        return c is not None and c.size == 1 and \
            abs(float(c.reshape(())) - target) <= rel * max(abs(target), 1e-30)

    def other_input(self, node: Any, tensor: str) -> str | None:
        ins = list(node.input)
        if len(ins) != 2 or tensor not in ins:
            return None
        return ins[1 - ins.index(tensor)]

    def match_gelu_erf(self, erf: Any) -> tuple[str, Any, list[Any]] | None:
        """x * 0.5 * (1 + erf(x / sqrt 2)) in the orders both exporters write."""
        div = self.producer.get(erf.input[0])
        if div is None or self.only_consumer(erf.input[0]) is None:
            return None
        if div.op_type == "Div" and self.const_near(div.input[1], math.sqrt(2)):
            x = div.input[0]
        elif div.op_type == "Mul" and any(self.const_near(i, 1 / math.sqrt(2))
                                          for i in div.input):
            x = next(i for i in div.input if not self.const_near(i, 1 / math.sqrt(2)))
        else:
            return None
        add = self.only_consumer(erf.output[0])
        if add is None or add.op_type != "Add" or not self.const_near(
                self.other_input(add, erf.output[0]) or "", 1.0):
            return None
        m1 = self.only_consumer(add.output[0])
        if m1 is None or m1.op_type != "Mul":
            return None
        o1 = self.other_input(m1, add.output[0])
        nodes = [div, erf, add, m1]
        if o1 == x:        # x * (1 + erf) then * 0.5
            m2 = self.only_consumer(m1.output[0])
            if m2 is None or m2.op_type != "Mul" or not self.const_near(
                    self.other_input(m2, m1.output[0]) or "", 0.5):
                return None
        elif o1 is not None and self.const_near(o1, 0.5):   # 0.5 * (1 + erf) then * x
            m2 = self.only_consumer(m1.output[0])
            if m2 is None or m2.op_type != "Mul" or self.other_input(m2, m1.output[0]) != x:
                return None
        else:
            return None
        return x, m2, [*nodes, m2]

    def match_gelu_tanh(self, tanh: Any) -> tuple[str, Any, list[Any]] | None:
        """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as both exporters write it."""
        c = math.sqrt(2 / math.pi)
        scale = self.producer.get(tanh.input[0])
        if scale is None or scale.op_type != "Mul" or self.only_consumer(tanh.input[0]) is None:
            return None
        k = next((i for i in scale.input if self.const_near(i, c)), None)
        if k is None:
            return None
        inner = self.producer.get(self.other_input(scale, k) or "")
        if inner is None or inner.op_type != "Add" or self.only_consumer(inner.output[0]) is None:
            return None
        cube_term = None
        x = None
        for cand in inner.input:
            other = self.other_input(inner, cand)
            p = self.producer.get(other or "")
            if p is not None and p.op_type == "Mul" and any(self.const_near(i, 0.044715)
                                                            for i in p.input):
                x, cube_term = cand, p
                break
        if cube_term is None or x is None:
            return None
        cube = self.producer.get(next(i for i in cube_term.input
                                      if not self.const_near(i, 0.044715)))
        nodes = [cube_term, inner, scale, tanh]
        if cube is None:
            return None
        if cube.op_type == "Pow" and cube.input[0] == x and self.const_near(cube.input[1], 3.0):
            nodes.append(cube)
        elif cube.op_type == "Mul" and x in cube.input:
            sq = self.producer.get(self.other_input(cube, x) or "")
            if sq is None or sq.op_type != "Mul" or list(sq.input) != [x, x]:
                return None
            nodes += [cube, sq]
        else:
            return None
        add = self.only_consumer(tanh.output[0])
        if add is None or add.op_type != "Add" or not self.const_near(
                self.other_input(add, tanh.output[0]) or "", 1.0):
            return None
        m1 = self.only_consumer(add.output[0])
        if m1 is None or m1.op_type != "Mul":
            return None
        o1 = self.other_input(m1, add.output[0])
        m2 = self.only_consumer(m1.output[0])
        if m2 is None or m2.op_type != "Mul":
            return None
        o2 = self.other_input(m2, m1.output[0])
        if not ((o1 == x and self.const_near(o2 or "", 0.5)) or
                (self.const_near(o1 or "", 0.5) and o2 == x)):
            return None
        return x, m2, [*nodes, add, m1, m2]

    def find_patterns(self) -> dict[int, tuple[str, Any]]:
        """Node id -> (pattern, data) for node groups folded into one pbxc op."""
        found: dict[int, tuple[str, Any]] = {}

        def take(final: Any, kind: str, data: Any, inner: Sequence[Any]) -> None:
            found[id(final)] = (kind, data)
            self.skip.update(id(n) for n in inner if n is not final)

        for n in self.graph.node:
            if id(n) in self.skip or id(n) in found:
                continue
            if n.op_type == "MatMul" and self.is_const(n.input[1]):
                add = self.only_consumer(n.output[0])
                if add is not None and add.op_type == "Add":
                    other = [i for i in add.input if i != n.output[0]]
                    if len(other) == 1 and self.is_const(other[0]):
                        found[id(n)] = ("matmul_add", add)
                        self.skip.add(id(add))
                        self.alias_out[add.output[0]] = n.output[0]
            if n.op_type == "Sub" and self.is_const(n.input[1]) and not self.is_const(n.input[0]):
                div = self.only_consumer(n.output[0])
                if div is not None and div.op_type == "Div" and div.input[0] == n.output[0] \
                        and self.is_const(div.input[1]):
                    found[id(n)] = ("standardize", div)
                    self.skip.add(id(div))
                    self.alias_out[div.output[0]] = n.output[0]
            if n.op_type == "Div":   # issue 12: a decomposed LayerNorm
                ln = self.match_layernorm(n)
                if ln is not None:
                    take(ln[0], "layernorm", ln[1], ln[2])
                    continue
            if n.op_type == "Erf":
                m = self.match_gelu_erf(n)
                if m is not None:
                    take(m[1], "gelu", (m[0], "gelu"), m[2])
            if n.op_type == "Tanh":
                m = self.match_gelu_tanh(n)
                if m is not None:
                    take(m[1], "gelu", (m[0], "gelu_tanh"), m[2])
            if n.op_type == "Softplus":   # softplus(beta x) / beta: nn.Softplus(beta)
                mul = self.producer_of(n.input[0], "Mul")
                div = self.only_consumer(n.output[0])
                if mul is not None and self.only_consumer(n.input[0]) is not None and \
                        div is not None and div.op_type == "Div" and \
                        div.input[0] == n.output[0]:
                    c = next((i for i in mul.input if self.is_const(i)), None)
                    x = self.other_input(mul, c) if c is not None else None
                    if c is not None and x is not None and not self.is_const(x) and \
                            self.consts[c].size == 1 and \
                            self.const_near(div.input[1], float(self.consts[c].reshape(())),
                                            0.0):
                        take(div, "softplus_beta", (x, float(self.consts[c].reshape(()))),
                             [mul, n, div])
            if n.op_type == "Where":
                m2 = self.match_softplus_threshold(n)
                if m2 is not None:
                    take(n, "softplus_threshold", m2[0], m2[1])
            if n.op_type == "Mul" and not any(self.is_const(i) for i in n.input):
                for z, s in (n.input, n.input[::-1]):
                    t = self.producer.get(s)
                    if t is not None and t.op_type == "Tanh" and self.only_consumer(s):
                        sp = self.producer.get(t.input[0])
                        if sp is not None and sp.op_type == "Softplus" and sp.input[0] == z \
                                and self.only_consumer(t.input[0]) and not sp.attribute:
                            take(n, "mish", z, [sp, t, n])
                            break
                    sig = self.producer.get(s)
                    if sig is None or sig.op_type != "Sigmoid" or self.only_consumer(s) is None:
                        continue
                    u = sig.input[0]
                    if u == z:
                        take(n, "swish", (z, 1.0), [sig, n])
                        break
                    pre = self.producer.get(u)
                    if pre is not None and pre.op_type == "Mul" and \
                            self.only_consumer(u) is not None:
                        ins = list(pre.input)
                        if z in ins:
                            c = ins[1 - ins.index(z)]
                            if self.is_const(c) and self.consts[c].size == 1:
                                beta = float(self.consts[c].reshape(()))
                                take(n, "swish", (z, beta), [sig, pre, n])
                                break
        return found

    def match_softplus_threshold(self, where: Any) -> tuple[Any, list[Any]] | None:
        """Where(Greater(beta x, t), x, Softplus(beta x) / beta): nn.Softplus(beta, threshold)
        as the dynamo exporter writes it (beta = 1: no Mul and no Div)."""
        cond, x, other = where.input
        gt = self.producer.get(cond)
        if gt is None or gt.op_type != "Greater" or not self.is_const(gt.input[1]) or \
                self.only_consumer(cond) is None:
            return None
        threshold = self.consts[gt.input[1]]
        if threshold.size != 1:
            return None
        nodes = [gt]
        scaled = gt.input[0]
        beta = 1.0
        if scaled != x:
            mul = self.producer.get(scaled)
            if mul is None or mul.op_type != "Mul" or x not in mul.input:
                return None
            c = self.other_input(mul, x)
            if c is None or not self.is_const(c) or self.consts[c].size != 1:
                return None
            beta = float(self.consts[c].reshape(()))
            nodes.append(mul)
        sp_out = other
        if beta != 1.0:
            div = self.producer.get(other)
            if div is None or div.op_type != "Div" or not self.const_near(div.input[1], beta) \
                    or self.only_consumer(other) is None:
                return None
            nodes.append(div)
            sp_out = div.input[0]
        sp = self.producer.get(sp_out)
        if sp is None or sp.op_type != "Softplus" or sp.input[0] != scaled or \
                self.only_consumer(sp_out) is None:
            return None
        if beta != 1.0 and len(self.consumers.get(scaled, [])) != 2:
            return None
        nodes.append(sp)
        return (x, beta, float(threshold.reshape(()))), [*nodes, where]

    # ------------------------------------------------------------ conversion

    def declare_inputs(self) -> None:
        g = self.graph
        for i in g.input:
            if i.name in self.consts:
                continue
            tt = i.type.tensor_type
            if tt.elem_type not in DTYPES:
                raise InputError(f"ONNX input '{i.name}': element type "
                                 f"{ONNX_TYPE_NAMES.get(tt.elem_type, tt.elem_type)} is not "
                                 "supported (float32 or float64)")
            dims = tt.shape.dim
            if not len(dims) or any(not d.HasField("dim_value") or d.dim_value <= 0
                                    for d in dims[1:]):
                raise InputError(f"ONNX input '{i.name}' needs a fixed shape after the batch "
                                 "axis")
            if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                b = int(dims[0].dim_value)
                if self.batch not in (None, b):
                    raise InputError("the ONNX inputs have different fixed batch sizes")
                self.batch = b
            shape = tuple(int(d.dim_value) for d in dims[1:])
            if math.prod(shape) > MAX_ELEMENTS:
                raise InputError(f"ONNX input '{i.name}': shape {list(shape)} is over the "
                                 f"limit of {MAX_ELEMENTS} elements per sample")
            declared = DTYPES[tt.elem_type]
            if self.header and declared != self.dtype and self.dtype_override is None:
                raise InputError(f"ONNX input '{i.name}' is {declared}, another input is "
                                 f"{self.dtype}; pass --dtype to choose one")
            self.dtype = self.dtype_override or declared
            if self.dtype_override and self.dtype_override != declared:
                self.notes.append(f"input '{i.name}' is {declared} in the ONNX file and "
                                  f"{self.dtype} here (--dtype)")
            name = self.fresh(i.name)
            self.header.append(f"input {name}: {self.dtype}[{', '.join(map(str, shape))}]")
            self.values[i.name] = Value(name, shape, shape)
        if not self.header:
            raise InputError("the ONNX graph has no input")

    def run(self) -> str:
        self.declare_inputs()
        need = self.needed_nodes()
        for node in self.graph.node:   # Constant nodes are constants like initializers
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and \
                    id(node) in need:
                try:
                    self.convert_constant(node)
                except NodeError as err:
                    self.errors.append(Diagnostic(str(err)))
        patterns = self.find_patterns()
        for node in self.graph.node:
            if id(node) in self.skip or id(node) not in need or \
                    (node.op_type == "Constant" and node.domain in ("", "ai.onnx")):
                continue
            try:
                if self.foldable(node):
                    self.fold(node)
                    continue
                pattern = patterns.get(id(node))
                self.source_node = f"{node.name or node.output[0]} ({node.op_type}" + (
                    f", end of the {pattern[0]} pattern)" if pattern is not None else ")")
                self.convert(node, pattern)
            except _Cascade:
                self.failed.update(o for o in node.output if o)
            except NodeError as err:
                self.errors.append(Diagnostic(str(err)))
                self.placeholder(node)
            except ValueError as err:   # a number no .pbx literal can hold
                self.errors.append(Diagnostic(f"{self.label(node)}: {err}"))
                self.placeholder(node)
        if self.errors:
            n = len(self.errors)
            self.errors.append(Diagnostic(
                f"{n} ONNX node{'s' if n > 1 else ''} cannot be imported; supported ops: "
                f"{', '.join(SUPPORTED_OPS)} (specs/onnx.md)"))
            raise UnsupportedOp(self.errors)
        self.source_node = None
        self.finish_outputs()
        return self.text()

    def placeholder(self, node: Any) -> None:
        """After a failed node: its outputs keep their inferred shapes so that its consumers
        are still checked (and reported), or are marked failed so they are skipped."""
        for o in node.output:
            if not o:
                continue
            shape = self.inferred.get(o)
            if shape is not None and shape:
                self.values[o] = Value(self.fresh(o), tuple(shape), tuple(shape))
            else:
                self.failed.add(o)

    def finish_outputs(self) -> None:
        for o in self.graph.output:
            if o.name not in self.outputs:
                continue
            src = self.alias_out.get(o.name, o.name)
            if src not in self.values:
                raise InputError(f"ONNX output '{o.name}' is not computed from an input")
            lay = self.values[src].layout
            if lay is not None:
                prod = self.producer.get(src)
                by = f" (computed by {self.label(prod)})" if prod is not None else ""
                raise UnsupportedOp(f"ONNX output '{o.name}'{by} has the batch in ONNX axis "
                                    f"{lay.bax} ({lay.describe()}, N the batch); pbxc outputs "
                                    "keep the batch alone at axis 0")
            v = self.value(self.producer.get(src) or _NoNode(o.name), src)
            classes = self.classes.get(o.name)
            meta = ""
            if classes:
                meta = " classes [" + ", ".join(_quote(c) for c in classes) + "]"
            idx = self.defined_at.get(v.name)
            if idx is not None and v.name == _ident(o.name) and \
                    not self.statements[idx].startswith("output "):
                self.statements[idx] = "output " + self.statements[idx] + meta
            else:
                self.statements.append(f"output {self.fresh(o.name)} = {v.name}{meta}")

    def text(self, source: str = "", weights_file: str = "weights.npz") -> str:
        lines = [f"# imported from {_comment(source or 'an ONNX model')} by `pbxc import` "
                 f"(ONNX opset {self.opset})"]
        lines += [f"# note: {_comment(n)}" for n in self.notes]
        lines.append(f"model {self.name}")
        if self.weights:
            lines.append(f'weights {_quote(weights_file)}')
        lines.append("")
        lines += self.header
        if self.declarations:
            lines += ["", *self.declarations]
        lines.append("")
        lines += [st + (f"  # onnx: {_comment(self.sources[i])}" if i in self.sources else "")
                  for i, st in enumerate(self.statements)]
        return "\n".join(lines) + "\n"

    def convert_constant(self, node: Any) -> None:
        a = self.check_attrs(node, {"value": None, "value_float": None, "value_floats": None,
                                    "value_int": None, "value_ints": None})
        if "value" in a:
            self.consts[node.output[0]] = self.read_tensor(a["value"], self.label(node))
        elif a:
            self.consts[node.output[0]] = np.asarray(next(iter(a.values())))
        else:
            raise self.fail(node, "a Constant without a value")

    def convert(self, node: Any, pattern: tuple[str, Any] | None) -> None:
        op = node.op_type
        if pattern is not None:
            getattr(self, f"pattern_{pattern[0]}")(node, pattern[1])
            return
        if node.domain == "ai.onnx.ml":
            handler = getattr(self, f"ml_{op}", None)
            if handler is None:
                raise self.fail(node, f"op 'ai.onnx.ml.{op}' is not supported (ai.onnx.ml: "
                                "Scaler, ZipMap)")
            handler(node)
            return
        if node.domain not in ("", "ai.onnx"):
            raise self.fail(node, f"op domain '{node.domain}' is not supported")
        if any(self.has_layout(i) for i in node.input if i):   # the batch has moved
            lay_handler = getattr(self, f"lay_{op}", None)
            if lay_handler is not None:
                lay_handler(node)
                return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise self.fail(node, f"op '{op}' is not supported (attributes: "
                            f"{_attrs_summary(self.attrs(node))})")
        handler(node)

    # ------------------------------------------------------------ dense ops

    def linear(self, node: Any, x: Value, w: np.ndarray, b: np.ndarray | None,
               weight_name: str | None, tensor: str | None = None) -> None:
        if x.shape[-1:] != (w.shape[1],):
            raise self.fail(node, f"weight [out, in] = {list(w.shape)} does not fit an input "
                            f"of shape {list(x.shape)}")
        p = self.prefix(node, weight_name, "linear")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(w)
        bias = ""
        if b is not None:
            self.weights[f"{p}.bias"] = np.ascontiguousarray(np.broadcast_to(b, (w.shape[0],)))
        else:
            bias = ", bias=false"
        self.define(node, f"linear({x.name}, @{p}{bias})", (*x.shape[:-1], w.shape[0]),
                    tensor=tensor)

    def op_Gemm(self, node: Any) -> None:
        x = self.value(node, node.input[0])
        if len(x.shape) != 1:
            raise self.fail(node, f"Gemm needs a [batch, features] input, got per-sample shape "
                            f"{list(x.shape)}")
        w, b = self.gemm_weights(node)
        self.linear(node, x, w, b, node.input[1])

    def gemm_weights(self, node: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Gemm's B and C as a linear layer's [out, in] weight and bias (alpha, beta and
        transB folded in, in the weights' own dtype)."""
        a = self.check_attrs(node, {"alpha": None, "beta": None, "transA": (0,),
                                    "transB": (0, 1)})
        w = self.weight(node, node.input[1])
        if w.ndim != 2:
            raise self.fail(node, f"Gemm needs a 2-D B, got shape {list(w.shape)}")
        w = w if a.get("transB", 0) else w.T
        alpha = float(a.get("alpha", 1.0))
        if alpha != 1.0:   # in the weight's own dtype: no silent widening or narrowing
            w = w * w.dtype.type(alpha)
        b = None
        if len(node.input) > 2 and node.input[2]:
            c = self.weight(node, node.input[2])
            beta = float(a.get("beta", 1.0))
            if beta != 1.0:
                c = c * c.dtype.type(beta)
            if c.ndim == 2 and c.shape[0] == 1:
                c = c[0]
            if c.ndim > 1 or c.size not in (1, w.shape[0]):
                raise self.fail(node, f"bias C of shape {list(c.shape)} is not supported "
                                "([out], [1, out] or a scalar)")
            b = c
        return w, b

    def _matmul(self, node: Any, bias: np.ndarray | None, tensor: str | None = None) -> None:
        self.check_attrs(node, {})
        x = self.raw_value(node, node.input[0])
        w = self.weight(node, node.input[1])
        if w.ndim != 2:
            raise self.fail(node, f"MatMul with a constant of rank {w.ndim} is not supported "
                            "(a 2-D weight [in, out])")
        if x.layout is not None:   # issue 12: the batch has moved (attention's projections)
            self.lay_linear(node, x, x.layout, w.T, bias, node.input[1], tensor)
            return
        self.linear(node, x, w.T, bias, node.input[1], tensor)

    def op_MatMul(self, node: Any) -> None:
        if not self.is_const(node.input[1]):
            if self.is_const(node.input[0]):
                raise self.fail(node, "MatMul of a constant by a value is not supported")
            self.matmul_values(node)   # issue 12: attention's products
            return
        self._matmul(node, None)

    def pattern_matmul_add(self, node: Any, add: Any) -> None:
        c = self.weight(add, next(i for i in add.input if i != node.output[0]))
        out = self.const(node, node.input[1]).shape[-1]
        if c.size != out and c.size != 1:
            raise self.fail(add, f"bias of shape {list(c.shape)} does not fit {out} outputs")
        self.alias_out.pop(add.output[0], None)
        self._matmul(node, np.broadcast_to(c.reshape(-1), (out,)), add.output[0])

    # ------------------------------------------------------------ convolutions and pooling

    def window_attrs(self, node: Any, a: dict[str, Any], nd: int, kernel: Sequence[int],
                     spatial: Sequence[int]) -> tuple[list[int], list[int], list[int],
                                                      list[int]]:
        """strides, dilations, begin pads and end pads, checked; auto_pad made explicit."""
        for key in ("strides", "dilations"):
            vals = a.get(key)
            if vals is not None and (len(vals) != nd or any(int(s) < 1 for s in vals)):
                raise self.fail(node, f"{key}={list(vals)} must hold {nd} values >= 1")
        strides = [int(s) for s in a.get("strides", [1] * nd)]
        dil = [int(d) for d in a.get("dilations", [1] * nd)]
        pads = [int(p) for p in a.get("pads", [0] * 2 * nd)]
        if len(pads) != 2 * nd or any(p < 0 for p in pads):
            raise self.fail(node, f"pads={pads} must hold {2 * nd} values >= 0")
        if len(kernel) != nd or any(int(k) < 1 for k in kernel):
            raise self.fail(node, f"kernel_shape={list(kernel)} must hold {nd} values >= 1")
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if "pads" in a and any(pads):
                raise self.fail(node, "auto_pad and pads together")
            pads = [0] * 2 * nd
            for i in range(nd):
                out = -(-spatial[i] // strides[i])
                total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i],
                            0)
                small, large = total // 2, total - total // 2
                pads[i], pads[nd + i] = (small, large) if auto == "SAME_UPPER" else (large, small)
        elif auto == "VALID":
            pads = [0] * 2 * nd
        limit = max(spatial) if spatial else 0
        if any(p > limit + max(kernel) for p in pads):
            raise self.fail(node, f"pads={pads} are larger than the input {list(spatial)}")
        return strides, dil, pads[:nd], pads[nd:]

    @staticmethod
    def padding_setting(begin: Sequence[int], end: Sequence[int]) -> str | None:
        """A convolution's ``padding=``: one value per axis, or per side (begin then end of
        each axis in order, specs/language.md) when the two sides differ."""
        if not any(begin) and not any(end):
            return None
        if list(begin) == list(end):
            return f"padding={_fmt(tuple(begin))}"
        return f"padding={_fmt(tuple(v for b, e in zip(begin, end) for v in (b, e)))}"

    def op_Conv(self, node: Any) -> None:
        a = self.check_attrs(node, {"kernel_shape": None, "strides": None, "pads": None,
                                    "dilations": None, "group": None,
                                    "auto_pad": ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")})
        x = self.value(node, node.input[0])
        w = self.weight(node, node.input[1])
        nd = w.ndim - 2
        if nd not in (1, 2, 3) or len(x.shape) != nd + 1:
            raise self.fail(node, f"only 1-, 2- and 3-D convolutions are supported (weight "
                            f"{list(w.shape)}, input {list(x.shape)})")
        k = [int(v) for v in a.get("kernel_shape", w.shape[2:])]
        if tuple(k) != tuple(w.shape[2:]):
            raise self.fail(node, f"kernel_shape {k} does not match the weight "
                            f"{list(w.shape)}")
        groups = int(a.get("group", 1))
        if groups < 1 or x.shape[0] % groups or w.shape[0] % groups or \
                w.shape[1] * groups != x.shape[0]:
            raise self.fail(node, f"group={groups} does not fit {x.shape[0]} input channels and "
                            f"weight {list(w.shape)}")
        strides, dil, pb, pe = self.window_attrs(node, a, nd, k, x.shape[1:])
        p = self.prefix(node, node.input[1], f"conv{len(self.weights)}")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(w)
        args = [x.name, f"@{p}"]
        if len(node.input) > 2 and node.input[2]:
            b = self.weight(node, node.input[2])
            if b.shape != (w.shape[0],):
                raise self.fail(node, f"bias of shape {list(b.shape)} does not fit "
                                f"{w.shape[0]} output channels")
            self.weights[f"{p}.bias"] = np.ascontiguousarray(b)
        else:
            args.append("bias=false")
        if any(s != 1 for s in strides):
            args.append(f"stride={_fmt(strides)}")
        pad = self.padding_setting(pb, pe)
        if pad:
            args.append(pad)
        if any(d != 1 for d in dil):
            args.append(f"dilation={_fmt(dil)}")
        if groups != 1:
            args.append(f"groups={groups}")
        spatial = tuple((n + b0 + e0 - d * (kk - 1) - 1) // s + 1 for n, b0, e0, d, kk, s in
                        zip(x.shape[1:], pb, pe, dil, k, strides))
        self.define(node, f"conv{nd}d({', '.join(args)})",
                    self.shape_of(node, (w.shape[0], *spatial)))

    def op_ConvTranspose(self, node: Any) -> None:
        a = self.check_attrs(node, {"kernel_shape": None, "strides": None, "pads": None,
                                    "dilations": None, "group": None, "output_padding": None,
                                    "output_shape": None, "auto_pad": ("NOTSET", "VALID")})
        x = self.value(node, node.input[0])
        w = self.weight(node, node.input[1])
        nd = w.ndim - 2
        if nd not in (1, 2, 3) or len(x.shape) != nd + 1:
            raise self.fail(node, f"only 1-, 2- and 3-D transposed convolutions are supported "
                            f"(weight {list(w.shape)}, input {list(x.shape)})")
        k = [int(v) for v in a.get("kernel_shape", w.shape[2:])]
        if tuple(k) != tuple(w.shape[2:]):
            raise self.fail(node, f"kernel_shape {k} does not match the weight {list(w.shape)}")
        groups = int(a.get("group", 1))
        if groups < 1 or w.shape[0] != x.shape[0] or x.shape[0] % groups:
            raise self.fail(node, f"group={groups} does not fit {x.shape[0]} input channels and "
                            f"weight [in, out/groups, ...] = {list(w.shape)}")
        strides, dil, pb, pe = self.window_attrs(node, a, nd, k, x.shape[1:])
        op_pad = [int(v) for v in a.get("output_padding", [0] * nd)]
        if len(op_pad) != nd or any(v < 0 or v >= max(s, d) for v, s, d in
                                    zip(op_pad, strides, dil)):
            raise self.fail(node, f"output_padding={op_pad} must be smaller than the stride or "
                            "the dilation")
        spatial = [(n - 1) * s - b0 - e0 + d * (kk - 1) + op + 1 for n, s, b0, e0, d, kk, op in
                   zip(x.shape[1:], strides, pb, pe, dil, k, op_pad)]
        if "output_shape" in a and [int(v) for v in a["output_shape"][-nd:]] != spatial:
            raise self.fail(node, f"output_shape={list(a['output_shape'])} differs from the "
                            f"size its pads give ({spatial}); write pads and output_padding")
        p = self.prefix(node, node.input[1], f"deconv{len(self.weights)}")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(w)
        out_c = w.shape[1] * groups
        args = [x.name, f"@{p}"]
        if len(node.input) > 2 and node.input[2]:
            b = self.weight(node, node.input[2])
            if b.shape != (out_c,):
                raise self.fail(node, f"bias of shape {list(b.shape)} does not fit {out_c} "
                                "output channels")
            self.weights[f"{p}.bias"] = np.ascontiguousarray(b)
        else:
            args.append("bias=false")
        if any(s != 1 for s in strides):
            args.append(f"stride={_fmt(strides)}")
        pad = self.padding_setting(pb, pe)
        if pad:
            args.append(pad)
        if any(op_pad):
            args.append(f"output_padding={_fmt(op_pad)}")
        if any(d != 1 for d in dil):
            args.append(f"dilation={_fmt(dil)}")
        if groups != 1:
            args.append(f"groups={groups}")
        self.define(node, f"conv_transpose{nd}d({', '.join(args)})",
                    self.shape_of(node, (out_c, *spatial)))

    def _pool(self, node: Any, kind: str) -> None:
        allowed: dict[str, Any] = {"kernel_shape": None, "strides": None, "pads": None,
                                   "ceil_mode": (0, 1), "dilations": None,
                                   "auto_pad": ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")}
        if kind == "max":
            allowed |= {"storage_order": (0,)}
        else:
            allowed |= {"count_include_pad": (0, 1)}
        a = self.check_attrs(node, allowed)
        if len(node.output) > 1 and node.output[1]:
            raise self.fail(node, "the Indices output of MaxPool is not supported")
        x = self.value(node, node.input[0])
        k = [int(v) for v in a.get("kernel_shape", [])]
        nd = len(k)
        if nd not in (1, 2, 3) or len(x.shape) != nd + 1:
            raise self.fail(node, f"only 1-, 2- and 3-D pooling is supported (kernel {k}, "
                            f"input {list(x.shape)})")
        strides, dil, pb, pe = self.window_attrs(node, a, nd, k, x.shape[1:])
        ceil = bool(a.get("ceil_mode", 0))
        args = [x.name, f"kernel={_fmt(k)}", f"stride={_fmt(strides)}"]
        if pb != pe:
            raise self.fail(node, f"asymmetric pooling pads {[*pb, *pe]} are not supported "
                            "(pooling pads the same on both sides of an axis)")
        pad = self.padding_setting(pb, pe)
        if pad:
            args.append(pad)
        if any(d != 1 for d in dil):
            if kind == "avg":
                raise self.fail(node, f"AveragePool dilations {dil} are not supported (1 only)")
            args.append(f"dilation={_fmt(dil)}")
        if ceil:
            args.append("ceil_mode=true")
        if kind == "avg" and pad:
            args.append(f"count_include_pad={_fmt(bool(a.get('count_include_pad', 0)))}")
        spatial = []
        for n, b0, e0, kk, s, d in zip(x.shape[1:], pb, pe, k, strides, dil):
            span = n + b0 + e0 - d * (kk - 1) - 1
            out = (-(-span // s) if ceil else span // s) + 1
            if ceil and (out - 1) * s >= n + b0:   # the last window must start inside
                out -= 1
            spatial.append(out)
        self.define(node, f"{kind}pool{nd}d({', '.join(args)})",
                    self.shape_of(node, (x.shape[0], *spatial)))

    def op_MaxPool(self, node: Any) -> None:
        self._pool(node, "max")

    def op_AveragePool(self, node: Any) -> None:
        self._pool(node, "avg")

    def _global_pool(self, node: Any, x: Value, keepdims: bool) -> None:
        c = x.shape[0]
        onnx_shape = (c, *([1] * (len(x.shape) - 1))) if keepdims else (c,)
        self.define(node, f"global_avgpool({x.name})", (c,), onnx_shape)

    def op_GlobalAveragePool(self, node: Any) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        if len(x.shape) < 2:
            raise self.fail(node, "GlobalAveragePool needs a [C, ...] input")
        self._global_pool(node, x, True)

    def op_ReduceMean(self, node: Any) -> None:
        a = self.check_attrs(node, {"axes": None, "keepdims": (0, 1),
                                    "noop_with_empty_axes": (0,)})
        x = self.value(node, node.input[0])
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node, node.input[1]).tolist()
        full = len(x.shape) + 1
        got = sorted(int(ax) % full for ax in (axes or []))
        if got != list(range(2, full)) or len(x.shape) < 2:
            self.reduce_axes(node, "mean")   # issue 12: mean over per-sample axes
            return
        self._global_pool(node, x, bool(a.get("keepdims", 1)))

    def op_Resize(self, node: Any) -> None:
        a = self.check_attrs(node, {
            "mode": ("nearest", "linear"), "coordinate_transformation_mode": None,
            "nearest_mode": None, "cubic_coeff_a": None, "antialias": (0,),
            "exclude_outside": (0,), "extrapolation_value": None,
            "keep_aspect_ratio_policy": ("stretch",), "axes": None})
        x = self.value(node, node.input[0])
        nd = len(x.shape) - 1
        mode = a.get("mode", "nearest")
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        if mode == "nearest":
            if ctm != "asymmetric" or a.get("nearest_mode", "round_prefer_floor") != "floor":
                raise self.fail(node, f"nearest Resize with coordinate_transformation_mode="
                                f"{ctm!r} and nearest_mode={a.get('nearest_mode')!r} is not "
                                "supported (asymmetric + floor, PyTorch's 'nearest')")
            align = None
        elif ctm in ("half_pixel", "pytorch_half_pixel"):
            align = False
        elif ctm == "align_corners":
            align = True
        else:
            raise self.fail(node, f"linear Resize with coordinate_transformation_mode={ctm!r} "
                            "is not supported (half_pixel, pytorch_half_pixel, align_corners)")
        if "axes" in a:
            raise self.fail(node, "Resize with axes is not supported")
        scales = node.input[2] if len(node.input) > 2 and node.input[2] else None
        sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if nd < 1 or (scales is None) == (sizes is None):
            raise self.fail(node, "Resize needs a [C, ...] input and exactly one of scales and "
                            "sizes")
        args = [x.name, f'mode="{mode}"']
        if scales is not None:
            s = self.const(node, scales).astype(np.float64).reshape(-1)
            if s.size != nd + 2 or s[0] != 1 or s[1] != 1 or np.any(s[2:] <= 0):
                raise self.fail(node, f"scales {s.tolist()} must be 1 on the batch and channel "
                                "axes and positive elsewhere")
            out = [math.floor(n * f) for n, f in zip(x.shape[1:], s[2:])]
            args.append(f"scale={_fmt(tuple(float(v) for v in s[2:]))}")
        else:
            assert sizes is not None
            if sizes in self.batch_consts:
                s2, s3 = self.batch_consts[sizes]
                if s2.reshape(-1)[0] != BATCH_PROBES[0] or s3.reshape(-1)[0] != BATCH_PROBES[1] \
                        or not np.array_equal(s2.reshape(-1)[1:], s3.reshape(-1)[1:]):
                    raise self.fail(node, "sizes depend on the batch other than through its "
                                    "first entry")
                sz = s2.reshape(-1)
            else:
                sz = self.const(node, sizes).reshape(-1)
            if sz.size != nd + 2 or int(sz[1]) != x.shape[0] or np.any(sz[2:] < 1):
                raise self.fail(node, f"sizes {sz.tolist()} must keep the channels and be "
                                "positive")
            out = [int(v) for v in sz[2:]]
            args.append(f"size={_fmt(out)}")
        if align is not None:
            args.append(f"align_corners={_fmt(align)}")
        self.define(node, f"upsample({', '.join(args)})", self.shape_of(node, (x.shape[0], *out)))

    # ------------------------------------------------------------ shape ops

    def per_sample_target(self, node: Any, name: str) -> list[int]:
        """A shape operand, as the per-sample part: its first entry must be the batch (0, -1,
        the batch size, or a value that follows it)."""
        if name in self.batch_consts:
            t2, t3 = (v.reshape(-1).astype(np.int64) for v in self.batch_consts[name])
            if not (t2[0] == BATCH_PROBES[0] and t3[0] == BATCH_PROBES[1]
                    and np.array_equal(t2[1:], t3[1:])):
                raise self.fail(node, f"shape {t2.tolist()} moves elements between the batch "
                                "and the other axes")
            return [int(v) for v in t2[1:]]
        t = [int(v) for v in self.const(node, name).reshape(-1).tolist()]
        if not t or t[0] not in (0, -1, self.batch if self.batch is not None else 1):
            raise self.fail(node, f"reshape to {t} must keep the batch axis first (0, -1 or "
                            f"the batch size there)")
        return t[1:]

    def reshaped(self, node: Any, x: Value, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != math.prod(x.onnx_shape) or any(s <= 0 for s in shape):
            raise self.fail(node, f"reshape of per-sample shape {list(x.onnx_shape)} to "
                            f"{list(shape)} changes the number of elements per sample")
        self.shape_of(node, shape)
        self.alias(node.output[0], x, shape)

    def op_Reshape(self, node: Any) -> None:
        a = self.check_attrs(node, {"allowzero": (0, 1)})
        x = self.value(node, node.input[0], layout="pbx")
        try:   # issue 12: a reshape that moves the batch or merges it with other axes
            moved = self.lay_reshape(node, Layout((1, *x.onnx_shape), 0), node.input[1],
                                     bool(a.get("allowzero", 0)))
        except NodeError:
            moved = None
        if moved is not None and not moved.canonical:
            v = self.value(node, node.input[0])
            self.lay_define(node, self.reshape_expr(v, moved.shape), v, moved)
            return
        rest = self.per_sample_target(node, node.input[1])
        allowzero = bool(a.get("allowzero", 0))
        if allowzero and 0 in rest:
            raise self.fail(node, f"allowzero=1 with a 0 in the shape {rest} makes an empty "
                            "tensor")
        out = [x.onnx_shape[i] if t == 0 and i < len(x.onnx_shape) else t
               for i, t in enumerate(rest)]
        if 0 in out or sum(1 for t in out if t == -1) > 1 or any(t < -1 for t in out):
            raise self.fail(node, f"shape {rest} is not a valid reshape target")
        n = math.prod(x.onnx_shape)
        if -1 in out:
            known = math.prod(t for t in out if t != -1)
            if known <= 0 or n % known:
                raise self.fail(node, f"reshape of per-sample shape {list(x.onnx_shape)} to "
                                f"{rest} does not divide evenly")
            out[out.index(-1)] = n // known
        self.reshaped(node, x, out)

    def op_Flatten(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None})
        x = self.value(node, node.input[0], layout="pbx")
        axis = int(a.get("axis", 1))
        rank = len(x.onnx_shape) + 1
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise self.fail(node, f"Flatten with axis={a.get('axis')} mixes the batch with "
                            "other axes (axis=1 only)")
        self.reshaped(node, x, (math.prod(x.onnx_shape),))

    def _axes(self, node: Any, a: dict[str, Any]) -> list[int] | None:
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(node.input) > 1 and node.input[1]:
            return [int(v) for v in self.const(node, node.input[1]).reshape(-1).tolist()]
        return None

    def op_Squeeze(self, node: Any) -> None:
        a = self.check_attrs(node, {"axes": None})
        x = self.value(node, node.input[0], layout="pbx")
        axes = self._axes(node, a)
        shp = list(x.onnx_shape)
        rank = len(shp) + 1
        if axes is None:
            axes = [i + 1 for i, d in enumerate(shp) if d == 1]
        norm = sorted({ax + rank if ax < 0 else ax for ax in axes})
        if any(ax <= 0 or ax >= rank for ax in norm):
            raise self.fail(node, f"axes {axes} must be per-sample axes (not the batch)")
        if any(shp[ax - 1] != 1 for ax in norm):
            raise self.fail(node, f"axes {axes} of shape {shp} are not of size 1")
        self.reshaped(node, x, [d for i, d in enumerate(shp) if i + 1 not in norm])

    def op_Unsqueeze(self, node: Any) -> None:
        a = self.check_attrs(node, {"axes": None})
        x = self.value(node, node.input[0], layout="pbx")
        axes = self._axes(node, a)
        if axes and any(ax == 0 or ax == -(len(x.onnx_shape) + 1 + len(axes))
                        for ax in axes):   # issue 12: a new axis before the batch
            self.lay_Unsqueeze(node)
            return
        if not axes:
            raise self.fail(node, "Unsqueeze needs axes")
        rank = len(x.onnx_shape) + 1 + len(axes)
        norm = sorted({ax + rank if ax < 0 else ax for ax in axes})
        if len(norm) != len(axes) or any(ax <= 0 or ax >= rank for ax in norm):
            raise self.fail(node, f"axes {axes} must be distinct per-sample axes")
        it = iter(x.onnx_shape)
        out = [1 if i in norm else next(it) for i in range(1, rank)]
        self.reshaped(node, x, out)

    def op_Concat(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None})
        ins = [i for i in node.input if i]
        if all(i in self.consts or i in self.batch_consts for i in ins):
            raise self.fail(node, "Concat of constants only should have been folded")
        xs = [self.constant_operand(node, i) if i in self.consts or i in self.batch_consts
              else self.value(node, i) for i in ins]   # issue 12: the class token
        rank = len(xs[0].shape)
        ax = self.axis(node, int(a["axis"]), rank)
        if any(len(v.shape) != rank for v in xs):
            raise self.fail(node, f"inputs of different ranks {[list(v.shape) for v in xs]}")
        if len(xs) == 1:   # a single input: the same value
            self.alias(node.output[0], xs[0])
            return
        shape = list(xs[0].shape)
        for v in xs[1:]:
            if [d for i, d in enumerate(v.shape) if i != ax % rank] != \
                    [d for i, d in enumerate(shape) if i != ax % rank]:
                raise self.fail(node, f"input shapes {[list(v.shape) for v in xs]} differ off "
                                f"the axis")
        shape[ax] = sum(v.shape[ax] for v in xs)
        setting = "" if ax == -rank else f", axis={ax}"
        self.define(node, f"concat({', '.join(v.name for v in xs)}{setting})",
                    self.shape_of(node, tuple(shape)))

    def op_Pad(self, node: Any) -> None:
        a = self.check_attrs(node, {"mode": ("constant",), "pads": None, "value": None})
        x = self.value(node, node.input[0])
        if "pads" in a:
            pads = [int(v) for v in a["pads"]]
        elif len(node.input) > 1 and node.input[1]:
            pads = [int(v) for v in self.const(node, node.input[1]).reshape(-1).tolist()]
        else:
            raise self.fail(node, "Pad needs pads")
        value = float(a.get("value", 0.0))
        if len(node.input) > 2 and node.input[2]:
            value = self.scalar(node, node.input[2])
        rank = len(x.shape) + 1
        if len(node.input) > 3 and node.input[3]:
            axes = [int(v) % rank for v in self.const(node, node.input[3]).reshape(-1)]
            full = [0] * 2 * rank
            for j, ax in enumerate(axes):
                full[ax], full[rank + ax] = pads[j], pads[len(axes) + j]
            pads = full
        if len(pads) != 2 * rank:
            raise self.fail(node, f"pads {pads} must hold {2 * rank} values")
        if pads[0] or pads[rank]:
            raise self.fail(node, "padding along the batch axis is not supported")
        if any(p < 0 for p in pads):
            raise self.fail(node, f"negative pads {pads} (cropping) are not supported")
        begin, end = pads[1:rank], pads[rank + 1:]
        shape = tuple(d + b0 + e0 for d, b0, e0 in zip(x.shape, begin, end))
        # torch.nn.functional.pad's order: the last axis first, (begin, end) for each
        torch_order = [v for b0, e0 in zip(begin[::-1], end[::-1]) for v in (b0, e0)]
        while len(torch_order) > 2 and torch_order[-2:] == [0, 0]:
            torch_order = torch_order[:-2]
        self.define(node, f"pad({x.name}, pads=({', '.join(map(str, torch_order))}), "
                    f"value={_fmt(value)})", self.shape_of(node, shape))

    def _pass_through(self, node: Any) -> None:
        if self.has_layout(node.input[0]):
            self.lay_pass(node)
            return
        x = self.value(node, node.input[0], layout="pbx")
        self.alias(node.output[0], x)

    def op_Identity(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._pass_through(node)

    def op_Dropout(self, node: Any) -> None:
        self.check_attrs(node, {"seed": None, "ratio": None, "is_test": None})
        if len(node.input) > 2 and node.input[2]:
            mode = self.const(node, node.input[2])
            if bool(np.asarray(mode).reshape(())):
                raise self.fail(node, "Dropout in training mode is not supported")
        if len([o for o in node.output if o]) > 1 and any(
                self.consumers.get(o) or o in self.outputs for o in node.output[1:] if o):
            raise self.fail(node, "the mask output of Dropout is not supported")
        self._pass_through(node)

    def op_Cast(self, node: Any) -> None:
        a = self.check_attrs(node, {"to": None, "saturate": None, "round_mode": None})
        to = int(a["to"])
        src = self.elem_type.get(node.input[0])
        x = self.raw_value(node, node.input[0], layout="pbx")
        if to not in FLOAT_TYPES:
            raise self.fail(node, f"Cast to {ONNX_TYPE_NAMES.get(to, to)} is not supported "
                            "(float types only: pbxc differentiates its values)")
        target = FLOAT_TYPES[to]
        if target != self.dtype and self.dtype_override is None:
            raise self.fail(node, f"Cast to {target} in a model that computes in {self.dtype}: "
                            f"pbxc keeps one dtype (pass --dtype {target} or --dtype "
                            f"{self.dtype} to choose it explicitly)")
        if target != self.dtype:
            self.notes.append(f"{self.label(node)}: Cast to {target} becomes the identity "
                              f"(--dtype {self.dtype})")
        del src
        self.alias(node.output[0], x)   # keeps a moved batch's layout

    # ------------------------------------------------------------ activations

    def _activation(self, node: Any, expr: str) -> None:
        if self.has_layout(node.input[0]):
            self.lay_unary(node, expr)
            return
        x = self.value(node, node.input[0])
        self.define(node, expr.format(x=x.name), x.shape)

    def op_Relu(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "relu({x})")

    def op_Tanh(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "tanh({x})")

    def op_Sigmoid(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "sigmoid({x})")

    def op_Softplus(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "softplus({x})")

    def op_Mish(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "mish({x})")

    def op_HardSwish(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._activation(node, "hardswish({x})")

    def op_HardSigmoid(self, node: Any) -> None:
        a = self.check_attrs(node, {"alpha": None, "beta": None})
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        # PyTorch's hardsigmoid is clip(x/6 + 1/2, 0, 1); exporters write alpha = float32(1/6)
        if beta != 0.5 or np.float32(alpha) != np.float32(1 / 6):
            raise self.fail(node, f"HardSigmoid with alpha={alpha}, beta={beta} is not "
                            "supported (alpha=1/6, beta=0.5: PyTorch's hardsigmoid)")
        self._activation(node, "hardsigmoid({x})")

    def op_Gelu(self, node: Any) -> None:
        a = self.check_attrs(node, {"approximate": ("none", "tanh")})
        self._activation(node, "gelu_tanh({x})" if a.get("approximate") == "tanh"
                         else "gelu({x})")

    def op_LeakyRelu(self, node: Any) -> None:
        a = self.check_attrs(node, {"alpha": None})
        self._activation(node, f"leaky_relu({{x}}, alpha={_fmt(float(a.get('alpha', 0.01)))})")

    def op_Elu(self, node: Any) -> None:
        a = self.check_attrs(node, {"alpha": None})
        alpha = float(a.get("alpha", 1.0))
        self._activation(node, "elu({x})" if alpha == 1.0 else f"elu({{x}}, alpha={_fmt(alpha)})")

    def op_Selu(self, node: Any) -> None:
        a = self.check_attrs(node, {"alpha": None, "gamma": None})
        if abs(a.get("alpha", 1.67326) - 1.6732632) > 1e-5 or \
                abs(a.get("gamma", 1.0507) - 1.0507010) > 1e-5:
            raise self.fail(node, "Selu with alpha/gamma other than the standard constants is "
                            "not supported")
        self._activation(node, "selu({x})")

    def op_Clip(self, node: Any) -> None:
        a = self.check_attrs(node, {"min": None, "max": None})
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = self.scalar(node, node.input[1])
        if len(node.input) > 2 and node.input[2]:
            hi = self.scalar(node, node.input[2])
        lo, hi = float(lo), float(hi)
        if lo == 0.0 and hi == 6.0:
            self._activation(node, "relu6({x})")
        elif lo == 0.0 and hi == math.inf:
            self._activation(node, "relu({x})")
        elif math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            self._activation(node, f"clip({{x}}, min={_fmt(lo)}, max={_fmt(hi)})")
        else:
            raise self.fail(node, f"Clip to [{lo}, {hi}] is not supported (finite bounds with "
                            "min < max, or [0, inf): relu)")

    def op_PRelu(self, node: Any) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        slope = self.weight(node, node.input[1])
        s = slope[0] if slope.ndim == len(x.shape) + 1 and slope.shape[0] == 1 else slope
        c = x.shape[0]
        # per channel: [C], [C, 1, ...] (the channel axis leading), or one shared slope
        flat = s.reshape(-1)
        if flat.size == 1 or (flat.size == c and ((s.ndim == 1 and len(x.shape) == 1) or
                                 (s.ndim == len(x.shape) and s.shape[0] == c))):
            w = flat.copy()
        else:
            raise self.fail(node, f"PRelu slope of shape {list(slope.shape)} is not supported "
                            f"for input {list(x.shape)} (one slope, or one per channel)")
        p = self.prefix(node, node.input[1], "prelu")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(w)
        self.define(node, f"prelu({x.name}, @{p})", x.shape)

    def _softmax(self, node: Any, fn: str) -> None:
        a = self.check_attrs(node, {"axis": None})
        x = self.value(node, node.input[0])
        rank = len(x.shape)
        default = -1 if self.opset >= 13 else 1
        ax = self.axis(node, int(a.get("axis", default)), rank)
        if self.opset < 13 and ax != -1:
            raise self.fail(node, f"{node.op_type} before opset 13 flattens from its axis; only "
                            "the last axis is supported")
        self.define(node, f"{fn}({x.name})" if ax == -1 else f"{fn}({x.name}, axis={ax})",
                    x.shape)

    def op_Softmax(self, node: Any) -> None:
        self._softmax(node, "softmax")

    def op_LogSoftmax(self, node: Any) -> None:
        self._softmax(node, "log_softmax")

    def op_BatchNormalization(self, node: Any) -> None:
        a = self.check_attrs(node, {"epsilon": None, "momentum": None, "training_mode": (0,),
                                    "spatial": (1,)})
        if len([o for o in node.output if o]) > 1:
            raise self.fail(node, "BatchNormalization in training mode (running statistics "
                            "as outputs) is not supported")
        x = self.value(node, node.input[0])
        c = x.shape[0] if x.shape else 0
        tensors = {}
        for role, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            t = self.weight(node, node.input[i])
            if t.shape != (c,):
                raise self.fail(node, f"{role} of shape {list(t.shape)} does not fit {c} "
                                "channels")
            tensors[role] = t
        if np.any(tensors["running_var"] < 0):
            raise self.fail(node, "negative running variance")
        p = self.prefix(node, node.input[1], f"bn{len(self.weights)}")
        for role, t in tensors.items():
            self.weights[f"{p}.{role}"] = np.ascontiguousarray(t)
        eps = float(a.get("epsilon", 1e-5))
        if eps < 0:
            raise self.fail(node, f"epsilon={eps} is negative")
        settings = "" if eps == 1e-5 else f", eps={_fmt(eps)}"
        self.define(node, f"batchnorm({x.name}, @{p}{settings})", x.shape)

    # ------------------------------------------------------------ elementwise arithmetic

    def normalize(self, node: Any, x: Value, mean: np.ndarray, std: np.ndarray,
                  stem: str, tensor: str | None = None) -> None:
        p = self.prefix(node, None, stem)
        dt = np.dtype(self.dtype)
        self.weights[f"{p}.mean"] = np.ascontiguousarray(mean, dtype=dt)
        self.weights[f"{p}.std"] = np.ascontiguousarray(std, dtype=dt)
        self.define(node, f"normalize({x.name}, @{p})", x.shape, tensor=tensor)

    def pattern_standardize(self, node: Any, div: Any) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        mean = self.per_sample_const(node, self.weight(node, node.input[1]), x.shape)
        std = self.per_sample_const(div, self.weight(div, div.input[1]), x.shape)
        if np.any(std == 0):
            raise self.fail(div, "division by a constant with zeros")
        self.alias_out.pop(div.output[0], None)
        self.normalize(node, x, mean, std, "scaler", div.output[0])

    def _with_constant(self, node: Any, fn: str) -> None:
        """A value and a constant: ``fn(x, value=c)`` for a scalar, ``fn(x, @p)`` for a
        tensor (broadcast per sample as ONNX broadcasts; a leading batch axis of size 1 is
        dropped). ``c - x`` is ``(x - c) / -1`` (a normalize); ``c / x`` is not linear."""
        self.check_attrs(node, {})
        a, b = node.input
        if self.is_const(a) and fn in ("add", "mul"):
            a, b = b, a
        if self.is_const(a) and fn == "sub" and not self.is_const(b):
            x = self.value(node, b)
            c = self.per_sample_const(node, self.weight(node, a), x.shape)
            self.normalize(node, x, c, -np.ones(x.shape), "shift")
            return
        if self.is_const(a) or not self.is_const(b):
            raise self.fail(node, f"{node.op_type} of a constant by a value is not supported")
        x = self.value(node, a)
        c = self.weight(node, b)
        if c.ndim == len(x.shape) + 1:
            if c.shape[0] != 1:
                raise self.fail(node, f"a constant of shape {list(c.shape)} varies along the "
                                "batch axis")
            c = c[0]
        try:
            shape = tuple(np.broadcast_shapes(x.shape, c.shape))
        except ValueError:
            raise self.fail(node, f"constant of shape {list(c.shape)} does not broadcast to "
                            f"the per-sample shape {list(x.shape)}") from None
        if shape != x.shape:
            raise self.fail(node, f"constant of shape {list(c.shape)} would grow the value of "
                            f"shape {list(x.shape)}")
        if fn == "div" and np.any(c == 0):
            raise self.fail(node, "division by a constant with zeros")
        if c.size == 1:
            v = _shortest(c.reshape(())) if c.dtype == np.float32 else float(c.reshape(()))
            self.define(node, f"{fn}({x.name}, value={_fmt(v)})", x.shape)
            return
        p = self.prefix(node, None, fn)
        self.weights[p] = np.ascontiguousarray(c)
        self.define(node, f"{fn}({x.name}, @{p})", x.shape)

    def _binary(self, node: Any, fn: str) -> None:
        if any(self.is_const(i) for i in node.input):
            self._with_constant(node, fn)
            return
        if fn == "div":
            raise self.fail(node, "Div of two computed values is not supported (only by a "
                            "constant)")
        self.check_attrs(node, {})
        names = list(node.input)
        if fn == "mul":   # the gated signal first: mul's LRP rule gives it the relevance
            names.sort(key=self._is_gate)
        xs = [self.value(node, i) for i in names]
        try:
            shape = tuple(np.broadcast_shapes(*(v.shape for v in xs)))
        except ValueError:
            raise self.fail(node, f"shapes {[list(v.shape) for v in xs]} do not "
                            "broadcast") from None
        self.define(node, f"{fn}({', '.join(v.name for v in xs)})", self.shape_of(node, shape))

    #: ops a gate ends with (squeeze-and-excitation: Sigmoid in EfficientNet, HardSigmoid in
    #: MobileNet-V3), and the shape-only ops that may follow it before the product
    GATE_ENDS = frozenset({"Sigmoid", "HardSigmoid"})
    GATE_SHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Flatten", "Identity", "Expand"})

    def _is_gate(self, tensor: str) -> bool:
        """Whether ``tensor`` is a gate (a sigmoid, maybe reshaped). In a product of two
        values mul's "gate" rule tells the gate by its smaller, broadcast shape; on a 1x1
        feature map (MobileNet-V3 at 32x32) both factors have the output's shape and it
        takes the first, so the importer writes the gated signal first."""
        n = self.producer.get(tensor)
        for _ in range(8):
            if n is None or n.op_type not in self.GATE_SHAPE_OPS:
                break
            n = self.producer.get(n.input[0])
        return n is not None and n.op_type in self.GATE_ENDS

    def op_Add(self, node: Any) -> None:
        self._binary(node, "add")

    def op_Sub(self, node: Any) -> None:
        self._binary(node, "sub")

    def op_Mul(self, node: Any) -> None:
        self._binary(node, "mul")

    def op_Div(self, node: Any) -> None:
        self._binary(node, "div")

    # ------------------------------------------------------------ patterns

    def pattern_swish(self, node: Any, data: tuple[str, float]) -> None:
        self.check_attrs(node, {})
        z, beta = data
        x = self.value(node, z)
        if beta == 1.0:
            self.define(node, f"silu({x.name})", x.shape)
        else:
            if SWISH not in self.declarations:
                self.declarations.append(SWISH)
            self.define(node, f"swish({x.name}, beta={_fmt(beta)})", x.shape)

    def pattern_mish(self, node: Any, z: str) -> None:
        x = self.value(node, z)
        self.define(node, f"mish({x.name})", x.shape)

    def pattern_gelu(self, node: Any, data: tuple[str, str]) -> None:
        if self.has_layout(data[0]):
            self.lay_unary(node, f"{data[1]}({{x}})", data[0])
            return
        x = self.value(node, data[0])
        self.define(node, f"{data[1]}({x.name})", x.shape)

    def pattern_softplus_beta(self, node: Any, data: tuple[str, float]) -> None:
        x = self.value(node, data[0])
        self.define(node, f"softplus({x.name}, beta={_fmt(data[1])})", x.shape)

    def pattern_softplus_threshold(self, node: Any, data: tuple[str, float, float]) -> None:
        z, beta, threshold = data
        x = self.value(node, z)
        if SOFTPLUS_THRESHOLD not in self.declarations:
            self.declarations.append(SOFTPLUS_THRESHOLD)
        self.define(node, f"softplus_threshold({x.name}, beta={_fmt(beta)}, "
                    f"threshold={_fmt(threshold)})", x.shape)

    # ------------------------------------------------------------ ai.onnx.ml

    def ml_Scaler(self, node: Any) -> None:
        """sklearn's StandardScaler: y = (x - offset) * scale."""
        a = self.check_attrs(node, {"offset": None, "scale": None})
        x = self.value(node, node.input[0])
        offset = np.asarray(a.get("offset", [0.0]), dtype=np.float64)
        scale = np.asarray(a.get("scale", [1.0]), dtype=np.float64)
        if np.any(scale == 0):
            raise self.fail(node, "a scale of 0 is not supported")
        mean = self.per_sample_const(node, offset, x.shape)
        std = self.per_sample_const(node, 1.0 / scale, x.shape)
        self.normalize(node, x, mean, std, "scaler")

    def ml_ZipMap(self, node: Any) -> None:
        """The class-probability dictionaries: the same tensor, with its class names."""
        a = self.check_attrs(node, {"classlabels_int64s": None, "classlabels_strings": None})
        x = self.value(node, node.input[0])
        labels = a.get("classlabels_strings") or a.get("classlabels_int64s") or []
        labels = [lb.decode() if isinstance(lb, bytes) else str(lb) for lb in labels]
        if x.shape != (len(labels),):
            raise self.fail(node, f"{len(labels)} class labels for a value of shape "
                            f"{list(x.shape)}")
        self.alias(node.output[0], x)
        self.classes[node.output[0]] = labels


class _Cascade(Exception):
    """A node whose input comes from a node that already failed: not reported again."""


@dataclass
class _NoNode:
    name: str
    op_type: str = "output"

    @property
    def output(self) -> list[str]:
        return [self.name]


def _attrs_summary(attrs: dict[str, Any]) -> str:
    if not attrs:
        return "none"
    return ", ".join(f"{k}={_attr_text(v)}" for k, v in sorted(attrs.items()))


def _quote(text: str) -> str:
    """A .pbx string literal (the grammar's STRING: no raw newline, escaped quotes)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = re.sub(r"[\x00-\x1f\x7f\u2028\u2029\x85]", "?", out)
    return f'"{out}"'


def _comment(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029\x85\x0c]", "?", text)


def _ident(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_").lower()
    if not s:
        s = "v"
    if s[0].isdigit():
        s = "v" + s
    return s


def load_external_data(model: Any, base: Path) -> None:
    """Read the tensors a model keeps in external files (the dynamo exporter's default), with
    each location checked: a plain relative path inside the model's folder, no symlink out of
    it, an offset and length inside the file that match the tensor's dims. Errors name the
    tensor; nothing outside the folder is ever opened."""
    import onnx

    diags: list[Diagnostic] = []
    root = base.resolve()
    tensors = [t for t in model.graph.initializer]
    tensors += [a.t for n in model.graph.node for a in n.attribute
                if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = f"ONNX initializer '{t.name}'"
        loc = info.get("location", "")
        rel = Path(loc)
        if not loc or rel.is_absolute() or ".." in rel.parts or "\\" in loc or \
                any(c in loc for c in "\0\n"):
            diags.append(Diagnostic(f"{where}: external data location {loc!r} is not a "
                                    "relative path inside the model's folder"))
            continue
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            diags.append(Diagnostic(f"{where}: external data file {loc!r} is missing or "
                                    "outside the model's folder"))
            continue
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            diags.append(Diagnostic(f"{where}: external data offset/length are not integers"))
            continue
        if t.data_type not in READABLE_TYPES:
            diags.append(Diagnostic(f"{where}: element type "
                                    f"{ONNX_TYPE_NAMES.get(t.data_type, t.data_type)} is not "
                                    "supported"))
            continue
        count = math.prod(int(d) for d in t.dims)
        want = count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        size = path.stat().st_size
        if length is None:
            length = want
        if count > MAX_ELEMENTS or any(int(d) < 0 for d in t.dims) or length != want or \
                offset < 0 or offset + length > size:
            diags.append(Diagnostic(f"{where}: dims {list(t.dims)} need {want} bytes; the "
                                    f"external data gives {length} at offset {offset} of a "
                                    f"{size}-byte file"))
            continue
        with open(path, "rb") as fh:
            fh.seek(offset)
            t.raw_data = fh.read(length)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    if diags:
        raise InputError(diags)


def convert_onnx(model: Any, name: str = "imported", source: str = "",
                 weights_file: str = "weights.npz", *, dtype: str | None = None,
                 outputs: Sequence[str] | None = None) -> ImportResult:
    """An in-memory ONNX ModelProto as .pbx text and a weight dict (keys as written).
    ``dtype`` ('float32' or 'float64') converts every float explicitly; without it a weight
    whose dtype differs from the input's is an error. ``outputs`` chooses graph outputs."""
    if dtype is not None and dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    conv = Converter(model, name, dtype, outputs)
    conv.run()
    text = conv.text(source, weights_file)
    return ImportResult(text, conv.weights, list(conv.statements), notes=list(conv.notes))


def import_onnx(source: str | os.PathLike[str], pbx_path: str | os.PathLike[str], *,
                name: str | None = None, weights_name: str | None = None,
                validate: Callable[[Path], object] | None = None,
                force: bool = False, dtype: str | None = None,
                outputs: Sequence[str] | None = None, check: bool = True) -> ImportResult:
    """Read ``source`` (.onnx) with the onnx package; write ``pbx_path`` and its .npz weights
    beside it, both or neither (pbxc.outputs.write_files): ``validate(staged_pbx)`` (by default,
    unless ``check=False``, the checks of ``pbxc check``) runs on the staged pair before either
    replaces anything. Returns what was written."""
    try:
        import onnx
    except ImportError:
        raise InputError("pbxc import needs the onnx package: pip install 'pbxc[onnx]'") from None
    src = Path(source)
    if not src.is_file():
        raise InputError(f"ONNX file not found: '{src}'")
    try:   # external data would be read from paths the file names: never followed
        model = onnx.load(str(src), load_external_data=False)
    except Exception as err:   # protobuf raises several types
        raise InputError(f"cannot read '{src}' as ONNX: {err}") from None
    load_external_data(model, src.parent)
    out = Path(pbx_path)
    wname = weights_name or out.with_suffix(".npz").name
    result = convert_onnx(model, name or out.stem, src.name, wname, dtype=dtype,
                          outputs=outputs)
    wpath = out.parent / wname

    if wpath.parent != out.parent:
        raise InputError(f"the weights file name '{wname}' must not name a folder")
    if validate is None and check:
        from pbxc.graph.frontend import check_file

        def validate(staged: Path) -> object:
            return check_file(str(staged))

    def write_npz(fh: IO[bytes]) -> None:
        np.savez(fh, **result.weights)  # type: ignore[arg-type]

    def write_text(fh: IO[bytes]) -> None:
        fh.write(result.text.encode("utf-8"))
    check_staged = validate
    write_files(out.parent, {wname: write_npz, out.name: write_text}, force=force,
                validate=(lambda staged: check_staged(staged / out.name)) if check_staged
                else None)
    result.pbx_path, result.weights_path = out, wpath
    return result
