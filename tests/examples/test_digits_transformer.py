"""The shipped vision transformer (examples/digits_transformer.pbx), beyond the forward checks
that every example gets (tests/examples/test_examples_forward.py).

- an independent NumPy transcription of the .pbx file (patches, class token, positional
  embedding, two pre-norm blocks of four-head attention and a GELU MLP, the head on the class
  token) against the recorded float64 torch outputs, and pbxc against it;
- where torch is installed: the gradient and the Jacobian against torch's autograd;
- AttnLRP (the file's ``lrp { composite attnlrp }`` block): conservation with the ledger, the
  rules named per op, and the class token's relevance recorded as the concat's bias;
- DFD: summation-to-delta with two baselines and every class as the target;
- the file's ``verify { }`` block holds (a small search);
- the heatmap the README shows is shipped.

Nothing here trains: the tests read the shipped weights.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.verify import verify_model

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
FIGURE = Path(__file__).resolve().parents[2] / "docs" / "figures" / "digits_transformer_attnlrp.png"
NAME = "digits_transformer"
DIM, HEADS, TOKENS = 32, 4, 17
EPS = 1e-5


@functools.cache
def model() -> pbxc.Model:
    return pbxc.load(EXAMPLES_DIR / f"{NAME}.pbx")


@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(EXAMPLES_DIR / f"{NAME}_reference.npz", allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@functools.cache
def weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(EXAMPLES_DIR / f"{NAME}.safetensors")))


# ------------------------------------------------------------ NumPy transcription

def _linear(x: np.ndarray, w: dict[str, np.ndarray], key: str) -> np.ndarray:
    return x @ w[f"{key}.weight"].T + w[f"{key}.bias"]


def _layernorm(x: np.ndarray, w: dict[str, np.ndarray], key: str) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w[f"{key}.weight"] + w[f"{key}.bias"]


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_forward(images: np.ndarray) -> np.ndarray:
    """The .pbx file's statements in NumPy, written from the file, batch first."""
    w = weights()
    b = len(images)
    patches = images.reshape(b, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(b, 16, 4)
    tokens = _linear(patches, w, "patch_embed")
    h = np.concatenate([np.broadcast_to(w["cls_token"], (b, 1, DIM)), tokens], axis=1)
    h = h + w["pos_embedding"]
    hd = DIM // HEADS
    for i in range(2):
        p = f"blocks.{i}"
        a = _layernorm(h, w, f"{p}.norm1")
        q, k, v = (_linear(a, w, f"{p}.attn.{n}").reshape(b, TOKENS, HEADS, hd)
                   .transpose(0, 2, 1, 3) for n in "qkv")
        att = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
        c = (att @ v).transpose(0, 2, 1, 3).reshape(b, TOKENS, DIM)
        h = h + _linear(c, w, f"{p}.attn.out")
        m = _gelu(_linear(_layernorm(h, w, f"{p}.norm2"), w, f"{p}.fc1"))
        h = h + _linear(m, w, f"{p}.fc2")
    return _linear(_layernorm(h[:, 0], w, "norm"), w, "head")


def test_weights_are_float64_and_match_the_file() -> None:
    w = weights()
    assert {a.dtype for a in w.values()} == {np.dtype(np.float64)}
    assert w["cls_token"].shape == (1, DIM)
    assert w["pos_embedding"].shape == (TOKENS, DIM)
    assert model().dtype == np.float64


def test_numpy_transcription_matches_torch() -> None:
    ref = reference()
    out = numpy_forward(ref["inputs"][:128])
    scale = float(np.abs(ref["outputs"]).max())
    np.testing.assert_allclose(out, ref["outputs"][:128], rtol=1e-12, atol=1e-13 * scale)


def test_pbxc_matches_numpy_transcription() -> None:
    x = reference()["inputs"][:128]
    expected = numpy_forward(x)
    np.testing.assert_allclose(model().forward(x), expected, rtol=1e-12,
                               atol=1e-13 * float(np.abs(expected).max()))


def test_patches_are_two_by_two_pixels() -> None:
    """The patch statement of the file is the 2x2 cut: patch 5 is rows 2-3, columns 2-3."""
    image = np.arange(64, dtype=np.float64).reshape(1, 1, 8, 8)
    patches = image.reshape(1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(1, 16, 4)
    np.testing.assert_array_equal(patches[0, 5], image[0, 0, 2:4, 2:4].ravel())


# ------------------------------------------------------------ torch's autograd

@functools.cache
def torch_net():
    torch = pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("pbxc_examples_models_vit",
                                                  EXAMPLES_DIR / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch, module.load_model(NAME, EXAMPLES_DIR)


def test_gradient_and_jacobian_match_torch() -> None:
    torch, net = torch_net()
    ref = reference()
    x = ref["inputs"][:4]
    jac = torch.func.vmap(torch.func.jacrev(lambda s: net(s[None])[0]))(torch.from_numpy(x))
    expected = jac.detach().numpy()                                   # (4, 10, 1, 8, 8)
    scale = float(np.abs(expected).max())
    for mode in ("forward", "reverse"):
        got = model().jacobian(x, mode=mode).jacobian
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * scale)
    target = ref["labels"][:4]
    grad = model().gradient(x, target=target)
    np.testing.assert_allclose(grad, expected[np.arange(4), target], rtol=1e-10,
                               atol=1e-12 * scale)


# ------------------------------------------------------------ AttnLRP and DFD

def test_attnlrp_conserves_with_the_ledger() -> None:
    x = reference()["inputs"][:16]
    res = model().lrp(x)                       # the file's lrp block: composite attnlrp
    assert res.relevance["image"].shape == x.shape
    assert res.relevance["image"].dtype == np.float64
    ledger = res.ledger
    assert ledger.conservation_error.max() < 1e-12
    assert ledger.max_layer_error < 1e-12
    rules = {e.rule for e in ledger.layers.values() if e.op in ("matmul", "softmax")}
    assert rules == {"matmul-uniform(epsilon=1e-06, placement=sign)", "attnlrp-softmax"}
    # the class token takes relevance and the ledger records it as the concat's bias
    (concat,) = [e for e in ledger.layers.values() if e.op == "concat"]
    assert np.all(np.abs(concat.bias) > 0)
    np.testing.assert_allclose(concat.relevance_in + concat.bias, concat.relevance_out,
                               rtol=1e-12)


def lxt_attnlrp(images: np.ndarray, target: np.ndarray) -> np.ndarray:
    """AttnLRP of the example by LXT's explicit rules (``lxt.explicit.functional``: Achtibat
    et al.'s reference code), the model written out with them. LXT stabilises with ``z + eps``
    and pbxc with ``z + eps sign(z)`` (sign(0) = +1), so each stabiliser is handed to LXT as the
    tensor ``eps sign(z)`` of the value it stabilises; the rules are otherwise LXT's own. GELU
    (identity rule) and the scale 8^-1/2 (an epsilon rule, as pbxc's ``mul`` by a number) are
    two small autograd functions here: LXT's explicit module has no function for either."""
    torch = pytest.importorskip("torch")
    lf = pytest.importorskip("lxt.explicit.functional")
    w = {k: torch.from_numpy(v) for k, v in weights().items()}
    eps = 1e-6

    function: Any = torch.autograd.Function

    def stab(z: Any) -> Any:
        return eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype).detach()

    class Gelu(function):
        @staticmethod
        def forward(ctx, z):
            return torch.nn.functional.gelu(z)

        @staticmethod
        def backward(ctx, r):
            return r                   # AttnLRP's identity rule (Prop. 3.4)

    class Scale(function):
        @staticmethod
        def forward(ctx, z, c):
            ctx.save_for_backward(z)
            ctx.c = c
            return z * c

        @staticmethod
        def backward(ctx, r):
            (z,) = ctx.saved_tensors
            y = z * ctx.c
            return r * y / (y + stab(y)), None

    def linear(x, key):
        z = torch.nn.functional.linear(x, w[f"{key}.weight"], w[f"{key}.bias"]).detach()
        return lf.linear_epsilon(x, w[f"{key}.weight"], w[f"{key}.bias"], stab(z))

    def layernorm(x, key):
        fn = lf.layer_norm_grad_fn
        y = torch.nn.functional.layer_norm(x, (DIM,), w[f"{key}.weight"], w[f"{key}.bias"], EPS)
        return fn.apply(x, w[f"{key}.weight"], w[f"{key}.bias"], EPS, stab(y.detach()))

    def add(a, b):
        return lf.add2(a, b, False, stab((a + b).detach()))

    def matmul(a, b):
        return lf.matmul(a, b, False, stab(2 * torch.matmul(a, b).detach()))

    x = torch.from_numpy(images).requires_grad_(True)
    b = len(images)
    hd = DIM // HEADS
    patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
    tokens = linear(patches, "patch_embed")
    h = torch.cat([w["cls_token"].expand(b, 1, DIM), tokens], dim=1)
    h = add(h, w["pos_embedding"].expand(b, TOKENS, DIM))
    for i in range(2):
        p = f"blocks.{i}"
        a = layernorm(h, f"{p}.norm1")
        q, k, v = (linear(a, f"{p}.attn.{n}").reshape(b, TOKENS, HEADS, hd).transpose(1, 2)
                   for n in "qkv")
        att = lf.softmax(Scale.apply(matmul(q, k.transpose(-2, -1)), hd ** -0.5), -1)
        c = matmul(att, v).transpose(1, 2).reshape(b, TOKENS, DIM)
        h = add(h, linear(c, f"{p}.attn.out"))
        m = Gelu.apply(linear(layernorm(h, f"{p}.norm2"), f"{p}.fc1"))
        h = add(h, linear(m, f"{p}.fc2"))
    logits = linear(layernorm(h[:, 0], "norm"), "head")
    seed = torch.zeros_like(logits)
    rows = torch.arange(b)
    seed[rows, torch.from_numpy(target)] = logits.detach()[rows, torch.from_numpy(target)]
    logits.backward(seed)
    assert x.grad is not None
    return x.grad.numpy()


def test_attnlrp_matches_lxt() -> None:
    """pbxc's ``attnlrp`` against LXT's explicit AttnLRP on the shipped model (same rules,
    same stabilisers): the whole transformer, from the logit to the pixels."""
    x = reference()["inputs"][:8]
    res = model().lrp(x)
    target = model().forward(x).argmax(axis=1)
    expected = lxt_attnlrp(x, target)
    got = res.relevance["image"]
    np.testing.assert_allclose(got, expected, rtol=1e-10,
                               atol=1e-12 * float(np.abs(expected).max()))


def test_block_composite_is_attnlrp() -> None:
    x = reference()["inputs"][:4]
    by_block = model().lrp(x).relevance["image"]
    by_name = model().lrp(x, composite="attnlrp").relevance["image"]
    np.testing.assert_array_equal(by_block, by_name)


@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_dfd_sums_to_delta(baseline: str) -> None:
    ref = reference()
    x = ref["inputs"][:16]
    x0 = np.zeros((1, 8, 8)) if baseline == "zeros" else ref["inputs"].mean(axis=0)
    for target in range(10):
        res = model().dfd(x, baseline=x0, target=target)
        assert res.summation_error.max() < 1e-12, target


# ------------------------------------------------------------ verify, figure

def test_verify_block_holds() -> None:
    m = model()
    data = reference()["inputs"]
    _, results = verify_model(m, data={"image": data}, samples={"image": data[:2]},
                              examples=2)
    names = {r.config.name for r in results}
    assert {"summation_to_delta", "lrp_conservation", "jacobian_fd", "backend_parity"} <= names
    for r in results:
        assert r.status == "holds", (r.config.name, r.counterexample)


def test_heatmap_is_shipped() -> None:
    assert FIGURE.is_file()
    assert FIGURE.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert FIGURE.stat().st_size < 200_000
