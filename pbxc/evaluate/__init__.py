"""Evaluating heatmaps: the CO score, AX and GAX (Tjoa et al.), and pictures (matplotlib)."""

from pbxc.evaluate.co_score import (
    AX_MODES,
    METHODS,
    Gap,
    MethodScore,
    ScoreReport,
    augment,
    co_score,
    co_score_gradient,
    gap_statistic,
    heatmap_method,
    kappa,
    normalize_heatmaps,
    rank_biserial,
    score_methods,
)
from pbxc.evaluate.gax import GaxResult, gax, gax_loss

__all__ = [
    "AX_MODES", "METHODS", "Gap", "GaxResult", "MethodScore", "ScoreReport", "augment",
    "co_score", "co_score_gradient", "gap_statistic", "gax", "gax_loss", "heatmap_method",
    "kappa", "normalize_heatmaps", "rank_biserial", "score_methods",
]
