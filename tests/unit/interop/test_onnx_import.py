"""ONNX import: the imported model's forward pass matches onnxruntime; errors name node and op."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.errors import UnsupportedOp

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbxc.interop import convert_onnx, import_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = ["breast_cancer_mlp", "breast_cancer_smooth_mlp", "digits_cnn", "digits_resnet",
            "wine_swish_mlp"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ort_run(path: Path | bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path))
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def example_models():  # type: ignore[no-untyped-def]
    pytest.importorskip("torch", reason="torch is not installed")
    spec = importlib.util.spec_from_file_location("pbxc_example_models",
                                                  REPO / "examples" / "models.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# every example as torch.onnx.export folds it (batch norm into conv), and the residual net
# with batch norm kept as BatchNormalization nodes
CASES = [(name, True) for name in EXAMPLES] + [("digits_resnet", False)]


@pytest.mark.parametrize(("name", "folding"), CASES,
                         ids=[f"{n}-{'folded' if f else 'batchnorm'}" for n, f in CASES])
def test_examples_round_trip(name: str, folding: bool, tmp_path: Path) -> None:
    import torch

    mod = example_models()
    model = mod.load_model(name).float().eval()
    x = np.load(REPO / "examples" / f"{name}_reference.npz")["inputs"][:64].astype(np.float32)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      dynamo=False, do_constant_folding=folding,
                      training=torch.onnx.TrainingMode.EVAL if folding else
                      torch.onnx.TrainingMode.PRESERVE)
    result = import_onnx(path, tmp_path / f"{name}.pbx")
    assert (tmp_path / f"{name}.npz").is_file()
    imported = pbxc.load(tmp_path / f"{name}.pbx")
    assert imported.dtype == np.float32 and imported.output_names == ("logits",)
    ours, theirs = imported.forward(x), ort_run(path, x)
    assert ours.shape == theirs.shape == (len(x), theirs.shape[1])
    assert rel_err(ours, theirs) < 1e-6, result.text
    if not folding:
        assert "batchnorm(" in result.text
    if name == "wine_swish_mlp":
        assert "swish(" in result.text and "beta=1.5" in result.text


def make_model(nodes, inputs, outputs, inits, opset: int = 17):  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def check_against_ort(model, x: np.ndarray, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    res = convert_onnx(model, "hand", weights_file="w.npz")
    np.savez(tmp_path / "w.npz", **res.weights)
    m = pbxc.loads(res.text, path=str(tmp_path / "m.pbx"))
    assert rel_err(m.forward(x), ort_run(model.SerializeToString(), x)) < 1e-6, res.text
    return res.text


def test_hand_built_mlp_ops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = {"w1": rng.normal(size=(6, 5)).astype(f32), "b1": rng.normal(size=5).astype(f32),
             "w2": rng.normal(size=(4, 5)).astype(f32), "c2": rng.normal(size=(1, 4)).astype(f32),
             "w3": rng.normal(size=(9, 3)).astype(f32), "shape": np.array([0, 3, 3])}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="/l1/MatMul"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="/l1/Add"),
        helper.make_node("LeakyRelu", ["a1"], ["r1"], alpha=0.2, name="/act1"),
        helper.make_node("Gemm", ["r1", "w2", "c2"], ["g2"], transB=1, alpha=0.5, beta=2.0,
                         name="/l2/Gemm"),
        helper.make_node("Elu", ["g2"], ["e2"], alpha=0.7, name="/act2"),
        helper.make_node("Dropout", ["e2"], ["d2"], name="/drop"),
        helper.make_node("Identity", ["d2"], ["i2"], name="/id"),
        helper.make_node("Concat", ["i2", "r1"], ["cat"], axis=1, name="/cat"),
        helper.make_node("Reshape", ["cat", "shape"], ["rs"], name="/rs"),
        helper.make_node("Flatten", ["rs"], ["fl"], axis=1, name="/fl"),
        helper.make_node("Sigmoid", ["fl"], ["sg"], name="/sig"),
        helper.make_node("Gemm", ["sg", "w3"], ["g3"], name="/l3/Gemm"),
        helper.make_node("LogSoftmax", ["g3"], ["y"], axis=-1, name="/ls"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    text = check_against_ort(model, rng.normal(size=(7, 6)).astype(f32), tmp_path)
    assert "leaky_relu(" in text and "alpha=0.2" in text and "concat(" in text
    assert "output y = log_softmax(" in text


def test_hand_built_conv_ops(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    f32 = np.float32
    inits = {"k": rng.normal(size=(4, 2, 3, 3)).astype(f32), "kb": rng.normal(size=4).astype(f32),
             "s": rng.uniform(0.5, 2, size=4).astype(f32), "b": rng.normal(size=4).astype(f32),
             "mu": rng.normal(size=4).astype(f32), "var": rng.uniform(0.5, 2, 4).astype(f32),
             "fc": rng.normal(size=(5, 4)).astype(f32)}
    nodes = [
        helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1], strides=[2, 1],
                         name="/conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"], ["bn"],
                         epsilon=1e-3, name="/bn"),
        helper.make_node("Tanh", ["bn"], ["t"], name="/tanh"),
        helper.make_node("AveragePool", ["t"], ["ap"], kernel_shape=[2, 2], strides=[1, 1],
                         pads=[1, 1, 1, 1], count_include_pad=0, name="/ap"),
        helper.make_node("MaxPool", ["ap"], ["mp"], kernel_shape=[2, 2], strides=[2, 2],
                         name="/mp"),
        helper.make_node("Softplus", ["mp"], ["sp"], name="/sp"),
        helper.make_node("GlobalAveragePool", ["sp"], ["gp"], name="/gap"),
        helper.make_node("Flatten", ["gp"], ["f"], name="/flat"),
        helper.make_node("Gemm", ["f", "fc"], ["z"], transB=1, name="/fc"),
        helper.make_node("Softmax", ["z"], ["y"], name="/softmax"),
    ]
    model = make_model(nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 9, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    text = check_against_ort(model, rng.normal(size=(3, 2, 9, 8)).astype(f32), tmp_path)
    assert "stride=(2, 1)" in text and "count_include_pad=false" in text and "eps=0.001" in text


def tiny(node) -> object:  # type: ignore[no-untyped-def]
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])],
                      {"k": np.ones((1, 1, 3, 3), np.float32)})


def test_unsupported_op_names_node_and_op() -> None:
    model = tiny(helper.make_node("Cos", ["x"], ["y"], name="/weird/Cos"))
    with pytest.raises(UnsupportedOp) as err:
        convert_onnx(model)
    msg = str(err.value)
    assert "'/weird/Cos'" in msg and "op 'Cos' is not supported" in msg and "Gemm" in msg


def test_unsupported_attribute_names_node_and_attribute() -> None:
    model = tiny(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[1, 1], storage_order=1,
                                  name="/p1/MaxPool"))
    with pytest.raises(UnsupportedOp) as err:
        convert_onnx(model)
    msg = str(err.value)
    assert "'/p1/MaxPool' (MaxPool)" in msg and "storage_order=1" in msg and "0" in msg


def test_auto_pad_same_becomes_explicit_padding(tmp_path: Path) -> None:
    model = tiny(helper.make_node("Conv", ["x", "k"], ["y"], auto_pad="SAME_UPPER",
                                  name="/c1/Conv"))
    text = check_against_ort(model, np.random.default_rng(0).normal(size=(2, 1, 4, 4))
                             .astype(np.float32), tmp_path)
    assert "padding=1" in text


def test_cli_import_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = make_model([helper.make_node("Relu", ["x"], ["y"], name="/r")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], {})
    onnx.save(good, tmp_path / "good.onnx")
    assert main(["import", str(tmp_path / "good.onnx"), "-o", str(tmp_path / "good.pbx")]) == 0
    assert "output y = relu(x)" in (tmp_path / "good.pbx").read_text()
    onnx.save(tiny(helper.make_node("Cos", ["x"], ["y"], name="/cos")), tmp_path / "bad.onnx")
    assert main(["import", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "bad.pbx")]) == 1
    assert not (tmp_path / "bad.pbx").exists()
    assert main(["import", str(tmp_path / "good.pbx")]) == 2
    assert main(["import", str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err
    assert "'/cos' (Cos)" in err and "not found" in err
