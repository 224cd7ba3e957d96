"""layernorm (issue 12): forward vs torch's layer_norm and a slow loop reference, Jacobian in
every mode and the gradient vs torch autograd, DFD summation-to-delta through the primitives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pbxc

torch = pytest.importorskip("torch")
F = torch.nn.functional
RNG = np.random.default_rng(12)


def slow_layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float,
                   last: int) -> np.ndarray:
    """One sample, each normalised group by explicit sums (the definition, biased variance)."""
    lead = x.shape[: x.ndim - last]
    flat = x.reshape(int(np.prod(lead)) if lead else 1, -1)
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        n = len(row)
        mu = sum(float(v) for v in row) / n
        var = sum((float(v) - mu) ** 2 for v in row) / n
        out[i] = [(float(v) - mu) / np.sqrt(var + eps) for v in row]
    return out.reshape(x.shape) * w + b


def build(tmp_path: Path, shape: tuple[int, ...], last: int, eps: float = 1e-5,
          bias: bool = True, dtype: str = "float64"):
    norm_shape = shape[len(shape) - last:]
    width = int(np.prod(shape))
    weights = {"ln.weight": 1.0 + 0.3 * RNG.normal(size=norm_shape),
               "head.weight": RNG.normal(size=(3, width)) / np.sqrt(width),
               "head.bias": RNG.normal(size=3) * 0.1}
    if bias:
        weights["ln.bias"] = 0.2 * RNG.normal(size=norm_shape)
    np.savez(tmp_path / "w.npz", **weights)
    text = (f'model ln\nweights "w.npz"\ninput x: {dtype}[{", ".join(map(str, shape))}]\n'
            f"h = layernorm(x, @ln, eps={eps}, last={last}{'' if bias else ', bias=false'})\n"
            "output logits = linear(flatten(h), @head)\n")
    (tmp_path / "m.pbx").write_text(text)
    return pbxc.load(tmp_path / "m.pbx"), weights


def torch_net(weights: dict[str, np.ndarray], shape: tuple[int, ...], last: int, eps: float):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in weights.items()}

    def net(x):
        h = F.layer_norm(x, shape[len(shape) - last:], t["ln.weight"], t.get("ln.bias"), eps)
        return h.flatten(1) @ t["head.weight"].T + t["head.bias"]
    return net


CASES = [((8,), 1, True), ((4, 6), 1, True), ((3, 4, 5), 2, False), ((2, 3, 4), 3, True)]


@pytest.mark.parametrize("shape,last,bias", CASES)
def test_forward_jacobian_gradient_against_torch(tmp_path: Path, shape, last, bias) -> None:
    model, weights = build(tmp_path, shape, last, bias=bias)
    net = torch_net(weights, shape, last, 1e-5)
    x = RNG.normal(size=(3, *shape)) * 2.0 + 0.5
    xt = torch.tensor(x)
    np.testing.assert_allclose(model.forward(x), net(xt).numpy(), rtol=1e-12, atol=1e-12)
    h = model.evaluate({"x": x})["h"]
    ns = shape[len(shape) - last:]
    ref_h = F.layer_norm(xt, ns, torch.tensor(weights["ln.weight"]),
                         torch.tensor(weights["ln.bias"]) if bias else None, 1e-5).numpy()
    np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-12)
    b = weights.get("ln.bias", np.zeros(ns))
    np.testing.assert_allclose(h[0], slow_layernorm(x[0], weights["ln.weight"], b, 1e-5, last),
                               rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda t: net(t[None])[0])(xt[0]).numpy()
    for mode in ("forward", "reverse", "auto"):
        got = model.jacobian(x[:1], mode=mode).jacobian[0]
        np.testing.assert_allclose(got, jac, rtol=1e-10, atol=1e-12, err_msg=mode)
    grad = model.gradient(x, target=1)
    xg = xt.clone().requires_grad_(True)
    net(xg)[:, 1].sum().backward()
    np.testing.assert_allclose(grad, xg.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,last,bias", CASES)
def test_dfd_sums_to_delta(tmp_path: Path, shape, last, bias) -> None:
    model, _ = build(tmp_path, shape, last, bias=bias)
    x = RNG.normal(size=(4, *shape)) * 3.0
    x0 = RNG.normal(size=shape) * 0.5
    res = model.dfd(x, baseline=x0)
    assert res.summation_error.max() <= 1e-12
    # the baseline itself: zero contributions
    same = model.dfd(x0[None], baseline=x0)
    assert np.abs(same.attributions["x"]).max() <= 1e-12


def test_float32_keeps_its_dtype(tmp_path: Path) -> None:
    model, weights = build(tmp_path, (4, 6), 1, dtype="float32")
    x = RNG.normal(size=(2, 4, 6)).astype(np.float32)
    y = model.forward(x)
    assert y.dtype == np.float32
    ref = torch_net(weights, (4, 6), 1, 1e-5)(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_weight_shape_error_names_the_axes(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **{"ln.weight": np.ones(5)})
    (tmp_path / "m.pbx").write_text('model ln\nweights "w.npz"\ninput x: float64[4, 6]\n'
                                    "output y = layernorm(x, @ln, bias=false)\n")
    with pytest.raises(pbxc.PbxError, match=r"expected \[6\]"):
        pbxc.load(tmp_path / "m.pbx")


def test_lrp_identity_rule_and_ledger(tmp_path: Path) -> None:
    """AttnLRP (Achtibat et al. 2024): sigma held constant. Under LRP-0 throughout, the input's
    relevance is then x times the gradient of the network with sigma detached (torch)."""
    shape, last = (4, 6), 1
    model, weights = build(tmp_path, shape, last)
    x = RNG.normal(size=(2, *shape))
    for composite in ("epsilon", "lrp0", "epsilon-plus"):
        res = model.lrp(x, composite=composite, target=1)
        assert res.ledger.conservation_error.max() < 1e-12, composite
        assert res.ledger.max_layer_error < 1e-12, composite
    t = {k: torch.tensor(v) for k, v in weights.items()}
    xt = torch.tensor(x).requires_grad_(True)
    mu = xt.mean(-1, keepdim=True)
    sigma = torch.sqrt(((xt - mu) ** 2).mean(-1, keepdim=True) + 1e-5).detach()
    h = (xt - mu) / sigma * t["ln.weight"] + t["ln.bias"]
    (h.flatten(1) @ t["head.weight"].T + t["head.bias"])[:, 1].sum().backward()
    expected = (xt * xt.grad).detach().numpy()
    got = model.lrp(x, composite="lrp0", target=1).relevance["x"]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_verify_lanes_and_compiled_module_agree(tmp_path: Path) -> None:
    import importlib.util

    from pbxc.runtime.compile import compile_model
    from pbxc.verify.lanes import float_kit, reference_jacobian
    model, _ = build(tmp_path, (3, 4, 5), 2)
    x = RNG.normal(size=(2, 3, 4, 5))
    lanes, _ = reference_jacobian(model, {"x": x[0]}, "logits", "x", float_kit(model))
    np.testing.assert_allclose(lanes, model.jacobian(x[:1]).jacobian[0], rtol=1e-12,
                               atol=1e-13)
    files = compile_model(model, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("gen_layernorm", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    np.testing.assert_allclose(gen.forward(x)["logits"], model.forward(x), rtol=1e-14)
    np.testing.assert_allclose(gen.gradient(x), model.gradient(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-13,
                               atol=1e-15)
    contributions, _ = gen.dfd(x, baseline=0.1)
    np.testing.assert_allclose(contributions, model.dfd(x, baseline=0.1).attributions["x"],
                               rtol=1e-12, atol=1e-14)
    relevance, _ = gen.lrp(x, composite="epsilon")
    np.testing.assert_allclose(relevance, model.lrp(x, composite="epsilon").relevance["x"],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,last", [((4, 3), 1), ((2, 3, 2), 2)])
def test_hessian_against_torch_func(tmp_path: Path, shape, last) -> None:
    model, weights = build(tmp_path, shape, last)
    net = torch_net(weights, shape, last, 1e-5)
    x = RNG.normal(size=(2, *shape))
    for mode in ("forward", "reverse"):
        got = model.hessian(x, target=1, mode=mode).hessian
        for b in range(2):
            ref = torch.func.hessian(lambda t: net(t[None])[0, 1])(torch.tensor(x[b])).numpy()
            np.testing.assert_allclose(got[b], ref, rtol=1e-10, atol=1e-12, err_msg=mode)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), dims=st.lists(st.integers(1, 5), min_size=1,
                                                               max_size=3),
                  data=st.data(), scale=st.floats(0.01, 100.0),
                  eps=st.sampled_from([1e-5, 1e-12, 0.1]))
def test_dfd_summation_property_on_random_layernorm_models(seed, dims, data, scale,
                                                           eps) -> None:
    """Random shapes, groups, input scales and eps: DFD through the primitives sums to delta."""
    import tempfile
    last = data.draw(st.integers(1, len(dims)))
    rng = np.random.default_rng(seed)
    shape = tuple(dims)
    with tempfile.TemporaryDirectory() as d:
        global RNG
        saved, RNG = RNG, rng
        try:
            model, _ = build(Path(d), shape, last, eps=eps)
        finally:
            RNG = saved
        x = rng.normal(size=(3, *shape)) * scale
        x0 = rng.normal(size=shape) * scale * 0.3
        res = model.dfd(x, baseline=x0)
        out = model.forward(x)
        bound = 1e-12 * max(1.0, float(np.abs(out).max()))
        assert res.summation_error.max() <= bound
