"""Models with the new convolutions (conv3d, conv1d with per-side padding, ConvTranspose2d)
through every pass: forward and gradient against torch, the Jacobian in every mode against
verify's independent lane evaluator, LRP against Zennit (which gives ConvTranspose the rules
of a convolution, through modified weights), DFD's summation to delta, and the standalone
NumPy module of ``pbxc compile``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.runtime.compile import compile_model
from pbxc.runtime.lrp import lrp
from pbxc.verify.lanes import float_kit, reference_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn

UNET_PBX = """model tiny_unet
weights "w.npz"
input x: float64[2, 8, 8]
e1 = relu(conv2d(x, @enc1, padding=1))
e2 = relu(conv2d(e1, @enc2, stride=2, padding=1))
d1 = relu(conv_transpose2d(e2, @dec1, stride=2, padding=1, output_padding=1))
skip = concat(d1, e1)
h = relu(conv2d(skip, @head, groups=2))
output y = linear(flatten(h), @fc)
"""


class TinyUNet(nn.Module):   # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(2, 4, 3, padding=1)
        self.enc2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.dec1 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(8, 4, 1, groups=2)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x: Any) -> Any:
        e1 = torch.relu(self.enc1(x))
        e2 = torch.relu(self.enc2(e1))
        d1 = torch.relu(self.dec1(e2))
        h = torch.relu(self.head(torch.cat([d1, e1], 1)))
        return self.fc(h.flatten(1))


def _torch_and_pbxc(write_model: Any, text: str, net: Any, dtype: str = "float64"
                    ) -> tuple[Any, pbxc.Model]:
    torch.manual_seed(0)
    net = net.double().eval()
    weights = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return net, pbxc.load(write_model(text, weights), dtype=dtype)


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, pbxc.Model, Path]:
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    net = TinyUNet().double().eval()
    np.savez(folder / "w.npz", **{k: v.detach().numpy() for k, v in net.state_dict().items()})
    (folder / "m.pbx").write_text(UNET_PBX, encoding="utf-8")
    return net, pbxc.load(folder / "m.pbx", dtype="float64"), folder


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def test_unet_forward_and_gradient_match_torch(unet: tuple) -> None:
    net, model, _ = unet
    x = _x((4, 2, 8, 8))
    xt = torch.tensor(x, requires_grad=True)
    yt = net(xt)
    np.testing.assert_allclose(model.forward(x), yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    target = yt.argmax(1)
    yt[torch.arange(4), target].sum().backward()
    np.testing.assert_allclose(model.gradient(x), xt.grad.numpy(), rtol=1e-11, atol=1e-13)


def test_unet_float32_stays_float32(unet: tuple) -> None:
    net, _, folder = unet
    model = pbxc.load(folder / "m.pbx", dtype="float32")
    x = _x((2, 2, 8, 8)).astype(np.float32)
    y = model.forward(x)
    assert y.dtype == np.float32
    with torch.no_grad():
        ref = net(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert model.gradient(x).dtype == np.float32


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
def test_unet_jacobian_every_mode_matches_the_lane_evaluator(unet: tuple, mode: str) -> None:
    _, model, _ = unet
    x = _x((1, 2, 8, 8))
    ref, _ = reference_jacobian(model, {"x": x[0]}, "y", "x", float_kit(model))
    np.testing.assert_allclose(model.jacobian(x, mode=mode).jacobian[0], ref, rtol=1e-11,
                               atol=1e-13)


def test_unet_dfd_sums_to_delta(unet: tuple) -> None:
    _, model, _ = unet
    result = model.dfd(_x((3, 2, 8, 8)), baseline="zeros")
    total = result.attributions["x"].reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(total, result.delta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["epsilon", "epsilon-plus", "epsilon-gamma-box", "alphabeta"])
def test_unet_lrp_matches_zennit(unet: tuple, name: str) -> None:
    """Composites (Zennit gives ConvTranspose2d the convolutions' ZPlus and Gamma), and
    AlphaBeta(2, 1) on every layer."""
    try:
        from zennit import composites, rules, types
        from zennit.attribution import Gradient
    except Exception as exc:   # zennit imports torchvision, which may fail beside a foreign torch
        pytest.skip(f"needs zennit: {exc}")
    from pbxc.runtime import lrp_rules as R

    net, model, _ = unet
    x = _x((3, 2, 8, 8))
    single = {"alphabeta": (R.AlphaBeta(alpha=2.0, beta=1.0),
                            rules.AlphaBeta(alpha=2.0, beta=1.0))}
    low, high = float(x.min()), float(x.max())
    if name in single:
        ours = lrp(model, x, rule=single[name][0])
    elif name == "epsilon-gamma-box":
        from pbxc.runtime.lrp import get_composite

        ours = lrp(model, x, composite=get_composite(name, low=low, high=high))
    else:
        ours = lrp(model, x, composite=name)

    class Twin(nn.Module):   # type: ignore[misc]
        """The same net with modules Zennit can hook (ReLU as modules; concat as is)."""

        def __init__(self) -> None:
            super().__init__()
            self.net, self.r1, self.r2, self.r3, self.r4 = net, nn.ReLU(), nn.ReLU(), \
                nn.ReLU(), nn.ReLU()

        def forward(self, x: Any) -> Any:
            n = self.net
            e1 = self.r1(n.enc1(x))
            d1 = self.r3(n.dec1(self.r2(n.enc2(e1))))
            return n.fc(self.r4(n.head(torch.cat([d1, e1], 1))).flatten(1))

    twin = Twin().eval()
    if name in single:
        composite = composites.LayerMapComposite(layer_map=[
            *composites.layer_map_base(), (types.Convolution, single[name][1]),
            (nn.Linear, single[name][1])])
    elif name == "epsilon":
        composite = composites.LayerMapComposite(layer_map=[
            *composites.layer_map_base(), (types.Convolution, rules.Epsilon()),
            (nn.Linear, rules.Epsilon())])
    elif name == "epsilon-gamma-box":   # ZBox first, Gamma on every other Convolution
        composite = composites.EpsilonGammaBox(low=low, high=high)
    else:   # ZPlus on every Convolution, ConvTranspose2d included; Epsilon on Linear
        composite = composites.EpsilonPlus()
    data = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        logits = twin(data)
    seed = torch.zeros_like(logits)
    rows, targets = torch.arange(3), torch.from_numpy(ours.targets)
    seed[rows, targets] = logits[rows, targets]
    with Gradient(model=twin, composite=composite) as attributor:
        _, relevance = attributor(data, seed)
    theirs = relevance.detach().numpy()
    assert np.abs(theirs).max() > 1e-3
    # epsilon-gamma-box agrees to 2e-8 of the largest relevance here (on digits_cnn, to 1e-9);
    # the gap is not explained yet (see the conv engineer's report)
    atol = 1e-7 * np.abs(theirs).max() if name == "epsilon-gamma-box" else 1e-12
    np.testing.assert_allclose(ours.relevance["x"], theirs, rtol=1e-9, atol=atol)


def test_unet_standalone_module_matches(unet: tuple, tmp_path: Path) -> None:
    _, model, _ = unet
    files = compile_model(model, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("generated_unet", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    x = _x((2, 2, 8, 8))
    np.testing.assert_allclose(gen.forward(x)["y"], model.forward(x), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(gen.gradient(x), model.gradient(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-12,
                               atol=1e-14)
    contributions, delta = gen.dfd(x)[:2]
    np.testing.assert_allclose(contributions.reshape(2, -1).sum(axis=1), delta, rtol=1e-12,
                               atol=1e-12)


VOLUME_PBX = """model vol
weights "w.npz"
input x: float64[1, 6, 6, 6]
h = relu(conv3d(x, @c1, stride=(2, 1, 1), padding=(1, 0, 1, 1, 0, 1), dilation=(1, 2, 1)))
t = conv_transpose3d(h, @t1, stride=2, padding=1, output_padding=(1, 0, 1), groups=2)
output y = linear(flatten(t), @fc)
"""

SIGNAL_PBX = """model sig
weights "w.npz"
input x: float64[2, 20]
h = relu(conv1d(x, @c1, stride=2, padding=(2, 1), dilation=2))
t = relu(conv_transpose1d(h, @t1, stride=3, padding=1, output_padding=2, dilation=2))
output y = linear(flatten(t), @fc)
"""


def _pad(x: Any, pads: list[int]) -> Any:
    return torch.nn.functional.pad(x, pads)


class Volume(nn.Module):   # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 4, 3, stride=(2, 1, 1), dilation=(1, 2, 1))
        self.t1 = nn.ConvTranspose3d(4, 2, 2, stride=2, padding=1, output_padding=(1, 0, 1),
                                     groups=2)
        self.fc = nn.Linear(2 * 5 * 6 * 9, 2)

    def forward(self, x: Any) -> Any:   # F.pad lists the last axis first
        h = torch.relu(self.c1(_pad(x, [0, 1, 1, 1, 1, 0])))
        return self.fc(self.t1(h).flatten(1))


class Signal(nn.Module):   # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, dilation=2)
        self.t1 = nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2,
                                     dilation=2)
        self.fc = nn.Linear(2 * 34, 2)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.c1(_pad(x, [2, 1])))
        return self.fc(torch.relu(self.t1(h)).flatten(1))


@pytest.mark.parametrize(("text", "net", "shape"), [(VOLUME_PBX, Volume, (1, 6, 6, 6)),
                                                    (SIGNAL_PBX, Signal, (2, 20))],
                         ids=["conv3d", "conv1d"])
def test_volume_and_signal_models(write_model: Any, text: str, net: Any,
                                  shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = net().double().eval()
    model = pbxc.load(write_model(text, {k: v.detach().numpy()
                                         for k, v in net.state_dict().items()}))
    x = _x((3, *shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = net(xt)
    np.testing.assert_allclose(model.forward(x), yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    yt[torch.arange(3), yt.argmax(1)].sum().backward()
    np.testing.assert_allclose(model.gradient(x), xt.grad.numpy(), rtol=1e-11, atol=1e-13)
    ref, _ = reference_jacobian(model, {"x": x[0]}, "y", "x", float_kit(model))
    for mode in ("forward", "reverse", "chain"):
        np.testing.assert_allclose(model.jacobian(x[:1], mode=mode).jacobian[0], ref,
                                   rtol=1e-11, atol=1e-13)
    result = model.dfd(x)
    np.testing.assert_allclose(result.attributions["x"].reshape(3, -1).sum(axis=1),
                               result.delta, rtol=1e-12, atol=1e-12)
    ledger = lrp(model, x, composite="epsilon-plus")
    assert np.isfinite(ledger.relevance["x"]).all()


def test_bad_padding_and_output_padding_are_errors(write_model: Any) -> None:
    w = {"c.weight": np.zeros((2, 2, 3, 3))}
    with pytest.raises(pbxc.PbxError, match=r"integers \(begin, end of each axis"):
        pbxc.load(write_model("model m\nweights \"w.npz\"\ninput x: float64[2, 5, 5]\n"
                              "output y = conv2d(x, @c, padding=(1, 2, 3))\n", w))
    with pytest.raises(pbxc.PbxError, match="output_padding 2 must be smaller"):
        pbxc.load(write_model("model m\nweights \"w.npz\"\ninput x: float64[2, 5, 5]\n"
                              "output y = conv_transpose2d(x, @c, stride=2, "
                              "output_padding=2, bias=false)\n", w))


def test_cuda_target_names_what_it_refuses(write_model: Any) -> None:
    from pbxc.codegen.cuda_module import unsupported

    w = {"c.weight": np.zeros((2, 2, 3, 3))}
    model = pbxc.load(write_model("model m\nweights \"w.npz\"\ninput x: float64[2, 5, 5]\n"
                                  "output y = conv_transpose2d(x, @c, stride=2, bias=false)\n", w))
    assert "conv_transpose2d" in (unsupported(model.graph) or "")
    model = pbxc.load(write_model("model m\nweights \"w.npz\"\ninput x: float64[2, 5, 5]\n"
                                  "output y = conv2d(x, @c, padding=(0, 1, 0, 1), bias=false)\n", w))
    assert "symmetric convolution padding" in (unsupported(model.graph) or "")


def test_dense_matrices_are_lazy_bounded_and_equal_the_kernels(
        unet: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The small convolutions' dense matrices (transposed one included) are built on first
    use, scattered from the weights, equal to the JVP of the identity through the kernels,
    and the planner keeps their total within DENSE_TOTAL_LIMIT entries."""
    from pbxc.lower import plan as plan_module
    from pbxc.lower.plan import cheaper_dense, size
    from pbxc.runtime.jacobian import dense_matrix, identity_tangents
    from pbxc.runtime.linearize import Point, jvp_rule

    _, _, folder = unet
    model = pbxc.load(folder / "m.pbx", dtype="float64")
    assert not model.dense_cache
    assert {"d1/conv_transpose2d", "e2/conv2d"} <= set(model.dense_ops)
    x = _x((2, 2, 8, 8))
    grad = model.gradient(x)
    assert model.dense_cache   # built by the first pass that needed one
    for node in model.nodes:
        if node.name not in model.dense_ops:
            continue
        in_shape, out_shape = model.graph.shape_of(node.inputs[0]), node.shape
        pt = Point(node, [np.zeros((1, *in_shape))], np.zeros((1, *out_shape)),
                   model.params[node.name])
        t = jvp_rule(node)(pt, [identity_tangents(1, in_shape, np.dtype("float64"))])
        pushed = t.reshape(size(in_shape), size(out_shape)).T
        assert np.array_equal(dense_matrix(model, node, np.dtype("float64")), pushed)
    monkeypatch.setattr(plan_module, "DENSE_TOTAL_LIMIT", 30_000)
    bounded = cheaper_dense(model.nodes, model.graph)
    assert bounded < model.dense_ops
    assert sum(size(n.shape) * size(model.graph.shape_of(n.inputs[0]))
               for n in model.nodes if n.name in bounded) <= 30_000
    model.dense_ops, model.dense_cache = frozenset(), {}
    np.testing.assert_allclose(model.gradient(x), grad, rtol=1e-12, atol=1e-14)
