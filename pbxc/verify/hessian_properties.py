"""The second-order properties of ``pbxc verify`` (specs/hessian.md, specs/verify.md).

* ``hessian_symmetry``: H - H^T of the forward-over-reverse Hessian, whose two triangles come
  from different products (the forward recursion is symmetric by construction);
* ``hessian_fd``: H against central differences of pbxc's own gradient;
* ``hessian_mp``: H against central differences of the mpmath forward-mode Jacobian at
  ``dps`` digits (independent of the runtime's passes; small models only);
* ``taylor_residual``: the residual of the mixed difference, I_ij - d_i^T H d_j, shrinks as
  O(|d|^3) when the steps halve.

Each registers into :data:`pbxc.verify.properties.PROPERTIES`, so the search, the report and
counterexample replay treat them like every other property.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mpmath
import numpy as np

from pbxc.errors import UnsupportedOp
from pbxc.lower.plan import path_nodes
from pbxc.ops import OpKind
from pbxc.runtime.hessian import piece_sides
from pbxc.runtime.jacobian import linearize
from pbxc.verify.lanes import MP_PARAM_LIMIT, Kit, apply, mp_kit, parameter_count
from pbxc.verify.properties import (
    CheckConfig,
    Context,
    Outcome,
    Property,
    Skip,
    _rel,
    register,
)

Array = np.ndarray

#: taylor_residual fits on the pairs among at most this many features (the largest H rows)
MAX_TAYLOR_FEATURES = 16
#: taylor_residual halves its steps at most this many more times to reach the asymptotic
#: regime (0.02 down to 2e-5)
MAX_EXTRA_HALVINGS = 10


def _target_spec(cfg: CheckConfig) -> Any:
    t = cfg.settings.get("target", "predicted")
    return None if t in (None, "predicted") else int(t)


def _hessian(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig, mode: str = "auto"
             ) -> Any:
    try:
        return ctx.model.hessian(inputs, target=_target_spec(cfg), output=ctx.output,
                                 wrt=ctx.wrt, on=str(cfg.settings.get("on", "logits")),
                                 mode=mode)
    except UnsupportedOp as err:
        raise Skip(str(err)) from None


def _rel_or_abs(a: Array, b: Array) -> float:
    return _rel(a, b) if b.size and float(np.max(np.abs(b))) > 0 else (
        float(np.max(np.abs(a - b))) if a.size else 0.0)


def check_hessian_symmetry(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                           ) -> list[Outcome]:
    """max |H - H^T| / max |H| of the forward-over-reverse Hessian, per sample."""
    res = _hessian(ctx, inputs, cfg, mode="reverse")
    batch = len(res.hessian)
    h = res.hessian.reshape(batch, int(np.sqrt(res.hessian[0].size)), -1)
    out = []
    for b in range(batch):
        out.append(Outcome(_rel_or_abs(h[b], h[b].T), (ctx.output,),
                           f"target {int(res.targets[b])}; {res.kinks.describe(b)}"))
    return out


def check_hessian_fd(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                     ) -> list[Outcome]:
    """Central differences of the gradient, step h_j = cbrt(u) max(|x_j|, s_j); columns whose
    perturbations cross a kink or change a max-pool winner are left out."""
    model = ctx.model
    wrt, output = ctx.wrt, ctx.output
    res = _hessian(ctx, inputs, cfg)
    x = inputs[wrt]
    batch, shape = x.shape[0], x.shape[1:]
    n = int(np.prod(shape))
    eps = float(np.finfo(x.dtype).eps)
    scale = np.asarray(ctx.scales.get(wrt, np.ones(shape)), dtype=x.dtype).reshape(-1)
    nodes = path_nodes(model.graph, wrt, output)
    on = str(cfg.settings.get("on", "logits"))
    out = []
    for b in range(batch):
        xb = x[b].reshape(-1)
        h = eps ** (1 / 3) * np.maximum(np.abs(xb), scale)
        steps = np.eye(n, dtype=x.dtype) * h[:, None]
        pert = np.concatenate([xb[None], xb + steps, xb - steps]).reshape(2 * n + 1, *shape)
        h_eff = ((xb + h) - (xb - h)).astype(np.float64)
        batch_in = {k: np.repeat(v[b:b + 1], 2 * n + 1, axis=0) for k, v in inputs.items()}
        batch_in[wrt] = pert
        target = np.full(2 * n + 1, int(res.targets[b]))
        grad = _gradient_of(model, batch_in, target, output, wrt, on)
        fd = ((grad[1:n + 1] - grad[n + 1:]).reshape(n, n) / h_eff[:, None]).T   # (i, j)
        lin = linearize(model, batch_in, derivatives=False)
        crossing = np.zeros(n, dtype=bool)
        for side in piece_sides(model, lin, nodes).values():
            changed = np.any(side[1:] != side[0], axis=1)
            crossing |= changed[:n] | changed[n:]
        hb = res.hessian[b].reshape(n, n)
        keep = ~crossing
        err = _rel_or_abs(fd[:, keep], hb[:, keep]) if keep.any() else 0.0
        detail = f"{int(keep.sum())} of {n} columns compared"
        if crossing.any():
            detail += f" ({int(crossing.sum())} cross a kink or a max-pool tie)"
        out.append(Outcome(err, (output,), detail, {"fd_hessian": fd[None]}))
    return out


def _gradient_of(model: Any, inputs: Mapping[str, Array], target: Array, output: str,
                 wrt: str, on: str) -> Array:
    """d f_c / dx of the logits, or of the softmax probabilities (by the Jacobian's rows)."""
    if on == "logits":
        return np.asarray(model.gradient(inputs, target=target, output=output, wrt=wrt)
                          ).reshape(len(target), -1)
    batch = len(target)
    y = model.evaluate(inputs)[output].reshape(batch, -1)
    jac = model.jacobian(inputs, output=output, wrt=wrt).jacobian.reshape(batch, y.shape[1], -1)
    s = np.exp(y - y.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    rows = np.arange(batch)
    sc = s[rows, target]
    # d s_c = s_c (J_c - s^T J)
    return sc[:, None] * (jac[rows, target] - np.einsum("bk,bkn->bn", s, jac))


# ---------------------------------------------------------------- mpmath


def mp_jacobian(model: Any, sample: Mapping[str, Array], output: str, wrt: str, kit: Kit
                ) -> Array:
    """d output / d wrt at one sample whose inputs are object arrays of mpmath numbers:
    (n_out, n_in) mpmath numbers, by the verifier's independent lanes evaluator."""
    n = int(np.size(sample[wrt]))
    values: dict[str, Array] = {}
    for node in model.nodes:
        if node.kind is OpKind.INPUT:
            x = np.asarray(sample[node.name], dtype=object)
            tangents = (np.eye(n).reshape(n, *x.shape) if node.name == wrt
                        else np.zeros((n, *x.shape)))
            values[node.name] = np.concatenate([x[None], kit.const(tangents)])
            continue
        values[node.name] = apply(node, [values[i] for i in node.inputs],
                                  model.params[node.name], kit)
        if node.name == output:
            break
    t = values[output][1:]
    return np.moveaxis(t.reshape(t.shape[0], -1), 0, -1)


def mp_hessian(model: Any, sample: Mapping[str, Array], output: str, wrt: str, target: int,
               dps: int, on: str = "logits") -> Array:
    """The target's Hessian at one sample, float64 (n, n): central differences of the mpmath
    Jacobian with step 10^(-dps/3) max(1, |x_j|), truncation and rounding both far below
    float64 (specs/hessian.md)."""
    kit = mp_kit(model, dps)
    x = kit.const(np.asarray(sample[wrt], dtype=np.float64)).reshape(-1)
    n = x.size
    shape = np.shape(sample[wrt])
    others = {k: kit.const(np.asarray(v, dtype=np.float64)) for k, v in sample.items()
              if k != wrt}
    step = mpmath.mpf(10) ** (-(dps // 3))
    hess = np.empty((n, n), dtype=object)

    def target_row(point: Array) -> Array:
        jac = mp_jacobian(model, {**others, wrt: point.reshape(shape)}, output, wrt, kit)
        if on == "logits":
            return jac[target]
        # the softmax's gradient: s_c (J_c - s^T J), with the logits in mpmath too
        lanes_y = _mp_values(model, {**others, wrt: point.reshape(shape)}, output, kit)
        top = max(lanes_y)
        e = [mpmath.exp(v - top) for v in lanes_y]
        total = mpmath.fsum(e)
        s = [v / total for v in e]
        mean = [mpmath.fsum(s[k] * jac[k, j] for k in range(len(s))) for j in range(n)]
        return np.array([s[target] * (jac[target, j] - mean[j]) for j in range(n)],
                        dtype=object)

    for j in range(n):
        h = step * max(mpmath.mpf(1), abs(x[j]))
        up, down = x.copy(), x.copy()
        up[j] = x[j] + h
        down[j] = x[j] - h
        hess[:, j] = (target_row(up) - target_row(down)) / (2 * h)
    return np.vectorize(float, otypes=[np.float64])(hess)


def _mp_values(model: Any, sample: Mapping[str, Array], output: str, kit: Kit) -> list[Any]:
    values: dict[str, Array] = {}
    for node in model.nodes:
        if node.kind is OpKind.INPUT:
            x = np.asarray(sample[node.name], dtype=object)
            values[node.name] = x[None]
            continue
        values[node.name] = apply(node, [values[i] for i in node.inputs],
                                  model.params[node.name], kit)
        if node.name == output:
            break
    return list(values[output][0].reshape(-1))


#: inputs hessian_mp differentiates along at most (each costs two mpmath Jacobians)
MP_INPUT_LIMIT = 32


def check_hessian_mp(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                     ) -> list[Outcome]:
    model = ctx.model
    limit = int(cfg.settings["max_params"])
    count = parameter_count(model)
    if count > limit:
        raise Skip(f"the model has {count:,} weight values; hessian_mp evaluates in mpmath "
                   f"and takes models of at most {limit:,} (raise max_params to insist)")
    width = int(np.prod(model.input_shapes[ctx.wrt]))
    max_inputs = int(cfg.settings.get("max_inputs", MP_INPUT_LIMIT))
    if width > max_inputs:
        # central differences of the mpmath Jacobian: 2 x inputs mpmath passes per sample
        raise Skip(f"the input has {width} values; hessian_mp differentiates the mpmath "
                   f"Jacobian along each and takes inputs of at most {max_inputs} "
                   "(raise max_inputs to insist)")
    dps = int(cfg.settings["dps"])
    on = str(cfg.settings.get("on", "logits"))
    res = _hessian(ctx, inputs, cfg)
    batch = len(res.hessian)
    out = []
    with mpmath.workdps(dps):
        for b in range(batch):
            sample = {k: v[b].astype(np.float64) for k, v in inputs.items()}
            ref = mp_hessian(model, sample, ctx.output, ctx.wrt, int(res.targets[b]), dps, on)
            got = res.hessian[b].reshape(ref.shape).astype(np.float64)
            detail = f"against {dps}-digit mpmath; {res.kinks.describe(b)}"
            if res.kinks.at_x[b]:
                # at a kink f'' is a convention and the differences straddle it
                out.append(Outcome(0.0, (ctx.output,), detail + " (not compared)"))
                continue
            out.append(Outcome(_rel_or_abs(got, ref), (ctx.output,), detail,
                               {"mp_hessian": ref[None]}))
    return out


# ---------------------------------------------------------------- Taylor residual


def check_taylor_residual(ctx: Context, inputs: dict[str, Array], cfg: CheckConfig
                          ) -> list[Outcome]:
    """Order deficit max(0, 3 - p) of the mixed difference's residual R(d) = I_ij - d_i^T H d_j,
    p the median of log2 |R(d)| / |R(d / 2)| over the halvings and the ``pairs`` pairs with the
    largest residuals (kink crossings and residuals near rounding left out)."""
    model = ctx.model
    step = float(cfg.settings["step"])
    halvings = int(cfg.settings["halvings"])
    top = int(cfg.settings["pairs"])
    on = str(cfg.settings.get("on", "logits"))
    x = inputs[ctx.wrt]
    eps = float(np.finfo(x.dtype).eps)
    batch = len(x)
    out = []
    for b in range(batch):
        sample = {k: v[b:b + 1] for k, v in inputs.items()}
        out += _taylor_residual_sample(model, ctx, sample, cfg, step, halvings, top, on, eps)
    return out


def _taylor_residual_sample(model: Any, ctx: Context, inputs: dict[str, Array],
                            cfg: CheckConfig, step: float, halvings: int, top: int, on: str,
                            eps: float) -> list[Outcome]:
    x = inputs[ctx.wrt]
    n_all = int(np.prod(x.shape[1:]))
    features = None
    if n_all > MAX_TAYLOR_FEATURES:   # the features with the largest Hessian rows
        try:
            h = _hessian(ctx, inputs, cfg).hessian.reshape(n_all, n_all)
        except UnsupportedOp as err:
            raise Skip(str(err)) from None
        features = np.sort(np.argsort(-np.abs(h).sum(axis=1), kind="stable")
                           [:MAX_TAYLOR_FEATURES])

    def at(k: int) -> Any:
        return model.interactions(inputs, target=_target_spec(cfg), step=step / 2 ** k,
                                  output=ctx.output, wrt=ctx.wrt, on=on, features=features)

    try:
        results = [at(k) for k in range(halvings + 1)]
        out = _residual_orders(ctx, results, step, top, eps, x.dtype)
        # the O(|d|^3) law is asymptotic: where the function bends on a smaller scale than
        # the first step (a layer norm of a constant token: sqrt(eps) ~ 0.003 against 0.02)
        # the first halvings are not yet in it; halve on, and fit the last ones
        extra = 0
        while (extra < MAX_EXTRA_HALVINGS and any(o.measured > cfg.tol for o in out)
               and any(not o.detail.startswith("no pair") for o in out)):
            extra += 1
            results.append(at(halvings + extra))
            out = _residual_orders(ctx, results[extra:], step / 2 ** extra, top, eps, x.dtype)
    except UnsupportedOp as err:
        raise Skip(str(err)) from None
    return out


def _residual_orders(ctx: Context, results: list[Any], step: float, top: int, eps: float,
                     dtype: Any) -> list[Outcome]:
    """Per sample, the order deficit fitted on ``results`` (interactions at ``step``,
    ``step / 2``, ...)."""
    halvings = len(results) - 1
    batch = len(results[0].values)
    n = results[0].interactions.shape[1]
    iu, ju = np.triu_indices(n, 1) if n > 1 else np.triu_indices(n)
    out = []
    for b in range(batch):
        resid = np.stack([np.abs(r.residual[b][iu, ju]) for r in results])     # (K+1, pairs)
        crossed = np.any(np.stack([r.crossed[b][iu, ju] for r in results]), axis=0)
        scale = abs(float(results[0].values[b])) + float(np.abs(results[-1].interactions[b])
                                                         .max())
        floor = 1e3 * eps * max(scale, np.finfo(dtype).tiny)
        usable = ~crossed & np.all(resid > floor, axis=0)
        arrays = {"residuals": resid[None], "steps": np.array([step / 2 ** k for k in
                                                               range(halvings + 1)])[None]}
        if not usable.any():
            out.append(Outcome(0.0, (ctx.output,), f"no pair with a residual above rounding "
                               f"({int(crossed.sum())} cross a kink); nothing to fit", arrays))
            continue
        idx = np.flatnonzero(usable)
        idx = idx[np.argsort(-resid[0, idx])][:top]
        orders = np.log2(resid[:-1, idx] / resid[1:, idx])
        order = float(np.median(orders))
        if not math.isfinite(order):
            order = 0.0
        worst = int(idx[np.argmin(orders.min(axis=0))])
        names = results[0].feature_names
        out.append(Outcome(max(0.0, 3.0 - order), (ctx.output,),
                           f"residual order {order:.2f} over {len(idx)} pair(s) from step "
                           f"{step:.3g}; lowest at "
                           f"({names[iu[worst]]}, {names[ju[worst]]}), residuals "
                           + ", ".join(f"{v:.3g}" for v in resid[:, worst]), arrays))
    return out


register(Property("hessian_symmetry", "the forward-over-reverse Hessian is symmetric", 1e-10,
                  {"target": "predicted", "on": "logits"}, check_hessian_symmetry,
                  search_cap=20))
register(Property("hessian_fd", "the Hessian against central differences of the gradient",
                  1e-6, {"target": "predicted", "on": "logits"}, check_hessian_fd,
                  search_cap=20))
register(Property("hessian_mp", "the Hessian against mpmath (small models)", 1e-12,
                  {"target": "predicted", "on": "logits", "dps": 40,
                   "max_params": MP_PARAM_LIMIT, "max_inputs": MP_INPUT_LIMIT},
                  check_hessian_mp, search_cap=2,
                  sample_cap=4))
register(Property("taylor_residual", "the mixed difference's Taylor residual shrinks as "
                  "O(|d|^3)", 0.5, {"target": "predicted", "on": "logits", "step": 0.02,
                                    "halvings": 2, "pairs": 10},
                  check_taylor_residual, search_cap=10, sample_cap=16))
