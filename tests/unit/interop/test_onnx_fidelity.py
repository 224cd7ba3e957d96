"""ONNX import fidelity: dtypes kept, hostile files refused with an error line, shape
subgraphs folded, exporter patterns recognised exactly, every unsupported node listed, and
sklearn's MLPClassifier through skl2onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.errors import InputError, UnsupportedOp
from pbxc.ops import BUILTIN_ACTIVATIONS, SIGNATURES

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbxc.interop import convert_onnx, import_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_model(nodes: list[Any], inputs: list[Any], outputs: list[Any],
               inits: dict[str, np.ndarray], opset: int = 17, check: bool = True) -> Any:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(model)
    return model


def vi(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def ort_run(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString())
    return [np.asarray(r) for r in sess.run(None, feeds)]


def load(res: Any, tmp_path: Path, **kw: Any) -> Any:
    np.savez(tmp_path / "w.npz", **res.weights)
    return pbxc.loads(res.text, path=str(tmp_path / "m.pbx"), **kw)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def has_op(name: str) -> bool:
    return name in SIGNATURES or name in BUILTIN_ACTIVATIONS


# ---------------------------------------------------------------- dtypes


def test_float64_gemm_matmul_conv_batchnorm_stay_float64(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f8 = np.float64
    inits = {"k": rng.normal(size=(3, 2, 3)), "kb": rng.normal(size=3),
             "s": rng.uniform(0.5, 2, 3), "b": rng.normal(size=3), "mu": rng.normal(size=3),
             "var": rng.uniform(0.5, 2, 3), "w": rng.normal(size=(5, 18)),
             "c": rng.normal(size=5), "m": rng.normal(size=(5, 4)), "shift": rng.normal(size=4)}
    nodes = [helper.make_node("Conv", ["x", "k", "kb"], ["c1"], pads=[1, 1], name="/conv"),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "mu", "var"], ["bn"],
                              name="/bn"),
             helper.make_node("Tanh", ["bn"], ["t"], name="/t"),
             helper.make_node("Flatten", ["t"], ["f"], name="/f"),
             helper.make_node("Gemm", ["f", "w", "c"], ["g"], transB=1, alpha=0.5, beta=2.0,
                              name="/fc"),
             helper.make_node("MatMul", ["g", "m"], ["mm"], name="/mm"),
             helper.make_node("Add", ["mm", "shift"], ["y"], name="/add")]
    model = make_model(nodes, [vi("x", ["N", 2, 6], TensorProto.DOUBLE)],
                       [vi("y", ["N", 4], TensorProto.DOUBLE)],
                       {k: v.astype(f8) for k, v in inits.items()})
    res = convert_onnx(model, weights_file="w.npz")
    assert "input x: float64[2, 6]" in res.text
    assert all(w.dtype == np.float64 for w in res.weights.values())
    x = rng.normal(size=(3, 2, 6))
    m = load(res, tmp_path)
    assert m.dtype == np.float64
    # the float64 reference, by hand
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1)))
    conv = np.stack([np.einsum("nci,oci->no", xp[:, :, i:i + 3], inits["k"])
                     for i in range(6)], -1) + inits["kb"][:, None]
    bn = (conv - inits["mu"][:, None]) / np.sqrt(inits["var"][:, None] + 1e-5) * \
        inits["s"][:, None] + inits["b"][:, None]
    g = 0.5 * np.tanh(bn).reshape(3, -1) @ inits["w"].T + 2.0 * inits["c"]
    ref = g @ inits["m"] + inits["shift"]
    assert rel(m.forward(x), ref) < 1e-13


def test_a_weight_of_another_dtype_is_an_error_unless_asked(tmp_path: Path) -> None:
    w = np.random.default_rng(1).normal(size=(3, 4))
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="/fc")],
                       [vi("x", ["N", 4])], [vi("y", ["N", 3])], {"w": w.astype(np.float16)})
    with pytest.raises(UnsupportedOp, match=r"'/fc' \(Gemm\): constant 'w' is float16 but the "
                       r"model computes in float32.*--dtype float32"):
        convert_onnx(model)
    res = convert_onnx(model, dtype="float32", weights_file="w.npz")
    assert res.weights["fc.weight"].dtype == np.float32
    x = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    ref = x @ w.astype(np.float16).astype(np.float32).T
    assert rel(load(res, tmp_path).forward(x), ref) < 1e-6


def test_cast_between_float_types(tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.DOUBLE, name="/cast"),
             helper.make_node("Relu", ["c"], ["y"], name="/r")]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3], TensorProto.DOUBLE)], {})
    with pytest.raises(UnsupportedOp, match=r"'/cast' \(Cast\): Cast to float64 in a model that "
                       r"computes in float32"):
        convert_onnx(model)
    res = convert_onnx(model, dtype="float64")
    assert "input x: float64[3]" in res.text and "output y = relu(x)" in res.text
    assert any("--dtype" in n for n in res.notes)
    same = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                      [vi("x", ["N", 3])], [vi("y", ["N", 3])], {})
    assert "output y = x" in convert_onnx(same).text


# ---------------------------------------------------------------- hostile files (issue #10)


def bad_tensor_model(tensor: Any) -> Any:
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="/fc")],
                          "g", [vi("x", ["N", 3])], [vi("y", ["N", 3])], [tensor])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def lying_dims() -> Any:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 3])
    t.raw_data = np.ones(4, np.float32).tobytes()
    return bad_tensor_model(t)


def typed(data_type: int) -> Any:
    t = TensorProto(name="w", data_type=data_type, dims=[3, 3])
    if data_type == TensorProto.STRING:
        t.string_data.extend([b"a"] * 9)
    elif data_type != TensorProto.UNDEFINED:
        t.raw_data = np.ones(9, np.complex64).tobytes()
    return bad_tensor_model(t)


def conv_strides_zero() -> Any:
    return make_model([helper.make_node("Conv", ["x", "k"], ["y"], strides=[0, 0],
                                        name="/conv")],
                      [vi("x", ["N", 1, 4, 4])], [vi("y", ["N", 1, 2, 2])],
                      {"k": np.ones((1, 1, 3, 3), np.float32)}, check=False)


def alpha_inf() -> Any:
    return make_model([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=float("inf"),
                                        name="/lrelu")],
                      [vi("x", ["N", 3])], [vi("y", ["N", 3])], {}, check=False)


def reshape_huge() -> Any:
    return make_model([helper.make_node("Reshape", ["x", "s"], ["y"], name="/rs")],
                      [vi("x", ["N", 4])], [vi("y", ["N", 10 ** 15])],
                      {"s": np.array([0, 10 ** 15], np.int64)}, check=False)


HOSTILE = {
    "dims-lie": (lying_dims, "ONNX initializer 'w': dims [3, 3] need 36 bytes of data, the "
                             "file holds 16"),
    "string": (lambda: typed(TensorProto.STRING), "ONNX initializer 'w': element type STRING "
                                                  "is not supported"),
    "undefined": (lambda: typed(TensorProto.UNDEFINED), "element type UNDEFINED is not "
                                                        "supported"),
    "complex": (lambda: typed(TensorProto.COMPLEX64), "element type COMPLEX64 is not "
                                                      "supported"),
    "strides-0": (conv_strides_zero, "'/conv' (Conv): strides=[0, 0] must hold 2 values >= 1"),
    "alpha-inf": (alpha_inf, "'/lrelu' (LeakyRelu): attribute alpha=inf is not finite"),
    "reshape-1e15": (reshape_huge, "'/rs' (Reshape): reshape of per-sample shape [4] to "
                                   "[1000000000000000] changes the number of elements"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_onnx_files_are_refused(case: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    build, message = HOSTILE[case]
    src = tmp_path / "bad.onnx"
    src.write_bytes(build().SerializeToString())
    before = set(tmp_path.iterdir())
    assert main(["import", str(src), "-o", str(tmp_path / "bad.pbx")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before   # nothing written, nothing left behind


def test_external_data_outside_the_folder_is_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(9, np.float32).tobytes())
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 3])
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    (tmp_path / "m").mkdir()
    src = tmp_path / "m" / "bad.onnx"
    src.write_bytes(bad_tensor_model(t).SerializeToString())
    assert main(["import", str(src), "-o", str(tmp_path / "m" / "bad.pbx")]) == 1
    err = capsys.readouterr().err
    assert "external data location '../secret.bin' is not a relative path inside" in err


def test_external_data_inside_the_folder_is_read(tmp_path: Path) -> None:
    w = np.arange(9, dtype=np.float32).reshape(3, 3)
    (tmp_path / "w.bin").write_bytes(b"xxxx" + w.tobytes())
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 3])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "4"), ("length", "36")):
        e = t.external_data.add()
        e.key, e.value = k, v
    src = tmp_path / "m.onnx"
    src.write_bytes(bad_tensor_model(t).SerializeToString())
    res = import_onnx(src, tmp_path / "m.pbx")
    assert np.array_equal(res.weights["fc.weight"], w)


# ---------------------------------------------------------------- folding


def test_shape_subgraphs_fold_with_a_dynamic_batch(tmp_path: Path) -> None:
    """x.view(x.size(0), -1) as the TorchScript exporter writes it without constant folding,
    an Identity of an initializer, a ConstantOfShape bias and Reshape allowzero=1."""
    rng = np.random.default_rng(2)
    inits = {"w": rng.normal(size=(3, 8)).astype(np.float32),
             "zero": np.array(0, np.int64), "minus1": np.array([-1], np.int64),
             "bshape": np.array([3], np.int64), "t2": np.array([0, 4, 2], np.int64)}
    nodes = [
        helper.make_node("Reshape", ["x", "t2"], ["x3"], allowzero=0, name="/r0"),
        helper.make_node("Shape", ["x3"], ["shp"], name="/shape"),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0, name="/gather"),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="/unsq"),
        helper.make_node("Constant", [], ["axes0"], value=numpy_helper.from_array(
            np.array([0], np.int64)), name="/c0"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="/cat"),
        helper.make_node("Reshape", ["x3", "target"], ["flat"], allowzero=1, name="/view"),
        helper.make_node("Identity", ["w"], ["w_id"], name="/wid"),
        helper.make_node("ConstantOfShape", ["bshape"], ["bias"], name="/cos",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Gemm", ["flat", "w_id", "bias"], ["y"], transB=1, name="/fc"),
    ]
    nodes.insert(0, nodes.pop(4))   # the Constant first: a valid topological order
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 3])], inits)
    res = convert_onnx(model, weights_file="w.npz")
    assert "shape" not in res.text.split("model")[1].lower().replace("reshape", "")
    x = rng.normal(size=(5, 8)).astype(np.float32)
    assert rel(load(res, tmp_path).forward(x), ort_run(model, {"x": x})[0]) < 1e-6


def test_a_reshape_that_mixes_batch_and_features_is_refused() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="/shape"),
             helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0, name="/gather"),
             helper.make_node("Mul", ["n", "two"], ["n2"], name="/mul"),
             helper.make_node("Unsqueeze", ["n2", "axes0"], ["n1"], name="/unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="/cat"),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="/view")]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["M", 4])],
                       {"zero": np.array(0, np.int64), "two": np.array(2, np.int64),
                        "axes0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)})
    # issue 12: the batch is tracked inside the graph ([N, 8] -> [N*2, 4]); leaving it merged
    # at an output is the error, naming the output and its node
    with pytest.raises(UnsupportedOp, match=r"output 'y' \(computed by ONNX node '/view' "
                       r"\(Reshape\)\) has the batch in ONNX axis 0 \(\[N\*2, 4\]"):
        convert_onnx(model)


def test_single_input_concat_dropout_and_identity_chains_are_the_same_value() -> None:
    nodes = [helper.make_node("Concat", ["x"], ["c"], axis=1, name="/cat"),
             helper.make_node("Dropout", ["c"], ["d"], name="/drop"),
             helper.make_node("Identity", ["d"], ["i"], name="/id"),
             helper.make_node("Dropout", ["i"], ["d2"], name="/drop2"),
             helper.make_node("Relu", ["d2"], ["y"], name="/r")]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3])], {})
    res = convert_onnx(model)
    assert "concat(" not in res.text and "output y = relu(x)" in res.text


def test_squeeze_unsqueeze_are_reshapes(tmp_path: Path) -> None:
    nodes = [helper.make_node("Unsqueeze", ["x", "a"], ["u"], name="/u"),
             helper.make_node("Relu", ["u"], ["r"], name="/r"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="/gap"),
             helper.make_node("Squeeze", ["g", "b"], ["s"], name="/s"),
             helper.make_node("Flatten", ["s"], ["y"], name="/f")]
    model = make_model(nodes, [vi("x", ["N", 2, 5])], [vi("y", ["N", 2])],
                       {"a": np.array([-2], np.int64), "b": np.array([-1, -2], np.int64)})
    res = convert_onnx(model, weights_file="w.npz")
    x = np.random.default_rng(0).normal(size=(3, 2, 5)).astype(np.float32)
    assert rel(load(res, tmp_path).forward(x), ort_run(model, {"x": x})[0]) < 1e-6


def test_a_squeeze_excitation_gate_on_a_1x1_map_is_written_second(tmp_path: Path) -> None:
    """On a 1x1 feature map (MobileNet-V3 at 32x32) the SE gate and the signal have the same
    shape, so mul's "gate" LRP rule cannot tell them apart by shape; torch writes
    ``scale * x``, and the importer puts the gated signal first. Relevance then reaches the
    input through the signal only: the SE branch (pool, 1x1 convs, hardsigmoid) gets none."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
             "w2": rng.normal(size=(4, 4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/relu"),
             helper.make_node("GlobalAveragePool", ["a"], ["p"], name="/se/pool"),
             helper.make_node("Conv", ["p", "w1"], ["c1"], name="/se/fc1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="/se/relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/se/fc2"),
             helper.make_node("HardSigmoid", ["c2"], ["s"], alpha=1 / 6, name="/se/gate"),
             helper.make_node("Mul", ["s", "a"], ["y"], name="/se/mul")]
    model = make_model(nodes, [vi("x", ["N", 4, 1, 1])], [vi("y", ["N", 4, 1, 1])], inits)
    res = convert_onnx(model, weights_file="w.npz")
    mul = next(line for line in res.text.splitlines() if "mul(" in line)
    mul, source = mul.split("  # onnx: ")
    assert source == "/se/mul (Mul)"
    signal, gate = mul.split("mul(")[1].rstrip(")").split(", ")[:2]
    assert (signal, gate) == ("relu", "se_gate"), mul
    m = load(res, tmp_path, dtype="float64")
    x = rng.normal(size=(3, 4, 1, 1)) + 1.0
    assert rel(m.forward(x), ort_run(model, {"x": x.astype(np.float32)})[0]) < 1e-6
    result = m.lrp(x, composite="epsilon")
    branch = {n: float(np.abs(e.relevance_out).max()) for n, e in result.ledger.layers.items()
              if n.startswith("se_") and "mul" not in n}
    assert branch and all(r == 0 for r in branch.values()), branch
    assert np.abs(result.relevance["x"].sum((1, 2, 3)) - result.ledger.start).max() < 1e-6
    assert result.ledger.conservation_error.max() < 1e-12


# ---------------------------------------------------------------- patterns


def test_every_unsupported_node_is_listed_at_once() -> None:
    nodes = [helper.make_node("Cos", ["x"], ["a"], name="/cos"),
             helper.make_node("Relu", ["a"], ["b"], name="/relu"),
             helper.make_node("LpNormalization", ["b"], ["c"], p=1, name="/lp"),
             helper.make_node("HardSigmoid", ["c"], ["y"], alpha=0.3, name="/hs")]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3])], {})
    with pytest.raises(UnsupportedOp) as err:
        convert_onnx(model)
    msg = str(err.value)
    assert "'/cos' (Cos): op 'Cos' is not supported (attributes: none)" in msg
    assert "'/lp' (LpNormalization): op 'LpNormalization' is not supported (attributes: " \
           "p=1)" in msg
    assert "'/hs' (HardSigmoid): HardSigmoid with alpha=0.3, beta=0.5" in msg
    assert "3 ONNX nodes cannot be imported; supported ops:" in msg and "Gemm" in msg
    assert len(err.value.diagnostics) == 4


def torch_export(module: Any, x: Any, path: Path, dynamo: bool, opset: int | None = None) -> None:
    import contextlib
    import io
    import warnings

    torch = pytest.importorskip("torch")
    kwargs: dict[str, Any] = {"dynamo": dynamo}
    if opset is not None:
        kwargs["opset_version"] = opset
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), **kwargs)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_softplus_with_threshold_is_recognised_exactly(dynamo: bool, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Softplus(beta=2.0, threshold=5.0)).eval()
    torch_export(net, torch.zeros(1, 3), tmp_path / "sp.onnx", dynamo)
    res = import_onnx(tmp_path / "sp.onnx", tmp_path / "sp.pbx")
    x = np.linspace(-3, 3, 36).reshape(12, 3)
    m = pbxc.load(tmp_path / "sp.pbx", dtype="float64")
    ours = m.forward(x)
    if dynamo:   # Where(Greater(2x, 5), x, Softplus(2x) / 2): torch's function, exactly
        assert "softplus_threshold(" in res.text and "threshold=5.0" in res.text
        with torch.no_grad():
            ref = net.double()(torch.from_numpy(x)).numpy()
        assert rel(ours, ref) < 1e-13
    else:   # the TorchScript exporter drops the threshold: softplus(2x) / 2 everywhere
        assert "softplus(" in res.text and "beta=2.0" in res.text
        with torch.no_grad():
            z = net[0].double()(torch.from_numpy(x)).numpy()
        assert rel(ours, np.logaddexp(0, 2 * z) / 2) < 1e-13


def act_net() -> Any:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Acts(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = self.fc(x)
            f = nn.functional
            return torch.cat([f.gelu(h), f.gelu(h, approximate="tanh"), f.silu(h), f.mish(h),
                              torch.tanh(h)], 1)
    torch.manual_seed(0)
    return Acts().eval()


OPSETS = [(17, False), (18, False), (19, False), (20, False), (18, True), (20, True),
          (21, True)]
OPSET_IDS = [f"opset{o}-{'dynamo' if d else 'torchscript'}" for o, d in OPSETS]


@pytest.fixture(scope="module")
def act_exports(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("acts")
    cache: dict[tuple[int, bool], Path] = {}

    def get(opset: int, dynamo: bool) -> Path:
        if (opset, dynamo) not in cache:
            path = folder / f"a{opset}{dynamo}.onnx"
            torch_export(act_net(), torch.zeros(1, 4), path, dynamo, opset)
            cache[(opset, dynamo)] = path
        return cache[(opset, dynamo)]
    return get


@pytest.mark.parametrize(("opset", "dynamo"), OPSETS, ids=OPSET_IDS)
def test_activation_patterns_across_opsets(opset: int, dynamo: bool, act_exports: Any) -> None:
    """Gelu (both forms) as the op from opset 20 and as its Erf/Tanh expansion before,
    silu as x * Sigmoid(x), Mish as the op (18) or x * Tanh(Softplus(x)): the text."""
    res = convert_onnx(onnx.load(str(act_exports(opset, dynamo))))
    body = res.text.split("\n\n", 2)[-1]
    for op in ("gelu(", "gelu_tanh(", "silu(", "mish(", "tanh("):
        assert op in body, res.text
    for leftover in ("erf", "pow", "normalize", "mul(", "sigmoid("):
        assert leftover not in body, res.text


@pytest.mark.parametrize(("opset", "dynamo"), OPSETS, ids=OPSET_IDS)
@pytest.mark.xfail(not has_op("gelu_tanh"), strict=True,
                   reason="waiting for gelu_tanh in the language")
def test_activations_across_opsets_match_torch(opset: int, dynamo: bool, act_exports: Any,
                                               tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import_onnx(act_exports(opset, dynamo), tmp_path / "a.pbx")
    x = np.linspace(-4, 4, 24).reshape(6, 4)
    with torch.no_grad():
        ref = act_net().double()(torch.from_numpy(x)).numpy()
    assert rel(pbxc.load(tmp_path / "a.pbx", dtype="float64").forward(x), ref) < 1e-12


@pytest.mark.xfail(not has_op("prelu"), strict=True, reason="waiting for prelu in the language")
def test_prelu_per_channel(tmp_path: Path) -> None:
    slope = np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)
    model = make_model([helper.make_node("PRelu", ["x", "s"], ["y"], name="/prelu")],
                       [vi("x", ["N", 3, 2, 2])], [vi("y", ["N", 3, 2, 2])], {"s": slope})
    res = convert_onnx(model, weights_file="w.npz")
    assert res.weights["prelu.weight"].shape == (3,)
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32)
    assert rel(load(res, tmp_path).forward(x), ort_run(model, {"x": x})[0]) < 1e-6


@pytest.mark.xfail(not has_op("pad"), strict=True, reason="waiting for pad in the language")
def test_constant_pad(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Pad", ["x", "p", "v"], ["y"], name="/pad")],
                       [vi("x", ["N", 2, 3])], [vi("y", ["N", 2, 6])],
                       {"p": np.array([0, 0, 1, 0, 0, 2], np.int64),
                        "v": np.array(0.5, np.float32)})
    res = convert_onnx(model, weights_file="w.npz")
    x = np.random.default_rng(0).normal(size=(2, 2, 3)).astype(np.float32)
    assert rel(load(res, tmp_path).forward(x), ort_run(model, {"x": x})[0]) < 1e-6


# ---------------------------------------------------------------- sklearn


@pytest.mark.parametrize("scaled", [False, True], ids=["mlp", "scaler-pipeline"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_sklearn_mlp_classifier(scaled: bool, dtype: Any, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4)) * [1, 2, 3, 4] + 1
    y = (X[:, 0] > 1).astype(int) + (X[:, 1] > 1)
    clf = MLPClassifier((8,), max_iter=300, random_state=0)
    est = make_pipeline(StandardScaler(), clf) if scaled else clf
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    onx = skl2onnx.to_onnx(est, X[:1].astype(dtype))
    src = tmp_path / "mlp.onnx"
    src.write_bytes(onx.SerializeToString())
    assert main(["import", str(src), "-o", str(tmp_path / "mlp.pbx")]) == 0
    err = capsys.readouterr().err
    assert "output 'output_label' (INT64, computed by Cast <- Cast <- Reshape <- " \
           "ArrayFeatureExtractor <- ArgMax" in err
    text = (tmp_path / "mlp.pbx").read_text()
    assert 'classes ["0", "1", "2"]' in text
    if scaled:
        assert "normalize(" in text
    m = pbxc.load(tmp_path / "mlp.pbx")
    assert m.dtype == dtype and m.output_names == ("output_probability",)
    probs = m.forward(X[:20].astype(dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert rel(probs, est.predict_proba(X[:20])) < tol
    assert np.array_equal(probs.argmax(1), est.predict(X[:20]))


def test_outputs_option_chooses_and_checks_names(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/r"),
             helper.make_node("Tanh", ["x"], ["b"], name="/t")]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("a", ["N", 3]), vi("b", ["N", 3])], {})
    res = convert_onnx(model, outputs=["b"])
    assert "output b = tanh(x)" in res.text and "relu" not in res.text
    with pytest.raises(InputError, match="--outputs names 'c'"):
        convert_onnx(model, outputs=["c"])


# ---------------------------------------------------------------- files from other tools


def small_cnn_export(tmp_path: Path) -> tuple[Path, np.ndarray]:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU6(),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "cnn.onnx"
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.zeros(1, 2, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}},
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return path, np.random.default_rng(0).normal(size=(3, 2, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("tool", ["onnxslim", "onnxruntime-basic"])
def test_files_rewritten_by_other_tools(tool: str, tmp_path: Path) -> None:
    src, x = small_cnn_export(tmp_path)
    out = tmp_path / f"{tool}.onnx"
    if tool == "onnxslim":
        onnxslim = pytest.importorskip("onnxslim")
        onnx.save(onnxslim.slim(onnx.load(str(src))), str(out))
    else:   # onnxruntime's optimizer at the level that keeps standard ONNX ops
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    import_onnx(out, tmp_path / "m.pbx")
    sess = ort.InferenceSession(str(src))
    ref = sess.run(None, {"x": x})[0]
    assert rel(pbxc.load(tmp_path / "m.pbx").forward(x), ref) < 1e-5
