"""``pbxc compile --target cuda``: the standalone directory, run on the CPU shim; argument
checks before launch; the library path ``pbxc.load(..., backend="cupy")``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.codegen.cuda_shim import ShimDevice, build_shim
from pbxc.errors import InputError, PbxError
from pbxc.runtime.compile import compile_model
from pbxc.runtime.cupy_backend import CupyModel, cupy_unavailable

from .conftest import EXAMPLES, inputs_for, rel


def import_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, shim_dir: Path) -> tuple[Path, Any]:
    """The compiled directory of the digits CNN, its module running on the shim."""
    if importlib.util.find_spec("pbxc") is None:  # pragma: no cover
        pytest.skip("pbxc is not importable")
    out = tmp_path_factory.mktemp("artifact") / "cnn"
    assert main(["compile", str(EXAMPLES / "digits_cnn.pbx"), "--target", "cuda", "-o",
                 str(out)]) == 0
    module = import_file(out / "digits_cnn.py", "pbxc_test_artifact_cnn")
    try:
        library = build_shim((out / "digits_cnn.cu").read_text(), module.KERNELS, shim_dir)
    except PbxError as exc:
        pytest.skip(str(exc))
    module.set_device(ShimDevice(library, module.KERNELS))
    return out, module


def test_directory_and_manifest(artifact: tuple[Path, Any]) -> None:
    out, _ = artifact
    assert sorted(p.name for p in out.iterdir()) == [
        "digits_cnn.cu", "digits_cnn.py", "manifest.json", "weights.npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "cuda" and manifest["cuda_source"] == "digits_cnn.cu"
    assert manifest["requires"] == ["cupy", "numpy"]
    for name in ("digits_cnn.cu", "digits_cnn.py"):
        assert manifest["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()


def test_artifact_runs_every_pass(artifact: tuple[Path, Any]) -> None:
    """The module reads weights.npz beside it; float32 by the input, float64 on request."""
    _, module = artifact
    for dtype in ("float32", "float64"):
        ref = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype=dtype)
        x = inputs_for(ref, batch=3).astype(dtype)
        tol = 1e-12 if dtype == "float64" else 1e-5
        assert module.forward(x)["logits"].dtype == np.dtype(dtype)
        assert rel(module.forward(x)["logits"], ref.forward(x)) <= tol
        assert rel(module.jacobian(x), ref.jacobian(x).jacobian) <= tol
        assert rel(module.input_x_gradient(x, target=3), ref.input_x_gradient(x, target=3)) <= tol
        contributions, _ = module.dfd(x)
        assert rel(contributions, ref.dfd(x).attributions["image"]) <= tol
        relevance, _ = module.lrp(x, composite="epsilon-plus")
        assert rel(relevance, ref.lrp(x, composite="epsilon-plus").relevance["image"]) <= tol


def test_checks_before_launch(artifact: tuple[Path, Any]) -> None:
    _, module = artifact
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    err = module.KernelArgumentError
    with pytest.raises(err, match=r"input 'image' has shape \[2, 64\]; expected \[batch, 1, 8, "
                                  r"8\]"):
        module.gradient(x.reshape(2, 64))
    with pytest.raises(err, match="non-finite"):
        module.forward(np.full_like(x, np.nan))
    with pytest.raises(err, match=r"baseline has shape \[3\]"):
        module.dfd(x, baseline=np.zeros(3))
    with pytest.raises(err, match=r"class indices in \[0, 10\)"):
        module.gradient(x, target=10)
    with pytest.raises(err, match="unknown composite 'nope'"):
        module.lrp(x, composite="nope")
    C = module.Context(module._device(), module.KERNELS, np.float64)
    a32 = np.zeros((2, 64), dtype=np.float32)
    a64 = np.zeros((2, 64))
    with pytest.raises(err, match=r"kernel pbx_add_f64, argument 0 \(a\): expected float64, "
                                  "got float32"):
        C.call("pbx_add", [a32, a64], [a64])
    with pytest.raises(err, match=r"argument 1 \(b\): expected 128 elements, got 64"):
        C.call("pbx_add", [a64, a64[:1]], [a64])
    with pytest.raises(err, match="expected a C-contiguous array"):
        C.call("pbx_add", [a64, np.zeros((64, 2)).T], [a64])
    with pytest.raises(err, match="takes 3 arguments, got 2"):
        C.call("pbx_add", [a64], [a64])
    with pytest.raises(err, match="dtype must be float32 or float64"):
        module.Context(module._device(), module.KERNELS, np.int32)


def test_replaces_only_its_own_directory(tmp_path: Path) -> None:
    model = pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PbxError, match="was not written by pbxc compile"):
        compile_model(model, foreign, target="cuda")
    out = tmp_path / "out"
    compile_model(model, out, target="numpy")
    files = compile_model(model, out, target="cuda")
    assert {f.name for f in files} == {f.name for f in out.iterdir()}
    with pytest.raises(PbxError, match="unknown compile target 'opencl'"):
        compile_model(model, tmp_path / "x", target="opencl")


def test_library_path_without_a_gpu() -> None:
    reason = cupy_unavailable()
    if reason is None:
        pytest.skip("a GPU is present: tests/unit/cuda/test_gpu.py covers the cupy backend")
    with pytest.raises(PbxError, match=r"pip install pbxc\[cuda\]"):
        pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx", backend="cupy")
    with pytest.raises(PbxError, match="unknown backend 'tpu'"):
        pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx", backend="tpu")


def test_cupy_model_wrapper_on_the_shim(shim_dir: Path, needs_gxx: None) -> None:
    """CupyModel (what backend="cupy" returns) with the shim as its device."""
    ref = pbxc.load(EXAMPLES / "wine_swish_mlp.pbx")
    model = CupyModel(ref, device="shim")
    x = inputs_for(ref, batch=4)
    assert "cuda-shim" in repr(model) and model.output_names == ref.output_names
    assert rel(model(x), ref(x)) <= 1e-12
    assert rel(model.gradient(x, target=1), ref.gradient(x, target=1)) <= 1e-12
    assert rel(model.jacobian(x), ref.jacobian(x).jacobian) <= 1e-12
    contributions, delta = model.dfd(x, baseline="zeros")
    assert rel(delta, ref.dfd(x).delta) <= 1e-12
    assert rel(contributions, ref.dfd(x).attributions["x"]) <= 1e-12
    relevance, ledger = model.lrp(x)
    assert rel(ledger["start"], ref.lrp(x).ledger.start) <= 1e-12
    assert rel(relevance, ref.lrp(x).relevance["x"]) <= 1e-12
    with pytest.raises(InputError, match=r"has shape \[4, 12\]; expected \[batch, 13\]"):
        model.gradient(x[:, :12])
    with pytest.raises(InputError, match="class indices"):
        model.gradient(x, target=7)


def test_verify_runs_the_cuda_module_on_the_cpu(needs_gxx: None) -> None:
    from pbxc.verify.backends import available_backends

    runners, skipped = available_backends(pbxc.load(EXAMPLES / "digits_resnet.pbx"))
    assert "cuda-on-cpu" in [r.name for r in runners]
    x = inputs_for(pbxc.load(EXAMPLES / "digits_resnet.pbx"), batch=2).astype(np.float32)
    cuda = next(r for r in runners if r.name == "cuda-on-cpu")
    assert isinstance(cuda.gradient(x), np.ndarray)
    if cupy_unavailable() is not None:
        assert ("cupy", cupy_unavailable()) in skipped
