"""A loaded model: its graph, bound weights in one dtype, and the NumPy forward pass."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pbxc.codegen import fused_kernels
from pbxc.codegen.fused_kernels import FusedKernels
from pbxc.codegen.numpy_printer import render_activation_functions
from pbxc.errors import Diagnostic, InputError, SourcePos
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.lower.memory import PassPlan, pass_plan
from pbxc.lower.plan import cheaper_dense, path_nodes
from pbxc.ops import OpKind
from pbxc.runtime.allocator import tune_allocator
from pbxc.runtime.codeload import load_generated_module
from pbxc.runtime.dfd import DfdResult, dfd, linearize_both, resolve_baseline
from pbxc.runtime.hessian import HessianResult, HvpResult, hessian, hvp
from pbxc.runtime.interactions import InteractionResult, interactions
from pbxc.runtime.jacobian import JacobianResult, jacobian, linearize, reverse_sweep
from pbxc.runtime.lrp import LrpResult, file_rules, lrp
from pbxc.runtime.lrp_rules import rule_from_spec
from pbxc.runtime.numpy_forward import forward_rule
from pbxc.symbolic.activations import ActivationKey, activation_key
from pbxc.symbolic.calculus import CONVENTIONS, DEFAULT_CONVENTION
from pbxc.symbolic.derive import AccuracyWarning, derive
from pbxc.weights.store import WeightStore

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def resolve_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in DTYPES.values():
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    assert resolved is not None
    return resolved


def _redo(out: np.ndarray, rest: np.ndarray, z0: np.ndarray, z: np.ndarray,
          fn: Callable[..., np.ndarray]) -> None:
    """``out[rest] = fn(z0[rest], z[rest])`` for an elementwise ``fn``, bit for bit (the same
    entries in the same row-major order): the indices found once, then gathers by index.
    Three boolean-mask indexings cost about three times one (a scattered mask mispredicts
    every branch: 170 us each on a (256, 512) float64 array with 7% set, against 5 us a
    ``take``)."""
    if not out.flags.c_contiguous:
        out[rest] = fn(z0[rest], z[rest])
        return
    index = np.flatnonzero(rest)
    out.reshape(-1)[index] = fn(_gathered(z0, index, out.shape), _gathered(z, index, out.shape))


def _gathered(a: np.ndarray, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` (broadcasting onto ``shape``) at the flat indices ``index`` of ``shape``."""
    if a.shape == shape and a.flags.c_contiguous:
        return a.reshape(-1).take(index)
    if (len(shape) > 1 and a.shape == shape and a.strides[0] == 0
            and a[0].flags.c_contiguous):   # a shared default row, broadcast over the batch
        row = a[0].reshape(-1)
        return row.take(index % row.size)
    return np.broadcast_to(a, shape)[np.unravel_index(index, shape)]


def _small_abs(a: np.ndarray) -> np.ndarray:
    """|a|, computed once per distinct element when ``a`` broadcasts a shared baseline row."""
    if a.ndim and a.strides[0] == 0:
        return np.broadcast_to(np.abs(a[:1]), a.shape)
    return np.abs(a)


# the built-in relu, whose DFD secant (relu(z) - relu(z0)) / (z - z0) is exact wherever
# z != z0: 1 or 0 when z and z0 share a side of 0 (d / d, 0 / d), else z / (z - z0) or
# z0 / (z0 - z), the routine's own quotient (ActivationTable.multiplier)
_RELU = ActivationKey("relu", ())


def _relu(z: np.ndarray) -> np.ndarray | None:
    """relu(z) bit for bit as the generated ``np.where(z > 0, z, 0.0)``, branch-free (where on
    a mask of random signs is several times slower): max(z, 0) is z, +0.0 or (z = -0.0)
    -0.0, and + 0.0 makes every zero +0.0 (-inf gives +0.0, as the routine). None where that
    differs: a NaN, which max propagates."""
    out = np.maximum(z, 0)
    out += 0.0
    if np.isnan(np.add.reduce(out, axis=None)):   # every entry >= 0: only a NaN sums to NaN
        return None
    return out


_MASK_RULES: dict[Callable[..., np.ndarray], str | None] = {}


def _relu_mask_rule(df: Callable[..., np.ndarray]) -> str | None:
    """Which comparison gives ``df(z) == 1`` for relu's generated f' (the kink convention
    decides f'(0)): "positive" (z > 0, NaN included as f' gives 1 there), "nonnegative", or
    None. Checked once per routine on every class of input relu distinguishes."""
    if df not in _MASK_RULES:
        probe = np.array([-np.inf, -1.0, -0.0, 0.0, 1e-300, 1.0, np.inf, np.nan])
        with np.errstate(all="ignore"):
            got = np.asarray(df(probe))
        rule = None
        if got.shape == probe.shape and bool(((got == 0) | (got == 1)).all()):
            for name, mask in (("positive", ~(probe <= 0)), ("nonnegative", ~(probe < 0))):
                if np.array_equal(got == 1, mask):
                    rule = name
        _MASK_RULES[df] = rule
    return _MASK_RULES[df]


@dataclass(frozen=True)
class ActivationTable:
    """Generated NumPy routines (f, f', f'', DFD multiplier m) of every distinct activation.

    The routines are the symbolic stage's (``pbxc.symbolic.derive``): f' follows the kink
    ``convention``, and m is the cancellation-free multiplier of seed 004 eq. 16-17 with its
    0/0 limit f'(z0) (the activation-calculus spec, ``specs/activations.md``).
    """

    keys: dict[str, ActivationKey]                      # node name -> key
    routines: dict[ActivationKey, dict[str, Callable[..., np.ndarray]]]
    routine_names: dict[ActivationKey, dict[str, str]]  # key -> {"f": "act0_f", ...}
    kink_points: dict[ActivationKey, tuple[float, ...]]
    convention: str
    source: str
    binary_slopes: frozenset[ActivationKey] = frozenset()   # f' takes only 0 and 1
    fused: FusedKernels | None = None   # fused relu and secant loops (the ``fast`` extra)

    def __call__(self, node_name: str, z: np.ndarray) -> np.ndarray:
        if self.keys[node_name] == _RELU and isinstance(z, np.ndarray) and z.dtype.kind == "f":
            out = self.fused.relu(z) if self.fused is not None else None
            if out is None:
                out = _relu(z)
            if out is not None:
                return out
        return self._apply(self.routines[self.keys[node_name]]["f"], z)

    def derivative(self, node_name: str, z: np.ndarray) -> np.ndarray:
        """f'(z), elementwise: the diagonal of the activation's Jacobian."""
        return self._apply(self.routines[self.keys[node_name]]["df"], z)

    def second_derivative(self, node_name: str, z: np.ndarray) -> np.ndarray:
        """f''(z), elementwise (one-sided at kinks, by the convention): the Hessian pass."""
        return self._apply(self.routines[self.keys[node_name]]["d2f"], z)

    def multiplier(self, node_name: str, z0: np.ndarray, z: np.ndarray,
                   f0: np.ndarray | None = None, f1: np.ndarray | None = None) -> np.ndarray:
        """The DFD multiplier (f(z) - f(z0)) / (z - z0), and f'(z0) where z == z0.

        ``f0``, ``f1``: f(z0) and f(z) when the caller has them (the forward passes). Where
        the secant cannot cancel, |f1 - f0| >= (|f0| + |f1|) / 4 with |f1 - f0| and |z - z0|
        far from underflow, its relative error is a few units of f's own (about 4 ulps of
        f), well inside the bar; the full routine (a series, a difference form) runs only on
        the other entries. On typical batches that is a small fraction of them.
        """
        fn = self.routines[self.keys[node_name]]["m"]
        shape = np.broadcast_shapes(np.shape(z0), np.shape(z))
        if (f0 is None or f1 is None or not shape or np.shape(z0) != shape
                or np.shape(z) != shape
                or (getattr(fn, "widen_single", False) and z.dtype == np.float32)):
            with np.errstate(all="ignore"):
                out = fn(z0, z)
            return np.broadcast_to(np.asarray(out, dtype=z.dtype), shape)
        fused = self.fused
        if fused is not None:   # the same quotient and tests in one pass (bit for bit)
            loop = fused.relu_secant if self.keys[node_name] == _RELU else fused.secant
            with np.errstate(all="ignore"):
                got = loop(z0, z, f0, f1)
                if got is not None:
                    out, rest, count = got
                    fused.redo(out, rest, count, z0, z, fn)
                    return out
        if self.keys[node_name] == _RELU:   # the secant is exact for relu: one quotient
            with np.errstate(all="ignore"):
                out = np.subtract(f1, f0)
                out /= np.subtract(z, z0)
                # both sides <= 0 give 0 / d, -0.0 where d < 0: the routine's +0.0 (every
                # relu multiplier is >= 0, so abs changes nothing else)
                np.abs(out, out=out)
                finite = np.isfinite(out)       # not: z == z0 (0 / 0) or an infinite z
                if not finite.all():
                    _redo(out, ~finite, z0, z, fn)
            return out
        floor = np.finfo(z.dtype).tiny / np.finfo(z.dtype).eps
        with np.errstate(all="ignore"):
            d, df = z - z0, f1 - f0
            out = np.asarray(df / d, dtype=z.dtype)   # the secant
            # in place, into d's buffer once |d| is tested, and without np.where or inverted
            # masks: this runs on every activation of every call. The tests, as ``trusted``:
            # |df| >= bound and |df| > floor, i.e. |df| >= max(bound, next float above floor);
            # |d| > floor; the secant finite (a NaN anywhere makes it NaN, so the comparisons'
            # NaN cases need no test of their own)
            trusted = np.greater(np.abs(d, out=d), floor)
            np.abs(df, out=df)
            bound = np.abs(f1, out=d) if f1.dtype == d.dtype else np.abs(f1)
            bound += _small_abs(f0)
            bound *= 0.25
            np.maximum(bound, np.nextafter(floor, np.inf, dtype=z.dtype), out=bound)
            trusted &= np.greater_equal(df, bound)
            trusted &= np.isfinite(out)
            if not trusted.all():
                _redo(out, ~trusted, z0, z, fn)
        return out

    def slope(self, node_name: str, z: np.ndarray) -> np.ndarray:
        """f'(z) in the least memory that holds it exactly: a bool mask where f' is 0 or 1
        everywhere (ReLU under a 0/1 kink convention; 1/8 of a float64 array), else f'(z).
        ``v * mask`` equals ``v * f'(z)`` bit for bit."""
        key = self.keys[node_name]
        if key == _RELU and key in self.binary_slopes and isinstance(z, np.ndarray):
            rule = _relu_mask_rule(self.routines[key]["df"])
            if rule is not None:   # f' == 1 exactly where z > 0 (or >= 0): one comparison
                return ~np.less_equal(z, 0) if rule == "positive" else ~np.less(z, 0)
        df = self.derivative(node_name, z)
        if key not in self.binary_slopes:
            return df
        mask = df == 1
        if not (mask | (df == 0)).all():   # NaN or inf in z: keep f' as it is
            return df
        return mask

    def kinks_hit(self, node_name: str, z: np.ndarray) -> int:
        """How many entries of ``z`` sit exactly on a kink, where f' is a convention."""
        points = self.kink_points[self.keys[node_name]]
        return int(sum(np.count_nonzero(z == z.dtype.type(c)) for c in points))

    @staticmethod
    def _apply(fn: Callable[[np.ndarray], np.ndarray], z: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # np.where evaluates the branch it discards too
            out = fn(z)
        return np.broadcast_to(np.asarray(out, dtype=z.dtype), z.shape)


def compile_activations(graph: ModelGraph, convention: str = DEFAULT_CONVENTION,
                        dtype: Any = np.float64) -> ActivationTable:
    """Derive every distinct activation of ``graph`` once and load its generated routines.

    An :class:`AccuracyWarning` of a user activation is raised only where it concerns
    ``dtype``, the precision the model runs in.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"unknown kink convention '{convention}'; expected one of "
                         f"{', '.join(CONVENTIONS)}")
    keys: dict[str, ActivationKey] = {}
    for node in graph.topological():
        if node.kind is OpKind.ACTIVATION:
            assert node.activation is not None
            keys[node.name] = activation_key(node.activation, node.activation_params,
                                             graph.user_activations)
    distinct = list(dict.fromkeys(keys.values()))
    rendered = render_activation_functions(distinct, graph.user_activations, convention,
                                           prefix="act", warn_for=np.dtype(dtype).name)
    module = load_generated_module(rendered.source, f"{graph.name}_activations")
    routines = {key: {kind: getattr(module, fname) for kind, fname in names.items()}
                for key, names in rendered.names.items()}
    with warnings.catch_warnings():   # render_activation_functions has warned already
        warnings.simplefilter("ignore", AccuracyWarning)
        kink_points = {key: tuple(float(k.point) for k in
                                  derive(key, graph.user_activations, convention).kinks)
                       for key in distinct}
    binary = frozenset(key for key in distinct if key.definition is None
                       and key.name in BINARY_SLOPE_BUILTINS
                       and _slopes_binary(routines[key]["df"], kink_points[key]))
    return ActivationTable(keys, routines, dict(rendered.names), kink_points, convention,
                           rendered.source, binary, fused_kernels.available())


# built-ins whose derivative is 0 or 1 away from their kinks
BINARY_SLOPE_BUILTINS = frozenset({"relu"})


def _slopes_binary(df: Callable[[np.ndarray], np.ndarray], kinks: tuple[float, ...]) -> bool:
    """The kink convention keeps f' in {0, 1} at the kinks too (not the 'mean' convention)."""
    at = np.asarray([*kinks, -1.0, 1.0], dtype=np.float64)
    with np.errstate(all="ignore"):
        values = np.broadcast_to(np.asarray(df(at), dtype=np.float64), at.shape)
    return bool(np.isin(values, (0.0, 1.0)).all())


def _first_bad_index(array: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])


class Model:
    """A compiled .pbx model on the NumPy reference backend.

    ``forward(x)`` takes a batch (shape ``(B, *input_shape)``) or, for several inputs, a dict by
    input name; it returns an array for a single-output model and a dict by name otherwise.
    """

    def __init__(self, graph: ModelGraph, weights: WeightStore, dtype: Any = None,
                 convention: str = DEFAULT_CONVENTION) -> None:
        tune_allocator()
        self.graph = graph
        declared = {i.dtype for i in graph.inputs}
        if dtype is None:
            dtype = "float64" if "float64" in declared else "float32"
        self.dtype = resolve_dtype(dtype)
        self.nodes: list[OpNode] = list(graph.topological())
        self.params: dict[str, dict[str, np.ndarray]] = {}
        cast: dict[str, np.ndarray] = {}
        for node in self.nodes:
            bound = {}
            for role, key, _ in node.params:
                if key not in cast:
                    cast[key] = np.ascontiguousarray(weights[key], dtype=self.dtype)
                bound[role] = cast[key]
            self.params[node.name] = bound
        self.weights = cast
        self.activations = compile_activations(graph, convention, self.dtype)
        # dense matrices of the constant linear ops in ``dense_ops`` (small convolutions,
        # pooling), by (node, dtype); weights never change after loading, so they stay valid
        self.dense_cache: dict[tuple[str, str], np.ndarray] = {}
        self.plan_cache: dict[tuple[str, str, int, str], Any] = {}   # Jacobian plans
        self.memory_plans: dict[tuple[str, ...], PassPlan] = {}      # liveness, per pass
        # DFD's forward pass at the last shared default, per plan (pbxc.runtime.dfd)
        self.default_points: dict[object, Any] = {}
        self.dense_ops = cheaper_dense(self.nodes, graph)   # applied as cached matrices
        # numba's fused elementwise loops for LRP and DFD, when installed (``fast``)
        self.fused = fused_kernels.available()

    def pass_plan(self, pass_name: str, output: str, wrt: str | None = None) -> PassPlan:
        """The liveness plan of a pass (``pbxc.lower.memory``), once per pass and values."""
        key = (pass_name, output, wrt or "")
        if key not in self.memory_plans:
            nodes = path_nodes(self.graph, wrt, output) if wrt else self.nodes
            keep = {output, wrt} if wrt else {output}
            self.memory_plans[key] = pass_plan(self.graph, pass_name, nodes, keep)
        return self.memory_plans[key]

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.graph.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.graph.output_names

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {i.name: i.shape for i in self.graph.inputs}

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {o.name: self.graph.shape_of(o.name) for o in self.graph.outputs}

    @property
    def feature_names(self) -> dict[str, tuple[str, ...] | None]:
        return {i.name: i.features for i in self.graph.inputs}

    @property
    def class_names(self) -> dict[str, tuple[str, ...] | None]:
        return {o.name: o.classes for o in self.graph.outputs}

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}{list(s)}" for n, s in self.input_shapes.items())
        outs = ", ".join(f"{n}{list(s)}" for n, s in self.output_shapes.items())
        return f"<pbxc.Model {self.name}: {ins} -> {outs}, {self.dtype.name}>"

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check and cast inputs: right names, shape (B, *declared), real and finite."""
        if isinstance(x, Mapping):
            given = dict(x)
            missing = [n for n in self.input_names if n not in given]
            extra = [n for n in given if n not in self.input_names]
            if missing or extra:
                raise InputError(f"model '{self.name}' takes inputs {list(self.input_names)}; "
                                 f"missing {missing}, unexpected {extra}")
        else:
            if len(self.input_names) != 1:
                raise InputError(f"model '{self.name}' has {len(self.input_names)} inputs "
                                 f"{list(self.input_names)}; pass a dict by name")
            given = {self.input_names[0]: x}
        batch = None
        out = {}
        problems = []
        for info in self.graph.inputs:
            arr = np.asarray(given[info.name])
            where = f"input '{info.name}' (declared at {info.pos})"
            if arr.dtype.kind not in "fiub":
                problems.append(Diagnostic(f"{where} has dtype {arr.dtype}; expected real numbers"))
                continue
            expected = (-1, *info.shape)
            if arr.shape[1:] != info.shape or arr.ndim != len(expected):
                hint = ""
                if arr.shape == info.shape:
                    hint = "; add a batch axis, e.g. x[None]"
                problems.append(Diagnostic(
                    f"{where} has shape {list(arr.shape)}; expected [batch, "
                    f"{', '.join(map(str, info.shape))}]{hint}"))
                continue
            if arr.shape[0] == 0:  # one rule for every pass (specs/security.md, Inputs)
                problems.append(Diagnostic(f"{where} is an empty batch (shape "
                                           f"{list(arr.shape)}); give at least one sample"))
                continue
            if batch is not None and arr.shape[0] != batch:
                problems.append(Diagnostic(f"{where} has batch size {arr.shape[0]}, but other "
                                           f"inputs have {batch}"))
                continue
            batch = arr.shape[0]
            arr = np.ascontiguousarray(arr, dtype=self.dtype)
            if not np.isfinite(arr).all():
                idx = _first_bad_index(arr)
                count = int((~np.isfinite(arr)).sum())
                problems.append(Diagnostic(f"{where} has {count} non-finite value(s): "
                                           f"{arr[idx]} at index {list(idx)}"))
                continue
            out[info.name] = arr
        if problems:
            raise InputError(problems)
        return out

    # ------------------------------------------------------------------ forward
    def evaluate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every node's value, from already checked inputs."""
        values: dict[str, np.ndarray] = dict(inputs)
        for node in self.nodes:
            if node.kind is OpKind.INPUT:
                continue
            xs = [values[i] for i in node.inputs]
            if node.kind is OpKind.ACTIVATION:
                values[node.name] = self.activations(node.name, xs[0])
            else:
                values[node.name] = forward_rule(node)(node, xs, self.params[node.name])
        return values

    def outputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The forward pass; always a dict by output name."""
        values = self.evaluate(self.prepare_inputs(x))
        return {name: values[name] for name in self.output_names}

    def forward(self, x: np.ndarray | Mapping[str, np.ndarray],
                intermediates: bool = False) -> Any:
        """The forward pass: an array for one output, a dict for several.

        With ``intermediates=True``, a dict of every node's value.
        """
        if intermediates:
            return self.evaluate(self.prepare_inputs(x))
        outs = self.outputs(x)
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    __call__ = forward

    # ------------------------------------------------------------------ attribution passes
    def _io(self, output: str | None, wrt: str | None) -> tuple[str, str]:
        output = output or self.output_names[0]
        wrt = wrt or self.input_names[0]
        if output not in self.graph.digraph:
            raise InputError(f"model '{self.name}' has no value '{output}'; outputs are "
                             f"{list(self.output_names)}")
        if wrt not in self.input_names:
            raise InputError(f"model '{self.name}' has no input '{wrt}'; inputs are "
                             f"{list(self.input_names)}")
        return output, wrt

    def jacobian(self, x: np.ndarray | Mapping[str, np.ndarray], *, output: str | None = None,
                 wrt: str | None = None, mode: str = "auto",
                 intermediates: bool = False) -> JacobianResult:
        """The exact Jacobian d output / d wrt: ``.jacobian`` is (B, *out_shape, *in_shape).

        ``mode`` is "auto" (the cheapest plan for this model and batch), "forward", "reverse"
        or "chain". With ``intermediates=True`` (forward mode, Algorithm 1 of the PBX paper),
        ``.intermediates`` holds the Jacobian of every node on the way.
        """
        output, wrt = self._io(output, wrt)
        return jacobian(self, self.prepare_inputs(x), output, wrt, mode, intermediates)

    def hessian(self, x: np.ndarray | Mapping[str, np.ndarray], *, target: Any = None,
                output: str | None = None, wrt: str | None = None, on: str = "logits",
                mode: str = "auto", intermediates: bool = False) -> HessianResult:
        """Exact per-sample Hessians of the target output (specs/hessian.md).

        ``.hessian`` is (B, *in, *in) for ``target`` "predicted" (default), a class index or
        one per sample; (B, *out, *in, *in) for ``target="all"``. ``on``: "logits" or
        "probabilities" (the softmax of the output). ``mode``: "auto" (the plan's choice),
        "forward" (the second-order Algorithm 1; with ``intermediates=True`` every node's
        H[l]) or "reverse" (forward over reverse). ``.kinks`` says per sample where f'' is a
        convention.
        """
        output, wrt = self._io(output, wrt)
        return hessian(self, self.prepare_inputs(x), output, wrt, target, on, mode,
                       intermediates)

    def hvp(self, x: np.ndarray | Mapping[str, np.ndarray], v: np.ndarray, *,
            target: Any = None, output: str | None = None, wrt: str | None = None,
            on: str = "logits", mode: str = "auto") -> HvpResult:
        """Hessian-vector products H v of the target output, per sample (forward over
        reverse); ``v`` is (*in), (B, *in) or (B, K, *in) and ``.hvp`` has its shape."""
        output, wrt = self._io(output, wrt)
        return hvp(self, self.prepare_inputs(x), v, output, wrt, target, on, mode)

    def interactions(self, x: np.ndarray | Mapping[str, np.ndarray], *, target: Any = None,
                     step: Any = 0.1, scale: Any = None, output: str | None = None,
                     wrt: str | None = None, on: str = "logits",
                     features: Any = None) -> InteractionResult:
        """Finite-perturbation interactions I_ij = f(x+d_i+d_j) - f(x+d_i) - f(x+d_j) + f(x)
        of the target output, with d_i = step * scale_i along feature i, beside the Taylor
        term d_i^T H d_j and the residual (specs/hessian.md); ``features`` restricts the
        pairs to those flattened input indices."""
        output, wrt = self._io(output, wrt)
        return interactions(self, self.prepare_inputs(x), output, wrt, target, on, step,
                            scale, features)

    def kinks_hit(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per activation node, how many units of the batch sit exactly on a kink.

        There the Jacobian, gradient and LRP/DFD limits use the model's kink convention
        (``self.activations.convention``) instead of a derivative.
        """
        values = self.evaluate(self.prepare_inputs(x))
        return {n.name: self.activations.kinks_hit(n.name, values[n.inputs[0]])
                for n in self.nodes if n.kind is OpKind.ACTIVATION}

    def targets(self, logits: np.ndarray, target: Any) -> np.ndarray:
        """Per-sample target indices into the flattened output: predicted by default."""
        batch = logits.shape[0]
        flat = logits.reshape(batch, -1)
        if target is None or (isinstance(target, str) and target == "predicted"):
            return flat.argmax(axis=1)
        t = np.broadcast_to(np.asarray(target), (batch,))
        if t.dtype.kind not in "iu" or np.any(t < 0) or np.any(t >= flat.shape[1]):
            raise InputError(f"target must be 'predicted' or class indices in [0, "
                             f"{flat.shape[1]}), got {target!r}")
        return t.astype(np.int64)

    def gradient(self, x: np.ndarray | Mapping[str, np.ndarray], *, target: Any = None,
                 output: str | None = None, wrt: str | None = None) -> np.ndarray:
        """d f_c / d x for the target class c of each sample (predicted by default): saliency."""
        return self._gradient(x, target, output, wrt)[0]

    def input_x_gradient(self, x: np.ndarray | Mapping[str, np.ndarray], *, target: Any = None,
                         output: str | None = None, wrt: str | None = None) -> np.ndarray:
        """x * d f_c / d x, elementwise."""
        grad, inputs, wrt_name = self._gradient(x, target, output, wrt)
        return inputs[wrt_name] * grad

    def _gradient(self, x: np.ndarray | Mapping[str, np.ndarray], target: Any,
                  output: str | None, wrt: str | None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
        output, wrt = self._io(output, wrt)
        inputs = self.prepare_inputs(x)
        nodes = path_nodes(self.graph, wrt, output)
        # the memory plan: keep only what the VJPs read (masks, argmax, softmax outputs)
        plan = self.pass_plan("gradient", output, wrt)
        lin = linearize(self, inputs, keep=plan.keep,
                        local_of=lambda node, z, _: self.activations.slope(node.name, z))
        y = lin.values[output]
        c = self.targets(y, target)
        seed = np.zeros((y.shape[0], 1, y[0].size), dtype=y.dtype)
        seed[np.arange(y.shape[0]), 0, c] = 1
        seed = seed.reshape(y.shape[0], 1, *y.shape[1:])
        grad = reverse_sweep(self, lin, wrt, output, nodes, seed, schedule=plan.schedule)[:, 0]
        return grad, inputs, wrt

    def dfd(self, x: np.ndarray | Mapping[str, np.ndarray], *, baseline: Any = "zeros",
            target: Any = None, output: str | None = None, data: np.ndarray | None = None,
            rule: str = "rescale") -> DfdResult:
        """DFD / DeepLIFT contributions to the target output, per input.

        ``baseline``: "zeros", a number, "mean" (of ``data``), an array (one shared sample or
        one per sample), or a dict of these by input name. ``target``: "predicted" (default),
        a class index, or one index per sample. ``rule``: "rescale" or "revealcancel" for
        the nonlinearities (see specs/dfd.md). The result's ``attributions`` sum to
        ``delta`` = f_c(x) - f_c(x0) (see ``summation_error``).
        """
        output, _ = self._io(output, None)
        inputs = self.prepare_inputs(x)
        default = resolve_baseline(self, inputs, baseline, data)
        at, base = linearize_both(self, inputs, default, self.pass_plan("dfd", output).keep
                                  if rule == "rescale" else None)
        y = at.values[output]
        c = self.targets(y, target)
        flat = y.reshape(y.shape[0], -1)
        seed = np.zeros_like(flat)
        seed[np.arange(len(c)), c] = 1
        mult, _, base = dfd(self, inputs, default, output, seed.reshape(y.shape), rule,
                            (at, base))
        y0 = base.values[output].reshape(y.shape[0], -1)
        delta = flat[np.arange(len(c)), c] - y0[np.arange(len(c)), c]
        contributions = {k: mult[k] * (inputs[k] - default[k]) for k in inputs}
        return DfdResult(contributions, mult, default, np.ascontiguousarray(y),
                         np.ascontiguousarray(base.values[output]), c, delta)

    def lrp(self, x: np.ndarray | Mapping[str, np.ndarray], *, target: Any = None,
            rule: Any = None, composite: Any = None, overrides: Mapping[str, Any] | None = None,
            output: str | None = None) -> LrpResult:
        """Layer-wise relevance propagation of the target logit (see ``specs/lrp.md``).

        ``rule``: a Rule, or text such as "epsilon:0.25", "gamma", "zplus", "alphabeta:2:1";
        ``composite``: a name ("epsilon", "lrp0", "epsilon-plus", "epsilon-gamma-box") or a
        Composite; ``overrides``: node or statement name -> rule. With neither ``rule`` nor
        ``composite``, the model's ``lrp { ... }`` block applies (its composite and rules; the
        ``overrides`` given here win over its rules), and without a block, "epsilon".
        The result carries the ledger.
        """
        if isinstance(rule, str):
            rule = rule_from_spec(rule)
        if overrides:
            overrides = {k: rule_from_spec(v) if isinstance(v, str) else v
                         for k, v in overrides.items()}
        composite_args: dict[str, float] = {}
        block = self.graph.lrp_block
        if rule is None and composite is None and block is not None:
            composite, composite_args, from_file = file_rules(block)
            overrides = {**from_file, **(overrides or {})}
        return lrp(self, x, target=target, composite=composite, rule=rule,
                   overrides=overrides, output=output, composite_args=composite_args)

    def source_of(self, node_name: str) -> SourcePos:
        return self.graph.node(node_name).pos
