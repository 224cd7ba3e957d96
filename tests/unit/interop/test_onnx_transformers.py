"""ONNX import of transformer ops (issue 12): each handler on a hand-built ONNX graph (the
emitted .pbx text per SYNTAX-12's op contract), batch-axis moves refused naming the node,
Identity of a Constant node, and torch exports of the blocks that do not move the batch
axis (LayerNorm, GELU both forms, an MLP-Mixer-like block) with both exporters.

End-to-end checks (forward vs onnxruntime/torch, Jacobian vs torch.func, LRP/DFD) need the
ops of helpers `tensor` and `norm`; they are skipped, naming the missing op, until those
ops are in pbxc/ops.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.errors import UnsupportedOp

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbxc.interop import convert_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_model(nodes: list[Any], inputs: list[Any], outputs: list[Any],
               inits: dict[str, np.ndarray], opset: int = 18) -> Any:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def vi(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def body(text: str) -> list[str]:
    """The statements, without their ``# onnx:`` source comments."""
    return [ln.split("  # onnx: ")[0] for ln in text.splitlines()
            if "=" in ln and not ln.startswith("#")]


# ---------------------------------------------------------------- handlers, text level

def test_transpose_keeps_batch_first_and_converts_perm() -> None:
    m = make_model([helper.make_node("Transpose", ["x"], ["y"], name="/t", perm=[0, 2, 3, 1])],
                   [vi("x", ["N", 2, 3, 4])], [vi("y", ["N", 3, 4, 2])], {})
    assert "output y = transpose(x, perm=(1, 2, 0))" in convert_onnx(m).text


def test_a_moved_batch_is_tracked_and_refused_where_it_cannot_be_kept() -> None:
    """A Transpose that moves the batch is followed (issue 12): back at axis 0 it is the
    identity; left moved at an output, or fed to an op that needs it first, it is an error
    naming the output or the node."""
    back = make_model([
        helper.make_node("Transpose", ["x"], ["t"], name="/attn/T", perm=[1, 0, 2]),
        helper.make_node("Relu", ["t"], ["r"], name="/attn/relu"),
        helper.make_node("Transpose", ["r"], ["y"], name="/attn/T2", perm=[1, 0, 2]),
    ], [vi("x", ["N", 5, 4])], [vi("y", ["N", 5, 4])], {})
    assert body(convert_onnx(back).text) == ["attn_relu = relu(x)", "output y = attn_relu"]
    m = make_model([helper.make_node("Transpose", ["x"], ["y"], name="/attn/T", perm=[1, 0, 2])],
                   [vi("x", ["N", 5, 4])], [vi("y", [5, "N", 4])], {})
    with pytest.raises(UnsupportedOp, match=r"output 'y' \(computed by ONNX node '/attn/T' "
                       r"\(Transpose\)\) has the batch in ONNX axis 1 \(\[5, N, 4\]"):
        convert_onnx(m)
    ln = make_model([
        helper.make_node("Transpose", ["x"], ["t"], name="/attn/T", perm=[1, 0, 2]),
        helper.make_node("LayerNormalization", ["t", "w"], ["u"], name="/ln", axis=-1),
        helper.make_node("Transpose", ["u"], ["y"], name="/attn/T2", perm=[1, 0, 2]),
    ], [vi("x", ["N", 5, 4])], [vi("y", ["N", 5, 4])], {"w": np.ones(4, np.float32)}, opset=17)
    with pytest.raises(UnsupportedOp, match=r"'/ln' \(LayerNormalization\).*batch moved "
                       r"to ONNX axis 1"):
        convert_onnx(ln)


def test_matmul_of_two_values_and_of_a_constant() -> None:
    w = np.arange(12, dtype=np.float64).reshape(4, 3)
    m = make_model([
        helper.make_node("MatMul", ["x", "w"], ["q"], name="/q"),
        helper.make_node("Transpose", ["q"], ["kt"], name="/kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="/s"),
    ], [vi("x", ["N", 5, 4], TensorProto.DOUBLE)], [vi("s", ["N", 5, 5], TensorProto.DOUBLE)],
        {"w": w})
    res = convert_onnx(m)
    lines = body(res.text)
    assert any("linear(x, @" in ln for ln in lines)
    assert any("transpose(" in ln and "perm=(1, 0)" in ln for ln in lines)
    assert lines[-1].startswith("output s = matmul(")
    (wk,) = [k for k in res.weights if k.endswith(".weight")]
    assert res.weights[wk].dtype == np.float64            # float64 kept, never cast
    np.testing.assert_array_equal(res.weights[wk], w.T)  # [in, out] -> [out, in]


def test_gather_scalar_is_select_and_vector_is_refused() -> None:
    m = make_model([helper.make_node("Gather", ["x", "i"], ["y"], name="/cls", axis=1)],
                   [vi("x", ["N", 5, 4])], [vi("y", ["N", 4])], {"i": np.array(0, np.int64)})
    assert "output y = select(x, axis=-2, index=0)" in convert_onnx(m).text
    m2 = make_model([helper.make_node("Gather", ["x", "i"], ["y"], name="/g", axis=1)],
                    [vi("x", ["N", 5, 4])], [vi("y", ["N", 2, 4])], {"i": i64(0, 1)})
    with pytest.raises(UnsupportedOp, match=r"'/g' \(Gather\).*only a scalar index"):
        convert_onnx(m2)


def test_slice_and_split_are_slices() -> None:
    m = make_model([
        helper.make_node("Slice", ["x", "s", "e", "a"], ["y"], name="/sl"),
        helper.make_node("Split", ["x", "sz"], ["p", "q"], name="/sp", axis=-1),
    ], [vi("x", ["N", 5, 6])], [vi("y", ["N", 4, 6]), vi("p", ["N", 5, 2]), vi("q", ["N", 5, 4])],
        {"s": i64(1), "e": i64(2 ** 63 - 1), "a": i64(1), "sz": i64(2, 4)})
    text = convert_onnx(m).text
    assert "slice(x, axis=-2, start=1)" in text
    assert "slice(x, axis=-1, start=0, stop=2)" in text
    assert "slice(x, axis=-1, start=2)" in text


def test_reductions_over_per_sample_axes() -> None:
    m = make_model([
        helper.make_node("ReduceMean", ["x", "ax"], ["y"], name="/m", keepdims=0),
        helper.make_node("ReduceSum", ["x", "ax2"], ["z"], name="/s", keepdims=1),
    ], [vi("x", ["N", 5, 6])], [vi("y", ["N", 6]), vi("z", ["N", 5, 1])],
        {"ax": i64(1), "ax2": i64(-1)})
    text = convert_onnx(m).text
    assert "mean(x, axes=(0,))" in text
    assert "sum(x, axes=(1,), keepdims=true)" in text
    m2 = make_model([helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="/b", keepdims=0)],
                    [vi("x", ["N", 5])], [vi("y", [5])], {"ax": i64(0)})
    with pytest.raises(UnsupportedOp, match=r"'/b' \(ReduceSum\).*batch axis"):
        convert_onnx(m2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernormalization_single_op(dtype: type) -> None:
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=6).astype(dtype), rng.normal(size=6).astype(dtype)
    m = make_model([helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["y"],
                                     name="/ln", axis=-1, epsilon=1e-5)],
                   [vi("x", ["N", 5, 6], elem)], [vi("y", ["N", 5, 6], elem)],
                   {"ln.weight": w, "ln.bias": b}, opset=17)
    res = convert_onnx(m)
    assert "output y = layernorm(x, @ln, eps=1e-05)" in res.text
    assert res.weights["ln.weight"].dtype == dtype
    np.testing.assert_array_equal(res.weights["ln.bias"], b)


def test_identity_of_a_constant_node_feeds_a_weight() -> None:
    """Issue 11 leftover: Identity of a constant (here a Constant node, as torchvision
    exports share weights) folds without onnxslim."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = make_model([
        helper.make_node("Constant", [], ["c"], name="/c", value=numpy_helper.from_array(w)),
        helper.make_node("Identity", ["c"], ["c2"], name="/id"),
        helper.make_node("Gemm", ["x", "c2"], ["y"], name="/fc", transB=1),
    ], [vi("x", ["N", 4])], [vi("y", ["N", 3])], {})
    res = convert_onnx(m)
    assert body(res.text) == ["output y = linear(x, @fc, bias=false)"]
    np.testing.assert_array_equal(res.weights["fc.weight"], w)


# ---------------------------------------------------------------- torch exports

torch = pytest.importorskip("torch", reason="torch is not installed")
nn = torch.nn


def export(model: Any, x: Any, path: Path, dynamo: bool, opset: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw: dict[str, Any] = {"dynamo": dynamo, "opset_version": opset,
                              "input_names": ["x"], "output_names": ["y"]}
        if not dynamo:
            kw["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
        torch.onnx.export(model.eval(), (x,), str(path), **kw)
    return onnx.load(str(path))


class MixerBlock(nn.Module):
    """MLP-Mixer-like: token mixing across 8 tokens (Transpose, Linear, GELU) and channel
    mixing, each behind a LayerNorm with a residual; head on the mean token."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.tok = nn.Sequential(nn.Linear(8, 12), nn.GELU(approximate=approximate), nn.Linear(12, 8))
        self.ch = nn.Sequential(nn.Linear(16, 24), nn.GELU(approximate=approximate), nn.Linear(24, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: Any) -> Any:
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ch(self.n2(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mixer_block_imports_to_the_named_ops(tmp_path: Path, dynamo: bool,
                                             approximate: str) -> None:
    torch.manual_seed(0)
    model = MixerBlock(approximate)
    m = export(model, torch.randn(2 if not dynamo else 1, 8, 16), tmp_path / "m.onnx",
               dynamo, 18)
    res = convert_onnx(m)
    text = res.text
    gelu = "gelu_tanh(" if approximate == "tanh" else "gelu("
    assert text.count("layernorm(") == 2, text
    assert text.count(gelu) == 2, text
    assert text.count("transpose(") == 2 and "perm=(1, 0)" in text, text
    assert "mean(" in text and "axes=(0,)" in text, text
    assert text.count("linear(") == 5, text
    np.savez(tmp_path / "w.npz", **res.weights)
    net = pbxc.loads(text.replace('"weights.npz"', '"w.npz"'), path=str(tmp_path / "m.pbx"))
    x = np.random.default_rng(1).normal(size=(3, 8, 16)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(net(x), want, rtol=1e-5, atol=1e-6)


class HandLayerNorm(nn.Module):
    """LayerNorm written out (as exporters decompose it before opset 17 and as users write
    it): the canonicalisation rebuilds one `layernorm`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.b = nn.Parameter(torch.linspace(-1.0, 1.0, 16))

    def forward(self, x: Any) -> Any:
        mu = x.mean(-1, keepdim=True)
        d = x - mu
        var = (d ** 2).mean(-1, keepdim=True)
        return d / torch.sqrt(var + 1e-5) * self.w + self.b


@pytest.mark.parametrize("dynamo", [False, True])
def test_decomposed_layernorm_is_rebuilt(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    model = HandLayerNorm().double()
    m = export(model, torch.randn(2, 8, 16, dtype=torch.float64), tmp_path / "l.onnx", dynamo, 18)
    res = convert_onnx(m)
    lines = body(res.text)
    assert len(lines) == 1 and lines[0].startswith("output y = layernorm(x, @"), res.text
    # the eps the file holds, exactly: the dynamo exporter writes 1e-5 rounded to float32
    # (then cast to double), the TorchScript exporter the double 1e-5
    eps = "eps=9.999999747378752e-06" if dynamo else "eps=1e-05"
    assert eps in lines[0], res.text
    (wk,) = [k for k in res.weights if k.endswith(".weight")]
    assert res.weights[wk].dtype == np.float64
    np.testing.assert_array_equal(res.weights[wk], model.w.detach().numpy())


@pytest.mark.parametrize("dynamo", [False, True])
def test_pbxc_graph_shows_the_onnx_node_of_each_recognised_op(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], dynamo: bool) -> None:
    """Issue 12: `pbxc graph` of an imported model shows, per node, the .pbx line, the op
    pbxc recognised and the ONNX node it was converted from (a pattern by its last node):
    here the nine nodes of a hand-written LayerNorm rebuilt as one layernorm."""
    from pbxc.cli import main

    torch.manual_seed(0)
    model = HandLayerNorm().double()
    export(model, torch.randn(2, 8, 16, dtype=torch.float64), tmp_path / "l.onnx", dynamo, 18)
    assert main(["import", str(tmp_path / "l.onnx"), "-o", str(tmp_path / "l.pbx")]) == 0
    text = (tmp_path / "l.pbx").read_text()
    (line,) = [ln for ln in text.splitlines() if "layernorm(" in ln]
    origin = line.split("  # onnx: ")[1]
    assert origin.endswith(", end of the layernorm pattern)"), line
    capsys.readouterr()
    assert main(["graph", str(tmp_path / "l.pbx")]) == 0
    out = capsys.readouterr().out
    (row,) = [r for r in out.splitlines() if "layernorm(" in r]
    assert row.endswith(f"<- onnx {origin}"), out
    assert main(["graph", str(tmp_path / "l.pbx"), "--format", "json"]) == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert [n["onnx"] for n in nodes if n["kind"] == "layernorm"] == [origin]
    assert all("onnx" not in n for n in nodes if n["kind"] == "input")


class PatchEmbed(nn.Module):
    """ViT patch embedding on 1x32x32: Conv2d(stride = kernel = 4), flatten, transpose, a
    class token expanded over the batch and concatenated, a positional embedding, the head
    on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 65, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Any) -> Any:
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(t[:, 0])


# both exporters: dynamo folds the expand into an initializer at the example batch; the
# TorchScript exporter's `cls.expand(x.shape[0], ...)` goes through Shape/ConstantOfShape/
# Equal/Where/Expand of a shape computed from the input, which folds at two probe batches
@pytest.mark.parametrize("dynamo", [False, True])
def test_vit_patch_embedding_class_token(tmp_path: Path, dynamo: bool) -> None:
    """The class token imports as a constant operand, `concat(@cls, tokens)`; the model
    matches torch in float64 and onnxruntime in float32 (which has no float64 Conv)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = PatchEmbed().double()
    m = export(model, torch.randn(2, 1, 32, 32, dtype=torch.float64), tmp_path / "p.onnx",
               dynamo, 18)
    res = convert_onnx(m)
    text = res.text
    assert "conv2d(" in text and "transpose(" in text and "constant(" not in text, text
    assert "select(" in text and "axis=-2, index=0" in text, text
    (cat,) = [ln for ln in body(text) if "concat(" in ln]
    assert "concat(@" in cat and cat.endswith(")") and "axis" not in cat, cat   # axis 0: default
    ck = cat.split("concat(@", 1)[1].split(",", 1)[0]
    if not dynamo:
        assert ck == "cls", cat    # named after the parameter it is expanded from
    np.testing.assert_array_equal(res.weights[ck], model.cls.detach().numpy()[0])
    assert res.weights[ck].dtype == np.float64
    np.savez(tmp_path / "w.npz", **res.weights)
    net = pbxc.loads(text.replace('"weights.npz"', '"w.npz"'), path=str(tmp_path / "p.pbx"))
    assert net.graph.node(cat.split(" = ")[0]).operand_slots()[0] == "operand0"
    x = np.random.default_rng(3).normal(size=(2, 1, 32, 32))
    got = net(x)
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                               atol=1e-12)
    assert net.lrp(x).ledger.conservation_error.max() < 1e-12
    assert np.abs(net.dfd(x, baseline=0.1).summation_error).max() < 1e-12
    # float32: the same module exported in float32, against onnxruntime
    m32 = export(model.float(), torch.randn(2, 1, 32, 32), tmp_path / "p32.onnx", dynamo, 18)
    res32 = convert_onnx(m32)
    assert res32.weights[_class_token_key(res32.text)].dtype == np.float32
    np.savez(tmp_path / "w32.npz", **res32.weights)
    net32 = pbxc.loads(res32.text.replace('"weights.npz"', '"w32.npz"'),
                       path=str(tmp_path / "p32.pbx"))
    x32 = x.astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "p32.onnx"), providers=["CPUExecutionProvider"])
    got32 = net32(x32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, sess.run(None, {"x": x32})[0], rtol=1e-5, atol=1e-6)


def _class_token_key(text: str) -> str:
    (cat,) = [ln for ln in body(text) if "concat(" in ln]
    return cat.split("concat(@", 1)[1].split(",", 1)[0]
