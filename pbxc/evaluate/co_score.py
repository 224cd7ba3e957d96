"""The confidence-optimisation (CO) score of Tjoa et al. and the augmentative explanation (AX).

s_co(x, h) = kappa . [f(AX(x, h)) - f(x)]  (eq. 5), with kappa_j = 1 for the true class j and
-1/(C-1) for every other class; AX is ``x + h`` ("sum", the paper's main form) or ``x * h``
("product"). Heatmaps are normalised per sample to h / max|h| before the AX step. ``f`` is the
raw output (logits) by default, or its softmax. See specs/evaluate.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbxc.errors import InputError
from pbxc.lower.plan import path_nodes
from pbxc.runtime.jacobian import linearize, reverse_sweep

AX_MODES = ("sum", "product")


# ---------------------------------------------------------------- the score


def kappa(labels: np.ndarray, n_classes: int, dtype: Any = np.float64) -> np.ndarray:
    """Score constants (B, C): 1 at the true class, -1/(C-1) elsewhere."""
    labels = np.asarray(labels)
    if n_classes < 2:
        raise InputError(f"the CO score needs at least 2 classes, got {n_classes}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be a 1-D integer array, got {labels.dtype}{list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"labels must lie in [0, {n_classes - 1}], got "
                         f"[{labels.min()}, {labels.max()}]")
    k = np.full((len(labels), n_classes), -1.0 / (n_classes - 1), dtype=dtype)
    k[np.arange(len(labels)), labels] = 1.0
    return k


def normalize_heatmaps(h: np.ndarray) -> np.ndarray:
    """h / max|h| per sample (axis 0 is the batch); an all-zero heatmap stays zero."""
    h = np.asarray(h)
    flat = h.reshape(len(h), -1)
    m = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(len(h))
    scale = np.where(m > 0, m, 1.0).astype(h.dtype)
    return (flat / scale[:, None]).reshape(h.shape)


def augment(x: np.ndarray, h: np.ndarray, mode: str = "sum") -> np.ndarray:
    """The AX step: ``x + h`` or ``x * h``."""
    if mode == "sum":
        return x + h
    if mode == "product":
        return x * h
    raise InputError(f"unknown AX mode '{mode}'; use one of {', '.join(AX_MODES)}")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def model_scores(model: Any, x: np.ndarray, output: str | None = None,
                 use_softmax: bool = False) -> np.ndarray:
    """f(x): the raw output (B, C), or its softmax."""
    out = output or model.output_names[0]
    y = model.outputs(x)[out]
    y = y.reshape(len(y), -1)
    return softmax(y) if use_softmax else y


def co_score(model: Any, x: np.ndarray, h: np.ndarray, labels: np.ndarray, *,
             mode: str = "sum", use_softmax: bool = False, output: str | None = None,
             base: np.ndarray | None = None) -> np.ndarray:
    """s_co(x, h) per sample (eq. 5). ``h`` is used as given (normalise it first).
    ``base`` may pass f(x) when it is already known."""
    fx = model_scores(model, x, output, use_softmax) if base is None else base
    fxh = model_scores(model, augment(x, h, mode), output, use_softmax)
    k = kappa(labels, fx.shape[1], fx.dtype)
    return np.einsum("bc,bc->b", k, fxh - fx)


def co_score_gradient(model: Any, x_aug: np.ndarray, labels: np.ndarray, *,
                      use_softmax: bool = False, output: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """kappa . f(x_aug) and its gradient w.r.t. x_aug, from pbxc's reverse pass: a VJP of the
    model at ``x_aug`` with seed kappa (through the softmax by hand when ``use_softmax``)."""
    out = output or model.output_names[0]
    wrt = model.input_names[0]
    inputs = model.prepare_inputs(x_aug)
    lin = linearize(model, inputs)
    y = lin.values[out]
    flat = y.reshape(len(y), -1)
    k = kappa(labels, flat.shape[1], flat.dtype)
    if use_softmax:
        p = softmax(flat)
        value = np.einsum("bc,bc->b", k, p)
        seed = p * (k - value[:, None])          # J_softmax^T kappa
    else:
        value = np.einsum("bc,bc->b", k, flat)
        seed = k
    seed = seed.reshape(len(y), 1, *y.shape[1:])
    grad = reverse_sweep(model, lin, wrt, out, path_nodes(model.graph, wrt, out), seed)[:, 0]
    return value, grad


# ---------------------------------------------------------------- heatmap methods

HeatmapFn = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


def _lrp(spec: str) -> HeatmapFn:
    def run(model: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        from pbxc.runtime.lrp_rules import COMPOSITES

        wrt = model.input_names[0]
        if spec in COMPOSITES:
            return np.asarray(model.lrp(x, target=target, composite=spec).relevance[wrt])
        return np.asarray(model.lrp(x, target=target, rule=spec).relevance[wrt])
    return run


def _dfd(baseline: str) -> HeatmapFn:
    def run(model: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        wrt = model.input_names[0]
        data = x if baseline == "mean" else None
        return np.asarray(model.dfd(x, baseline=baseline, target=target, data=data)
                          .attributions[wrt])
    return run


def _random(model: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1.0, 1.0, size=x.shape).astype(x.dtype)


#: Built-in heatmap methods by name; ``lrp-RULE`` and ``lrp-COMPOSITE`` also resolve.
METHODS: dict[str, HeatmapFn] = {
    "gradient": lambda m, x, t: np.asarray(m.gradient(x, target=t)),
    "input_x_gradient": lambda m, x, t: np.asarray(m.input_x_gradient(x, target=t)),
    "lrp-epsilon": _lrp("epsilon"),
    "dfd": _dfd("zeros"),
    "dfd-mean": _dfd("mean"),
    "input": lambda m, x, t: np.array(x, copy=True),   # h = x: the paper's uninformative control
    "random": _random,                                   # uniform noise in [-1, 1], seed 0
}


def heatmap_method(name: str) -> HeatmapFn:
    """The heatmap function for ``name``: a key of METHODS, or ``lrp-SPEC`` with an LRP rule
    spec ("lrp-zplus", "lrp-epsilon:0.25") or composite name ("lrp-epsilon-gamma-box")."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("lrp-") and len(name) > 4:
        return _lrp(name[4:])
    raise InputError(f"unknown heatmap method '{name}'; use one of "
                     f"{', '.join([*METHODS, 'gax', 'lrp-RULE', 'lrp-COMPOSITE'])}")


# ---------------------------------------------------------------- the gap statistic


def rank_biserial(a: np.ndarray, b: np.ndarray) -> float:
    """Rank-biserial correlation r = 2 P(A > B) + P(A = B) - 1 = 2U/(n m) - 1 (Mann-Whitney U
    of sample ``a`` against ``b``): +1 when every a exceeds every b, -1 the other way round."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        return float("nan")
    below = np.searchsorted(b, a, side="left")      # b < a
    tied = np.searchsorted(b, a, side="right") - below
    u = float(below.sum() + 0.5 * tied.sum())
    return 2.0 * u / (len(a) * len(b)) - 1.0


@dataclass
class Gap:
    """Correct vs wrong predictions: the difference of median CO scores and the rank-biserial
    effect size (how often a correct sample outscores a wrong one, rescaled to [-1, 1])."""

    n_correct: int
    n_wrong: int
    median_correct: float
    median_wrong: float
    median_gap: float
    rank_biserial: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gap_statistic(scores: np.ndarray, correct: np.ndarray) -> Gap:
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    a, b = scores[correct], scores[~correct]
    med_a = float(np.median(a)) if len(a) else float("nan")
    med_b = float(np.median(b)) if len(b) else float("nan")
    return Gap(len(a), len(b), med_a, med_b, med_a - med_b, rank_biserial(a, b))


# ---------------------------------------------------------------- a whole evaluation


@dataclass
class MethodScore:
    """The CO scores of one heatmap method, for each AX mode."""

    method: str
    scores: dict[str, np.ndarray]            # mode -> (B,)
    accuracy_after: dict[str, float]         # mode -> accuracy of argmax f(AX(x, h))
    gaps: dict[str, Gap]
    heatmaps: np.ndarray                     # normalised, (B, *in_shape)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for mode, s in self.scores.items():
            out[mode] = {
                "mean": float(np.mean(s)), "median": float(np.median(s)),
                "q25": float(np.quantile(s, 0.25)), "q75": float(np.quantile(s, 0.75)),
                "positive_fraction": float(np.mean(s > 0)),
                "accuracy_after": self.accuracy_after[mode],
                "gap": self.gaps[mode].as_dict(),
            }
        out.update({k: v for k, v in self.extra.items() if isinstance(v, (int, float, str))})
        return out


@dataclass
class ScoreReport:
    """CO scores of several methods on one labelled batch (see :func:`score_methods`)."""

    model: str
    n_samples: int
    n_classes: int
    accuracy: float
    predicted: np.ndarray
    labels: np.ndarray
    use_softmax: bool
    methods: dict[str, MethodScore]

    @property
    def correct(self) -> np.ndarray:
        return np.asarray(self.predicted == self.labels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "samples": self.n_samples, "classes": self.n_classes,
            "accuracy": self.accuracy, "scores_on": "softmax" if self.use_softmax else "logits",
            "gap_statistic": "median(correct) - median(wrong); rank-biserial "
                             "r = 2 P(s_correct > s_wrong) + P(=) - 1",
            "methods": [m.summary() for m in self.methods.values()],
        }

    def table(self) -> str:
        """One row per method and AX mode: the CO-score distribution, the gap, accuracy after."""
        head = (f"{'method':<20} {'AX':<7} {'median':>9} {'mean':>9} {'>0':>6} "
                f"{'med ok':>9} {'med wrong':>9} {'gap':>9} {'r_rb':>6} {'acc':>7}")
        rows = [f"model {self.model}: {self.n_samples} samples, {self.n_classes} classes, "
                f"accuracy {100 * self.accuracy:.1f} %, CO scores on "
                f"{'softmax' if self.use_softmax else 'raw logits'}", head, "-" * len(head)]

        def f(v: float) -> str:
            return f"{v:>9.3f}" if np.isfinite(v) else f"{'-':>9}"
        for m in self.methods.values():
            for mode, s in m.scores.items():
                g = m.gaps[mode]
                ax = "x+h" if mode == "sum" else "x*h"
                r = f"{g.rank_biserial:>6.2f}" if np.isfinite(g.rank_biserial) else f"{'-':>6}"
                rows.append(f"{m.method:<20} {ax:<7} {f(float(np.median(s)))} "
                            f"{f(float(np.mean(s)))} {100 * np.mean(s > 0):>5.0f}% "
                            f"{f(g.median_correct)} {f(g.median_wrong)} {f(g.median_gap)} "
                            f"{r} {100 * m.accuracy_after[mode]:>6.1f}%")
        return "\n".join(rows)


def score_methods(model: Any, x: np.ndarray, labels: np.ndarray, methods: Sequence[str], *,
                  modes: Sequence[str] = AX_MODES, use_softmax: bool = False,
                  batch_size: int = 256, gax_options: Mapping[str, Any] | None = None,
                  progress: bool | None = None) -> ScoreReport:
    """Heatmaps of each method w.r.t. the predicted class, normalised per sample, then the CO
    score of every AX mode, the accuracy after AX and the correct/wrong gap."""
    from tqdm import tqdm

    x = np.asarray(x)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(x):
        raise InputError(f"{len(x)} samples but {len(labels)} labels")
    for mode in modes:
        if mode not in AX_MODES:
            raise InputError(f"unknown AX mode '{mode}'; use one of {', '.join(AX_MODES)}")
    fns = {name: heatmap_method(name) for name in methods if name != "gax"}
    base_logits = np.concatenate([model_scores(model, x[i:i + batch_size])
                                  for i in range(0, len(x), batch_size)])
    n_classes = base_logits.shape[1]
    kappa(labels, n_classes)  # validates the labels
    predicted = base_logits.argmax(axis=1)
    base = _softmax_if(base_logits, use_softmax)
    results: dict[str, MethodScore] = {}
    steps = [(name, i) for name in methods for i in range(0, len(x), batch_size)]
    bar = tqdm(total=len(steps), desc="score", unit="batch", disable=None if progress is None
               else not progress, leave=False)
    for name in methods:
        maps, extra_parts = [], []
        for i in range(0, len(x), batch_size):
            xb, tb = x[i:i + batch_size], predicted[i:i + batch_size]
            if name == "gax":
                from pbxc.evaluate.gax import gax

                res = gax(model, xb, labels[i:i + batch_size], use_softmax=use_softmax,
                          **dict(gax_options or {}))
                maps.append(res.heatmaps)
                extra_parts.append(res)
            else:
                maps.append(np.asarray(fns[name](model, xb, tb), dtype=x.dtype))
            bar.update(1)
        heat = np.concatenate(maps)
        # GAX heatmaps are tanh(w x) + b, in [-1, 1] by construction; they are not rescaled
        h = heat if name == "gax" else normalize_heatmaps(heat)
        scores, acc, gaps = {}, {}, {}
        for mode in modes:
            aug = augment(x, h, mode)
            out = np.concatenate([model_scores(model, aug[i:i + batch_size])
                                  for i in range(0, len(x), batch_size)])
            k = kappa(labels, n_classes, out.dtype)
            s = np.einsum("bc,bc->b", k, _softmax_if(out, use_softmax) - base)
            scores[mode] = s
            acc[mode] = float(np.mean(out.argmax(axis=1) == labels))
            gaps[mode] = gap_statistic(s, predicted == labels)
        extra: dict[str, Any] = {}
        if extra_parts:
            steps_taken = np.concatenate([r.steps for r in extra_parts])
            extra = {"gax_steps_median": float(np.median(steps_taken)),
                     "gax_reached_target": float(np.mean(np.concatenate(
                         [r.reached for r in extra_parts]))),
                     "gax_history": [r for r in extra_parts]}
        results[name] = MethodScore(name, scores, acc, gaps, h, extra)
    bar.close()
    return ScoreReport(model=getattr(model, "name", "model"), n_samples=len(x),
                       n_classes=n_classes, accuracy=float(np.mean(predicted == labels)),
                       predicted=predicted, labels=labels, use_softmax=use_softmax,
                       methods=results)


def _softmax_if(z: np.ndarray, use_softmax: bool) -> np.ndarray:
    return softmax(z) if use_softmax else z
