"""concat with constant tensors as operands (``concat(@cls_token, tokens, axis=0)``, the class
token of a ViT) in every pass, on a small ViT-like model written in .pbx: patch embedding by a
strided conv2d, the class token before the patch tokens, a positional embedding, one
single-head attention block with a residual, the class token selected, a GELU and a linear
head. Forward, Jacobians (all modes), gradient and Hessian against an independent torch
implementation; LRP's ledger (the constant block's relevance is the concat's bias) and DFD's
summation-to-delta, each also against the same model with the class token fed as an input;
the verifier's lanes; the standalone NumPy module; float32; positioned errors naming the key.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.errors import PbxError, UnsupportedOp, WeightError
from pbxc.runtime.compile import compile_model
from pbxc.verify.lanes import float_kit, mp_kit, reference_jacobian

torch = pytest.importorskip("torch")
RNG = np.random.default_rng(2026)
D, P, IMG = 6, 4, 8            # width, patch size, image side: (8/4)^2 = 4 patch tokens
N = (IMG // P) ** 2            # patch tokens; the sequence holds N + 1


def vit_source(dtype: str = "float64", cls: str = "@cls_token") -> str:
    """The model; ``cls`` is the class token operand (a constant, or an input's name)."""
    extra = f"input cls: {dtype}[1, {D}]\n" if not cls.startswith("@") else ""
    return f"""model vit
weights "w.npz"
input x: {dtype}[1, {IMG}, {IMG}]
{extra}tokens = transpose(reshape(conv2d(x, @patch, stride={P}), [{D}, {N}]), perm=(1, 0))
seq = concat({cls}, tokens, axis=0)
h = add(seq, @pos)
q = linear(h, @q)
k = linear(h, @k)
v = linear(h, @v)
a = softmax(div(matmul(q, transpose(k, perm=(1, 0))), value={math.sqrt(D)!r}), axis=-1)
o = add(h, linear(matmul(a, v), @o))
c = select(o, axis=0, index=0)
output logits = linear(gelu(c), @head)
"""


def _weights() -> dict[str, np.ndarray]:
    w = {"patch.weight": RNG.normal(size=(D, 1, P, P)) / 3, "patch.bias": RNG.normal(size=D) / 4,
         "cls_token": RNG.normal(size=(1, D)), "pos": RNG.normal(size=(N + 1, D)) / 4,
         "head.weight": RNG.normal(size=(3, D)) / 2, "head.bias": RNG.normal(size=3) / 4}
    for n in "qkvo":
        w[f"{n}.weight"] = RNG.normal(size=(D, D)) / 2
        w[f"{n}.bias"] = RNG.normal(size=D) / 4
    return w


WEIGHTS = _weights()


def build(tmp_path: Path, dtype: str = "float64", cls: str = "@cls_token",
          weights: dict[str, np.ndarray] | None = None) -> pbxc.Model:
    w = WEIGHTS if weights is None else weights
    np.savez(tmp_path / "w.npz", **{k: v.astype(dtype) for k, v in w.items()})
    path = tmp_path / ("vit.pbx" if cls.startswith("@") else "vit_in.pbx")
    path.write_text(vit_source(dtype, cls))
    return pbxc.load(path)


def torch_vit(x: Any) -> Any:
    """The same model in torch, one sample [1, IMG, IMG] -> [3] (float64)."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in WEIGHTS.items()}
    t = torch.nn.functional.conv2d(x[None], w["patch.weight"], w["patch.bias"], stride=P)[0]
    t = t.reshape(D, N).T                                         # [N, D]
    h = torch.cat([w["cls_token"], t], dim=0) + w["pos"]          # [N + 1, D]
    q, k, v = (h @ w[f"{n}.weight"].T + w[f"{n}.bias"] for n in "qkv")
    a = torch.softmax(q @ k.T / math.sqrt(D), dim=-1)
    o = h + (a @ v) @ w["o.weight"].T + w["o.bias"]
    return torch.nn.functional.gelu(o[0]) @ w["head.weight"].T + w["head.bias"]


def images(n: int) -> np.ndarray:
    return RNG.normal(size=(n, 1, IMG, IMG))


def test_graph_keeps_the_written_order(tmp_path: Path) -> None:
    model = build(tmp_path)
    node = model.graph.node("seq")
    assert node.inputs == ("tokens",)
    assert node.operand_slots() == ("operand0", 0)
    assert node.param_key("operand0") == "cls_token"
    assert model.graph.shape_of("seq") == (N + 1, D)


def test_forward_matches_torch(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = images(3)
    got = model.forward(x)
    for i in range(3):
        np.testing.assert_allclose(got[i], torch_vit(torch.tensor(x[i])).numpy(), rtol=1e-12,
                                   atol=1e-12)


def test_jacobian_all_modes_and_gradient_match_torch_func(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = images(2)
    grad = model.gradient(x, target=2)
    for i in range(2):
        xi = torch.tensor(x[i])
        jac = torch.func.jacrev(torch_vit)(xi).numpy()
        for mode in ("forward", "reverse", "auto"):
            got = model.jacobian(x[i:i + 1], mode=mode).jacobian[0]
            np.testing.assert_allclose(got, jac, rtol=1e-10, atol=1e-10, err_msg=mode)
        g = torch.func.grad(lambda t: torch_vit(t)[2])(xi).numpy()
        np.testing.assert_allclose(grad[i], g, rtol=1e-10, atol=1e-10)


def test_hessian_matches_torch_func(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = images(1)
    ref = torch.func.hessian(lambda t: torch_vit(t)[1])(torch.tensor(x[0])).numpy()
    for mode in ("forward", "reverse"):
        got = model.hessian(x, target=1, mode=mode).hessian[0]
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=mode)


@pytest.mark.parametrize("composite", ["epsilon", "attnlrp", "cp-lrp"])
def test_lrp_books_the_constant_block_as_the_concat_bias(tmp_path: Path, composite: str) -> None:
    """Conservation with the ledger; the concat's bias is the relevance the same model hands
    to the class token when the token is an input instead (every other rule alike)."""
    model = build(tmp_path)
    as_input = build(tmp_path, cls="cls")
    x = images(3)
    res = model.lrp(x, composite=composite)
    assert res.ledger.conservation_error.max() < 1e-12
    assert res.ledger.max_layer_error < 1e-12
    entry = res.ledger.layers["seq"]
    token = np.broadcast_to(WEIGHTS["cls_token"], (3, 1, D))
    ref = as_input.lrp({"x": x, "cls": token}, composite=composite)
    np.testing.assert_allclose(entry.bias, ref.relevance["cls"].reshape(3, -1).sum(axis=1),
                               rtol=1e-12, atol=1e-14)
    assert np.abs(entry.bias).min() > 1e-6     # the class token does take relevance
    np.testing.assert_allclose(entry.relevance_in + entry.bias, entry.relevance_out,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.relevance["x"], ref.relevance["x"], rtol=1e-12, atol=1e-14)


def test_dfd_sums_to_delta_and_the_constant_contributes_nothing(tmp_path: Path) -> None:
    model = build(tmp_path)
    as_input = build(tmp_path, cls="cls")
    x, x0 = images(3), RNG.normal(size=(1, IMG, IMG)) * 0.3
    res = model.dfd(x, baseline=x0, target=0)
    assert np.abs(res.summation_error).max() < 1e-12
    token = np.broadcast_to(WEIGHTS["cls_token"], (3, 1, D))
    ref = as_input.dfd({"x": x, "cls": token}, baseline={"x": x0, "cls": token[0]}, target=0)
    np.testing.assert_allclose(res.attributions["x"], ref.attributions["x"], rtol=1e-11,
                               atol=1e-13)
    np.testing.assert_array_equal(ref.attributions["cls"], 0)


def test_verify_lanes_agree(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = images(2)
    for i in range(2):
        lanes, values = reference_jacobian(model, {"x": x[i]}, "logits", "x", float_kit(model))
        np.testing.assert_allclose(lanes, model.jacobian(x[i:i + 1]).jacobian[0], rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(values["logits"][0], model.forward(x[i:i + 1])[0],
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_array_equal(values["seq"][0, 0], WEIGHTS["cls_token"][0])
        np.testing.assert_array_equal(values["seq"][1:, 0], 0)   # the constant's tangents


CHAIN = f"""model chain
weights "c.npz"
input x: {{dtype}}[3, {D}]
seq = concat(@reg, x, @cls, axis=0)
h = relu(linear(seq, @fc))
output y = linear(flatten(h), @head)
"""


def build_chain(tmp_path: Path, dtype: str = "float64") -> pbxc.Model:
    """A chain (one value operand): register and class tokens on both sides of the input."""
    w = {"reg": RNG.normal(size=(2, D)), "cls": RNG.normal(size=(1, D)),
         "fc.weight": RNG.normal(size=(D, D)) / 2, "fc.bias": RNG.normal(size=D) / 4,
         "head.weight": RNG.normal(size=(2, 6 * D)) / 3, "head.bias": RNG.normal(size=2)}
    np.savez(tmp_path / "c.npz", **{k: v.astype(dtype) for k, v in w.items()})
    (tmp_path / "c.pbx").write_text(CHAIN.format(dtype=dtype))
    return pbxc.load(tmp_path / "c.pbx")


def test_chain_model_every_mode_and_mp_lanes(tmp_path: Path) -> None:
    model = build_chain(tmp_path)
    x = RNG.normal(size=(2, 3, D))
    ref = model.jacobian(x, mode="forward").jacobian
    for mode in ("reverse", "chain"):
        np.testing.assert_allclose(model.jacobian(x, mode=mode).jacobian, ref, rtol=1e-12,
                                   atol=1e-14, err_msg=mode)
    mp, _ = reference_jacobian(model, {"x": x[0]}, "y", "x", mp_kit(model))
    np.testing.assert_allclose(ref[0], mp, rtol=1e-13, atol=1e-15)
    assert model.lrp(x).ledger.conservation_error.max() < 1e-12
    assert np.abs(model.dfd(x, baseline=0.2).summation_error).max() < 1e-12


@pytest.mark.parametrize("which", ["vit", "chain"])
def test_standalone_numpy_module_agrees(tmp_path: Path, which: str) -> None:
    model = build(tmp_path) if which == "vit" else build_chain(tmp_path)
    out = model.output_names[0]
    x = images(2) if which == "vit" else RNG.normal(size=(2, 3, D))
    files = compile_model(model, tmp_path / "out")
    spec = importlib.util.spec_from_file_location(f"gen_concat_{which}", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    np.testing.assert_allclose(gen.forward(x)[out], model.forward(x), rtol=1e-14)
    np.testing.assert_allclose(gen.gradient(x), model.gradient(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-12,
                               atol=1e-15)
    contributions, delta = gen.dfd(x, baseline=0.1)
    np.testing.assert_allclose(contributions, model.dfd(x, baseline=0.1).attributions["x"],
                               rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(contributions.reshape(2, -1).sum(axis=1), delta, rtol=1e-12,
                               atol=1e-12)
    if which == "chain":   # the module's LRP has no interior softmax rule yet (the ViT's)
        relevance, ledger = gen.lrp(x, composite="epsilon")
        ref = model.lrp(x, composite="epsilon")
        np.testing.assert_allclose(relevance, ref.relevance["x"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ledger["bias"], ref.ledger.bias, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ledger["inputs"] + ledger["bias"] + ledger["stabiliser"],
                                   ledger["start"], rtol=1e-12, atol=1e-12)


def test_float32_kept_float32(tmp_path: Path) -> None:
    model = build(tmp_path, "float32")
    x = images(2).astype(np.float32)
    y = model.forward(x)
    assert y.dtype == np.float32
    assert model.gradient(x).dtype == np.float32
    assert model.jacobian(x).jacobian.dtype == np.float32
    lrp = model.lrp(x)
    assert lrp.relevance["x"].dtype == np.float32
    assert lrp.ledger.layers["seq"].bias.dtype == np.float32
    assert model.dfd(x).attributions["x"].dtype == np.float32
    ref = np.stack([torch_vit(torch.tensor(x[i], dtype=torch.float64)).numpy() for i in range(2)])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def _load_error(tmp_path: Path, weights: dict[str, np.ndarray], dtype: str = "float64",
                cls: str = "@cls_token") -> PbxError:
    with pytest.raises(PbxError) as info:
        build(tmp_path, dtype, cls, weights)
    return info.value


def _column(line: str, text: str) -> int:
    return line.index(text) + 1


def test_wrong_per_sample_shape_is_a_positioned_error_naming_the_key(tmp_path: Path) -> None:
    line = vit_source().splitlines()[4]
    col = _column(line, "@cls_token")
    for shape in ((1, D + 1), (1, 1, D)):   # off the axis, and with a batch axis
        err = _load_error(tmp_path, {**WEIGHTS, "cls_token": np.zeros(shape)})
        text = str(err)
        assert "constant 'cls_token'" in text and "concat 'seq'" in text, text
        assert f"vit.pbx:5:{col}:" in text, text
    assert "per-sample shape" in text


def test_float32_constant_in_a_float64_model_is_an_error_naming_the_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **{**WEIGHTS, "cls_token": WEIGHTS["cls_token"].astype(
        np.float32)})
    (tmp_path / "vit.pbx").write_text(vit_source())
    with pytest.raises(WeightError) as info:
        pbxc.load(tmp_path / "vit.pbx")
    text = str(info.value)
    assert "constant 'cls_token'" in text and "float32" in text and "float64" in text, text
    col = _column(vit_source().splitlines()[4], "@cls_token")
    assert f"vit.pbx:5:{col}:" in text, text


def test_concat_of_constants_only_is_a_positioned_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", a=np.zeros((1, 2)), b=np.zeros((1, 2)))
    (tmp_path / "e.pbx").write_text('model e\nweights "w.npz"\ninput x: float64[2]\n'
                                    "output y = add(x, flatten(concat(@a, @b, axis=0)))\n")
    with pytest.raises(PbxError) as info:
        pbxc.load(tmp_path / "e.pbx")
    text = str(info.value)
    assert "constants only (@a, @b)" in text, text
    assert f"e.pbx:4:{_column('output y = add(x, flatten(concat(@a, @b, axis=0)))', '@a')}:" \
        in text, text


def test_missing_constant_names_the_key(tmp_path: Path) -> None:
    weights = {k: v for k, v in WEIGHTS.items() if k != "cls_token"}
    text = str(_load_error(tmp_path, weights))
    assert "missing weight 'cls_token'" in text and "concat 'seq'" in text, text


def test_cuda_refuses_by_name(tmp_path: Path) -> None:
    from pbxc.codegen.cuda_module import unsupported
    model = build_chain(tmp_path)
    reason = unsupported(model.graph)
    assert reason is not None and "'concat'" in reason and "constant" in reason, reason
    with pytest.raises(UnsupportedOp, match="no kernels for op 'concat'"):
        compile_model(model, tmp_path / "cu", target="cuda")


def test_pbxc_verify_holds_on_the_chain_model(tmp_path: Path) -> None:
    """Every property of `pbxc verify` (lanes, mpmath, LRP-0 with the constants counted as a
    bias, backend parity with the compiled module) on the register/class-token chain."""
    from pbxc.verify import verify_model
    model = build_chain(tmp_path)
    _, results = verify_model(model, examples=5, seed=0)
    assert results
    for r in results:
        assert r.status in ("holds", "skipped"), (r.config.name, r.reason, r.counterexample)
    lrp0 = next(r for r in results if r.config.name == "lrp0_exact")
    assert lrp0.status == "holds"
