"""Pictures of attributions, Jacobians, CO-score distributions and GAX runs (matplotlib, Agg).

Every function writes PNG files atomically (a temporary file in the same folder, then a
rename) and returns their paths; none opens a window. Image-shaped inputs ([C, H, W] or
[H, W]) get the input, the attribution (diverging map centred at 0) and an overlay; tabular
inputs ([F]) get a bar chart with the top-k features marked; anything else is drawn as a heat
matrix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.outputs import prepare_directory, write_with

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100, force: bool = False) -> Path:
    """Write ``fig`` as PNG through a temporary file and a rename (pbxc.outputs); close it."""
    plt = _pyplot()
    try:
        write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                       bbox_inches="tight"), force=force)
    finally:
        plt.close(fig)
    return Path(path)


def input_kind(shape: Sequence[int]) -> str:
    """'image' for [C, H, W] or [H, W] with H, W > 1; 'tabular' for [F]; else 'matrix'."""
    shape = tuple(shape)
    if len(shape) == 1:
        return "tabular"
    if (len(shape) == 2 and min(shape) > 1) or (len(shape) == 3 and min(shape[1:]) > 1):
        return "image"
    return "matrix"


def _symmetric(a: np.ndarray) -> float:
    m = float(np.max(np.abs(a))) if a.size else 0.0
    return m if m > 0 else 1.0


def _image_of(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An [H, W] grey or [H, W, 3] RGB picture of one sample."""
    if x.ndim == 2:
        return x, "gray"
    if x.shape[0] == 3:
        rgb = np.moveaxis(x, 0, -1)
        lo, hi = float(rgb.min()), float(rgb.max())
        return (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb), None
    return x.mean(axis=0), "gray"


def _title(i: int, targets: np.ndarray | None, classes: Sequence[str] | None,
           labels: np.ndarray | None) -> str:
    text = f"sample {i}"
    if targets is not None:
        t = int(targets[i])
        text += f", target {classes[t] if classes and t < len(classes) else t}"
    if labels is not None:
        t = int(labels[i])
        text += f", label {classes[t] if classes and t < len(classes) else t}"
    return text


def draw_attributions(x: np.ndarray, attributions: np.ndarray, out_dir: str | os.PathLike[str],
                      *, method: str = "attribution", feature_names: Sequence[str] | None = None,
                      class_names: Sequence[str] | None = None, targets: np.ndarray | None = None,
                      labels: np.ndarray | None = None, top_k: int = 5, max_files: int = 16,
                      prefix: str = "sample", force: bool = False) -> list[Path]:
    """One PNG per sample (at most ``max_files``): ``{prefix}_{i:04d}_{method}.png``."""
    plt = _pyplot()
    x = np.asarray(x)
    a = np.asarray(attributions)
    if a.shape != x.shape:
        raise ValueError(f"attributions {list(a.shape)} and inputs {list(x.shape)} differ")
    kind = input_kind(x.shape[1:])
    paths = []
    for i in range(min(len(x), max_files)):
        title = f"{method}: {_title(i, targets, class_names, labels)}"
        if kind == "image":
            img, cmap = _image_of(x[i])
            att = a[i] if a[i].ndim == 2 else a[i].sum(axis=0)
            m = _symmetric(att)
            fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4))
            axes[0].imshow(img, cmap=cmap)
            axes[0].set_title("input")
            im = axes[1].imshow(att, cmap="RdBu_r", vmin=-m, vmax=m)
            axes[1].set_title("attribution")
            fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
            grey = img if img.ndim == 2 else img.mean(axis=-1)
            axes[2].imshow(grey, cmap="gray")
            axes[2].imshow(att, cmap="RdBu_r", vmin=-m, vmax=m, alpha=0.6)
            axes[2].set_title("overlay")
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
        elif kind == "tabular":
            n = a.shape[1]
            names = list(feature_names) if feature_names and len(feature_names) == n else \
                [f"x[{j}]" for j in range(n)]
            top = set(np.argsort(-np.abs(a[i]))[:top_k].tolist())
            fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.24 * n))
            colours = ["#b2182b" if v > 0 else "#2166ac" for v in a[i]]
            bars = ax.barh(np.arange(n), a[i], color=colours)
            for j, bar in enumerate(bars):
                if j in top:
                    bar.set_edgecolor("black")
                    bar.set_linewidth(1.5)
            ax.set_yticks(np.arange(n))
            ax.set_yticklabels([f"{'* ' if j in top else ''}{names[j]}" for j in range(n)],
                               fontsize=8)
            for j in top:
                ax.get_yticklabels()[j].set_fontweight("bold")
            ax.invert_yaxis()
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlabel(f"attribution (* = top {min(top_k, n)} by |value|)")
        else:
            att = a[i].reshape(a.shape[1], -1)
            m = _symmetric(att)
            fig, ax = plt.subplots(figsize=(7, 3.5))
            im = ax.imshow(att, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto")
            fig.colorbar(im, ax=ax)
        fig.suptitle(title, fontsize=10)
        paths.append(save_figure(fig, prepare_directory(out_dir) /
                                 f"{prefix}_{i:04d}_{method}.png", force=force))
    return paths


def draw_jacobian(jacobian: np.ndarray, out_dir: str | os.PathLike[str], *,
                  class_names: Sequence[str] | None = None,
                  feature_names: Sequence[str] | None = None, max_files: int = 16,
                  prefix: str = "sample", force: bool = False) -> list[Path]:
    """A heat matrix of outputs x inputs per sample, from (B, *out, *in)."""
    plt = _pyplot()
    jac = np.asarray(jacobian)
    paths = []
    n_out = len(class_names) if class_names else None
    for i in range(min(len(jac), max_files)):
        j = jac[i]
        rows = n_out if n_out and j.size % n_out == 0 and j.shape[0] == n_out else j.shape[0]
        mat = j.reshape(rows, -1)
        m = _symmetric(mat)
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * mat.shape[1]) if mat.shape[1] <= 40
                                        else 10, 1.5 + 0.3 * rows))
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set_ylabel("output")
        ax.set_xlabel("input (flattened)")
        if class_names and len(class_names) == rows:
            ax.set_yticks(np.arange(rows))
            ax.set_yticklabels(class_names, fontsize=8)
        if feature_names and len(feature_names) == mat.shape[1] and mat.shape[1] <= 40:
            ax.set_xticks(np.arange(mat.shape[1]))
            ax.set_xticklabels(feature_names, rotation=90, fontsize=7)
        ax.set_title(f"Jacobian d output / d input, sample {i}", fontsize=10)
        paths.append(save_figure(fig, prepare_directory(out_dir) /
                                 f"{prefix}_{i:04d}_jacobian.png", force=force))
    return paths


def draw_explanation(model: Any, x: np.ndarray, arrays: Mapping[str, np.ndarray], method: str,
                     out_dir: str | os.PathLike[str], *, max_files: int = 16,
                     output: str | None = None, top_k: int = 5, force: bool = False
                     ) -> list[Path]:
    """The pictures ``pbxc explain --png`` draws from its result arrays."""
    wrt = model.input_names[0]
    out = output or model.output_names[0]
    classes = model.class_names.get(out)
    features = model.feature_names.get(wrt)
    x = np.asarray(x).reshape(-1, *model.input_shapes[wrt])
    if method == "jacobian":
        return draw_jacobian(arrays["attributions"], out_dir, class_names=classes,
                             feature_names=features, max_files=max_files, force=force)
    return draw_attributions(x, arrays["attributions"], out_dir, method=method,
                             feature_names=features, class_names=classes,
                             targets=arrays.get("targets"), max_files=max_files, top_k=top_k,
                             force=force)


def draw_co_boxplots(report: Any, path: str | os.PathLike[str], mode: str = "sum") -> Path:
    """Box plots of CO scores per method, correct (1) and wrong (0) predictions side by side."""
    plt = _pyplot()
    methods = list(report.methods.values())
    correct = report.correct
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(methods) + 1), 4))
    data, positions, colours = [], [], []
    for i, m in enumerate(methods):
        s = m.scores[mode]
        for off, sel, col in ((-0.18, correct, "#4daf4a"), (0.18, ~correct, "#e41a1c")):
            data.append(s[sel] if sel.any() else np.array([np.nan]))
            positions.append(i + off)
            colours.append(col)
    bp = ax.boxplot(data, positions=positions, widths=0.3, patch_artist=True, showfliers=True,
                    flierprops={"markersize": 2})
    for patch, col in zip(bp["boxes"], colours):
        patch.set_facecolor(col)
        patch.set_alpha(0.6)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.method for m in methods], rotation=20, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.7)
    ax.set_ylabel("CO score" + (" (softmax)" if report.use_softmax else " (raw logits)"))
    ax.set_title(f"{report.model}: AX {'x+h' if mode == 'sum' else 'x*h'}, "
                 f"green = correct ({int(correct.sum())}), red = wrong ({int((~correct).sum())})",
                 fontsize=9)
    return save_figure(fig, Path(path))


def draw_gax_history(history: np.ndarray, path: str | os.PathLike[str],
                     target_score: float | None = None, title: str = "GAX") -> Path:
    """One curve of s_co per sample over the optimisation steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for row in np.asarray(history):
        ok = np.isfinite(row)
        ax.plot(np.flatnonzero(ok), row[ok], linewidth=0.8, alpha=0.7)
    if target_score is not None:
        ax.axhline(target_score, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("CO score")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, Path(path))


def is_png(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC
