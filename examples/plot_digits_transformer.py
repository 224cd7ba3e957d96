"""Draw the AttnLRP heatmaps of examples/digits_transformer: writes
docs/figures/digits_transformer_attnlrp.png.

    python examples/plot_digits_transformer.py

One test image of each digit (the first the model classifies correctly), and below it the
relevance of each pixel for the predicted logit under the file's ``lrp { composite attnlrp }``
block (red positive, blue negative, each map scaled to its own largest |relevance|), with the
logit and the sum of the pixels' relevance (the rest is in the ledger: biases, the class token,
the softmax and LayerNorm terms). Needs only
pbxc and matplotlib (no torch): it reads the shipped weights and reference file.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pbxc
from pbxc.evaluate.plots import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "figures" / "digits_transformer_attnlrp.png"


def samples() -> tuple[np.ndarray, np.ndarray]:
    """The first correctly classified test image of each class, and its index."""
    ref = np.load(HERE / "digits_transformer_reference.npz")
    right = ref["outputs"].argmax(axis=1) == ref["labels"]
    idx = np.array([np.flatnonzero(right & (ref["labels"] == c))[0] for c in range(10)])
    return ref["inputs"][idx], idx


def main() -> None:
    model = pbxc.load(HERE / "digits_transformer.pbx")
    x, idx = samples()
    res = model.lrp(x)                                        # the file's block: attnlrp
    relevance = res.relevance["image"][:, 0]
    logits = model.forward(x)
    error = float(res.ledger.conservation_error.max())
    fig, axes = plt.subplots(2, 10, figsize=(12.5, 3.6))
    for c in range(10):
        axes[0, c].imshow(x[c, 0], cmap="gray_r", vmin=0, vmax=1)
        axes[0, c].set_title(f"#{idx[c]}, digit {c}", fontsize=9)
        m = float(np.abs(relevance[c]).max()) or 1.0
        axes[1, c].imshow(relevance[c], cmap="RdBu_r", vmin=-m, vmax=m)
        axes[1, c].set_title(f"logit {logits[c, c]:.1f}\npixels {relevance[c].sum():.1f}",
                             fontsize=7)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("AttnLRP", fontsize=9)
    fig.suptitle("digits_transformer: AttnLRP relevance of the predicted logit "
                 f"(conservation with the ledger: {error:.0e})", fontsize=10)
    save_figure(fig, FIGURE, dpi=80, force=True)
    print(f"wrote {FIGURE} ({FIGURE.stat().st_size} bytes); conservation error {error:.1e}")


if __name__ == "__main__":
    main()
