"""Generative augmentative explanation (GAX): heatmaps optimised to raise the CO score.

h = tanh(w * x) + b, with w initialised to ones (the heatmap starts as tanh(x) + b). Each
sample has its own w, trained with Adam on (eq. 6 of Tjoa et al.)

    loss(w) = -s_co(x, h) + l_s / < (h - x + eps)^2 / (|x| + eps) >

where < . > averages over the elements of one sample. The paper writes x + eps in the
denominator for inputs normalised to [0, 1]; |x| + eps is the same there and keeps the
similarity term positive for inputs with negative entries. The gradient of s_co w.r.t. h is a
VJP of the model at x + h with seed kappa (pbxc's own reverse pass); the chain through the
similarity term and through h = tanh(w x) + b is written out by hand. No autodiff library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbxc.evaluate.co_score import co_score_gradient, model_scores, softmax


@dataclass
class GaxResult:
    heatmaps: np.ndarray            # (B, *in_shape): h = tanh(w x) + b at the step each stopped
    weights: np.ndarray             # (B, *in_shape): w
    history: np.ndarray             # (B, steps + 1): s_co after each step; NaN once stopped
    loss: np.ndarray                # (B, steps + 1): the loss after each step; NaN once stopped
    steps: np.ndarray               # (B,): steps taken
    reached: np.ndarray             # (B,): whether s_co reached the target
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)   # step -> heatmaps

    @property
    def final_scores(self) -> np.ndarray:
        return self.history[np.arange(len(self.steps)), self.steps]


def heatmap(w: np.ndarray, x: np.ndarray, bias: float) -> np.ndarray:
    return np.tanh(w * x) + bias


def gax_loss(model: Any, x: np.ndarray, labels: np.ndarray, w: np.ndarray, *,
             bias: float = 0.01, similarity: float = 100.0, eps: float = 1e-4,
             use_softmax: bool = False, output: str | None = None, base: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: the loss, its gradient w.r.t. ``w``, and s_co (eq. 6)."""
    t = np.tanh(w * x)
    h = t + bias
    fx = model_scores(model, x, output, use_softmax) if base is None else base
    value, grad_h = co_score_gradient(model, x + h, labels, use_softmax=use_softmax,
                                      output=output)
    from pbxc.evaluate.co_score import kappa

    k = kappa(labels, fx.shape[1], fx.dtype)
    s_co = value - np.einsum("bc,bc->b", k, fx)
    loss = -s_co
    dloss_dh = -grad_h
    if similarity:
        axes = tuple(range(1, x.ndim))
        n = int(np.prod(x.shape[1:]))
        denom = np.abs(x) + eps
        d = h - x + eps
        mean_q = (d * d / denom).mean(axis=axes)
        loss = loss + similarity / mean_q
        shape = (-1,) + (1,) * (x.ndim - 1)
        dloss_dh = dloss_dh - (similarity / mean_q ** 2).reshape(shape) * (2.0 * d / denom) / n
    grad_w = dloss_dh * (1.0 - t * t) * x
    return loss, grad_w, s_co


def gax(model: Any, x: np.ndarray, labels: np.ndarray, *, target_score: float = 48.0,
        max_steps: int = 100, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
        bias: float = 0.01, similarity: float = 100.0, eps: float = 1e-4,
        use_softmax: bool = False, output: str | None = None,
        snapshot_steps: Sequence[int] = (), progress: bool | None = False) -> GaxResult:
    """Optimise one w per sample with Adam until s_co >= ``target_score`` or ``max_steps``.
    A sample that reaches the target stops (its w, heatmap and history freeze)."""
    from tqdm import tqdm

    x = np.asarray(x)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    x = x.astype(dtype)
    b = len(x)
    w = np.ones_like(x)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    history = np.full((b, max_steps + 1), np.nan)
    losses = np.full((b, max_steps + 1), np.nan)
    steps = np.zeros(b, dtype=np.int64)
    active = np.ones(b, dtype=bool)
    base = model_scores(model, x, output, use_softmax)
    snapshots: dict[int, np.ndarray] = {}
    want = set(int(s) for s in snapshot_steps)
    b1, b2 = betas
    for step in tqdm(range(max_steps + 1), desc="gax", unit="step", disable=None if progress
                     is None else not progress, leave=False):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        loss, grad, s_co = gax_loss(model, x[idx], labels[idx], w[idx], bias=bias,
                                    similarity=similarity, eps=eps, use_softmax=use_softmax,
                                    output=output, base=base[idx])
        history[idx, step] = s_co
        losses[idx, step] = loss
        steps[idx] = step
        if step in want:
            snapshots[step] = heatmap(w, x, bias)
        done = s_co >= target_score
        active[idx[done]] = False
        if step == max_steps:
            break
        go = idx[~done]
        g = grad[~done]
        m[go] = b1 * m[go] + (1 - b1) * g
        v[go] = b2 * v[go] + (1 - b2) * g * g
        # Adam's bias correction uses each sample's own step count (all started together)
        t = step + 1
        w[go] = w[go] - lr * (m[go] / (1 - b1 ** t)) / (np.sqrt(v[go] / (1 - b2 ** t)) + 1e-8)
    reached = history[np.arange(b), steps] >= target_score
    return GaxResult(heatmap(w, x, bias), w, history, losses, steps, reached, snapshots)


__all__ = ["GaxResult", "gax", "gax_loss", "heatmap", "softmax"]
