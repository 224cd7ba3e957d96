"""Heat matrices of second-order explanations: Hessians and finite-perturbation interactions
(``pbxc explain --method hessian|interactions --png DIR``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pbxc.evaluate.plots import _pyplot, save_figure


def draw_pair_matrix(matrix: np.ndarray, path: str | os.PathLike[str], *, title: str,
                     feature_names: Sequence[str] | None = None) -> Path:
    """One symmetric (n, n) matrix as a diverging heat map, feature names on both axes."""
    plt = _pyplot()
    mat = np.asarray(matrix, dtype=np.float64)
    n = mat.shape[0]
    top = float(np.abs(mat).max()) or 1.0
    side = min(14.0, 3.0 + 0.28 * n) if n <= 64 else 10.0
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
    if feature_names is not None and n <= 64:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels([str(f) for f in feature_names], rotation=90, fontsize=7)
        ax.set_yticklabels([str(f) for f in feature_names], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def draw_pair_matrices(matrices: np.ndarray, out_dir: str | os.PathLike[str], *, label: str,
                       feature_names: Sequence[str] | None = None, max_files: int = 16,
                       titles: Sequence[str] | None = None) -> list[Path]:
    """``label``_mean.png (the batch mean) and one ``label``_sample_I.png per sample."""
    mats = np.asarray(matrices)
    out = Path(out_dir)
    paths = [draw_pair_matrix(mats.mean(axis=0), out / f"{label}_mean.png",
                              title=f"{label}: mean over {len(mats)} sample(s)",
                              feature_names=feature_names)]
    for i in range(min(len(mats), max_files)):
        title = titles[i] if titles else f"{label}: sample {i}"
        paths.append(draw_pair_matrix(mats[i], out / f"{label}_sample_{i}.png", title=title,
                                      feature_names=feature_names))
    return paths
