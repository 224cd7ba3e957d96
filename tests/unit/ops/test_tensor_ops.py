"""Tensor ops of issue 12 (matmul of two values, transpose, slice, select, mean, sum) in every
pass, on a hand-built self-attention block: forward against plain loops and torch, Jacobians
(all modes) and gradients against torch.func and finite differences, the verifier's lanes,
the Hessian against torch, DFD's summation-to-delta and the two-player rule, LRP's ledger and
matmul's three modes against a slow reference, the standalone NumPy module, float32, errors.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.codegen.kernels.tensor import matmul_relevance
from pbxc.errors import PbxError
from pbxc.runtime.compile import compile_model
from pbxc.verify.lanes import float_kit, reference_jacobian

torch = pytest.importorskip("torch")
RNG = np.random.default_rng(12)
T, D = 4, 3

ATTENTION = f"""model att
weights "w.npz"
input x: {{dtype}}[{T}, {D}]
q = linear(x, @q)
k = linear(x, @k)
v = linear(x, @v)
scores = div(matmul(q, transpose(k, perm=(1, 0))), value={math.sqrt(D)!r})
h = matmul(scores, v)
tail = mean(slice(h, axis=0, start=1, step=2), axes=0)
a = add(select(h, axis=-2, index=0), tail)
b = sum(a, axes=(0,), keepdims=true)
output y = linear(mul(a, b), @head)
"""


def _weights() -> dict[str, np.ndarray]:
    w = {f"{n}.weight": RNG.normal(size=(D, D)) / 2 for n in "qkv"}
    w |= {f"{n}.bias": RNG.normal(size=D) / 4 for n in "qkv"}
    w |= {"head.weight": RNG.normal(size=(2, D)), "head.bias": RNG.normal(size=2)}
    return w


WEIGHTS = _weights()


def build(tmp_path: Path, dtype: str = "float64") -> pbxc.Model:
    np.savez(tmp_path / "w.npz", **WEIGHTS)
    (tmp_path / "m.pbx").write_text(ATTENTION.format(dtype=dtype))
    return pbxc.load(tmp_path / "m.pbx")


def torch_net(x: object) -> object:
    """The same block in torch, one sample [T, D]."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in WEIGHTS.items()}
    q, k, v = (x @ w[f"{n}.weight"].T + w[f"{n}.bias"] for n in "qkv")
    h = ((q @ k.T) / math.sqrt(D)) @ v
    a = h[0] + h[1::2].mean(0)
    return (a * a.sum(0, keepdim=True)) @ w["head.weight"].T + w["head.bias"]


def slow_net(x: np.ndarray) -> np.ndarray:
    """Plain loops, one sample."""
    proj = {}
    for n in "qkv":
        wt, bs = WEIGHTS[f"{n}.weight"], WEIGHTS[f"{n}.bias"]
        proj[n] = np.array([[bs[o] + sum(x[t, i] * wt[o, i] for i in range(D))
                             for o in range(D)] for t in range(T)])
    s = np.array([[sum(proj["q"][i, c] * proj["k"][j, c] for c in range(D)) / math.sqrt(D)
                   for j in range(T)] for i in range(T)])
    h = np.array([[sum(s[i, j] * proj["v"][j, c] for j in range(T)) for c in range(D)]
                  for i in range(T)])
    rows = list(range(1, T, 2))
    a = [h[0, c] + sum(h[r, c] for r in rows) / len(rows) for c in range(D)]
    b = sum(a)
    hw, hb = WEIGHTS["head.weight"], WEIGHTS["head.bias"]
    return np.array([hb[o] + sum(a[c] * b * hw[o, c] for c in range(D)) for o in range(2)])


def test_forward_against_loops_and_torch(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = RNG.normal(size=(3, T, D))
    got = model.forward(x)
    for i in range(3):
        np.testing.assert_allclose(got[i], slow_net(x[i]), rtol=1e-12, atol=1e-12)
        ref = torch_net(torch.tensor(x[i])).numpy()
        np.testing.assert_allclose(got[i], ref, rtol=1e-12, atol=1e-12)


def test_jacobian_all_modes_gradient_and_lanes(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = RNG.normal(size=(2, T, D))
    for i in range(2):
        jac = torch.func.jacrev(torch_net)(torch.tensor(x[i])).numpy()
        for mode in ("forward", "reverse", "auto"):
            got = model.jacobian(x[i:i + 1], mode=mode).jacobian[0]
            np.testing.assert_allclose(got, jac, rtol=1e-10, atol=1e-10, err_msg=mode)
        lanes, _ = reference_jacobian(model, {"x": x[i]}, "y", "x", float_kit(model))
        np.testing.assert_allclose(lanes, jac, rtol=1e-10, atol=1e-10)
    grad = model.gradient(x, target=1)
    for i in range(2):
        g = torch.func.grad(lambda t: torch_net(t)[1])(torch.tensor(x[i])).numpy()
        np.testing.assert_allclose(grad[i], g, rtol=1e-10, atol=1e-10)
    # central finite differences of the forward pass
    h, jac0 = 1e-6, model.jacobian(x[:1]).jacobian[0]
    for idx in itertools.product(range(T), range(D)):
        e = np.zeros((T, D))
        e[idx] = h
        up, dn = model.forward((x[0] + e)[None])[0], model.forward((x[0] - e)[None])[0]
        np.testing.assert_allclose(jac0[:, idx[0], idx[1]], (up - dn) / (2 * h),
                                   rtol=1e-6, atol=1e-6)


def test_hessian_against_torch(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = RNG.normal(size=(1, T, D))
    ref = torch.autograd.functional.hessian(lambda t: torch_net(t)[1], torch.tensor(x[0]))
    got = model.hessian(x, target=1).hessian[0].reshape(ref.shape)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-10, atol=1e-10)


def test_dfd_summation_to_delta(tmp_path: Path) -> None:
    model = build(tmp_path)
    x = RNG.normal(size=(3, T, D))
    res = model.dfd(x, baseline=RNG.normal(size=(T, D)) * 0.3)
    assert np.abs(res.summation_error).max() <= 1e-12


def test_matmul_dfd_is_the_two_player_rule(tmp_path: Path) -> None:
    """With y = sum(A B), A = x[:, :2] and B = x^T... : m_A and m_B from the midpoints."""
    (tmp_path / "p.pbx").write_text(
        "model p\ninput a: float64[2, 3]\ninput b: float64[3, 2]\n"
        "output y = flatten(matmul(a, b))\n")
    model = pbxc.load(tmp_path / "p.pbx")
    a, b, a0, b0 = (RNG.normal(size=s) for s in ((1, 2, 3), (1, 3, 2), (2, 3), (3, 2)))
    res = model.dfd({"a": a, "b": b}, baseline={"a": a0, "b": b0}, target=1)
    n, m = np.unravel_index(1, (2, 2))
    exp_a = np.zeros((2, 3))
    exp_a[n] = (a[0, n] - a0[n]) * (b[0, :, m] + b0[:, m]) / 2
    exp_b = np.zeros((3, 2))
    exp_b[:, m] = (b[0, :, m] - b0[:, m]) * (a[0, n] + a0[n]) / 2
    np.testing.assert_allclose(res.attributions["a"][0], exp_a, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(res.attributions["b"][0], exp_b, rtol=1e-13, atol=1e-15)
    assert abs(res.summation_error[0]) < 1e-14


@pytest.mark.parametrize("composite", ["epsilon", "lrp0", "epsilon-plus"])
def test_lrp_conserves_with_the_ledger(tmp_path: Path, composite: str) -> None:
    model = build(tmp_path)
    res = model.lrp(RNG.normal(size=(3, T, D)), composite=composite)
    assert res.ledger.conservation_error.max() <= 1e-12
    assert res.ledger.max_layer_error <= 1e-12


def slow_matmul_relevance(r: np.ndarray, a: np.ndarray, b: np.ndarray, mode: str,
                          eps: float) -> tuple[np.ndarray, np.ndarray]:
    """AttnLRP's uniform rule / CP-LRP's constant rules, term by term (one sample)."""
    ra, rb = np.zeros_like(a), np.zeros_like(b)
    n, k = a.shape
    m = b.shape[1]
    for i, j in itertools.product(range(n), range(m)):
        z = sum(a[i, c] * b[c, j] for c in range(k))
        sign = 1.0 if z >= 0 else -1.0
        for c in range(k):
            term = a[i, c] * b[c, j]
            if mode == "uniform":
                share = term * r[i, j] / (2 * z + eps * sign)
                ra[i, c] += share
                rb[c, j] += share
            else:
                share = term * r[i, j] / (z + eps * sign)
                if mode == "constant0":
                    rb[c, j] += share
                else:
                    ra[i, c] += share
    return ra, rb


@pytest.mark.parametrize("mode", ["uniform", "constant0", "constant1"])
def test_matmul_relevance_modes(mode: str) -> None:
    a, b = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 4, 5))
    r = RNG.normal(size=(2, 3, 5))
    ra, rb, stab = matmul_relevance(r, [a, b], None, mode, 1e-3)
    for s in range(2):
        ea, eb = slow_matmul_relevance(r[s], a[s], b[s], mode, 1e-3)
        np.testing.assert_allclose(ra[s], ea, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(rb[s], eb, rtol=1e-12, atol=1e-13)
        assert abs(ra[s].sum() + rb[s].sum() + stab[s] - r[s].sum()) < 1e-12


def test_matmul_uniform_matches_lxt() -> None:
    lxt = pytest.importorskip("lxt.explicit.functional")
    a = torch.tensor(np.abs(RNG.normal(size=(1, 3, 4))) + 0.1, requires_grad=True)
    b = torch.tensor(np.abs(RNG.normal(size=(1, 4, 2))) + 0.1, requires_grad=True)
    out = lxt.matmul(a, b, epsilon=1e-6)
    r = torch.tensor(RNG.normal(size=(1, 3, 2)))
    out.backward(r)
    ra, rb, _ = matmul_relevance(r.numpy(), [a.detach().numpy(), b.detach().numpy()], None,
                                 "uniform", 1e-6)
    np.testing.assert_allclose(ra, a.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(rb, b.grad.numpy(), rtol=1e-10)


def test_broadcast_matmul_and_reductions_against_torch(tmp_path: Path) -> None:
    """Leading axes broadcast ([2, 3, 4] @ [4, 5]); keepdims and negative axes."""
    w = RNG.normal(size=(5, 4))
    np.savez(tmp_path / "w.npz", **{"lin.weight": w})
    (tmp_path / "b.pbx").write_text(
        'model b\nweights "w.npz"\ninput x: float64[2, 3, 4]\n'
        "m = transpose(x, perm=(0, 2, 1))\n"             # [2, 4, 3]
        "p = matmul(x, select(m, axis=0, index=-1))\n"    # [2, 3, 4] @ [4, 3] -> [2, 3, 3]
        "output y = flatten(sum(mean(p, axes=(-1,), keepdims=true), axes=(0, 2)))\n")
    model = pbxc.load(tmp_path / "b.pbx")

    def net(t: object) -> object:
        p = t @ t.permute(0, 2, 1)[-1]
        return p.mean(-1, keepdim=True).sum((0, 2))

    x = RNG.normal(size=(2, 2, 3, 4))
    for i in range(2):
        np.testing.assert_allclose(model.forward(x[i:i + 1])[0], net(torch.tensor(x[i])).numpy(),
                                   rtol=1e-12)
        jac = torch.func.jacrev(net)(torch.tensor(x[i])).numpy()
        for mode in ("forward", "reverse"):
            np.testing.assert_allclose(model.jacobian(x[i:i + 1], mode=mode).jacobian[0], jac,
                                       rtol=1e-10, atol=1e-12)
    assert np.abs(model.dfd(x, baseline=0.2).summation_error).max() <= 1e-12
    assert model.lrp(x, composite="epsilon").ledger.conservation_error.max() <= 1e-12


def test_float32_preserved(tmp_path: Path) -> None:
    model = build(tmp_path, "float32")
    x = RNG.normal(size=(2, T, D)).astype(np.float32)
    assert model.forward(x).dtype == np.float32
    assert model.gradient(x).dtype == np.float32
    assert model.lrp(x).relevance["x"].dtype == np.float32
    ref = np.stack([torch_net(torch.tensor(x[i], dtype=torch.float64)).numpy()
                    for i in range(2)])
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-4, atol=1e-4)


def test_generated_module_agrees(tmp_path: Path) -> None:
    model = build(tmp_path)
    files = compile_model(model, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("gen_tensor_att", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    x = RNG.normal(size=(2, T, D))
    np.testing.assert_allclose(gen.forward(x)["y"], model.forward(x), rtol=1e-14)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-13,
                               atol=1e-15)
    contributions, _ = gen.dfd(x, baseline=0.1)
    np.testing.assert_allclose(contributions, model.dfd(x, baseline=0.1).attributions["x"],
                               rtol=1e-12, atol=1e-14)
    relevance, _ = gen.lrp(x, composite="epsilon")
    np.testing.assert_allclose(relevance, model.lrp(x, composite="epsilon").relevance["x"],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("expr", "message"), [
    ("transpose(x, perm=(0, 0))", "not a permutation"),
    ("transpose(x, perm=(0, 1, 2))", "not a permutation"),
    ("slice(x, axis=2, start=0)", "out of range"),
    ("slice(x, axis=0, start=3, stop=1)", "is empty"),
    ("slice(x, axis=0, start=0, step=0)", "step"),
    ("select(x, axis=0, index=4)", "out of range"),
    ("mean(x, axes=(2,))", "out of range"),
    ("matmul(x, x)", "inner sizes differ"),
])
def test_bad_attributes_are_positioned_errors(tmp_path: Path, expr: str, message: str) -> None:
    (tmp_path / "e.pbx").write_text(f"model e\ninput x: float64[{T}, {D}]\noutput y = {expr}\n")
    with pytest.raises(PbxError) as info:
        pbxc.load(tmp_path / "e.pbx")
    text = str(info.value)
    assert message in text
    assert f"{tmp_path / 'e.pbx'}:3:" in text
