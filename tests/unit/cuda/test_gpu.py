"""On a real GPU (``cupy.is_available()``): the cupy backend and a compiled artifact against
the NumPy backend. Skipped, with the reason, everywhere else. NVRTC contracts a*b + c into
fused multiply-adds and cuBLAS sums in its own order, so the bars are looser than the CPU
shim's: 1e-10 (float64) and 1e-4 (float32), normwise relative."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.runtime.compile import compile_model
from pbxc.runtime.cupy_backend import cupy_unavailable

from .conftest import EXAMPLES, MODELS, inputs_for, rel

REASON = cupy_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs a GPU: {REASON}")
TOL = {"float64": 1e-10, "float32": 1e-4}


def host(a: object) -> np.ndarray:
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) else a)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_cupy_backend_agrees(name: str, dtype: str) -> None:
    path = EXAMPLES / f"{name}.pbx"
    ref = pbxc.load(path, dtype=dtype)
    gpu = pbxc.load(path, dtype=dtype, backend="cupy")
    tol = TOL[dtype]
    for batch in (1, 257):
        x = inputs_for(ref, batch=batch).astype(dtype)
        assert rel(host(gpu(x)), ref(x)) <= tol
        assert rel(host(gpu.gradient(x)), ref.gradient(x)) <= tol
        assert rel(host(gpu.jacobian(x)), ref.jacobian(x).jacobian) <= tol
        contributions, _ = gpu.dfd(x)
        assert rel(host(contributions), ref.dfd(x).attributions[ref.input_names[0]]) <= tol
        relevance, _ = gpu.lrp(x, composite="epsilon")
        assert rel(host(relevance), ref.lrp(x, composite="epsilon").relevance[
            ref.input_names[0]]) <= tol


def test_compiled_directory_runs_with_cupy(tmp_path: Path) -> None:
    ref = pbxc.load(EXAMPLES / "digits_resnet.pbx")
    compile_model(ref, tmp_path / "out", target="cuda")
    spec = importlib.util.spec_from_file_location("gpu_artifact", tmp_path / "out" /
                                                  "digits_resnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = inputs_for(ref, batch=8).astype(np.float32)
    assert rel(host(module.gradient(x)), ref.gradient(x)) <= TOL["float32"]
