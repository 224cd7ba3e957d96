"""The attribution properties ``pbxc verify`` checks; their math is in specs/verify.md.

Each property maps a batch of checked inputs to one :class:`Outcome` per sample: the measured
error in the property's own measure, the graph nodes involved and a line of detail. A
property holds on a sample when ``measured <= tol`` (for ``kinks``, the distance to a kink,
when ``measured > tol``). A property that cannot apply to a model raises :class:`Skip`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mpmath
import networkx as nx
import numpy as np

from pbxc.errors import InputError, PbxError, SourcePos
from pbxc.graph.ir import OpNode
from pbxc.ops import MAXPOOL, OpKind
from pbxc.runtime.dfd import DfdContext, dfd, dfd_step, resolve_baseline
from pbxc.runtime.jacobian import linearize
from pbxc.symbolic.accuracy import reference_values, relative_errors
from pbxc.symbolic.derive import derive
from pbxc.symbolic.precision import BAR
from pbxc.verify.backends import available_backends
from pbxc.verify.lanes import (
    MP_PARAM_LIMIT,
    float_kit,
    mp_kit,
    parameter_count,
    reference_jacobian,
)

Array = np.ndarray

#: summation-to-delta is judged relative to max(|delta|, SUMMATION_FLOOR * (|y| + |y0|)):
#: delta = y - y0 itself carries a rounding error of about u (|y| + |y0|)
SUMMATION_FLOOR = 1e-3


class Skip(Exception):
    """The property does not apply to this model (the message says why)."""


@dataclass
class Outcome:
    """One sample's measurement."""

    measured: float
    nodes: tuple[str, ...] = ()
    detail: str = ""
    arrays: dict[str, Array] = field(default_factory=dict)


@dataclass
class CheckConfig:
    """A property with its tolerance and settings, as declared (``pos``) or defaulted."""

    name: str
    tol: float
    settings: dict[str, Any]
    pos: SourcePos | None = None


@dataclass
class Context:
    """What every check may need besides the batch."""

    model: Any
    data: dict[str, Array] | None = None       # a data set, by input name
    base_dir: Path = Path()                       # for files named in settings
    scales: dict[str, Array] = field(default_factory=dict)   # per-element input scale
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return str(self.model.output_names[0])

    @property
    def wrt(self) -> str:
        return str(self.model.input_names[0])


Check = Callable[[Context, dict[str, Array], CheckConfig], list[Outcome]]


@dataclass(frozen=True)
class Property:
    name: str
    summary: str
    tol: float | None                  # None: the dtype's accuracy bar
    settings: dict[str, Any]
    check: Check
    search_cap: int | None = None      # most search examples (expensive properties)
    sample_cap: int | None = None      # most given samples checked (expensive properties)
    lower_is_violation: bool = False   # kinks: a small distance is the finding

    def holds(self, measured: float, tol: float) -> bool:
        if math.isnan(measured):
            return False
        return measured > tol if self.lower_is_violation else measured <= tol


PROPERTIES: dict[str, Property] = {}


def register(prop: Property) -> Property:
    PROPERTIES[prop.name] = prop
    return prop


# ---------------------------------------------------------------- helpers


def _per_sample(a: Array) -> Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _targets(ctx: Context, y: Array, target: Any) -> Array:
    spec = None if target in (None, "predicted") else int(target)
    return np.asarray(ctx.model.targets(y, spec))


def baseline_of(ctx: Context, inputs: Mapping[str, Array], spec: Any) -> dict[str, Array]:
    """The DFD default: zeros, mean (of the data), a number, or a file (.npy / .npz)."""
    if isinstance(spec, str) and spec not in ("zeros", "mean"):
        path = Path(spec) if Path(spec).is_absolute() else ctx.base_dir / spec
        from pbxc.weights.arrays import ArrayFileError, read_array_file

        try:  # sizes checked before reading (specs/security.md, Inputs)
            loaded = read_array_file(path, prefer=ctx.wrt)
        except (ArrayFileError, OSError) as err:
            raise InputError(f"cannot read baseline file '{path}': {err}") from None
        spec = loaded
    data = None
    if isinstance(spec, str) and spec == "mean":
        if ctx.data is None:
            raise Skip("baseline 'mean' needs a data set (--data)")
        data = ctx.data[ctx.wrt]
    return resolve_baseline(ctx.model, inputs, spec, data)


def _rel(a: Array, b: Array) -> float:
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def _activation_nodes(model: Any) -> list[OpNode]:
    return [n for n in model.nodes if n.kind is OpKind.ACTIVATION]


def calculus_of(ctx: Context, node: OpNode) -> Any:
    key = ctx.model.activations.keys[node.name]
    cache = ctx.cache.setdefault("calculus", {})
    if key not in cache:
        cache[key] = derive(key, ctx.model.graph.user_activations,
                            ctx.model.activations.convention, ctx.model.dtype.name)
    return cache[key]


def kink_points(ctx: Context, node: OpNode) -> list[tuple[float, float, float]]:
    """(point, left slope, right slope) of every kink of the node's activation, from the
    symbolic calculus (pbxc.symbolic.calculus.Kink)."""
    return [(float(k.point), float(k.left), float(k.right))
            for k in calculus_of(ctx, node).kinks]


# ---------------------------------------------------------------- DFD


def dfd_trace(ctx: Context, inputs: Mapping[str, Array], default: Mapping[str, Array],
              seed: Array) -> tuple[dict[str, Array], dict[str, Array], Any, Any]:
    """The DFD pass of ``pbxc.runtime.dfd`` (the rescale rule), keeping at every node its own
    summation-to-delta error: |sum_n m_n dn - sum_i m_i di| over its magnitude, per sample."""
    model = ctx.model
    output = ctx.output
    at = linearize(model, inputs, derivatives=False)
    base = linearize(model, default, derivatives=False)
    dctx = DfdContext(model, at, base)
    needed = nx.ancestors(model.graph.digraph, output) | {output}
    mult: dict[str, Array] = {output: seed[:, None]}
    local: dict[str, Array] = {}
    for node in reversed(model.nodes):
        if node.name not in needed or node.kind is OpKind.INPUT:
            continue
        m = mult.pop(node.name, None)
        if m is None:
            continue
        grads = dfd_step(dctx, node, m)
        d_out = at.values[node.name] - base.values[node.name]
        out_side = m[:, 0] * d_out
        terms = [g[:, 0] * (at.values[i] - base.values[i]) for i, g in zip(node.inputs, grads)]
        in_total = sum(_per_sample(t) for t in terms)
        scale = _per_sample(np.abs(out_side)) + sum(_per_sample(np.abs(t)) for t in terms)
        local[node.name] = np.abs(in_total - _per_sample(out_side)) / np.where(
            scale > 0, scale, 1.0)
        for i, g in zip(node.inputs, grads):
            mult[i] = mult[i] + g if i in mult else g
    result = {name: (mult[name][:, 0] if name in mult else np.zeros_like(x))
              for name, x in inputs.items()}
    return result, local, at, base


def _worst_nodes(local: Mapping[str, Array], b: int, tol: float, limit: int = 3
                 ) -> tuple[str, ...]:
    ranked = sorted(local, key=lambda n: -float(local[n][b]))
    return tuple(n for n in ranked[:limit] if float(local[n][b]) > tol)


def check_summation(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig) -> list[Outcome]:
    model = ctx.model
    default = baseline_of(ctx, inputs, cfg.settings["baseline"])
    y = model.evaluate(inputs)[ctx.output]
    c = _targets(ctx, y, cfg.settings["target"])
    flat = y.reshape(len(y), -1)
    seed = np.zeros_like(flat)
    seed[np.arange(len(c)), c] = 1
    if cfg.settings["rule"] == "rescale":
        mult, local, _, base = dfd_trace(ctx, inputs, default, seed.reshape(y.shape))
    else:
        mult, _, base = dfd(model, inputs, default, ctx.output, seed.reshape(y.shape),
                            cfg.settings["rule"])
        local = {}
    y0 = base.values[ctx.output].reshape(len(y), -1)
    yt, y0t = flat[np.arange(len(c)), c], y0[np.arange(len(c)), c]
    delta = yt - y0t
    total: Array = np.sum([_per_sample(mult[n] * (inputs[n] - default[n])) for n in inputs],
                          axis=0)
    scale = np.maximum(np.abs(delta), SUMMATION_FLOOR * (np.abs(yt) + np.abs(y0t)))
    err = np.abs(total - delta) / np.where(scale > 0, scale, 1.0)
    out = []
    for b in range(len(y)):
        nodes = _worst_nodes(local, b, cfg.tol) or (ctx.output,)
        out.append(Outcome(float(err[b]), nodes,
                           f"target {int(c[b])}: sum C = {float(total[b]):.17g}, "
                           f"delta = {float(delta[b]):.17g}",
                           {f"baseline__{n}": default[n][b:b + 1] for n in default}))
    return out


def check_linear_composition(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                             ) -> list[Outcome]:
    """Seed 004 eq. 2: the contributions to a f_i + b f_j are a C_i + b C_j."""
    model = ctx.model
    default = baseline_of(ctx, inputs, cfg.settings["baseline"])
    y = model.evaluate(inputs)[ctx.output]
    flat = y.reshape(len(y), -1)
    n = flat.shape[1]
    if n < 2:
        raise Skip("the output has a single element")
    i = _targets(ctx, y, "predicted")
    j = (i + 1) % n
    a, b_coef = float(cfg.settings["a"]), float(cfg.settings["b"])
    rows = np.arange(len(y))

    def contributions(seed: Array) -> dict[str, Array]:
        mult, _, _ = dfd(model, inputs, default, ctx.output, seed.reshape(y.shape))
        return {k: mult[k] * (inputs[k] - default[k]) for k in inputs}

    si, sj = np.zeros_like(flat), np.zeros_like(flat)
    si[rows, i] = 1
    sj[rows, j] = 1
    ci, cj, cc = contributions(si), contributions(sj), contributions(a * si + b_coef * sj)
    out = []
    for r in rows:
        err = 0.0
        for k in inputs:
            combined = a * ci[k][r] + b_coef * cj[k][r]
            scale = float(np.max(np.abs(a * ci[k][r]) + np.abs(b_coef * cj[k][r])))
            diff = float(np.max(np.abs(cc[k][r] - combined)))
            err = max(err, diff / scale if scale > 0 else diff)
        out.append(Outcome(err, (ctx.output,),
                           f"C({a:g} f_{int(i[r])} + {b_coef:g} f_{int(j[r])}) vs the same "
                           "combination of C(f_i), C(f_j)"))
    return out


# ---------------------------------------------------------------- LRP


def _lrp_kwargs(cfg: CheckConfig) -> dict[str, Any]:
    rule = cfg.settings.get("rule")
    if rule:
        return {"rule": str(rule)}
    return {"composite": str(cfg.settings["composite"])}


def check_lrp_conservation(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                           ) -> list[Outcome]:
    """sum R_in + bias + stabiliser == R_out per layer, and start == inputs + absorbed."""
    try:
        res = ctx.model.lrp(inputs, **_lrp_kwargs(cfg))
    except PbxError as err:
        raise Skip(f"LRP does not apply: {err.message}") from None
    ledger = res.ledger
    overall = ledger.conservation_error
    out = []
    for b in range(len(overall)):
        worst, node = float(overall[b]), ctx.output
        for name, entry in ledger.layers.items():
            e = float(entry.conservation_error[b])
            if e > worst or math.isnan(e):
                worst, node = e, name
        out.append(Outcome(worst, (node,), f"overall {float(overall[b]):.3g}; worst layer "
                           f"'{node}'" if node != ctx.output else f"overall {worst:.3g}"))
    return out


def _has_bias(node: OpNode) -> bool:
    """Whether the node's LRP rule sees a bias: a bias weight, batchnorm and normalize's
    shifts, a constant added or subtracted, a nonzero padding value, concat's constant
    operands (a class token absorbs its block's relevance as a bias)."""
    if node.kind in (OpKind.ADD, OpKind.SUB) and len(node.inputs) == 1:
        return True
    if node.kind is OpKind.CONCAT:
        return bool(node.params)
    if node.kind is OpKind.PAD:
        return float(node.attr("value") or 0.0) != 0.0
    return node.param_key("bias") is not None or node.kind in (OpKind.BATCHNORM,
                                                                  OpKind.NORMALIZE)


def check_lrp0_exact(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                     ) -> list[Outcome]:
    """LRP-0 (no epsilon): every layer without a bias passes on exactly what it receives."""
    try:
        res = ctx.model.lrp(inputs, composite="lrp0")
    except PbxError as err:
        raise Skip(f"LRP does not apply: {err.message}") from None
    graph = ctx.model.graph
    unbiased = {n: e for n, e in res.ledger.layers.items() if not _has_bias(graph.node(n))}
    whole = not any(_has_bias(n) for n in ctx.model.nodes)
    if not unbiased and not whole:
        raise Skip("every layer has a bias")
    out = []
    for b in range(len(res.ledger.start)):
        worst, node = 0.0, ""
        for name, e in unbiased.items():
            r_in, r_out = float(e.relevance_in[b]), float(e.relevance_out[b])
            mag = float(e.magnitude[b]) if e.magnitude is not None else 0.0
            scale = max(abs(r_out), mag)
            e_layer = abs(r_in - r_out) / scale if scale > 0 else abs(r_in - r_out)
            if e_layer > worst or math.isnan(e_layer):
                worst, node = e_layer, name
        if whole:
            start, reached = float(res.ledger.start[b]), float(res.ledger.inputs[b])
            e_all = abs(start - reached) / max(abs(start), 1e-300)
            if e_all > worst:
                worst, node = e_all, ctx.output
        out.append(Outcome(worst, (node,) if node else (), f"{len(unbiased)} bias-free "
                           "layers" + (", whole network bias-free" if whole else "")))
    return out


# ---------------------------------------------------------------- the Jacobian


def _kink_sides(ctx: Context, values: Mapping[str, Array], local: Mapping[str, Array]
                ) -> dict[str, Array]:
    """Per node, which piece each preactivation is on (activations) or the argmax (max
    pooling): two points with the same sides are joined by one smooth piece."""
    sides: dict[str, Array] = {}
    for node in ctx.model.nodes:
        if node.kind is OpKind.ACTIVATION:
            points = [p for p, _, _ in kink_points(ctx, node)]
            if points:
                z = values[node.inputs[0]]
                sides[node.name] = np.asarray(np.sum([(z > p) for p in points], axis=0,
                                                     dtype=np.int8))
        elif node.kind in MAXPOOL and node.name in local:
            sides[node.name] = np.asarray(local[node.name])
        elif node.kind is OpKind.PRELU:   # one kink, at 0
            sides[node.name] = np.asarray(values[node.inputs[0]] > 0, dtype=np.int8)
    return sides


def _central_differences(model: Any, inputs: dict[str, Array], b: int, wrt: str, output: str,
                         h: Array) -> tuple[Array, Any]:
    """Sample ``b``'s central differences of ``output`` along each input coordinate, with
    steps ``h`` (per coordinate), as (*out_shape, *in_shape); and the forward pass over the
    sample and its 2n perturbations (row 0 the sample itself)."""
    x = inputs[wrt]
    shape = x.shape[1:]
    n = int(np.prod(shape))
    xb = x[b].reshape(-1)
    steps = np.eye(n, dtype=x.dtype) * h[:, None]
    pert = np.concatenate([xb + steps, xb - steps]).reshape(2 * n, *shape)
    # exact representable steps: h' = (x + h) - x
    h_eff = ((xb + h) - (xb - h)).astype(np.float64)
    batch_in = {k: np.repeat(v[b:b + 1], 2 * n + 1, axis=0) for k, v in inputs.items()}
    batch_in[wrt] = np.concatenate([x[b:b + 1], pert])
    lin = linearize(model, batch_in, derivatives=False)
    y = lin.values[output]
    fd = ((y[1:n + 1] - y[n + 1:]) / h_eff.reshape(n, *(1,) * (y.ndim - 1)))
    return np.moveaxis(fd.reshape(n, -1), 0, -1).reshape(*y.shape[1:], *shape), lin


def _crossing(ctx: Context, lin: Any, n: int) -> Array:
    """Per input coordinate: its +-step perturbation (rows 1..n, n+1..2n of ``lin``) moves a
    pre-activation across a kink or changes a max-pool winner against row 0."""
    crossing = np.zeros(n, dtype=bool)
    for s in _kink_sides(ctx, lin.values, lin.local).values():
        flat = s.reshape(s.shape[0], -1)
        changed = np.any(flat[1:] != flat[0], axis=1)
        crossing |= changed[:n] | changed[n:]
    return crossing


def _fd_error(jacobian: Array, estimate: Array, keep: Array) -> float:
    """max |J - D| over the kept columns, relative to max |J| (absolute where J is 0)."""
    diff = np.abs(jacobian - estimate)[:, keep]
    top = float(np.max(np.abs(jacobian))) if jacobian.size else 0.0
    if not diff.size:
        return 0.0
    return float(diff.max()) / top if top > 0 else float(diff.max())


def check_jacobian_fd(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                      ) -> list[Outcome]:
    """Central differences, step h_i = cbrt(u) max(|x_i|, s_i) with s_i the input's scale;
    columns whose perturbations cross a kink or change a max-pool winner are left out.

    Where that misses the tolerance, the differences at h and h/2 are combined by Richardson
    extrapolation, (4 D(h/2) - D(h)) / 3, whose truncation error is O(h^4) instead of O(h^2):
    at strongly curved points (a layer norm of a constant token, where the variance is 0 and
    the curvature grows like eps^-3/2) the plain differences are off by 1e-5 while the
    Jacobian is exact, and the property would report a false violation."""
    model = ctx.model
    wrt, output = ctx.wrt, ctx.output
    jac = model.jacobian(inputs, output=output, wrt=wrt).jacobian
    x = inputs[wrt]
    batch, shape = x.shape[0], x.shape[1:]
    n = int(np.prod(shape))
    eps = float(np.finfo(x.dtype).eps)
    scale = ctx.scales.get(wrt, np.ones(shape))
    out = []
    for b in range(batch):
        xb = x[b].reshape(-1)
        h = eps ** (1 / 3) * np.maximum(np.abs(xb), np.asarray(scale, dtype=x.dtype).reshape(-1))
        fd, lin = _central_differences(model, inputs, b, wrt, output, h)
        jb = jac[b].reshape(-1, n)
        keep = ~_crossing(ctx, lin, n)
        err = _fd_error(jb, fd.reshape(-1, n), keep)
        detail = f"{int(keep.sum())} of {n} columns compared"
        if err > cfg.tol:
            half, lin_half = _central_differences(model, inputs, b, wrt, output, h / 2)
            keep &= ~_crossing(ctx, lin_half, n)
            extrapolated = half + (half - fd) / 3
            err = _fd_error(jb, extrapolated.reshape(-1, n), keep)
            detail = (f"{int(keep.sum())} of {n} columns compared, Richardson-extrapolated "
                      f"from steps h and h/2")
        if not keep.all():
            detail += f" ({int((~keep).sum())} cross a kink or a max-pool tie)"
        out.append(Outcome(err, (output,), detail, {"fd_jacobian": fd[None]}))
    return out


def check_jacobian_mp(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                      ) -> list[Outcome]:
    """The runtime Jacobian against a forward-mode evaluation in mpmath (``dps`` digits)."""
    model = ctx.model
    limit = int(cfg.settings["max_params"])
    count = parameter_count(model)
    if count > limit:
        raise Skip(f"the model has {count:,} weight values; jacobian_mp evaluates in mpmath "
                   f"and takes models of at most {limit:,} (raise max_params to insist)")
    dps = int(cfg.settings["dps"])
    jac = model.jacobian(inputs, output=ctx.output, wrt=ctx.wrt).jacobian
    out = []
    with mpmath.workdps(dps):
        kit = mp_kit(model, dps)
        for b in range(jac.shape[0]):
            sample = {k: v[b].astype(np.float64) for k, v in inputs.items()}
            ref, _ = reference_jacobian(model, sample, ctx.output, ctx.wrt, kit)
            out.append(Outcome(_rel(jac[b].astype(np.float64), ref), (ctx.output,),
                               f"against {dps}-digit mpmath", {"mp_jacobian": ref[None]}))
    return out


def check_gradient_row(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                       ) -> list[Outcome]:
    model = ctx.model
    jac = model.jacobian(inputs, output=ctx.output, wrt=ctx.wrt).jacobian
    y = model.evaluate(inputs)[ctx.output]
    c = _targets(ctx, y, cfg.settings["target"])
    grad = model.gradient(inputs, target=c, output=ctx.output, wrt=ctx.wrt)
    batch = len(y)
    rows = jac.reshape(batch, -1, *jac.shape[1 + y.ndim - 1:])[np.arange(batch), c]
    return [Outcome(_rel(grad[b], rows[b]), (ctx.output,), f"target {int(c[b])}")
            for b in range(batch)]


# ---------------------------------------------------------------- backends


def check_backend_parity(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                         ) -> list[Outcome]:
    model = ctx.model
    runners = ctx.cache.get("backends")
    if runners is None:
        runners, skipped = available_backends(model)
        ctx.cache["backends"], ctx.cache["backends_skipped"] = runners, skipped
    skipped_text = "; ".join(f"{n}: {r}" for n, r in ctx.cache["backends_skipped"])
    if not runners:
        raise Skip("no second backend is available: " + skipped_text)
    # the report says which backends ran (and why the others did not)
    ctx.cache.setdefault("notes", {})[cfg.name] = (
        "ran " + ", ".join(r.name for r in runners)
        + (f"; skipped {skipped_text}" if skipped_text else ""))
    default = baseline_of(ctx, inputs, cfg.settings["baseline"])
    x = inputs if len(inputs) > 1 else inputs[ctx.wrt]
    ref_out = model.outputs(inputs)
    ref_grad = model.gradient(inputs)
    ref_jac = model.jacobian(inputs).jacobian
    ref_dfd = model.dfd(inputs, baseline=default)
    composite = str(cfg.settings["composite"])
    ref_lrp = model.lrp(inputs, composite=composite)
    batch = len(ref_grad)
    errors = np.zeros(batch)
    where = [""] * batch
    for runner in runners:
        for pass_name in ("forward", "gradient", "jacobian", "dfd", "lrp"):
            value = _run_pass(runner, pass_name, x, default[ctx.wrt], composite)
            if pass_name == "forward":
                pairs = [(value[k], ref_out[k]) for k in ref_out]
            elif pass_name == "gradient":
                pairs = [(value, ref_grad)]
            elif pass_name == "jacobian":
                pairs = [(value, ref_jac)]
            elif pass_name == "dfd":
                pairs = [(value[0], ref_dfd.attributions[ctx.wrt])]
            else:
                pairs = [(value[0], ref_lrp.relevance[ctx.wrt])]
            for b in range(batch):
                e = max(_rel(np.asarray(a[b]), np.asarray(r[b])) for a, r in pairs)
                if e > errors[b] or math.isnan(e):
                    errors[b], where[b] = e, f"{runner.name}: {pass_name}"
    return [Outcome(float(errors[b]), (ctx.output,), where[b] or "all passes agree")
            for b in range(batch)]


def _run_pass(runner: Any, pass_name: str, x: Any, baseline: Array, composite: str) -> Any:
    if pass_name == "dfd":
        return runner.dfd(x, baseline)
    if pass_name == "lrp":
        return runner.lrp(x, composite)
    return getattr(runner, pass_name)(x)


# ---------------------------------------------------------------- activations


def check_multiplier_accuracy(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                              ) -> list[Outcome]:
    """The runtime's DFD multipliers at the (z0, z) pairs the model produces, against the
    50-digit mpmath multiplier (pbxc.symbolic.accuracy), in the accuracy bar's measure."""
    model = ctx.model
    nodes = _activation_nodes(model)
    if not nodes:
        raise Skip("the model has no elementwise activation")
    default = baseline_of(ctx, inputs, cfg.settings["baseline"])
    at = model.evaluate(inputs)
    base = model.evaluate(default)
    batch = len(next(iter(inputs.values())))
    worst = np.zeros(batch)
    where: list[tuple[str, ...]] = [()] * batch
    detail = [""] * batch
    limit = float(np.finfo(model.dtype).max)
    for node in nodes:
        calc = calculus_of(ctx, node)
        ref = calc.reference()
        z, z0 = at[node.inputs[0]], base[node.inputs[0]]
        m = model.activations.multiplier(node.name, z0, z)
        for b in range(batch):
            a, c, v = z0[b].ravel(), z[b].ravel(), m[b].ravel()
            pairs = np.unique(np.stack([a, c, v]), axis=1)
            refs = reference_values(ref, pairs[0], pairs[1])
            err, _ = relative_errors(pairs[2], refs, calc.slope_scale, limit)
            if err.size and float(err.max()) > worst[b]:
                k = int(np.argmax(err))
                worst[b], where[b] = float(err.max()), (node.name,)
                detail[b] = (f"m({float(pairs[0][k])!r}, {float(pairs[1][k])!r}) = {float(pairs[2][k])!r}, "
                             f"reference {mpmath.nstr(refs[k], 17)}")
    return [Outcome(float(worst[b]), where[b], detail[b]) for b in range(batch)]


def check_kinks(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig) -> list[Outcome]:
    """Preactivations within ``tol`` (relative) of a kink whose one-sided Jacobians differ;
    the measure is the smallest such distance (inf when there is none)."""
    model = ctx.model
    values = model.evaluate(inputs)
    batch = len(next(iter(inputs.values())))
    tol = cfg.tol
    kit = float_kit(model)
    out = []
    for b in range(batch):
        near: dict[str, tuple[Array, Array, Array, float]] = {}
        nearest, nodes = math.inf, []
        for node in _activation_nodes(model):
            z = values[node.inputs[0]][b].astype(np.float64)
            for point, left, right in kink_points(ctx, node):
                dist = np.abs(z - point) / max(1.0, abs(point))
                mask = dist <= tol
                if mask.any() and left != right:
                    prev = near.get(node.name)
                    lmask = mask if prev is None else prev[0] | mask
                    ls = np.where(mask, left, prev[1] if prev else 0.0)
                    rs = np.where(mask, right, prev[2] if prev else 0.0)
                    near[node.name] = (lmask, ls, rs, float(dist[mask].min()))
        if not near:
            out.append(Outcome(math.inf, (), "no preactivation near a kink"))
            continue
        sample = {k: v[b].astype(np.float64) for k, v in inputs.items()}
        kit.slope_override = {n: (m, ls) for n, (m, ls, _, _) in near.items()}
        left_j, _ = reference_jacobian(model, sample, ctx.output, ctx.wrt, kit)
        kit.slope_override = {n: (m, rs) for n, (m, _, rs, _) in near.items()}
        right_j, _ = reference_jacobian(model, sample, ctx.output, ctx.wrt, kit)
        kit.slope_override = {}
        differ = _rel(left_j, right_j) if np.abs(right_j).max() > 0 else float(
            np.abs(left_j - right_j).max())
        if differ <= 1e-12:
            out.append(Outcome(math.inf, (), "kinks nearby do not change the Jacobian"))
            continue
        for name, (_, _, _, d) in near.items():
            if d < nearest:
                nearest = d
            nodes.append(name)
        units = sum(int(v[0].sum()) for v in near.values())
        out.append(Outcome(nearest, tuple(nodes),
                           f"{units} preactivation(s) within {tol:g} of a kink; one-sided "
                           f"Jacobians differ by {differ:.3g} (relative)",
                           {"jacobian_left": left_j[None], "jacobian_right": right_j[None]}))
    return out


# ---------------------------------------------------------------- the registry

register(Property("summation_to_delta", "DFD contributions sum to the output's change "
                  "(seed 004, eq. 1)", 1e-12,
                  {"baseline": "zeros", "target": "predicted", "rule": "rescale"},
                  check_summation))
register(Property("linear_composition", "DFD contributions to a f_i + b f_j are a C_i + "
                  "b C_j (seed 004, eq. 2)", 1e-12, {"baseline": "zeros", "a": 2.0, "b": -0.5},
                  check_linear_composition))
register(Property("lrp_conservation", "LRP ledger: R_in + bias + stabiliser == R_out per "
                  "layer and overall", 1e-12, {"composite": "epsilon", "rule": ""},
                  check_lrp_conservation))
register(Property("lrp0_exact", "LRP-0: bias-free layers pass on exactly what they receive",
                  1e-12, {}, check_lrp0_exact))
register(Property("jacobian_fd", "the Jacobian against central finite differences", 1e-6, {},
                  check_jacobian_fd, search_cap=40))
register(Property("jacobian_mp", "the Jacobian against an mpmath evaluation (small models)",
                  1e-12, {"dps": 40, "max_params": MP_PARAM_LIMIT}, check_jacobian_mp,
                  search_cap=4, sample_cap=8))
register(Property("gradient_row", "the gradient equals the target's Jacobian row", 1e-12,
                  {"target": "predicted"}, check_gradient_row))
register(Property("backend_parity", "every available backend agrees with the NumPy runtime",
                  1e-10, {"baseline": "zeros", "composite": "epsilon"}, check_backend_parity,
                  search_cap=20))
register(Property("multiplier_accuracy", "DFD multipliers at the model's (z0, z) pairs "
                  "against 50-digit mpmath (the accuracy bar)", None, {"baseline": "zeros"},
                  check_multiplier_accuracy, search_cap=30, sample_cap=64))
register(Property("kinks", "no preactivation within tol of a kink where the one-sided "
                  "Jacobians differ", 1e-9, {}, check_kinks, lower_is_violation=True))


#: default tolerances are for float64; in float32 they grow by the ratio of the unit
#: roundoffs (2^29), up to this cap
FLOAT32_TOL_CAP = 1e-2


def default_tol(prop: Property, dtype: Any) -> float:
    dt = np.dtype(dtype)
    if prop.tol is None:
        return float(BAR[dt])
    if dt == np.dtype(np.float32) and not prop.lower_is_violation:
        ratio = float(np.finfo(np.float32).eps / np.finfo(np.float64).eps)
        return min(prop.tol * ratio, max(prop.tol, FLOAT32_TOL_CAP))
    return prop.tol
