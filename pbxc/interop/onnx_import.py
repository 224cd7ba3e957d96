"""ONNX -> .pbx: a readable model file and its weights (.npz), from the ``onnx`` package's
protobuf reader (never pickle, never executed). See specs/onnx.md for the op table.

ONNX tensors carry the batch as axis 0; pbxc shapes and axes are per sample. Axis attributes
move down by one (ONNX axis 1 is pbxc axis 0; negative axes are kept); an op on the batch axis
is refused. Weight layouts are rewritten into PyTorch's (Gemm with transB=0 and MatMul
weights are transposed to [out, in]; Gemm's alpha and beta are folded in).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pbxc.errors import InputError, UnsupportedOp
from pbxc.outputs import write_files

SUPPORTED_OPS = (
    "Gemm", "MatMul", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
    "Reshape", "Relu", "LeakyRelu", "Elu", "Selu", "Tanh", "Sigmoid", "Softplus", "Softmax",
    "LogSoftmax", "BatchNormalization", "Add", "Concat", "Identity", "Dropout", "Constant",
    # constant-affine and pattern ops: Sub/Div/Mul by a constant (normalize), x*sigmoid(b*x)
    # (silu / swish), ReduceMean over every spatial axis (global_avgpool)
    "Sub", "Div", "Mul", "ReduceMean",
)

ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus",
               "Selu": "selu"}
KEYWORDS = {"model", "weights", "input", "output", "activation", "verify", "features",
            "classes", "true", "false", "none", "domain", "in", "within", "std", "of", "key"}
DTYPES = {1: "float32", 11: "float64"}
SWISH = "activation swish(z, beta = 1.0) = z * sigmoid(beta * z)"
PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")


@dataclass
class Value:
    """An ONNX tensor as pbxc sees it: a .pbx name and its per-sample shape. ``onnx_shape``
    differs from ``shape`` only after a pooling to [C] that ONNX keeps as [C, 1, 1]."""

    name: str
    shape: tuple[int, ...]
    onnx_shape: tuple[int, ...]


@dataclass
class ImportResult:
    text: str
    weights: dict[str, np.ndarray]
    statements: list[str] = field(default_factory=list)
    pbx_path: Path | None = None
    weights_path: Path | None = None


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        if len(set(v)) == 1:
            return _fmt(v[0])
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(int(v))


class Converter:
    def __init__(self, model: Any, name: str) -> None:
        import onnx
        from onnx import numpy_helper

        self.onnx = onnx
        self.np_helper = numpy_helper
        self.name = _ident(name)
        with contextlib.suppress(Exception):   # shape inference helps; it is not required
            model = onnx.shape_inference.infer_shapes(model)
        self.model = model
        g = model.graph
        self.graph = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          13)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t)
                                              for t in g.initializer}
        self.values: dict[str, Value] = {}
        self.inferred: dict[str, tuple[int, ...] | None] = {}
        for vi in [*g.value_info, *g.output, *g.input]:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value")
                                                             for d in dims[1:]):
                self.inferred[vi.name] = tuple(int(d.dim_value) for d in dims[1:])
        for n in g.node:   # Constant nodes are constants like initializers
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                self.convert_constant(n)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.used_names: set[str] = set()
        self.used_prefixes: set[str] = set()
        self.weights: dict[str, np.ndarray] = {}
        self.statements: list[str] = []
        self.header: list[str] = []
        self.needs_swish = False
        self.skip: set[int] = set()           # ids of nodes folded into a pattern
        self.alias_out: dict[str, str] = {}    # ONNX tensor -> tensor whose value it takes
        self.counter = 0

    # ------------------------------------------------------------ helpers

    def fail(self, node: Any, message: str) -> UnsupportedOp:
        return UnsupportedOp(f"ONNX node '{node.name or node.output[0]}' ({node.op_type}): "
                             f"{message}")

    def attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def check_attrs(self, node: Any, allowed: dict[str, Any]) -> dict[str, Any]:
        """The node's attributes; one outside ``allowed`` (name -> None for any value, or a
        tuple of accepted values) is an error naming it."""
        found = self.attrs(node)
        for key, value in found.items():
            if key not in allowed:
                raise self.fail(node, f"attribute '{key}' is not supported (supported: "
                                f"{', '.join(sorted(allowed)) or 'none'})")
            ok = allowed[key]
            v = value.decode() if isinstance(value, bytes) else value
            if ok is not None and v not in ok:
                raise self.fail(node, f"attribute {key}={v!r} is not supported "
                                f"(supported: {', '.join(repr(o) for o in ok)})")
        return found

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, node: Any, name: str) -> np.ndarray:
        if name not in self.consts:
            raise self.fail(node, f"input '{name}' must be a constant (an initializer)")
        return self.consts[name]

    def value(self, node: Any, name: str, layout: str = "onnx") -> Value:
        name = self.alias_out.get(name, name)
        if name not in self.values:
            if name in self.consts:
                raise self.fail(node, f"input '{name}' is a constant where pbxc needs a value "
                                "computed from the model's input")
            raise self.fail(node, f"input '{name}' is not defined")
        v = self.values[name]
        if layout == "onnx" and v.shape != v.onnx_shape:
            new = Value(self.fresh(v.name + "_r"), v.onnx_shape, v.onnx_shape)
            self.emit(new.name, f"reshape({v.name}, [{', '.join(map(str, v.onnx_shape))}])",
                      False)
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

    def emit(self, name: str, expr: str, is_output: bool) -> None:
        self.statements.append(f"{'output ' if is_output else ''}{name} = {expr}")

    def define(self, node: Any, expr: str, shape: Sequence[int],
               onnx_shape: Sequence[int] | None = None, tensor: str | None = None) -> None:
        tensor = tensor or node.output[0]
        name = self.out_name(node, tensor)
        self.emit(name, expr, tensor in self.outputs)
        self.values[tensor] = Value(name, tuple(shape), tuple(onnx_shape or shape))

    def per_sample_const(self, node: Any, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A constant operand broadcast to one sample's shape (a leading batch axis of size 1
        is dropped)."""
        c = np.asarray(c, dtype=np.float64)
        if c.ndim == len(shape) + 1:
            if c.shape[0] != 1:
                raise self.fail(node, f"a constant of shape {list(c.shape)} varies along the "
                                "batch axis")
            c = c[0]
        try:
            return np.array(np.broadcast_to(c, shape))
        except ValueError:
            raise self.fail(node, f"constant of shape {list(c.shape)} does not broadcast to "
                            f"the per-sample shape {list(shape)}") from None

    def axis(self, node: Any, axis: int, rank: int) -> int:
        """An ONNX axis of a (batch + ``rank``)-dimensional tensor as a per-sample axis."""
        full = rank + 1
        a = axis + full if axis < 0 else axis
        if not 0 <= a < full:
            raise self.fail(node, f"axis {axis} is out of range for rank {full}")
        if a == 0:
            raise self.fail(node, "ops along the batch axis (axis 0) are not supported")
        return a - 1 - rank  # negative: counts from the end, the same in both conventions

    # ------------------------------------------------------------ patterns

    def only_consumer(self, tensor: str) -> Any:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def find_patterns(self) -> dict[int, tuple[str, Any]]:
        """Node id -> (pattern, data) for node groups folded into one pbxc op."""
        found: dict[int, tuple[str, Any]] = {}
        for n in self.graph.node:
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
            if n.op_type == "Mul" and not any(self.is_const(i) for i in n.input):
                for z, s in (n.input, n.input[::-1]):
                    sig = self.producer.get(s)
                    if sig is None or sig.op_type != "Sigmoid" or self.only_consumer(s) is None:
                        continue
                    u = sig.input[0]
                    if u == z:
                        found[id(n)] = ("swish", (z, 1.0))
                        self.skip.add(id(sig))
                        break
                    pre = self.producer.get(u)
                    if pre is not None and pre.op_type == "Mul" and \
                            self.only_consumer(u) is not None:
                        ins = list(pre.input)
                        if z in ins:
                            c = ins[1 - ins.index(z)]
                            if self.is_const(c) and self.consts[c].size == 1:
                                found[id(n)] = ("swish", (z, float(self.consts[c].reshape(()))))
                                self.skip.update({id(sig), id(pre)})
                                break
        return found

    # ------------------------------------------------------------ conversion

    def run(self) -> str:
        g = self.graph
        for i in g.input:
            if i.name in self.consts:
                continue
            tt = i.type.tensor_type
            if tt.elem_type not in DTYPES:
                raise InputError(f"ONNX input '{i.name}': element type {tt.elem_type} is not "
                                 "supported (float32 or float64)")
            dims = tt.shape.dim
            if not len(dims) or any(not d.HasField("dim_value") for d in dims[1:]):
                raise InputError(f"ONNX input '{i.name}' needs a fixed shape after the batch "
                                 "axis")
            shape = tuple(int(d.dim_value) for d in dims[1:])
            name = self.fresh(i.name)
            self.header.append(f"input {name}: {DTYPES[tt.elem_type]}"
                               f"[{', '.join(map(str, shape))}]")
            self.values[i.name] = Value(name, shape, shape)
        patterns = self.find_patterns()
        for node in g.node:
            if id(node) in self.skip:
                continue
            self.convert(node, patterns.get(id(node)))
        for o in g.output:
            src = self.alias_out.get(o.name, o.name)
            if src not in self.values:
                raise InputError(f"ONNX output '{o.name}' is not computed from an input")
            v = self.values[src]
            if not any(s.startswith(f"output {v.name} =") for s in self.statements):
                self.emit(self.fresh(o.name), v.name, True)
        return self.text()

    def text(self, source: str = "", weights_file: str = "weights.npz") -> str:
        lines = [f"# imported from {source or 'an ONNX model'} by `pbxc import` "
                 f"(ONNX opset {self.opset})", f"model {self.name}"]
        if self.weights:
            lines.append(f'weights "{weights_file}"')
        lines.append("")
        lines += self.header
        if self.needs_swish:
            lines += ["", SWISH]
        lines.append("")
        lines += self.statements
        return "\n".join(lines) + "\n"

    def convert_constant(self, node: Any) -> None:
        a = self.check_attrs(node, {"value": None, "value_float": None, "value_floats": None,
                                    "value_int": None, "value_ints": None})
        if "value" in a:
            self.consts[node.output[0]] = self.np_helper.to_array(a["value"])
        else:
            self.consts[node.output[0]] = np.asarray(next(iter(a.values())))

    def convert(self, node: Any, pattern: tuple[str, Any] | None) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise self.fail(node, f"op domain '{node.domain}' is not supported")
        if op == "Constant":
            return
        if all(self.is_const(i) for i in node.input if i):
            raise self.fail(node, "ops on constants alone are not supported (fold them first, "
                            "e.g. torch.onnx.export(..., do_constant_folding=True))")
        if pattern is not None:
            getattr(self, f"pattern_{pattern[0]}")(node, pattern[1])
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise self.fail(node, f"op '{op}' is not supported; supported ops: "
                            f"{', '.join(SUPPORTED_OPS)}")
        handler(node)

    # ------------------------------------------------------------ ops

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
        a = self.check_attrs(node, {"alpha": None, "beta": None, "transA": (0,),
                                    "transB": (0, 1)})
        x = self.value(node, node.input[0])
        if len(x.shape) != 1:
            raise self.fail(node, f"Gemm needs a [batch, features] input, got per-sample shape "
                            f"{list(x.shape)}")
        w = self.const(node, node.input[1]).astype(np.float64)
        w = w if a.get("transB", 0) else w.T
        w = w * a.get("alpha", 1.0)
        b = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node, node.input[2]).astype(np.float64) * a.get("beta", 1.0)
            if c.ndim == 2 and c.shape[0] == 1:
                c = c[0]
            if c.ndim > 1:
                raise self.fail(node, f"bias C of shape {list(c.shape)} is not supported "
                                "([out] or [1, out])")
            b = c
        self.linear(node, x, w.astype(np.float32) if w.dtype != np.float32 else w, b,
                    node.input[1])

    def _matmul(self, node: Any, bias: np.ndarray | None, tensor: str | None = None) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        w = self.const(node, node.input[1])
        if w.ndim != 2:
            raise self.fail(node, f"MatMul with a constant of rank {w.ndim} is not supported "
                            "(a 2-D weight [in, out])")
        self.linear(node, x, w.T, bias, node.input[1], tensor)

    def op_MatMul(self, node: Any) -> None:
        self._matmul(node, None)

    def pattern_matmul_add(self, node: Any, add: Any) -> None:
        c = next(self.consts[i] for i in add.input if i != node.output[0])
        c = np.asarray(c)
        out = self.const(node, node.input[1]).shape[-1]
        if c.size != out and c.size != 1:
            raise self.fail(add, f"bias of shape {list(c.shape)} does not fit {out} outputs")
        self.alias_out.pop(add.output[0], None)
        self._matmul(node, np.broadcast_to(c.reshape(-1), (out,)), add.output[0])

    def op_Conv(self, node: Any) -> None:
        a = self.check_attrs(node, {"kernel_shape": None, "strides": None, "pads": None,
                                    "dilations": None, "group": None,
                                    "auto_pad": ("NOTSET", "VALID")})
        x = self.value(node, node.input[0])
        w = self.const(node, node.input[1])
        nd = w.ndim - 2
        if nd not in (1, 2) or len(x.shape) != nd + 1:
            raise self.fail(node, f"only 1-D and 2-D convolutions are supported (weight "
                            f"{list(w.shape)}, input {list(x.shape)})")
        pads = list(a.get("pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:]:
            raise self.fail(node, f"asymmetric pads {pads} are not supported")
        strides = tuple(a.get("strides", [1] * nd))
        dil = tuple(a.get("dilations", [1] * nd))
        groups = int(a.get("group", 1))
        p = self.prefix(node, node.input[1], f"conv{len(self.weights)}")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(w)
        args = [x.name, f"@{p}"]
        if len(node.input) > 2 and node.input[2]:
            self.weights[f"{p}.bias"] = np.ascontiguousarray(self.const(node, node.input[2]))
        else:
            args.append("bias=false")
        if any(s != 1 for s in strides):
            args.append(f"stride={_fmt(strides)}")
        if any(pads):
            args.append(f"padding={_fmt(tuple(pads[:nd]))}")
        if any(d != 1 for d in dil):
            args.append(f"dilation={_fmt(dil)}")
        if groups != 1:
            args.append(f"groups={groups}")
        k = w.shape[2:]
        spatial = tuple((n + 2 * pd - d * (kk - 1) - 1) // s + 1 for n, pd, d, kk, s in
                        zip(x.shape[1:], pads[:nd], dil, k, strides))
        self.define(node, f"conv{nd}d({', '.join(args)})", (w.shape[0], *spatial))

    def _pool(self, node: Any, kind: str) -> None:
        allowed: dict[str, Any] = {"kernel_shape": None, "strides": None, "pads": None,
                                   "ceil_mode": (0,), "auto_pad": ("NOTSET", "VALID")}
        if kind == "max":
            allowed |= {"dilations": None, "storage_order": (0,)}
        else:
            allowed |= {"count_include_pad": (0, 1)}
        a = self.check_attrs(node, allowed)
        if kind == "max" and any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self.fail(node, f"dilations {a['dilations']} are not supported (1 only)")
        if len(node.output) > 1 and node.output[1]:
            raise self.fail(node, "the Indices output of MaxPool is not supported")
        x = self.value(node, node.input[0])
        k = tuple(a["kernel_shape"])
        if len(k) != 2 or len(x.shape) != 3:
            raise self.fail(node, f"only 2-D pooling on [C, H, W] is supported (kernel {list(k)}, "
                            f"input {list(x.shape)})")
        strides = tuple(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            raise self.fail(node, f"asymmetric pads {pads} are not supported")
        args = [x.name, f"kernel={_fmt(k)}", f"stride={_fmt(strides)}"]
        if any(pads):
            args.append(f"padding={_fmt(tuple(pads[:2]))}")
            if kind == "avg":
                args.append(f"count_include_pad={_fmt(bool(a.get('count_include_pad', 0)))}")
        spatial = tuple((n + 2 * pd - kk) // s + 1 for n, pd, kk, s in
                        zip(x.shape[1:], pads[:2], k, strides))
        self.define(node, f"{kind}pool2d({', '.join(args)})", (x.shape[0], *spatial))

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
            raise self.fail(node, f"ReduceMean over axes {axes} is not supported (only over "
                            "every spatial axis, i.e. a global average pool)")
        self._global_pool(node, x, bool(a.get("keepdims", 1)))

    def op_Flatten(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": (1,)})
        del a
        x = self.value(node, node.input[0], layout="pbx")
        n = int(np.prod(x.shape))
        if len(x.shape) == 1:
            self.values[node.output[0]] = Value(x.name, x.shape, (n,))
            if node.output[0] in self.outputs:
                self.emit(self.fresh(node.output[0]), x.name, True)
                self.values[node.output[0]] = Value(self.statements[-1].split()[1], (n,), (n,))
            return
        self.define(node, f"flatten({x.name})", (n,))

    def op_Reshape(self, node: Any) -> None:
        self.check_attrs(node, {"allowzero": (0,)})
        x = self.value(node, node.input[0])
        target = [int(t) for t in self.const(node, node.input[1]).tolist()]
        inferred = self.inferred.get(node.output[0])
        n = int(np.prod(x.shape))
        if inferred is not None and int(np.prod(inferred)) == n:
            shape = tuple(inferred)
        else:
            if not target or target[0] not in (0, -1, 1):
                raise self.fail(node, f"reshape to {target} must keep the batch axis first "
                                "(0 or -1 there)")
            rest = [x.shape[i - 1] if t == 0 and i - 1 < len(x.shape) else t
                    for i, t in enumerate(target) if i > 0]
            if rest.count(-1) == 1:
                known = int(np.prod([r for r in rest if r != -1]))
                rest[rest.index(-1)] = n // known if known else 0
            shape = tuple(rest)
            if int(np.prod(shape)) != n:
                raise self.fail(node, f"reshape of per-sample shape {list(x.shape)} to {target} "
                                "changes the batch size")
        if len(shape) == 1 and len(x.shape) > 1:
            self.define(node, f"flatten({x.name})", shape)
        else:
            self.define(node, f"reshape({x.name}, [{', '.join(map(str, shape))}])", shape)

    def _activation(self, node: Any, expr: str) -> None:
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
        p = self.prefix(node, node.input[1], f"bn{len(self.weights)}")
        for role, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            self.weights[f"{p}.{role}"] = np.ascontiguousarray(self.const(node, node.input[i]))
        eps = float(a.get("epsilon", 1e-5))
        settings = "" if abs(eps - 1e-5) < 1e-12 else f", eps={_fmt(eps)}"
        self.define(node, f"batchnorm({x.name}, @{p}{settings})", x.shape)

    def normalize(self, node: Any, x: Value, mean: np.ndarray, std: np.ndarray,
                  stem: str, tensor: str | None = None) -> None:
        p = self.prefix(node, None, stem)
        self.weights[f"{p}.mean"] = mean.astype(np.float64)
        self.weights[f"{p}.std"] = std.astype(np.float64)
        self.define(node, f"normalize({x.name}, @{p})", x.shape, tensor=tensor)

    def pattern_standardize(self, node: Any, div: Any) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        mean = self.per_sample_const(node, self.consts[node.input[1]], x.shape)
        std = self.per_sample_const(div, self.consts[div.input[1]], x.shape)
        self.alias_out.pop(div.output[0], None)
        self.normalize(node, x, mean, std, "scaler", div.output[0])

    def _affine_const(self, node: Any) -> None:
        self.check_attrs(node, {})
        op = node.op_type
        a, b = node.input
        if self.is_const(a) and op in ("Add", "Mul"):
            a, b = b, a
        if self.is_const(a) or not self.is_const(b):
            raise self.fail(node, f"{op} is supported with one constant operand (second for Sub "
                            "and Div)")
        x = self.value(node, a)
        c = self.per_sample_const(node, self.consts[b], x.shape)
        one, zero = np.ones(x.shape), np.zeros(x.shape)
        if op == "Add":
            self.normalize(node, x, -c, one, "shift")
        elif op == "Sub":
            self.normalize(node, x, c, one, "shift")
        elif op == "Div":
            self.normalize(node, x, zero, c, "scale")
        else:
            if np.any(c == 0):
                raise self.fail(node, "Mul by a constant with zeros is not supported")
            self.normalize(node, x, zero, 1.0 / c, "scale")

    def op_Add(self, node: Any) -> None:
        if any(self.is_const(i) for i in node.input):
            self._affine_const(node)
            return
        self.check_attrs(node, {})
        xs = [self.value(node, i) for i in node.input]
        if len({v.shape for v in xs}) != 1:
            raise self.fail(node, f"Add with broadcasting is not supported (shapes "
                            f"{[list(v.shape) for v in xs]})")
        self.define(node, f"add({', '.join(v.name for v in xs)})", xs[0].shape)

    def op_Sub(self, node: Any) -> None:
        self._affine_const(node)

    def op_Div(self, node: Any) -> None:
        self._affine_const(node)

    def op_Mul(self, node: Any) -> None:
        self._affine_const(node)

    def pattern_swish(self, node: Any, data: tuple[str, float]) -> None:
        self.check_attrs(node, {})
        z, beta = data
        x = self.value(node, z)
        if beta == 1.0:
            self.define(node, f"silu({x.name})", x.shape)
        else:
            self.needs_swish = True
            self.define(node, f"swish({x.name}, beta={_fmt(beta)})", x.shape)

    def op_Concat(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None})
        xs = [self.value(node, i) for i in node.input]
        rank = len(xs[0].shape)
        ax = self.axis(node, int(a["axis"]), rank)
        shape = list(xs[0].shape)
        shape[ax] = sum(v.shape[ax] for v in xs)
        setting = "" if ax == -rank else f", axis={ax}"
        if ax == -rank:
            setting = ""
        self.define(node, f"concat({', '.join(v.name for v in xs)}{setting})", shape)

    def _alias(self, node: Any) -> None:
        x = self.value(node, node.input[0], layout="pbx")
        if node.output[0] in self.outputs:
            name = self.fresh(node.output[0])
            self.emit(name, x.name, True)
            self.values[node.output[0]] = Value(name, x.shape, x.onnx_shape)
        else:
            self.values[node.output[0]] = x

    def op_Identity(self, node: Any) -> None:
        self.check_attrs(node, {})
        self._alias(node)

    def op_Dropout(self, node: Any) -> None:
        self.check_attrs(node, {"seed": None, "ratio": None, "is_test": None})
        if len(node.input) > 2 and node.input[2]:
            mode = self.const(node, node.input[2])
            if bool(np.asarray(mode).reshape(())):
                raise self.fail(node, "Dropout in training mode is not supported")
        if len([o for o in node.output if o]) > 1:
            raise self.fail(node, "the mask output of Dropout is not supported")
        self._alias(node)


def _ident(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_").lower()
    if not s:
        s = "v"
    if s[0].isdigit():
        s = "v" + s
    return s


def convert_onnx(model: Any, name: str = "imported", source: str = "",
                 weights_file: str = "weights.npz") -> ImportResult:
    """An in-memory ONNX ModelProto as .pbx text and a weight dict (keys as written)."""
    conv = Converter(model, name)
    conv.run()
    text = conv.text(source, weights_file)
    return ImportResult(text, conv.weights, list(conv.statements))


def import_onnx(source: str | os.PathLike[str], pbx_path: str | os.PathLike[str], *,
                name: str | None = None, weights_name: str | None = None,
                validate: Callable[[Path], object] | None = None,
                force: bool = False) -> ImportResult:
    """Read ``source`` (.onnx) with the onnx package; write ``pbx_path`` and its .npz weights
    beside it, both or neither (pbxc.outputs.write_files): ``validate(staged_pbx)`` runs on
    the staged pair before either replaces anything. Returns what was written."""
    try:
        import onnx
    except ImportError:
        raise InputError("pbxc import needs the onnx package: pip install 'pbxc[onnx]'") from None
    src = Path(source)
    if not src.is_file():
        raise InputError(f"ONNX file not found: '{src}'")
    try:
        model = onnx.load(str(src))
    except Exception as err:   # protobuf raises several types
        raise InputError(f"cannot read '{src}' as ONNX: {err}") from None
    out = Path(pbx_path)
    wname = weights_name or out.with_suffix(".npz").name
    result = convert_onnx(model, name or out.stem, src.name, wname)
    wpath = out.parent / wname

    if wpath.parent != out.parent:
        raise InputError(f"the weights file name '{wname}' must not name a folder")

    def write_npz(fh: IO[bytes]) -> None:
        np.savez(fh, **result.weights)  # type: ignore[arg-type]

    def write_text(fh: IO[bytes]) -> None:
        fh.write(result.text.encode("utf-8"))
    write_files(out.parent, {wname: write_npz, out.name: write_text}, force=force,
                validate=(lambda staged: validate(staged / out.name)) if validate else None)
    result.pbx_path, result.weights_path = out, wpath
    return result
