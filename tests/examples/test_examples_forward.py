"""The shipped example models (examples/*.pbx) against the framework that trained them.

Each example ships ``NAME_reference.npz``: test-split ``inputs``, their ``labels``, the float64
eval-mode PyTorch ``outputs`` and the test ``accuracy``. pbxc's forward pass must reproduce the
recorded outputs without torch; where torch is installed, the torch model is also rebuilt live
from the shipped weights (``examples/models.py``, the definitions the training scripts use).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pbxc

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

#: name -> (declared input dtype, per-sample input shape, class names, least test accuracy)
EXAMPLES = {
    "breast_cancer_mlp": ("float64", (30,), ("malignant", "benign"), 0.95),
    "breast_cancer_smooth_mlp": ("float64", (30,), ("malignant", "benign"), 0.95),
    "digits_cnn": ("float32", (1, 8, 8), tuple("0123456789"), 0.95),
    "digits_resnet": ("float32", (1, 8, 8), tuple("0123456789"), 0.95),
    "digits_transformer": ("float64", (1, 8, 8), tuple("0123456789"), 0.95),
    "wine_swish_mlp": ("float64", (13,), ("class_0", "class_1", "class_2"), 0.95),
}
NAMES = sorted(EXAMPLES)

RTOL64 = 1e-10   # float64 pbxc vs float64 torch: both exact up to summation order
TOL32 = 1e-4     # float32 pbxc vs float64 torch, relative to the largest |output|


@functools.cache
def model(name: str, dtype: str) -> pbxc.Model:
    return pbxc.load(EXAMPLES_DIR / f"{name}.pbx", dtype=dtype)


@functools.cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(EXAMPLES_DIR / f"{name}_reference.npz", allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def assert_close64(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=RTOL64 * 1e-2 * scale)


def test_every_shipped_example_is_checked() -> None:
    shipped = sorted(p.stem for p in EXAMPLES_DIR.glob("*.pbx"))
    assert shipped == NAMES
    for name in NAMES:
        assert (EXAMPLES_DIR / f"train_{name}.py").is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_model_declaration_matches_reference(name: str) -> None:
    dtype, shape, classes, _ = EXAMPLES[name]
    m = model(name, "float64")
    ref = reference(name)
    (info,) = m.graph.inputs
    assert info.dtype == dtype
    assert m.input_shapes == {info.name: shape}
    assert m.class_names == {"logits": classes}
    assert m.output_shapes == {"logits": (len(classes),)}
    if info.features is not None:
        assert len(info.features) == int(np.prod(shape))
    n = len(ref["labels"])
    assert n > 0
    assert ref["inputs"].dtype == np.dtype(dtype)
    assert ref["inputs"].shape == (n, *shape)
    assert ref["outputs"].dtype == np.float64
    assert ref["outputs"].shape == (n, len(classes))
    assert ref["labels"].shape == (n,)
    assert set(np.unique(ref["labels"])) <= set(range(len(classes)))
    assert ref["accuracy"].shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_float64_forward_matches_torch(name: str) -> None:
    ref = reference(name)
    out = model(name, "float64").forward(ref["inputs"])
    assert out.dtype == np.float64
    assert_close64(out, ref["outputs"])


@pytest.mark.parametrize("name", NAMES)
def test_float32_forward_matches_torch(name: str) -> None:
    ref = reference(name)
    out = model(name, "float32").forward(ref["inputs"])
    assert out.dtype == np.float32
    scale = float(np.abs(ref["outputs"]).max())
    np.testing.assert_allclose(out, ref["outputs"], rtol=0, atol=TOL32 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_accuracy_recomputed_by_pbxc(name: str) -> None:
    ref = reference(name)
    predicted = model(name, "float64").forward(ref["inputs"]).argmax(axis=1)
    accuracy = float(np.mean(predicted == ref["labels"]))
    assert accuracy == float(ref["accuracy"])
    assert accuracy >= EXAMPLES[name][3]


def test_resnet_batchnorm_statistics_are_trained() -> None:
    """The running statistics pbxc's batchnorm uses are trained ones, not PyTorch's defaults."""
    weights = model("digits_resnet", "float64").weights
    for prefix in ("bn1", "block.bn1", "block.bn2"):
        assert not np.allclose(weights[f"{prefix}.running_mean"], 0.0), prefix
        assert not np.allclose(weights[f"{prefix}.running_var"], 1.0), prefix


# ---------------------------------------------------------------------- live torch

@functools.cache
def torch_models():
    """examples/models.py, loaded by path under a name of its own."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors.torch")
    spec = importlib.util.spec_from_file_location("pbxc_examples_models",
                                                  EXAMPLES_DIR / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_live_torch_model_matches_pbxc(name: str) -> None:
    torch = pytest.importorskip("torch")
    defs = torch_models()
    ref = reference(name)
    net = defs.load_model(name, EXAMPLES_DIR)
    assert not net.training
    with torch.no_grad():
        live = net(torch.from_numpy(ref["inputs"].astype(np.float64))).numpy()
    assert live.dtype == np.float64
    assert_close64(live, ref["outputs"])
    assert_close64(model(name, "float64").forward(ref["inputs"]), live)
