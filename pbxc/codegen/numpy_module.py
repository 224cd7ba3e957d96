"""Render a model as one standalone NumPy module: straight-line code for every pass.

The module holds, in order: the op kernels (``numpy_kernels``, copied verbatim), the
activation functions printed from sympy, the bound weights' loader, and one function per pass
(forward, gradient, input_x_gradient, jacobian, dfd) whose body calls the kernels node by
node, each call preceded by the .pbx line it comes from. It imports only numpy.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping

import networkx as nx

from pbxc.codegen import numpy_kernels
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.lower.calls import DFD_BY_VJP, kernel_attrs, kernel_name
from pbxc.ops import OpKind

MULTIPLIER_HELPER = '''
def _secant_multiplier(f, df, z0, z):
    """(f(z) - f(z0)) / (z - z0), and f'(z0) where z == z0 (seed 004, eq. 16-17)."""
    same = z == z0
    with np.errstate(all="ignore"):
        secant = (f(z) - f(z0)) / np.where(same, 1, z - z0)
        slope = np.broadcast_to(df(z0), z0.shape)
    return np.where(same, slope, secant).astype(z.dtype)
'''


def var(name: str, prefix: str = "v") -> str:
    """A Python identifier for a graph value name (``h1/linear`` -> ``v_h1__linear``)."""
    return f"{prefix}_" + re.sub(r"[^0-9A-Za-z_]", "_", name.replace("/", "__")).replace("'", "_")


def _attrs(node: OpNode) -> str:
    return "".join(f", {k}={v!r}" for k, v in kernel_attrs(node).items())


def _comment(node: OpNode, source_lines: Mapping[int, str]) -> str:
    text = source_lines.get(node.pos.line, "").strip()
    return f"    # {node.pos.file}:{node.pos.line}: {text}"[:110]


class NumpyModuleRenderer:
    """Renders a model's passes as NumPy source; the CUDA renderer has the same method set."""

    def __init__(self, graph: ModelGraph, activation_source: str,
                 activation_names: Mapping[str, str], source_text: str | None = None) -> None:
        self.graph = graph
        self.nodes = [n for n in graph.topological() if n.kind is not OpKind.INPUT]
        self.activation_source = activation_source
        self.act = activation_names  # node name -> generated function name (act_i)
        self.lines = dict(enumerate((source_text or "").splitlines(), start=1))

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
                out.append(f"    {var(node.name, value)} = {fn}({xs})")
                out.append(f"    {var(node.name, local)} = d{fn}({xs})")
                continue
            args = f"([{xs}], P[{node.name!r}]{_attrs(node)})"
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
        if pass_suffix == "dfd" and node.kind not in DFD_BY_VJP:
            xs0 = "[" + ", ".join(env(i, "b") for i in node.inputs) + "]"
            if node.kind is OpKind.ACTIVATION:
                fn = self.act[node.name]
                local = (f"_secant_multiplier({fn}, d{fn}, {env(node.inputs[0], 'b')}, "
                         f"{env(node.inputs[0], 'v')})")
            return (f"{kernel_name(node, 'dfd')}({g}, {xs}, {xs0}, {env(node.name, 'v')}, "
                    f"{env(node.name, 'b')}, {local}, P[{node.name!r}]{_attrs(node)})")
        return (f"{kernel_name(node, 'vjp')}({g}, {xs}, {env(node.name, 'v')}, {local}, "
                f"P[{node.name!r}]{_attrs(node)})")

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
            "# ---- op kernels (pbxc.codegen.numpy_kernels) ----",
            inspect.getsource(numpy_kernels),
            "# ---- activations, printed from sympy ----",
            self.activation_source.replace("import numpy as np\n", ""),
            MULTIPLIER_HELPER,
            "# ---- the model ----",
            f"MODEL = {graph.name!r}",
            f"INPUTS = {inputs!r}",
            f"OUTPUTS = {outputs!r}",
            f"CLASSES = {classes!r}",
            f"PARAMS = {params!r}",
            f"OUTPUT_VARS = { {o: var(o) for o in graph.output_names}!r}",
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
        ]
        return "\n".join(parts) + "\n"


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
    if not isinstance(x, dict):
        x = {next(iter(INPUTS)): x}
    dtype = np.dtype(dtype or next(iter(x.values())).dtype)
    if dtype not in (np.float32, np.float64):
        dtype = np.dtype(np.float64)
    key = dtype.name
    if key not in _WEIGHTS:
        _WEIGHTS[key] = load_weights(dtype=key)
    xs = []
    for name, shape in INPUTS.items():
        a = np.ascontiguousarray(x[name], dtype=dtype)
        if a.shape[1:] != tuple(shape):
            raise ValueError(f"input {name!r} has shape {list(a.shape)}; expected [batch, "
                             + ", ".join(map(str, shape)) + "]")
        if not np.isfinite(a).all():
            raise ValueError(f"input {name!r} has non-finite values")
        xs.append(a)
    return _WEIGHTS[key], xs


def _targets(y, target):
    flat = y.reshape(y.shape[0], -1)
    if target is None or target == "predicted":
        return flat.argmax(axis=1)
    return np.broadcast_to(np.asarray(target, dtype=np.int64), (y.shape[0],))


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
