"""Fixtures of the CUDA tests: models, their generated sources, shim builds (once a session).

``pytest tests/unit/cuda --update-golden`` (or ``PBXC_UPDATE_GOLDEN=1 pytest ...``) rewrites
the golden files under ``tests/golden/cuda`` instead of comparing with them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.codegen.cuda_shim import load_nvrtc
from pbxc.runtime.compile import render_cuda_module

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
GOLDEN = REPO / "tests" / "golden" / "cuda"
MODELS = ("breast_cancer_mlp", "digits_cnn", "digits_resnet", "wine_swish_mlp")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/cuda from the current code generator")


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    try:
        flag = bool(request.config.getoption("--update-golden"))
    except ValueError:  # the option is registered only when this folder is on the command line
        flag = False
    return flag or os.environ.get("PBXC_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="session")
def needs_gxx() -> None:
    if shutil.which("g++") is None:
        pytest.skip("the CUDA CPU shim needs g++, which is not on PATH")


@pytest.fixture(scope="session")
def needs_nvrtc() -> None:
    if load_nvrtc() is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")


@pytest.fixture(scope="session")
def sources() -> dict[str, tuple[str, str]]:
    """(CUDA source, Python module) of every example model."""
    return {name: render_cuda_module(pbxc.load(EXAMPLES / f"{name}.pbx")) for name in MODELS}


@pytest.fixture(scope="session")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cuda-shim")


def inputs_for(model: Any, batch: int = 4, seed: int = 0) -> np.ndarray:
    """Inputs in each example's domain: raw features around the data set's scale."""
    rng = np.random.default_rng(seed)
    shape = model.graph.inputs[0].shape
    p = model.params
    scaler = next((v for v in p.values() if "mean" in v and "std" in v), None)
    if scaler is not None:  # the normalize layer's statistics give the scale
        x = scaler["mean"] + scaler["std"] * rng.standard_normal((batch, *shape))
        return np.asarray(x, dtype=np.float64)
    return rng.random((batch, *shape))


def rel(a: Any, b: Any) -> float:
    """Normwise relative difference max|a - b| / max|b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())
