"""Shared test set-up: Hypothesis profiles and small model builders.

Profiles: ``ci`` (default; bounded, derandomized) and ``deep`` (on demand:
``HYPOTHESIS_PROFILE=deep pytest``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "deep", max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """Write a .pbx text and its weights (a dict of arrays) into a temporary folder."""

    def write(text: str, weights: dict[str, np.ndarray] | None = None,
              weights_name: str = "w.npz", name: str = "model.pbx") -> Path:
        if weights is not None:
            np.savez(tmp_path / weights_name, **weights)
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
