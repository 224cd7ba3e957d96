"""Render a model as CUDA C kernels plus a standalone Python module that launches them.

The same method set as :class:`pbxc.codegen.numpy_module.NumpyModuleRenderer`, and the same
API in the generated module (forward, gradient, input_x_gradient, jacobian, dfd, lrp), so a
user switches targets without relearning. Per node, the renderer emits kernels with the
node's geometry baked in as constants (``n<k>_fwd``, ``n<k>_vjp``, ``n<k>_dfd``, ...) and a
Python function that calls them around the matrix products (``xp.matmul``: cuBLAS on a GPU).
Fusions: an activation whose input is a linear, convolution, batch-norm, normalize or add
used by it alone is computed in that op's epilogue kernel; the backward kernels of an
activation compute f'(z) or the DFD multiplier on the fly from the saved pre-activation, so
no local derivative is stored.

Jacobians accumulate in reverse (the plan's choice whenever the output is no larger than the
input, which holds for every classifier): cotangents are (B, K, *shape) for K seeds.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from pbxc.codegen import cuda_runtime
from pbxc.codegen.c_printer import C_SOFTMAX
from pbxc.codegen.cuda_kernels import (
    GENERIC,
    PREAMBLE,
    Arg,
    Kernel,
    device_helpers,
    kernel_table,
    render_kernels,
)
from pbxc.codegen.escape import py_literal, py_text
from pbxc.codegen.numpy_module import (
    EntryCalls,
    LrpPlan,
    check_symbols,
    render_lrp_entry,
    source_lines,
    var,
)
from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.lower.calls import DFD_BY_VJP, kernel_attrs, kernel_base
from pbxc.ops import OpKind

#: ops the CUDA target compiles
SUPPORTED = frozenset({
    OpKind.LINEAR, OpKind.CONV1D, OpKind.CONV2D, OpKind.MAXPOOL2D, OpKind.AVGPOOL2D,
    OpKind.GLOBAL_AVGPOOL, OpKind.BATCHNORM, OpKind.NORMALIZE, OpKind.ADD, OpKind.FLATTEN,
    OpKind.RESHAPE, OpKind.ACTIVATION, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX,
})
#: why an op the NumPy backend runs has no CUDA kernels yet
_CUDA_HINTS = {k: " (conv3d and the transposed convolutions run on the numpy backend only)"
               for k in (OpKind.CONV3D, OpKind.CONV_TRANSPOSE1D, OpKind.CONV_TRANSPOSE2D,
                         OpKind.CONV_TRANSPOSE3D)}
_CUDA_HINTS[OpKind.CONCAT] = (" (concat, of values or with constant operands such as a class "
                              "token, runs on the numpy backend and in `pbxc compile`'s NumPy "
                              "module only)")
#: ops whose epilogue kernel may also compute the activation that alone consumes them
FUSABLE = frozenset({OpKind.LINEAR, OpKind.CONV1D, OpKind.CONV2D, OpKind.BATCHNORM,
                     OpKind.NORMALIZE, OpKind.ADD})
#: the launcher's side of the entry points the CUDA module shares with the NumPy module
CUDA_ENTRY = EntryCalls("C, P, xs = _prepare(x, dtype)", "_forward(C, P, *xs)",
                        "_targets(C, logits, target)", "C, P, E", "C.xp",
                        "KernelArgumentError")
#: the largest pooling window (a thread keeps one slope per window element)
MAX_WINDOW = 64


def unsupported(graph: ModelGraph) -> str | None:
    """Why the cuda target cannot compile ``graph``, or None (checked before rendering)."""
    if len(graph.input_names) != 1:
        return "the cuda target compiles models with one input"
    for node in graph.topological():
        if node.kind is OpKind.INPUT:
            continue
        if node.kind not in SUPPORTED:
            return (f"the cuda target has no kernels for op '{node.kind.value}'"
                    + _CUDA_HINTS.get(node.kind, ""))
        if node.kind in (OpKind.CONV1D, OpKind.CONV2D) and any(
                b != e for b, e in kernel_attrs(node)["padding"]):
            return (f"the cuda target takes symmetric convolution padding only; "
                    f"'{node.name}' pads {kernel_attrs(node)['padding']} (begin, end) per axis")
        refused = _refused_form(node)
        if refused:
            return refused
        if node.kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
            rank = len(node.shape or ())
            if int(kernel_attrs(node)["axis"]) != rank - 1:
                return "the cuda target takes softmax over the last axis only"
        if node.kind in (OpKind.MAXPOOL2D, OpKind.AVGPOOL2D):
            kh, kw = kernel_attrs(node)["kernel"]
            if kh * kw > MAX_WINDOW:
                return f"the cuda target takes pooling windows of at most {MAX_WINDOW} elements"
    return None


def _refused_form(node: OpNode) -> str | None:
    """Forms of supported ops that the cuda kernels do not implement (the NumPy backend and
    ``pbxc compile`` do): ceil_mode or dilated 2-d pooling, add with broadcasting or a
    constant."""
    base = kernel_base(node)
    if node.kind in (OpKind.MAXPOOL2D, OpKind.AVGPOOL2D) and base != node.kind.value:
        return (f"the cuda target has no kernels for {node.kind.value} with ceil_mode or "
                "dilation")
    if node.kind is OpKind.ADD and base != "add":
        return "the cuda target adds values of one shape only (no broadcasting or constants)"
    return None


def size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def _a(kind: str, name: str, extent: int | str = "total") -> Arg:
    return Arg(kind, name, extent)


@dataclass
class NodeCode:
    """What one node contributes: kernels, and Python lines of its per-node functions."""

    kernels: list[Kernel] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Geometry2d:
    """A convolution's or pooling's window geometry on (C, H, W) -> (O, OH, OW)."""

    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    oh: int
    ow: int


def _geometry(node: OpNode, in_shape: tuple[int, ...], weight: tuple[int, ...] | None
              ) -> Geometry2d:
    attrs = kernel_attrs(node)
    if node.kind in (OpKind.CONV1D, OpKind.CONV2D):
        if any(b != e for b, e in attrs["padding"]):
            raise UnsupportedOp(f"the cuda target takes symmetric convolution padding only; "
                                f"'{node.name}' pads {attrs['padding']} (begin, end) per axis "
                                "(use the numpy backend)", node.pos)
        attrs["padding"] = tuple(b for b, _ in attrs["padding"])
    if node.kind is OpKind.CONV1D:
        assert weight is not None
        c, length = in_shape
        (s,), (p,), (d,) = attrs["stride"], attrs["padding"], attrs["dilation"]
        (_, ol) = node.shape or (0, 0)
        return Geometry2d(c, 1, length, 1, weight[2], 1, s, 0, p, 1, d, 1, ol)
    c, h, w = in_shape
    oh, ow = (node.shape or (0, 0, 0))[1:]
    if node.kind is OpKind.CONV2D:
        assert weight is not None
        (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
        return Geometry2d(c, h, w, weight[2], weight[3], sh, sw, ph, pw, dh, dw, oh, ow)
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs["padding"]
    return Geometry2d(c, h, w, kh, kw, sh, sw, ph, pw, 1, 1, oh, ow)


def _window_loop(g: Geometry2d, inner: str) -> str:
    """Loop over the windows that contain input pixel (h, w): ``inner`` sees p, q, oh, ow."""
    return (f"for (int p = 0; p < {g.kh}; ++p) {{\n"
            f"    const int hn = h + {g.ph} - p * {g.dh};\n"
            f"    if (hn < 0 || hn % {g.sh} != 0 || hn / {g.sh} >= {g.oh}) continue;\n"
            f"    const int oh = hn / {g.sh};\n"
            f"    for (int q = 0; q < {g.kw}; ++q) {{\n"
            f"        const int wn = w + {g.pw} - q * {g.dw};\n"
            f"        if (wn < 0 || wn % {g.sw} != 0 || wn / {g.sw} >= {g.ow}) continue;\n"
            f"        const int ow = wn / {g.sw};\n"
            + "\n".join("        " + line for line in inner.splitlines()) +
            "\n    }\n}")


def _pixel_index(g: Geometry2d) -> str:
    """Decompose i over (rows, C, H, W): w, h, c and the row-channel plane ``plane``."""
    return (f"const int w = (int)(i % {g.w});\nconst int h = (int)((i / {g.w}) % {g.h});\n"
            f"const long long plane = i / {g.h * g.w};\nconst int c = (int)(plane % {g.c});\n"
            f"const long long row = plane / {g.c};\n(void)c;\n(void)row;")


class CudaModuleRenderer:
    """Renders a model's passes as CUDA C plus a launcher module (see the module docstring)."""

    def __init__(self, graph: ModelGraph, activation_source: str,
                 activation_names: Mapping[str, Mapping[str, str]],
                 source_text: str | None = None, lrp: LrpPlan | None = None) -> None:
        self.graph = graph
        self.lrp = lrp
        self.nodes = [n for n in graph.topological() if n.kind is not OpKind.INPUT]
        self.activation_source = activation_source
        self.act = activation_names
        self.lines = source_lines(source_text)
        check_symbols(graph)
        self.index = {n.name: k for k, n in enumerate(self.nodes)}
        for node in self.nodes:
            if node.kind not in SUPPORTED:
                raise UnsupportedOp(f"the cuda target has no kernels for op '{node.kind.value}'"
                                    + _CUDA_HINTS.get(node.kind, ""),
                                    node.pos)
            refused = _refused_form(node)
            if refused:
                raise UnsupportedOp(refused, node.pos)
        outputs = set(graph.output_names)
        # producer -> the activation fused into its epilogue
        self.fused: dict[str, str] = {}
        for node in self.nodes:
            if node.kind is not OpKind.ACTIVATION:
                continue
            src = graph.node(node.inputs[0])
            users = list(graph.digraph.successors(src.name))
            if src.kind in FUSABLE and users == [node.name] and src.name not in outputs:
                self.fused[src.name] = node.name
        self.fused_into = {a: p for p, a in self.fused.items()}
        self.code = {n.name: self._node_code(n) for n in self.nodes}

    # ------------------------------------------------------------------ helpers
    def kid(self, node: OpNode, what: str) -> str:
        return f"n{self.index[node.name]}_{what}"

    def fn(self, node: OpNode, what: str) -> str:
        return f"_{what}{self.index[node.name]}"

    def in_shape(self, node: OpNode, k: int = 0) -> tuple[int, ...]:
        return self.graph.shape_of(node.inputs[k])

    def act_call(self, act_node: str, routine: str, *args: str) -> str:
        return f"{self.act[act_node][routine]}_$S({', '.join(args)})"

    def comment(self, node: OpNode) -> str:
        """Where the node comes from, as raw text: each sink escapes it (py_text, c_text)."""
        text = self.lines.get(node.pos.line, "").strip()
        return f"{node.pos.file}:{node.pos.line}: {text}"[:100]

    def _epilogue(self, node: OpNode, value: str, ins: list[Arg], fwd_lines: list[str],
                  call_ins: list[str]) -> NodeCode:
        """The node's forward kernel: ``value`` (a C expression) -> y[i] (and a[i] = f(y[i])
        when an activation is fused), and the Python function launching it."""
        act = self.fused.get(node.name)
        outs = [_a("T*", "y")] + ([_a("T*", "a")] if act else [])
        body = f"const T v = {value};\ny[i] = v;"
        if act:
            body += f"\na[i] = {self.act_call(act, 'f', 'v')};"
        kernel = Kernel(self.kid(node, "fwd"), (*ins, *outs), body,
                        f"{node.name}: {self.comment(node)}" + (f"; fused: {act}" if act else ""))
        shape = f"(xs[0].shape[0], *{tuple(node.shape or ())!r})"
        lines = [f"def {self.fn(node, 'f')}(C, P, xs):", *fwd_lines,
                 f"    y = C.new({shape})"]
        outs_py = ["y"]
        if act:
            lines.append(f"    a = C.new({shape})")
            outs_py.append("a")
        lines += [f"    C.call({kernel.name!r}, [{', '.join(call_ins)}], [{', '.join(outs_py)}])",
                  f"    return {', '.join(outs_py)}" + ("," if len(outs_py) == 1 else "")]
        return NodeCode([kernel], lines)

    # ------------------------------------------------------------------ per op
    def _node_code(self, node: OpNode) -> NodeCode:
        kind = node.kind
        n_out = size(node.shape or ())
        p = f"P[{py_literal(node.name)}]"
        if kind is OpKind.ACTIVATION:
            return self._activation(node)
        if kind is OpKind.LINEAR:
            return self._linear(node)
        if kind in (OpKind.CONV1D, OpKind.CONV2D):
            return self._conv(node)
        if kind is OpKind.MAXPOOL2D:
            return self._maxpool(node)
        if kind is OpKind.AVGPOOL2D:
            return self._avgpool(node)
        if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
            return self._softmax(node)
        if kind is OpKind.GLOBAL_AVGPOOL:
            c = self.in_shape(node)[0]
            s = size(self.in_shape(node)) // c
            fwd = Kernel(self.kid(node, "fwd"), (_a("const T*", "x", ""), _a("T*", "y")),
                         f"T sum = (T)0;\nfor (int k = 0; k < {s}; ++k) sum += x[i * {s} + k];\n"
                         f"y[i] = sum / (T){s};", f"{node.name}: mean over {s} positions")
            vjp = Kernel(self.kid(node, "vjp"), (_a("const T*", "g", ""), _a("T*", "out")),
                         f"out[i] = g[i / {s}] / (T){s};", f"{node.name}: the mean's transpose")
            f = [f"def {self.fn(node, 'f')}(C, P, xs):",
                 f"    return C.run({fwd.name!r}, [xs[0]], (xs[0].shape[0], {c})),"]
            b = [f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                 f"    return [C.run({vjp.name!r}, [g], (*g.shape[:2], "
                 f"*{self.in_shape(node)!r}))]"]
            return NodeCode([fwd, vjp], f + b)
        if kind is OpKind.BATCHNORM:
            c = self.in_shape(node)[0]
            s = n_out // c
            ch = f"(i / {s}) % {c}"
            code = self._epilogue(node, f"x[i] * scale[{ch}] + shift[{ch}]",
                                  [_a("const T*", "x"), _a("const T*", "scale", c),
                                   _a("const T*", "shift", c)], [],
                                  ["xs[0]", f"{p}['scale']", f"{p}['shift']"])
            vjp = Kernel(self.kid(node, "vjp"), (_a("const T*", "g"), _a("const T*", "scale", c),
                                                 _a("T*", "out")),
                         f"out[i] = g[i] * scale[{ch}];", f"{node.name}: g * scale")
            code.kernels.append(vjp)
            code.functions += [f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                               f"    return [C.run({vjp.name!r}, [g, {p}['scale']], g.shape)]"]
            return code
        if kind is OpKind.NORMALIZE:
            code = self._epilogue(node, f"(x[i] - mean[i % {n_out}]) / std[i % {n_out}]",
                                  [_a("const T*", "x"), _a("const T*", "mean", n_out),
                                   _a("const T*", "std", n_out)], [],
                                  ["xs[0]", f"{p}['mean_full']", f"{p}['std_full']"])
            vjp = Kernel(self.kid(node, "vjp"), (_a("const T*", "g"),
                                                 _a("const T*", "std", n_out), _a("T*", "out")),
                         f"out[i] = g[i] / std[i % {n_out}];", f"{node.name}: g / std")
            code.kernels.append(vjp)
            code.functions += [f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                               f"    return [C.run({vjp.name!r}, [g, {p}['std_full']], g.shape)]"]
            return code
        if kind is OpKind.ADD:
            k = len(node.inputs)
            value = "x0[i] + x1[i]"
            for j in range(2, k):
                value = f"({value}) + x{j}[i]"
            code = self._epilogue(node, value, [_a("const T*", f"x{j}") for j in range(k)], [],
                                  [f"xs[{j}]" for j in range(k)])
            code.functions += [f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                               f"    return [g] * {k}"]
            return code
        if kind in (OpKind.FLATTEN, OpKind.RESHAPE):
            return NodeCode([], [
                f"def {self.fn(node, 'f')}(C, P, xs):",
                f"    return xs[0].reshape(xs[0].shape[0], *{tuple(node.shape or ())!r}),",
                f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                f"    return [g.reshape(*g.shape[:2], *{self.in_shape(node)!r})]"])
        raise UnsupportedOp(f"the cuda target has no kernels for op '{kind.value}'", node.pos)

    def _activation(self, node: OpNode) -> NodeCode:
        n = size(node.shape or ())
        kernels: list[Kernel] = []
        lines: list[str] = []
        if node.name not in self.fused_into:
            fwd = Kernel(self.kid(node, "fwd"), (_a("const T*", "x"), _a("T*", "y")),
                         f"y[i] = {self.act_call(node.name, 'f', 'x[i]')};",
                         f"{node.name}: {self.comment(node)}")
            kernels.append(fwd)
            lines += [f"def {self.fn(node, 'f')}(C, P, xs):",
                      f"    return C.run({fwd.name!r}, [xs[0]], xs[0].shape),"]
        index = f"const long long j = (i / ({n}LL * K)) * {n} + i % {n};"
        vjp = Kernel(self.kid(node, "vjp"), (_a("const T*", "g"), _a("const T*", "z", ""),
                                             _a("T*", "out"), _a("long long", "K", "")),
                     f"{index}\nout[i] = g[i] * {self.act_call(node.name, 'df', 'z[j]')};",
                     f"{node.name}: g f'(z), f' by the model's kink convention")
        dfd = Kernel(self.kid(node, "dfd"), (_a("const T*", "g"), _a("const T*", "z0", ""),
                                             _a("const T*", "z", ""), _a("T*", "out"),
                                             _a("long long", "K", "")),
                     f"{index}\nout[i] = g[i] * {self.act_call(node.name, 'm', 'z0[j]', 'z[j]')};",
                     f"{node.name}: g m(z0, z), the cancellation-free multiplier "
                     "(seed 004 eq. 16-17)")
        kernels += [vjp, dfd]
        z, z0 = f"E[{var(node.inputs[0])!r}]", f"E[{var(node.inputs[0], 'b')!r}]"
        lines += [f"def {self.fn(node, 'b')}(C, P, E, g, K):",
                  f"    return [C.run({vjp.name!r}, [g, {z}], g.shape, [K])]",
                  f"def {self.fn(node, 'd')}(C, P, E, g, K):",
                  f"    return [C.run({dfd.name!r}, [g, {z0}, {z}], g.shape, [K])]"]
        return NodeCode(kernels, lines)

    def _linear(self, node: OpNode) -> NodeCode:
        n_in = self.in_shape(node)[-1]
        n_out = (node.shape or (1,))[-1]
        p = f"P[{py_literal(node.name)}]"
        has_bias = node.param_key("bias") is not None
        mm = [f"    acc = C.matmul(xs[0].reshape(-1, {n_in}), {p}['weight'].T)",
              f"    acc = acc.reshape(xs[0].shape[0], *{tuple(node.shape or ())!r})"]
        if has_bias or node.name in self.fused:
            value = f"acc[i] + bias[i % {n_out}]" if has_bias else "acc[i]"
            ins = [_a("const T*", "acc")] + ([_a("const T*", "bias", n_out)] if has_bias else [])
            code = self._epilogue(node, value, ins, mm,
                                  ["acc"] + ([f"{p}['bias']"] if has_bias else []))
        else:
            code = NodeCode([], [f"def {self.fn(node, 'f')}(C, P, xs):", *mm, "    return acc,"])
        code.functions += [
            f"def {self.fn(node, 'b')}(C, P, E, g, K):",
            f"    v = C.matmul(g.reshape(-1, {n_out}), {p}['weight'])",
            f"    return [v.reshape(*g.shape[:-1], {n_in})]",
            f"def {self.fn(node, 'lf')}(C, ins, w):",
            "    x = ins[0]",
            f"    return C.matmul(x.reshape(-1, {n_in}), w.T).reshape(x.shape[0], "
            f"*{tuple(node.shape or ())!r})",
            f"def {self.fn(node, 'lt')}(C, s, w):",
            f"    return [C.matmul(s.reshape(-1, {n_out}), w).reshape(*s.shape[:-1], {n_in})]",
            f"def {self.fn(node, 'lrp')}(C, P):",
            f"    return LrpOp({py_literal(node.name)}, {p}['weight'], {p}.get('bias'), 1, {n_out}, "
            f"{self.fn(node, 'lf')}, {self.fn(node, 'lt')})",
        ]
        return code

    def _conv(self, node: OpNode) -> NodeCode:
        weight = self.graph.param_shapes[node.param_key("weight") or ""]
        g = _geometry(node, self.in_shape(node), weight)
        groups = int(kernel_attrs(node)["groups"])
        out_ch = weight[0]
        npix = g.oh * g.ow
        rows = g.c * g.kh * g.kw
        p = f"P[{py_literal(node.name)}]"
        in_shape = self.in_shape(node)
        im2col = Kernel(
            self.kid(node, "im2col"), (_a("const T*", "x", ""), _a("T*", "cols")),
            f"const int pix = (int)(i % {npix});\nconst int r = (int)((i / {npix}) % {rows});\n"
            f"const long long b = i / {npix * rows};\n"
            f"const int c = r / {g.kh * g.kw}, p = (r / {g.kw}) % {g.kh}, q = r % {g.kw};\n"
            f"const int h = (pix / {g.ow}) * {g.sh} + p * {g.dh} - {g.ph};\n"
            f"const int w = (pix % {g.ow}) * {g.sw} + q * {g.dw} - {g.pw};\n"
            f"cols[i] = (h >= 0 && h < {g.h} && w >= 0 && w < {g.w})\n"
            f"    ? x[((b * {g.c} + c) * {g.h} + h) * {g.w} + w] : (T)0;",
            f"{node.name}: im2col, (B, C, H, W) -> columns (B, C*kh*kw, OH*OW)")
        col2im = Kernel(
            self.kid(node, "col2im"), (_a("const T*", "cols", ""), _a("T*", "out")),
            _pixel_index(g) + "\nT acc = (T)0;\n" + _window_loop(
                g, f"acc += cols[(row * {rows} + (c * {g.kh} + p) * {g.kw} + q) * {npix}"
                   f" + oh * {g.ow} + ow];") + "\nout[i] = acc;",
            f"{node.name}: col2im as a gather (no atomics): column cotangents -> input")
        has_bias = node.param_key("bias") is not None
        mm = [f"    cols = C.new((xs[0].shape[0], {rows}, {npix}))",
              f"    C.call({im2col.name!r}, [xs[0]], [cols])",
              f"    acc = C.conv_matmul({p}['weight2'], cols, {groups})",
              f"    acc = acc.reshape(xs[0].shape[0], *{tuple(node.shape or ())!r})"]
        if has_bias or node.name in self.fused:
            value = f"acc[i] + bias[(i / {npix}) % {out_ch}]" if has_bias else "acc[i]"
            ins = [_a("const T*", "acc")] + ([_a("const T*", "bias", out_ch)] if has_bias else [])
            code = self._epilogue(node, value, ins, mm,
                                  ["acc"] + ([f"{p}['bias']"] if has_bias else []))
        else:
            code = NodeCode([], [f"def {self.fn(node, 'f')}(C, P, xs):", *mm, "    return acc,"])
        code.kernels += [im2col, col2im]
        code.functions += [
            f"def {self.fn(node, 'lf')}(C, ins, w):",
            f"    cols = C.new((ins[0].shape[0], {rows}, {npix}))",
            f"    C.call({im2col.name!r}, [ins[0]], [cols])",
            f"    acc = C.conv_matmul(w, cols, {groups})",
            f"    return acc.reshape(ins[0].shape[0], *{tuple(node.shape or ())!r})",
            f"def {self.fn(node, 'lt')}(C, s, w):",
            f"    rows = s.size // {out_ch * npix}",
            f"    gcols = C.conv_matmul_t(w, s.reshape(rows, {out_ch}, {npix}), {groups})",
            f"    return [C.run({col2im.name!r}, [gcols], (*s.shape[:-{len(in_shape)}], "
            f"*{in_shape!r}))]",
            f"def {self.fn(node, 'b')}(C, P, E, g, K):",
            f"    return {self.fn(node, 'lt')}(C, g, {p}['weight2'])",
            f"def {self.fn(node, 'lrp')}(C, P):",
            f"    return LrpOp({py_literal(node.name)}, {p}['weight2'], {p}.get('bias'), {npix}, "
            f"{out_ch}, {self.fn(node, 'lf')}, {self.fn(node, 'lt')})",
        ]
        return code

    def _window_shape(self, node: OpNode) -> Geometry2d:
        g = _geometry(node, self.in_shape(node), None)
        if g.kh * g.kw > MAX_WINDOW:
            raise UnsupportedOp(f"the cuda target takes pooling windows of at most {MAX_WINDOW} "
                                f"elements, got {g.kh}x{g.kw}", node.pos)
        return g

    def _window_origin(self, g: Geometry2d) -> str:
        return (f"const int o = (int)(i % {g.oh * g.ow});\n"
                f"const long long plane = i / {g.oh * g.ow};\n"
                f"const int h0 = (o / {g.ow}) * {g.sh} - {g.ph};\n"
                f"const int w0 = (o % {g.ow}) * {g.sw} - {g.pw};\n"
                f"const T* xw = x + plane * {g.h * g.w};")

    def _maxpool(self, node: OpNode) -> NodeCode:
        g = self._window_shape(node)
        k = g.kh * g.kw
        opix = g.oh * g.ow
        fwd = Kernel(
            self.kid(node, "fwd"), (_a("const T*", "x", ""), _a("T*", "y"), _a("int*", "index")),
            self._window_origin(g) + "\nint best = -1;\nT top = (T)0;\n"
            f"for (int k = 0; k < {k}; ++k) {{\n"
            f"    const int h = h0 + k / {g.kw}, w = w0 + k % {g.kw};\n"
            f"    if (h < 0 || h >= {g.h} || w < 0 || w >= {g.w}) continue;\n"
            f"    const T v = xw[h * {g.w} + w];\n"
            "    if (best < 0 || v > top) {\n        best = k;\n        top = v;\n    }\n}\n"
            "y[i] = top;\nindex[i] = best;",
            f"{node.name}: window maxima and the in-window index of the first maximum")
        inner_vjp = (f"if (index[(row / K * {g.c} + c) * {opix} + oh * {g.ow} + ow] "
                     f"== p * {g.kw} + q)\n"
                     f"    acc += g[plane * {opix} + oh * {g.ow} + ow];")
        vjp = Kernel(
            self.kid(node, "vjp"), (_a("const T*", "g", ""), _a("const int*", "index", ""),
                                    _a("T*", "out"), _a("long long", "K", "")),
            _pixel_index(g) + "\nT acc = (T)0;\n" + _window_loop(g, inner_vjp) + "\nout[i] = acc;",
            f"{node.name}: each cotangent to its window's maximum (a gather)")
        inner_dfd = (f"const long long src = (row / K * {g.c} + c) * {g.h * g.w};\n"
                     f"acc += pbx_maxpool_share_$S(x + src, x0 + src, {g.h}, {g.w}, "
                     f"oh * {g.sh} - {g.ph}, ow * {g.sw} - {g.pw}, {g.kh}, {g.kw}, "
                     f"p * {g.kw} + q, g[plane * {opix} + oh * {g.ow} + ow], s);")
        dfd = Kernel(
            self.kid(node, "dfd"), (_a("const T*", "g", ""), _a("const T*", "x", ""),
                                    _a("const T*", "x0", ""), _a("T*", "out"),
                                    _a("long long", "K", "")),
            _pixel_index(g) + f"\nT s[{k}];\nT acc = (T)0;\n" + _window_loop(g, inner_dfd)
            + "\nout[i] = acc;",
            f"{node.name}: DFD of the window maximum as pairwise maxima (rescale rule)")
        shape = f"(xs[0].shape[0], *{tuple(node.shape or ())!r})"
        in_shape = self.in_shape(node)
        x, x0 = f"E[{var(node.inputs[0])!r}]", f"E[{var(node.inputs[0], 'b')!r}]"
        lines = [
            f"def {self.fn(node, 'f')}(C, P, xs):",
            f"    y, index = C.new({shape}), C.new({shape}, np.int32)",
            f"    C.call({fwd.name!r}, [xs[0]], [y, index])",
            "    return y, index",
            f"def {self.fn(node, 'b')}(C, P, E, g, K):",
            f"    return [C.run({vjp.name!r}, [g, E[{var(node.name, 'l')!r}]], "
            f"(*g.shape[:2], *{in_shape!r}), [K])]",
            f"def {self.fn(node, 'd')}(C, P, E, g, K):",
            f"    return [C.run({dfd.name!r}, [g, {x}, {x0}], (*g.shape[:2], *{in_shape!r}), "
            "[K])]",
        ]
        return NodeCode([fwd, vjp, dfd], lines)

    def _avgpool(self, node: OpNode) -> NodeCode:
        g = self._window_shape(node)
        opix = g.oh * g.ow
        include = bool(kernel_attrs(node)["count_include_pad"]) or (g.ph, g.pw) == (0, 0)
        fwd = Kernel(
            self.kid(node, "fwd"), (_a("const T*", "x", ""), _a("T*", "y")),
            self._window_origin(g) + "\nT sum = (T)0;\n"
            f"for (int k = 0; k < {g.kh * g.kw}; ++k) {{\n"
            f"    const int h = h0 + k / {g.kw}, w = w0 + k % {g.kw};\n"
            f"    if (h >= 0 && h < {g.h} && w >= 0 && w < {g.w}) sum += xw[h * {g.w} + w];\n"
            "}\n"
            + ("" if include else f"const int n = pbx_window_count({g.h}, {g.w}, h0, w0, "
                                  f"{g.kh}, {g.kw});\n")
            + f"y[i] = sum / (T){g.kh * g.kw if include else 'n'};",
            f"{node.name}: window means")
        count = (f"(T){g.kh * g.kw}" if include else
                 f"(T)pbx_window_count({g.h}, {g.w}, oh * {g.sh} - {g.ph}, ow * {g.sw} - {g.pw}, "
                 f"{g.kh}, {g.kw})")
        vjp = Kernel(
            self.kid(node, "vjp"), (_a("const T*", "g", ""), _a("T*", "out")),
            _pixel_index(g) + "\nT acc = (T)0;\n" + _window_loop(
                g, f"acc += g[plane * {opix} + oh * {g.ow} + ow] / {count};") + "\nout[i] = acc;",
            f"{node.name}: each window's cotangent shared by its elements (a gather)")
        shape = f"(xs[0].shape[0], *{tuple(node.shape or ())!r})"
        in_shape = self.in_shape(node)
        lines = [
            f"def {self.fn(node, 'f')}(C, P, xs):",
            f"    return C.run({fwd.name!r}, [xs[0]], {shape}),",
            f"def {self.fn(node, 'b')}(C, P, E, g, K):",
            f"    return [C.run({vjp.name!r}, [g], (*g.shape[:2], *{in_shape!r}))]",
        ]
        return NodeCode([fwd, vjp], lines)

    def _softmax(self, node: OpNode) -> NodeCode:
        shape = tuple(node.shape or ())
        axis = int(kernel_attrs(node)["axis"])
        if axis != len(shape) - 1:
            raise UnsupportedOp("the cuda target takes softmax over the last axis only",
                                node.pos)
        n = shape[-1]
        rows = size(shape) // n
        log = node.kind is OpKind.LOG_SOFTMAX
        fwd = Kernel(
            self.kid(node, "fwd"), (_a("const T*", "x", ""), _a("T*", "y", "")),
            f"const T* xr = x + i * {n};\nT* yr = y + i * {n};\nT top = xr[0];\n"
            f"for (int j = 1; j < {n}; ++j) top = xr[j] > top ? xr[j] : top;\n"
            f"T sum = (T)0;\nfor (int j = 0; j < {n}; ++j) sum += pbx_exp_$S(xr[j] - top);\n"
            + (f"const T lse = pbx_log_$S(sum);\n"
               f"for (int j = 0; j < {n}; ++j) yr[j] = (xr[j] - top) - lse;" if log else
               f"for (int j = 0; j < {n}; ++j) yr[j] = pbx_exp_$S(xr[j] - top) / sum;"),
            f"{node.name}: {node.kind.value} over rows of {n}, one thread a row")
        row = (f"const long long sample = (i / ({rows}LL * K)) * {rows} + i % {rows};\n"
               f"const T* yr = y + sample * {n};\nconst T* gr = g + i * {n};\n"
               f"T* outr = out + i * {n};\nT dot = (T)0;\n")
        body = (row + f"for (int j = 0; j < {n}; ++j) dot += gr[j];\n"
                f"for (int j = 0; j < {n}; ++j) outr[j] = gr[j] - pbx_exp_$S(yr[j]) * dot;"
                if log else
                row + f"for (int j = 0; j < {n}; ++j) dot += yr[j] * gr[j];\n"
                f"for (int j = 0; j < {n}; ++j) outr[j] = yr[j] * (gr[j] - dot);")
        vjp = Kernel(self.kid(node, "vjp"), (_a("const T*", "g", ""), _a("const T*", "y", ""),
                                             _a("T*", "out", ""), _a("long long", "K", "")),
                     body, f"{node.name}: u^T J with J = diag(s) - s s^T (log: I - 1 s^T)")
        dfd = Kernel(
            self.kid(node, "dfd"), (_a("const T*", "g", ""), _a("const T*", "z0", ""),
                                    _a("const T*", "z", ""), _a("T*", "out", ""),
                                    _a("long long", "K", "")),
            f"const long long sample = (i / ({rows}LL * K)) * {rows} + i % {rows};\n"
            f"T big[{n}], w[{n}];\n"
            f"pbx_softmax_dfd_factors(z0 + sample * {n}, z + sample * {n}, {n}, big, w);\n"
            + (f"pbx_diag_minus_outer_vjp((const T*)0, (const T*)0, w, g + i * {n}, {n}, "
               f"out + i * {n});" if log else
               f"pbx_diag_minus_outer_vjp(big, big, w, g + i * {n}, {n}, out + i * {n});"),
            f"{node.name}: m^T M, pbxc's {node.kind.value} DFD rule (specs/activations.md)")
        z, z0 = f"E[{var(node.inputs[0])!r}]", f"E[{var(node.inputs[0], 'b')!r}]"
        yv = f"E[{var(node.name)!r}]"
        lines = [
            f"def {self.fn(node, 'f')}(C, P, xs):",
            "    y = C.new(xs[0].shape)",
            f"    C.call({fwd.name!r}, [xs[0]], [y], total=xs[0].shape[0] * {rows})",
            "    return y,",
            f"def {self.fn(node, 'b')}(C, P, E, g, K):",
            "    out = C.new(g.shape)",
            f"    C.call({vjp.name!r}, [g, {yv}], [out], [K], total=g.shape[0] * K * {rows})",
            "    return [out]",
            f"def {self.fn(node, 'd')}(C, P, E, g, K):",
            "    out = C.new(g.shape)",
            f"    C.call({dfd.name!r}, [g, {z0}, {z}], [out], [K], "
            f"total=g.shape[0] * K * {rows})",
            "    return [out]",
        ]
        return NodeCode([fwd, vjp, dfd], lines)

    # ------------------------------------------------------------------ sources
    def kernels(self) -> list[Kernel]:
        return [*GENERIC, *(k for n in self.nodes for k in self.code[n.name].kernels)]

    def cuda_source(self, header: str) -> str:
        """The whole CUDA C source: helpers, activations (both precisions), every kernel."""
        softmax = any(n.kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX) for n in self.nodes)
        parts = [header, PREAMBLE, WINDOW_COUNT, device_helpers(),
                 "// ---- activations, printed from the sympy derivations", self.activation_source]
        if softmax:
            parts.append(C_SOFTMAX)
        parts += ["// ---- kernels", render_kernels(self.kernels())]
        return "\n".join(parts) + "\n"

    # ------------------------------------------------------------------ python
    def forward_body(self, prefix: str) -> list[str]:
        out = []
        for node in self.nodes:
            out.append(f"    # {py_text(self.comment(node))}")
            if node.name in self.fused_into:
                out.append(f"    # {py_text(node.name)}: computed with "
                           f"{py_text(self.fused_into[node.name])}")
                continue
            xs = ", ".join(var(i, prefix) for i in node.inputs)
            targets = [var(node.name, prefix)]
            if node.name in self.fused:
                targets.append(var(self.fused[node.name], prefix))
            if node.kind is OpKind.MAXPOOL2D:
                targets.append(var(node.name, "l" if prefix == "v" else "bl"))
            out.append(f"    {', '.join(targets)}{',' if len(targets) == 1 else ''} = "
                       f"{self.fn(node, 'f')}(C, P, [{xs}])")
        return out

    def backward_body(self, output: str, wrt: str, dfd: bool) -> list[str]:
        live = (nx.ancestors(self.graph.digraph, output) | {output}) & (
            nx.descendants(self.graph.digraph, wrt) | {wrt})
        out = []
        assigned = {output}
        for node in reversed(self.nodes):
            if node.name not in live:
                continue
            out.append(f"    # {py_text(self.comment(node))}")
            which = "d" if dfd and node.kind not in DFD_BY_VJP else "b"
            temps = [f"_t{k}" for k in range(len(node.inputs))]
            out.append(f"    {', '.join(temps)}{',' if len(temps) == 1 else ''} = "
                       f"{self.fn(node, which)}(C, P, E, {var(node.name, 'g')}, K)")
            for name, t in zip(node.inputs, temps):
                if name not in live:
                    continue
                g = var(name, "g")
                out.append(f"    {g} = C.add({g}, {t})" if name in assigned else f"    {g} = {t}")
                assigned.add(name)
        return out

    def lrp_body(self, start: str, rule_nodes: set[str]) -> list[str]:
        live = nx.ancestors(self.graph.digraph, start) | {start}
        out = ["    bias = stabiliser = 0.0"]
        assigned = {start}
        for node in reversed(self.nodes):
            if node.name not in live:
                continue
            out.append(f"    # {py_text(self.comment(node))}")
            r = var(node.name, "R")
            xs = "[" + ", ".join(f"E[{var(i)!r}]" for i in node.inputs) + "]"
            if node.name in rule_nodes:
                out.append(f"    _r, _b, _s = lrp_rule_step(C, {self._lrp_op(node)}, {r}, {xs}, "
                           f"*rules[{py_literal(node.name)}], z_out=E[{var(node.name)!r}])")
                out.append("    bias, stabiliser = bias + _b, stabiliser + _s")
            elif node.kind is OpKind.MAXPOOL2D:
                out.append(f"    _r = [{self.fn(node, 'b')}(C, P, E, {r}[:, None], 1)[0][:, 0]]")
            elif node.kind in (OpKind.FLATTEN, OpKind.RESHAPE):
                out.append(f"    _r = [{r}.reshape(E[{var(node.inputs[0])!r}].shape)]")
            elif node.kind is OpKind.ACTIVATION:
                out.append(f"    _r = [{r}]")
            else:
                message = f"lrp has no rule for op {node.kind.value!r} (value {node.name!r})"
                out.append(f"    raise KernelArgumentError({py_literal(message)})")
                continue
            for k, name in enumerate(node.inputs):
                if name not in live and name not in self.graph.input_names:
                    continue
                target = var(name, "R")
                out.append(f"    {target} = C.add({target}, _r[{k}])" if name in assigned
                           else f"    {target} = _r[{k}]")
                assigned.add(name)
        return out

    def _lrp_op(self, node: OpNode) -> str:
        """The LrpOp of a rule node: weighted ops have generated ones; the others here."""
        kind = node.kind
        p = f"P[{py_literal(node.name)}]"
        if kind in (OpKind.LINEAR, OpKind.CONV1D, OpKind.CONV2D):
            return f"{self.fn(node, 'lrp')}(C, P)"
        if kind is OpKind.BATCHNORM:
            c = self.in_shape(node)[0]
            s = size(node.shape or ()) // c
            return (f"LrpOp({py_literal(node.name)}, {p}['scale'], {p}['shift'], {s}, {c}, "
                    f"_diag_forward({s}, {c}), _diag_transpose({s}, {c}))")
        if kind is OpKind.NORMALIZE:
            n = size(node.shape or ())
            return (f"LrpOp({py_literal(node.name)}, {p}['lrp_w'], {p}['lrp_b'], 1, {n}, "
                    f"_diag_forward(1, {n}), _diag_transpose(1, {n}))")
        if kind is OpKind.ADD:
            return (f"LrpOp({py_literal(node.name)}, None, None, 1, 1, _add_forward, "
                    f"_add_transpose({len(node.inputs)}))")
        fwd, vjp = self.fn(node, "f"), self.fn(node, "b")
        return (f"LrpOp({py_literal(node.name)}, None, None, 1, 1, _unit_forward({fwd}, P), "
                f"_unit_transpose({vjp}, P))")

    def derived_params(self) -> list[str]:
        """Host-side parameters derived from the weights once, as numpy_kernels does."""
        out = ["def _derive(P):", '    """Derived parameters, computed on the host as '
               'numpy_kernels computes them."""']
        for node in self.nodes:
            p = f"P[{py_literal(node.name)}]"
            if node.kind is OpKind.BATCHNORM:
                eps = float(kernel_attrs(node)["eps"])
                out += [f"    {p}['scale'] = {p}['weight'] / np.sqrt({p}['running_var'] + {py_literal(eps)})",
                        f"    {p}['shift'] = {p}['bias'] - {p}['running_mean'] * {p}['scale']"]
            elif node.kind in (OpKind.CONV1D, OpKind.CONV2D):
                out.append(f"    {p}['weight2'] = np.ascontiguousarray("
                           f"{p}['weight'].reshape({p}['weight'].shape[0], -1))")
            elif node.kind is OpKind.NORMALIZE:
                shape = tuple(node.shape or ())
                out += [f"    mean = _sample_full({p}['mean'], {shape!r})",
                        f"    std = _sample_full({p}['std'], {shape!r})",
                        f"    {p}['mean_full'], {p}['std_full'] = mean, std",
                        f"    {p}['lrp_w'] = np.ascontiguousarray(1.0 / std)",
                        f"    {p}['lrp_b'] = np.ascontiguousarray(-mean * {p}['lrp_w'])"]
        out.append("    return P")
        return out

    def render(self, header: str, source_file: str) -> str:
        graph = self.graph
        wrt, output = graph.input_names[0], graph.output_names[0]
        if len(graph.input_names) != 1:
            raise UnsupportedOp("the cuda target compiles models with one input",
                                graph.inputs[1].pos)
        inputs = {i.name: list(i.shape) for i in graph.inputs}
        outputs = {o.name: list(graph.shape_of(o.name)) for o in graph.outputs}
        classes = {o.name: list(o.classes) for o in graph.outputs if o.classes}
        params = {n.name: {role: key for role, key, _ in n.params} for n in self.nodes}
        table = kernel_table(self.kernels())
        kernels = "{\n" + "".join(f"    {py_literal(k)}: {py_literal(v)},\n" for k, v in table.items()) + "}"
        functions = [line for n in self.nodes for line in
                     [f"# {py_text(n.name)}: {py_text(self.comment(n))}",
                      *self.code[n.name].functions, ""]]
        parts = [
            header,
            "import os",
            "",
            "# ---- runtime (pbxc.codegen.cuda_runtime) ----",
            RUNTIME_DOC.sub("", inspect.getsource(cuda_runtime)).replace(
                "import numpy as np\n", "", 1),
            "# ---- the model ----",
            f"MODEL = {py_literal(graph.name)}",
            f"SOURCE_FILE = {py_literal(source_file)}",
            f"INPUTS = {py_literal(inputs)}",
            f"OUTPUTS = {py_literal(outputs)}",
            f"CLASSES = {py_literal(classes)}",
            f"PARAMS = {py_literal(params)}",
            f"OUTPUT_VARS = {py_literal({o: var(o) for o in graph.output_names})}",
            f"OUTPUT_VALUE, BASELINE_VALUE = {var(output)!r}, {var(output, 'b')!r}",
            "#: kernel -> (kind, name, elements) of each argument, checked before every launch",
            f"KERNELS = {kernels}",
            "",
            *self.derived_params(),
            "",
            HELPERS,
            "# ---- per-node functions: kernels around the matrix products ----",
            *functions,
            f"def _forward(C, P, {var(wrt, 'v')}):",
            *self.forward_body("v"),
            "    return locals()",
            "",
            "",
            f"def _baseline_forward(C, P, {var(wrt, 'b')}):",
            *self.forward_body("b"),
            "    return locals()",
            "",
            "",
            f"def _pullback(C, P, E, {var(output, 'g')}, K):",
            *self.backward_body(output, wrt, dfd=False),
            f"    return {var(wrt, 'g')}",
            "",
            "",
            f"def _dfd_pullback(C, P, E, {var(output, 'g')}, K):",
            *self.backward_body(output, wrt, dfd=True),
            f"    return {var(wrt, 'g')}",
            "",
            PASSES,
            *self.render_lrp(),
        ]
        return "\n".join(parts) + "\n"

    def render_lrp(self) -> list[str]:
        if self.lrp is None:
            return []
        return render_lrp_entry(self.lrp, self.graph.input_names[0], self.lrp_body, CUDA_ENTRY)


#: the runtime module's docstring is replaced by the generated module's own header
RUNTIME_DOC = re.compile(r'\A""".*?"""\n', re.S)

WINDOW_COUNT = """\
__device__ __forceinline__ int pbx_window_count(int H, int W, int h0, int w0, int KH, int KW) {
    // how many elements of the window at (h0, w0) lie inside the (unpadded) input
    const int h1 = h0 + KH < H ? h0 + KH : H, w1 = w0 + KW < W ? w0 + KW : W;
    return ((h1 - (h0 > 0 ? h0 : 0)) * (w1 - (w0 > 0 ? w0 : 0)));
}
"""

HELPERS = '''
_HOST_WEIGHTS = {}
_WEIGHTS = {}
_DEVICE = None


def set_device(device):
    """Run on ``device`` (anything with ``xp`` and ``launch``): the CPU shim uses this."""
    global _DEVICE
    _DEVICE = device
    _WEIGHTS.clear()


def set_weights(arrays):
    """Use these weight arrays (by store key) instead of weights.npz beside the module."""
    _HOST_WEIGHTS.clear()
    _HOST_WEIGHTS.update({k: np.asarray(v) for k, v in arrays.items()})
    _WEIGHTS.clear()


def _device():
    global _DEVICE
    if _DEVICE is None:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, SOURCE_FILE), encoding="utf-8") as fh:
            _DEVICE = CupyDevice(fh.read())
    return _DEVICE


def load_weights(path=None, dtype="float64"):
    """The weights (weights.npz beside this module, or set_weights'), cast to ``dtype``, with
    the derived parameters, as host arrays by node and role."""
    if not _HOST_WEIGHTS:
        if path is None:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.npz")
        with np.load(path, allow_pickle=False) as data:
            _HOST_WEIGHTS.update({k: data[k] for k in data.files})
    arrays = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in _HOST_WEIGHTS.items()}
    return _derive({node: {role: arrays[key] for role, key in roles.items()}
                    for node, roles in PARAMS.items()})


def _sample_full(v, shape):
    """normalize's mean/std (per element, per channel or scalar) over one sample's shape."""
    v = np.asarray(v)
    if v.shape != tuple(shape) and v.ndim == 1:
        v = v.reshape((-1,) + (1,) * (len(shape) - 1))
    return np.ascontiguousarray(np.broadcast_to(v, shape))


def _prepare(x, dtype):
    """Check the input (shape, dtype, finite) and return (context, device weights, inputs)."""
    device = _device()
    if isinstance(x, dict):
        if set(x) != set(INPUTS):
            raise KernelArgumentError(f"expected inputs {list(INPUTS)}, got {list(x)}")
        x = x[next(iter(INPUTS))]
    given = getattr(x, "dtype", None)
    if dtype is None:
        dtype = given if given in (np.float32, np.float64) else np.float64
    C = Context(device, KERNELS, dtype)
    key = C.dtype.name
    if key not in _WEIGHTS:
        _WEIGHTS[key] = {node: {role: C.asarray(a) for role, a in roles.items()}
                         for node, roles in load_weights(dtype=key).items()}
    name, shape = next(iter(INPUTS.items()))
    kind = getattr(getattr(x, "dtype", None), "kind", None) or np.asarray(x).dtype.kind
    if kind not in "fiub":
        raise KernelArgumentError(f"input {name!r} has dtype kind {kind!r}; expected real "
                                  "numbers")
    a = C.asarray(x)
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != tuple(shape):
        raise KernelArgumentError(f"input {name!r} has shape {list(a.shape)}; expected "
                                  "[batch, " + ", ".join(map(str, shape)) + "]")
    if not bool(C.xp.isfinite(a).all()):
        raise KernelArgumentError(f"input {name!r} has non-finite values")
    return C, _WEIGHTS[key], [a]


def _targets(C, y, target):
    flat = y.reshape(y.shape[0], -1)
    if target is None or (isinstance(target, str) and target == "predicted"):
        return flat.argmax(axis=1)
    t = np.broadcast_to(np.asarray(target), (y.shape[0],))
    if t.dtype.kind not in "iu" or (t < 0).any() or (t >= flat.shape[1]).any():
        raise KernelArgumentError(f"target must be 'predicted' or class indices in [0, "
                                  f"{flat.shape[1]}), got {target!r}")
    return C.xp.asarray(t.astype(np.int64))


def _one_hot(C, y, c):
    seed = C.xp.zeros((y.shape[0], 1, y[0].size), dtype=y.dtype)
    seed[C.xp.arange(y.shape[0]), 0, c] = 1
    return seed.reshape(y.shape[0], 1, *y.shape[1:])


def _diag_forward(inner, count):
    def forward(C, ins, w):
        return C.run("pbx_diag", [ins[0], w], ins[0].shape, [inner, count])
    return forward


def _diag_transpose(inner, count):
    def transpose(C, s, w):
        return [C.run("pbx_diag", [s, w], s.shape, [inner, count])]
    return transpose


def _add_forward(C, ins, w):
    total = ins[0]
    for x in ins[1:]:
        total = C.add(total, x)
    return C.scale(total, w)


def _add_transpose(arity):
    def transpose(C, s, w):
        return [C.scale(s, w) for _ in range(arity)]
    return transpose


def _unit_forward(fwd, P):
    def forward(C, ins, w):
        return C.scale(fwd(C, P, ins)[0], w)
    return forward


def _unit_transpose(vjp, P):
    def transpose(C, s, w):
        return [C.scale(v[:, 0], w) for v in vjp(C, P, None, s[:, None], 1)]
    return transpose
'''

PASSES = '''
def forward(x, dtype=None):
    """The forward pass on a batch: a dict of outputs by name (device arrays)."""
    C, P, xs = _prepare(x, dtype)
    env = _forward(C, P, *xs)
    return {name: env[value] for name, value in OUTPUT_VARS.items()}


def gradient(x, target=None, dtype=None):
    """d f_c / d x for the target class of each sample (predicted by default)."""
    C, P, xs = _prepare(x, dtype)
    env = _forward(C, P, *xs)
    y = env[OUTPUT_VALUE]
    g = _pullback(C, P, env, _one_hot(C, y, _targets(C, y, target)), 1)
    return C.xp.ascontiguousarray(g[:, 0])


def input_x_gradient(x, target=None, dtype=None):
    C, P, xs = _prepare(x, dtype)
    return C.run("pbx_mul", [xs[0], gradient(xs[0], target, C.dtype)], xs[0].shape)


def jacobian(x, dtype=None):
    """The exact Jacobian (B, *out_shape, *in_shape), by reverse accumulation."""
    C, P, xs = _prepare(x, dtype)
    env = _forward(C, P, *xs)
    y = env[OUTPUT_VALUE]
    n = y[0].size
    seed = C.xp.broadcast_to(C.xp.eye(n, dtype=y.dtype), (y.shape[0], n, n))
    seed = C.xp.ascontiguousarray(seed).reshape(y.shape[0], n, *y.shape[1:])
    g = _pullback(C, P, env, seed, n)
    return g.reshape(*y.shape, *xs[0].shape[1:])


SECOND_ORDER_LEFT_OUT = ("hessian and hvp have no CUDA kernels yet (no second-order "
                         "kernels are generated for the CUDA target); use the NumPy module "
                         "(pbxc compile --target numpy) or pbxc.load(...).hessian")


def hessian(x, target=None, dtype=None):
    """Not generated for CUDA: raises NotImplementedError (see SECOND_ORDER_LEFT_OUT)."""
    raise NotImplementedError(SECOND_ORDER_LEFT_OUT)


def hvp(x, v, target=None, dtype=None):
    """Not generated for CUDA: raises NotImplementedError (see SECOND_ORDER_LEFT_OUT)."""
    raise NotImplementedError(SECOND_ORDER_LEFT_OUT)


def dfd(x, baseline=0.0, target=None, dtype=None):
    """DFD / DeepLIFT contributions C = m * (x - x0) to the target output, and delta."""
    C, P, xs = _prepare(x, dtype)
    b = C.asarray(baseline)
    try:
        x0 = C.xp.ascontiguousarray(C.xp.broadcast_to(b, xs[0].shape))
    except ValueError:
        raise KernelArgumentError(f"baseline has shape {list(b.shape)}; expected one that "
                                  f"broadcasts to the input's {list(xs[0].shape)}") from None
    env = _forward(C, P, *xs)
    env.update(_baseline_forward(C, P, x0))
    y = env[OUTPUT_VALUE]
    y0 = env[BASELINE_VALUE]
    c = _targets(C, y, target)
    m = C.xp.ascontiguousarray(_dfd_pullback(C, P, env, _one_hot(C, y, c), 1)[:, 0])
    flat, flat0 = y.reshape(len(y), -1), y0.reshape(len(y), -1)
    rows = C.xp.arange(len(c))
    delta = flat[rows, c] - flat0[rows, c]
    return C.run("pbx_contribution", [m, xs[0], x0], m.shape), delta
'''
