"""Attention through ONNX (issue 12): `pbxc import` of what `torch.onnx.export` writes for
`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` (batch_first, norm_first both ways,
ReLU and GELU), with both exporters (the TorchScript one, dynamic batch; the dynamo one,
whose example batch of 2 is fixed in the file) and opsets 17 to 20, and the three acceptance
models of the issue: a 2-layer MLP-Mixer-like model (LayerNorm, token and channel mixing,
both GELU forms, mean token), a transformer encoder classifier over 32 tokens of dimension 64 fed as
embeddings (2 layers, 4 heads, head on the mean token; norm_first True and False) and a ViT
for 1x32x32 images (patch 4 through Conv2d(stride = kernel), flatten, transpose, class token,
positional embedding, dim 64, 2 layers, 4 heads, head on the class token).

The exporters move the batch axis inside attention ([N, L, E] -> [L, N, E] -> [L, N*H, d] ->
[N*H, L, d], and [L*N, E] for the output projection); the importer tracks where it sits
(pbxc/interop/onnx_layout.py) and writes per-sample ops. Every model is built and exported
here, seeded, with every parameter drawn at random (torch initialises attention's biases and
LayerNorm's affine to zeros and ones, which would hide mistakes in them); nothing is
downloaded. For each acceptance model and exporter: the float32 file against onnxruntime
(1e-6 relative), the float64 file against torch (1e-10), the gradient and the Jacobian
against torch.func (1e-10), LRP conservation with the ledger (composites attnlrp and cp-lrp)
and DFD summation-to-delta (1e-12), and `pbxc verify` (a fast set of properties by default,
every property under ``-m slow``)."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.errors import UnsupportedOp
from pbxc.runtime.lrp import get_composite

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
torch = pytest.importorskip("torch", reason="torch is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbxc.interop import convert_onnx, import_onnx  # noqa: E402

nn = torch.nn
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")
EXPORTERS = ("torchscript", "dynamo")


def export(model: Any, x: Any, path: Path, exporter: str, opset: int = 18) -> Path:
    """``torch.onnx.export`` with the batch dynamic (TorchScript) or fixed at x's (dynamo)."""
    kw: dict[str, Any] = {"dynamo": exporter == "dynamo", "opset_version": opset,
                          "input_names": ["x"], "output_names": ["y"]}
    if exporter == "torchscript":
        kw["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), **kw)
    return path


def randomize(model: Any, seed: int, scale: float = 0.15) -> Any:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def load(onnx_path: Path, folder: Path, stem: str) -> tuple[Any, pbxc.Model]:
    res = import_onnx(onnx_path, folder / f"{stem}.pbx", force=True)
    assert res.pbx_path is not None
    return res, pbxc.load(res.pbx_path)


# ---------------------------------------------------------------- the blocks


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: Any) -> Any:
        return self.attn(x, x, x, need_weights=False)[0]


class EncoderLayer(nn.Module):
    def __init__(self, norm_first: bool, activation: str) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, activation=activation,
                                                batch_first=True, norm_first=norm_first)

    def forward(self, x: Any) -> Any:
        return self.layer(x)


BLOCKS = {
    "mha": lambda: Attention(),
    "post_relu": lambda: EncoderLayer(False, "relu"),
    "post_gelu": lambda: EncoderLayer(False, "gelu"),
    "pre_relu": lambda: EncoderLayer(True, "relu"),
    "pre_gelu": lambda: EncoderLayer(True, "gelu"),
}


def check_block(block: str, exporter: str, opset: int, tmp_path: Path) -> str:
    torch.manual_seed(0)
    model = randomize(BLOCKS[block](), 1).double()
    path = export(model, torch.randn(2, 8, 16, dtype=torch.float64), tmp_path / "b.onnx",
                  exporter, opset)
    res, net = load(path, tmp_path, "b")
    assert all(w.dtype == np.float64 for w in res.weights.values())   # float64 kept
    assert res.text.count("matmul(") == 2 and res.text.count("softmax(") == 1, res.text
    x = np.random.default_rng(2).normal(size=(3, 8, 16))   # another batch than exported
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = net.forward(x)
    assert got.dtype == np.float64
    assert rel(got, want) < 1e-10
    return str(res.text)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_attention_blocks_import_and_match_torch(block: str, exporter: str,
                                                 tmp_path: Path) -> None:
    text = check_block(block, exporter, 18, tmp_path)
    if block.endswith("gelu"):
        assert "gelu(" in text
    if block != "mha":
        assert text.count("layernorm(") == 2


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("opset", [17, 20])
def test_attention_block_other_opsets(opset: int, exporter: str, tmp_path: Path) -> None:
    check_block("pre_gelu", exporter, opset, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("opset", [17, 19, 20])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_attention_blocks_every_opset(block: str, opset: int, exporter: str,
                                      tmp_path: Path) -> None:
    check_block(block, exporter, opset, tmp_path)


# ---------------------------------------------------------------- the acceptance models


class EncoderClassifier(nn.Module):
    """32 tokens of dimension 64 fed as embeddings, 2 layers, 4 heads, head on the mean."""

    def __init__(self, norm_first: bool, activation: str) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation=activation,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x: Any) -> Any:
        return self.head(self.encoder(x).mean(1))


class ViT(nn.Module):
    """1x32x32 images, patches of 4 (Conv2d with stride = kernel), flatten, transpose, a
    class token, a positional embedding; dim 64, 2 layers, 4 heads; head on the class
    token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 64, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 64))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 65, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Any) -> Any:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
        return self.head(self.norm(self.encoder(t + self.pos_embedding))[:, 0])


class Mixer(nn.Module):
    """A 2-layer MLP-Mixer-like model over 16 tokens of dimension 32: per layer, token mixing
    (LayerNorm, transpose, Linear-GELU-Linear across tokens, transpose back) and channel mixing
    (LayerNorm, Linear-GELU(tanh)-Linear), each with a residual; head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(4))
        self.tokens = nn.ModuleList(nn.Sequential(nn.Linear(16, 24), nn.GELU(),
                                                  nn.Linear(24, 16)) for _ in range(2))
        self.channels = nn.ModuleList(nn.Sequential(nn.Linear(32, 48), nn.GELU("tanh"),
                                                    nn.Linear(48, 32)) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: Any) -> Any:
        for i in range(2):
            x = x + self.tokens[i](self.norms[2 * i](x).transpose(1, 2)).transpose(1, 2)
            x = x + self.channels[i](self.norms[2 * i + 1](x))
        return self.head(x.mean(1))


MODELS = {
    "mixer": (lambda: Mixer(), (16, 32)),
    "encoder_post": (lambda: EncoderClassifier(False, "relu"), (32, 64)),
    "encoder_pre": (lambda: EncoderClassifier(True, "gelu"), (32, 64)),
    "vit": (lambda: ViT(), (1, 32, 32)),
}


class Imported:
    """One acceptance model exported by one exporter: float32 and float64 files."""

    def __init__(self, name: str, exporter: str, folder: Path) -> None:
        self.name = name
        make, shape = MODELS[name]
        torch.manual_seed(0)
        self.torch32 = randomize(make(), 3)
        self.torch64 = randomize(make(), 3).double()
        rng = np.random.default_rng(4)
        self.x32 = rng.normal(size=(2, *shape)).astype(np.float32)
        self.x64 = self.x32.astype(np.float64)
        self.onnx32 = export(self.torch32, torch.from_numpy(self.x32), folder / "m32.onnx",
                             exporter)
        self.onnx64 = export(self.torch64, torch.from_numpy(self.x64), folder / "m64.onnx",
                             exporter)
        self.res32, self.f32 = load(self.onnx32, folder, "m32")
        self.res64, self.f64 = load(self.onnx64, folder, "m64")


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in EXPORTERS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    name, exporter = request.param
    return Imported(name, exporter, tmp_path_factory.mktemp(f"{name}-{exporter}"))


def test_forward_matches_onnxruntime_and_torch(model: Imported) -> None:
    m = model
    assert all(w.dtype == np.float32 for w in m.res32.weights.values())
    assert all(w.dtype == np.float64 for w in m.res64.weights.values())
    if m.name == "mixer":   # no attention: the named ops rebuilt from the exporters' nodes
        assert m.res64.text.count("layernorm(") == 4 and "softmax(" not in m.res64.text
        assert m.res64.text.count(" gelu(") == 2 and m.res64.text.count("gelu_tanh(") == 2
    else:
        assert m.res64.text.count("softmax(") == 2 and m.res64.text.count("matmul(") == 4
    sess = ort.InferenceSession(str(m.onnx32))
    theirs = sess.run(None, {"x": m.x32})[0]
    ours = m.f32.forward(m.x32)
    assert ours.dtype == np.float32
    assert rel(ours, theirs) < 1e-6
    ours64 = m.f64.forward(m.x64)
    assert ours64.dtype == np.float64
    with torch.no_grad():
        exact = m.torch64(torch.from_numpy(m.x64)).numpy()
    assert rel(ours64, exact) < 1e-10
    # another batch size than the export's (the TorchScript file's batch is dynamic; the
    # dynamo file's is fixed at 2, and pbxc's model is per sample either way)
    x3 = np.random.default_rng(5).normal(size=(3, *m.x64.shape[1:]))
    with torch.no_grad():
        assert rel(m.f64.forward(x3), m.torch64(torch.from_numpy(x3)).numpy()) < 1e-10


def test_gradient_and_jacobian_match_torch_func(model: Imported) -> None:
    from torch.func import grad, jacrev, vmap

    m = model
    x = torch.from_numpy(m.x64)
    one = lambda z: m.torch64(z[None])[0]   # noqa: E731
    jac = vmap(jacrev(one))(x).detach().numpy()
    ours = m.f64.jacobian(m.x64).jacobian
    assert ours.shape == jac.shape
    assert rel(ours, jac) < 1e-10
    with torch.no_grad():
        c = m.torch64(x).argmax(1)
    g = torch.stack([grad(lambda z, k=int(k): one(z)[k])(x[i]) for i, k in enumerate(c)])
    assert rel(m.f64.gradient(m.x64), g.detach().numpy()) < 1e-10


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_lrp_conserves_with_the_ledger(model: Imported, composite: str) -> None:
    res = model.f64.lrp(model.x64, composite=composite)
    assert res.ledger.conservation_error.max() < 1e-12
    assert res.ledger.max_layer_error < 1e-12
    r = res.relevance["x"]
    assert r.shape == model.x64.shape and r.dtype == np.float64 and np.abs(r).max() > 0
    rules = {e.op: e.rule for e in res.ledger.layers.values()
             if e.op in ("softmax", "layernorm")}
    if composite == "attnlrp" and model.name != "mixer":
        assert rules.get("softmax") == "attnlrp-softmax", rules


def test_dfd_sums_to_delta(model: Imported) -> None:
    res = model.f64.dfd(model.x64)
    n = len(model.x64)
    total = res.attributions["x"].reshape(n, -1).sum(axis=1)
    scale = max(1.0, float(np.abs(res.delta).max()))
    assert np.abs(total - res.delta).max() <= 1e-12 * scale
    assert np.abs(res.delta).max() > 1e-3 * np.abs(res.outputs).max()   # a real signal


# ---------------------------------------------------------------- LXT on the acceptance models


def _lxt_efficient() -> Any:
    """LXT's ``efficient/rules.py`` from its file (importing ``lxt.efficient`` pulls in its
    Hugging Face patches, which need an older transformers; see test_attnlrp_lxt.py)."""
    import importlib.util

    spec = importlib.util.find_spec("lxt")
    if spec is None or spec.origin is None:
        pytest.skip("the LXT comparison needs lxt (pip install lxt)")
    path = Path(spec.origin).parent / "efficient" / "rules.py"
    loaded = importlib.util.spec_from_file_location("_lxt_efficient_rules_onnx", path)
    if loaded is None or loaded.loader is None or not path.is_file():
        pytest.skip("lxt has no efficient/rules.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def lxt_forward(model: Any, x: Any, name: str, rules: Any) -> Any:
    """The torch acceptance model, op by op, with LXT efficient's AttnLRP rules (its
    gradient x input is the relevance): LayerNorm with the std held constant
    (``stop_gradient``, as lxt.efficient.patches.layer_norm_forward), GELU by
    ``identity_rule_implicit``, both attention matmuls' gradients halved
    (``divide_gradient``: the uniform rule); softmax, linear maps and ReLU by their plain
    gradients (LRP-0)."""
    F = torch.nn.functional

    def ln(t: Any, m: Any) -> Any:
        mean = t.mean(dim=-1, keepdim=True)
        std = (((t - mean) ** 2).mean(dim=-1, keepdim=True) + m.eps).sqrt()
        return (t - mean) / rules.stop_gradient(std) * m.weight + m.bias

    def gelu(t: Any, approximate: str = "none") -> Any:
        return rules.identity_rule_implicit(lambda u: F.gelu(u, approximate=approximate), t)

    def attention(t: Any, mha: Any) -> Any:
        b, n, e = t.shape
        h = mha.num_heads
        q, k, v = F.linear(t, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (u.reshape(b, n, h, e // h).transpose(1, 2) for u in (q, k, v))
        w = torch.softmax(rules.divide_gradient(q @ k.transpose(-1, -2), 2)
                          / math.sqrt(e // h), dim=-1)
        c = rules.divide_gradient(w @ v, 2).transpose(1, 2).reshape(b, n, e)
        return F.linear(c, mha.out_proj.weight, mha.out_proj.bias)

    def encoder(t: Any, layers: Any) -> Any:
        for layer in layers:
            act = gelu if layer.activation is F.gelu else torch.relu

            def ff(u: Any, layer: Any = layer, act: Any = act) -> Any:
                return layer.linear2(act(layer.linear1(u)))
            if layer.norm_first:
                t = t + attention(ln(t, layer.norm1), layer.self_attn)
                t = t + ff(ln(t, layer.norm2))
            else:
                t = ln(t + attention(t, layer.self_attn), layer.norm1)
                t = ln(t + ff(t), layer.norm2)
        return t

    if name == "mixer":
        for i in range(2):
            tok, ch = model.tokens[i], model.channels[i]
            u = ln(x, model.norms[2 * i]).transpose(1, 2)
            x = x + tok[2](gelu(tok[0](u))).transpose(1, 2)
            x = x + ch[2](gelu(ch[0](ln(x, model.norms[2 * i + 1])), "tanh"))
        return model.head(x.mean(1))
    if name == "vit":
        t = model.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
        t = encoder(t + model.pos_embedding, model.encoder.layers)
        return model.head(ln(t, model.norm)[:, 0])
    return model.head(encoder(x, model.encoder.layers).mean(1))


class ExactIdentity:
    """LXT efficient's rules with one change: the identity rule divides by x, not by
    x + 1e-10 (``identity_rule_implicit``), so that the rule set is exactly pbxc's."""

    def __init__(self, rules: Any) -> None:
        self.stop_gradient, self.divide_gradient = rules.stop_gradient, rules.divide_gradient

    @staticmethod
    def identity_rule_implicit(fn: Any, x: Any) -> Any:
        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, t: Any) -> Any:
                out = fn(t)
                ctx.save_for_backward(t, out)
                return out

            @staticmethod
            def backward(ctx: Any, g: Any) -> Any:
                t, out = ctx.saved_tensors
                return g * torch.where(t == 0, torch.zeros_like(t), out / t)
        return Identity.apply(x)


def lxt_relevance(m: Imported, rules: Any) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(m.x64).requires_grad_(True)
    y = lxt_forward(m.torch64, x, m.name, rules)
    with torch.no_grad():
        assert rel(y.detach().numpy(), m.torch64(torch.from_numpy(m.x64)).numpy()) < 1e-12
    target = y.argmax(1)
    seed = torch.zeros_like(y)
    seed[torch.arange(len(target)), target] = 1.0
    y.backward(seed)
    assert x.grad is not None
    return (x.grad * x).detach().numpy(), target.numpy()


def test_attnlrp_matches_lxt(model: Imported) -> None:
    """pbxc's attnlrp (epsilon 0) on the imported file against LXT's efficient AttnLRP on the
    torch model, the same rule set (LXT efficient has no stabiliser): to 1e-10 with LXT's
    GELU identity rule dividing by x as the paper's eq. 9 does; with LXT's own x + 1e-10,
    which moves each GELU input's relevance by 1e-10 / x, to 2e-7 (measured 1.0e-8 on the
    mixer, 1.3e-8 on the pre-norm encoder, 8.6e-8 on the ViT; 0 difference without GELU)."""
    rules = _lxt_efficient()
    ours = model.f64.lrp(model.x64, composite=get_composite("attnlrp", epsilon=0.0))
    assert ours.ledger.conservation_error.max() < 1e-12
    for reference, bar in ((ExactIdentity(rules), 1e-10), (rules, 2e-7)):
        theirs, targets = lxt_relevance(model, reference)
        assert np.array_equal(ours.targets, targets)
        assert rel(ours.relevance["x"], theirs) < bar, type(reference).__name__


FAST_PROPERTIES = ["summation_to_delta", "linear_composition", "lrp_conservation",
                   "gradient_row", "kinks", "backend_parity"]
# lrp0_exact (every bias-free layer passes on what it receives under LRP-0) does not hold for
# attention by design: AttnLRP's softmax rule absorbs relevance (the ledger's softmax term),
# so the property reports the softmax; it is left out here and checked for that reason below
# backend_parity runs the compiled NumPy module (its LRP goes through interior softmaxes);
# hessian_fd holds (measured 4e-10
# on encoder_pre-torchscript) but takes minutes at these sizes; jacobian_mp and hessian_mp
# skip (over 2,000 weights)
SLOW_PROPERTIES = [*FAST_PROPERTIES, "jacobian_fd", "jacobian_mp", "multiplier_accuracy",
                   "hessian_symmetry", "hessian_mp", "taylor_residual"]


def test_verify_holds(model: Imported) -> None:
    from pbxc.verify import verify_model

    # on the file's own samples (the search's random draws of 1024 or 2048 inputs are the
    # slow part; it runs under -m slow below)
    _, results = verify_model(model.f64, properties=FAST_PROPERTIES, samples={"x": model.x64},
                              examples=0)
    assert {r.config.name for r in results} == set(FAST_PROPERTIES)
    for r in results:
        assert r.status == "holds", (r.config.name, r.status, r.reason, r.counterexample)


@pytest.mark.slow
def test_verify_holds_for_every_property(model: Imported) -> None:
    from pbxc.verify import verify_model

    _, results = verify_model(model.f64, properties=SLOW_PROPERTIES,
                              samples={"x": model.x64}, examples=3, seed=0)
    for r in results:
        assert r.status in ("holds", "skipped"), (r.config.name, r.reason, r.counterexample)
    if model.name == "mixer":   # no softmax: nothing for lrp0_exact to report by design
        return
    _, (lrp0,) = verify_model(model.f64, properties=["lrp0_exact"], samples={"x": model.x64},
                              examples=0)
    assert lrp0.counterexample is not None
    (node,) = lrp0.counterexample.outcome.nodes
    assert model.f64.graph.node(node).kind.value == "softmax"


# ---------------------------------------------------------------- refusals name the node


def vi(name: str, shape: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.DOUBLE, shape)


def graph(nodes: list[Any], out_shape: list[Any], inits: dict[str, np.ndarray]) -> Any:
    g = helper.make_graph(nodes, "g", [vi("x", ["N", 4, 6])], [vi("y", out_shape)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_ops_over_a_moved_batch_are_refused_naming_the_node() -> None:
    t = helper.make_node("Transpose", ["x"], ["t"], name="/attn/T", perm=[1, 0, 2])
    back = helper.make_node("Transpose", ["s"], ["y"], name="/attn/T2", perm=[1, 0, 2])
    softmax = graph([t, helper.make_node("Softmax", ["t"], ["s"], name="/attn/sm", axis=1),
                     back], ["N", 4, 6], {})
    with pytest.raises(UnsupportedOp, match=r"'/attn/sm' \(Softmax\): axis 1 holds the batch"):
        convert_onnx(softmax)
    split = graph([t, helper.make_node("Reshape", ["t", "shape"], ["s"], name="/attn/view"),
                   back], [4, "N", 6], {"shape": np.array([4, 2, -1], np.int64)})
    with pytest.raises(UnsupportedOp, match=r"'/attn/view' \(Reshape\).*splits the batch"):
        convert_onnx(split)
    mixed = graph([t, helper.make_node("Add", ["t", "x"], ["s"], name="/attn/add"), back],
                  ["N", 4, 6], {})
    with pytest.raises(UnsupportedOp, match=r"'/attn/add' \(Add\).*batch sits differently"):
        convert_onnx(mixed)
