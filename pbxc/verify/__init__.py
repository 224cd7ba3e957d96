"""Verification of attribution properties, with shrunk counterexamples (specs/verify.md).

``verify_model(model, ...)`` checks the properties of the model's ``verify`` blocks (or the
ones named) on given samples, then searches the declared input domain with Hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.verify import hessian_properties  # noqa: F401  (registers the second-order properties)
from pbxc.verify.backends import BACKENDS, Backend
from pbxc.verify.properties import PROPERTIES, CheckConfig, Context, Outcome, Property, Skip
from pbxc.verify.search import (
    Plan,
    PropertyResult,
    config_for,
    load_counterexample,
    plan_from_model,
    run_property,
    save_counterexample,
)

__all__ = [
    "BACKENDS", "PROPERTIES", "Backend", "CheckConfig", "Context", "Outcome", "Plan", "Property",
    "PropertyResult", "Skip", "config_for", "load_counterexample", "plan_from_model",
    "run_property", "save_counterexample", "verify_model",
]


def input_scales(data: dict[str, np.ndarray] | None, plan: Plan) -> dict[str, np.ndarray]:
    """Per-element scale of each input for finite-difference steps: the data's std where it
    is positive, else the domain's width, else 1."""
    scales = {}
    for name, dom in plan.domains.items():
        scale = np.maximum(dom.high - dom.low, 0.0)
        if data is not None and name in data:
            std = data[name].std(axis=0)
            scale = np.where(std > 0, std, scale)
        scales[name] = np.where(scale > 0, scale, 1.0)
    return scales


def verify_model(model: Any, *, data: dict[str, np.ndarray] | None = None,
                 samples: dict[str, np.ndarray] | None = None,
                 properties: Sequence[str] = (), examples: int | None = None,
                 seed: int | None = None, counterexample_dir: Path | None = None,
                 progress: Callable[[str, int], None] | None = None
                 ) -> tuple[Plan, list[PropertyResult]]:
    """Check every planned property; save each counterexample to ``counterexample_dir``."""
    base_dir = Path(model.graph.path).parent
    plan = plan_from_model(model, properties, data, base_dir)
    if examples is not None:
        plan.examples = examples
    if seed is not None:
        plan.seed = seed
    ctx = Context(model, data, base_dir)
    ctx.scales = input_scales(data, plan)
    results = []
    for cfg in plan.checks:
        step = (lambda n, name=cfg.name: progress(name, n)) if progress else None
        result = run_property(ctx, cfg, samples, plan, step)
        cx = result.counterexample
        if cx is not None and counterexample_dir is not None:
            path = counterexample_dir / f"{model.name}.{cfg.name}.npz"
            means = {k: np.asarray(v, dtype=np.float64).mean(axis=0)
                     for k, v in (data or {}).items() if len(v)}
            save_counterexample(path, model.graph.path, cfg, cx, model_name=model.name,
                                dtype=model.dtype, scales=ctx.scales, data_mean=means)
            cx.file = str(path)
        results.append(result)
    return plan, results
