"""Finite-perturbation feature interactions: exact mixed differences, no Taylor expansion.

PBX property (e) with the "virtual variation" of property (c): perturb feature i by d_i
(one step per feature), feature j by d_j, and both; the mixed difference

    I_ij = f(x + d_i + d_j) - f(x + d_i) - f(x + d_j) + f(x)

is what the model does when both move, beyond what each does alone. For i = j it is the
second difference f(x + 2 d_i) - 2 f(x + d_i) + f(x). Its second-order Taylor term is
d_i^T H d_j = delta_i delta_j H_ij (the cross term of (1/2) d^T H d with d = d_i + d_j: the
mixed difference cancels the two diagonal terms); the residual I_ij - delta_i delta_j H_ij is
O(|d|^3) on a smooth piece (specs/hessian.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import InputError
from pbxc.lower.plan import path_nodes, size
from pbxc.runtime.hessian import KinkReport, hessian, piece_sides
from pbxc.runtime.jacobian import linearize

Array = np.ndarray

#: perturbed points evaluated per forward call
POINTS_PER_CALL = 8192


@dataclass
class InteractionResult:
    """Per sample b and feature pair (i, j) of the flattened input."""

    interactions: Array     # (B, n, n) I_ij, exact mixed differences
    taylor: Array           # (B, n, n) delta_i delta_j H_ij, the Taylor term
    residual: Array         # (B, n, n) I - taylor
    steps: Array            # (B, n) delta_i as represented: (x_i + d_i) - x_i
    hessian: Array          # (B, n, n) H at x
    values: Array           # (B,) f(x)
    targets: Array          # (B,) the target index of each sample
    on: str                 # "logits" or "probabilities"
    crossed: Array          # (B, n, n) a kink lies between x and a point of the pair
    kinks: KinkReport
    feature_names: list[str]

    def pairs(self, sample: int | None = None) -> list[tuple[int, int]]:
        n = self.interactions.shape[1]
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def top_pairs(self, k: int = 10, sample: int | None = None) -> list[dict[str, Any]]:
        """The k pairs i < j with the largest |I_ij| (for one sample, or the mean |I_ij| over
        the batch), with their Taylor term and residual (batch means without ``sample``)."""
        if sample is None:
            inter, taylor = self.interactions.mean(axis=0), self.taylor.mean(axis=0)
            strength = np.abs(self.interactions).mean(axis=0)
            crossed = self.crossed.sum(axis=0)
        else:
            inter, taylor = self.interactions[sample], self.taylor[sample]
            strength = np.abs(inter)
            crossed = self.crossed[sample].astype(np.int64)
        n = inter.shape[0]
        iu, ju = np.triu_indices(n, 1)
        order = np.argsort(-strength[iu, ju], kind="stable")[:k]
        rows = []
        for r in order:
            i, j = int(iu[r]), int(ju[r])
            rows.append({"i": i, "j": j, "feature_i": self.feature_names[i],
                         "feature_j": self.feature_names[j],
                         "strength": float(strength[i, j]), "interaction": float(inter[i, j]),
                         "taylor": float(taylor[i, j]),
                         "residual": float(inter[i, j] - taylor[i, j]),
                         "crossed": int(crossed[i, j])})
        return rows

    def table(self, k: int = 10, sample: int | None = None) -> str:
        """The top-k pairs as a Markdown table."""
        rows = self.top_pairs(k, sample)
        mean = "mean " if sample is None else ""
        head = (f"| rank | feature i | feature j | {mean}abs I_ij | {mean}I_ij | "
                f"{mean}d_i^T H d_j | {mean}residual | kink crossed |")
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for rank, r in enumerate(rows, 1):
            lines.append(f"| {rank} | {r['feature_i']} | {r['feature_j']} | "
                         f"{r['strength']:.4g} | {r['interaction']:.4g} | {r['taylor']:.4g} | "
                         f"{r['residual']:.3g} | {r['crossed']} |")
        return "\n".join(lines)


def default_scale(x: Array) -> Array:
    """Per element: |x_i|, where that is 0 the batch's mean |x_i|, where that is 0 one."""
    mag = np.abs(x)
    mean = np.broadcast_to(mag.mean(axis=0, keepdims=True), mag.shape)
    out = np.where(mag > 0, mag, mean)
    return np.where(out > 0, out, 1.0).astype(x.dtype)


def resolve_steps(x: Array, step: Any, scale: Any) -> Array:
    """d = step * scale, broadcast to (B, *in); checked real and finite."""
    batch, in_shape = x.shape[0], x.shape[1:]
    pieces = []
    for name, value in (("step", step), ("scale", scale)):
        if value is None:
            pieces.append(default_scale(x))
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{name} must be real numbers, got dtype {arr.dtype}")
        try:
            arr = np.broadcast_to(arr, (batch, *in_shape))
        except ValueError:
            raise InputError(f"{name} has shape {list(arr.shape)}; expected a number, "
                             f"{list(in_shape)} or [batch, {', '.join(map(str, in_shape))}]"
                             ) from None
        pieces.append(arr)
    d = np.asarray(pieces[0] * pieces[1], dtype=x.dtype)
    if not np.isfinite(d).all():
        raise InputError("step * scale has non-finite values")
    return d


def _target_values(y: Array, rows: Array, on: str) -> Array:
    flat = y.reshape(len(y), -1)
    if on == "probabilities":
        flat = K.softmax(flat, 1)
    return flat[np.arange(len(flat)), rows]


def perturbed_points(x: Array, d: Array, features: Array | None = None
                     ) -> tuple[Array, Array, Array]:
    """For one sample x (n_all,), steps d (n_all,) and the k chosen features (default: all):
    the points x, x + d_i (i among them) and x + d_i + d_j (i <= j, upper triangle in
    row-major order), built as x, then p[i] += d_i, then p[j] += d_j; and the pair indices
    (iu, ju) into the chosen features."""
    chosen = np.arange(x.size) if features is None else np.asarray(features)
    k = chosen.size
    iu, ju = np.triu_indices(k)
    points = np.repeat(x[None], 1 + k + len(iu), axis=0)
    single = points[1:1 + k]
    single[np.arange(k), chosen] += d[chosen]
    pair = points[1 + k:]
    rows = np.arange(len(iu))
    pair[rows, chosen[iu]] += d[chosen[iu]]
    pair[rows, chosen[ju]] += d[chosen[ju]]
    return points, iu, ju


def interactions(model: Any, inputs: Mapping[str, Array], output: str, wrt: str,
                 target: Any = None, on: str = "logits", step: Any = 0.1,
                 scale: Any = None, features: Any = None) -> InteractionResult:
    """Mixed differences of the target output for every feature pair (see the module doc);
    ``features``: indices into the flattened input to restrict the pairs to (the matrices
    are then (B, k, k) over those features, in that order)."""
    x = inputs[wrt]
    batch, in_shape = x.shape[0], x.shape[1:]
    n_all = size(in_shape)
    chosen = np.arange(n_all) if features is None else np.asarray(features, dtype=np.int64)
    if chosen.ndim != 1 or chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n_all \
            or len(set(chosen.tolist())) != chosen.size:
        raise InputError(f"features must be distinct indices in [0, {n_all}), got {features!r}")
    n = chosen.size
    d = resolve_steps(x, step, scale).reshape(batch, n_all)
    res = hessian(model, inputs, output, wrt, target, on)
    rows = np.asarray(res.targets)
    nodes = path_nodes(model.graph, wrt, output)
    per_sample = 1 + n + n * (n + 1) // 2
    inter = np.empty((batch, n, n), dtype=x.dtype)
    crossed = np.zeros((batch, n, n), dtype=bool)
    crossed_nodes: list[dict[str, int]] = []
    values = np.empty(batch, dtype=x.dtype)
    steps = np.empty((batch, n), dtype=x.dtype)
    flat_x = x.reshape(batch, n_all)
    for b in range(batch):
        points, iu, ju = perturbed_points(flat_x[b], d[b], chosen)
        steps[b] = points[1 + np.arange(n), chosen] - flat_x[b][chosen]
        f = np.empty(per_sample, dtype=x.dtype)
        changed: dict[str, Array] = {}      # node -> per point: a unit changed piece
        reference: dict[str, Array] = {}    # node -> the pieces at x
        for start in range(0, per_sample, POINTS_PER_CALL):
            chunk = points[start:start + POINTS_PER_CALL]
            sub = {k: np.repeat(v[b:b + 1], len(chunk), axis=0) for k, v in inputs.items()}
            sub[wrt] = chunk.reshape(len(chunk), *in_shape)
            lin = linearize(model, sub, derivatives=False)
            f[start:start + len(chunk)] = _target_values(lin.values[output],
                                                         np.full(len(chunk), rows[b]), on)
            for name, side in piece_sides(model, lin, nodes).items():
                if start == 0:   # row 0 of the first chunk is x itself
                    changed[name] = np.zeros(per_sample, dtype=bool)
                    reference[name] = side[0]
                changed[name][start:start + len(chunk)] = np.any(side != reference[name],
                                                                 axis=1)
        f0, fi, fij = f[0], f[1:1 + n], f[1 + n:]
        mixed = ((fij - fi[iu]) - fi[ju]) + f0
        inter[b][iu, ju] = mixed
        inter[b][ju, iu] = mixed
        values[b] = f0
        counts: dict[str, int] = {}
        for name, flags in changed.items():
            single, pair = flags[1:1 + n], flags[1 + n:]
            hit = pair | single[iu] | single[ju]
            if hit.any():
                crossed[b][iu, ju] |= hit
                crossed[b][ju, iu] |= hit
                counts[name] = int(hit.sum())
        crossed_nodes.append(counts)
    h = res.hessian.reshape(batch, n_all, n_all)[:, chosen][:, :, chosen]
    taylor = steps[:, :, None] * steps[:, None, :] * h
    names = [_feature_names(model, wrt, n_all)[i] for i in chosen]
    kinks = KinkReport(res.kinks.at_x, crossed_nodes)
    return InteractionResult(inter, taylor, inter - taylor, steps, h, values, rows, on,
                             crossed, kinks, names)


def _feature_names(model: Any, wrt: str, n: int) -> list[str]:
    names = model.feature_names.get(wrt)
    if names and len(names) == n:
        return [str(s) for s in names]
    shape = model.input_shapes[wrt]
    return [f"{wrt}[{', '.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
