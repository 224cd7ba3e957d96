"""pbxc LRP against Zennit (an independent implementation) on the digits_cnn example.

Skipped unless both torch and zennit import. The PyTorch model comes from examples/models.py
(``load_model``); it calls relu and the pools functionally, which Zennit cannot hook, so its
layers are copied into an ``nn.Sequential`` of modules (ReLU -> Pass, AvgPool2d -> Norm,
MaxPool2d -> gradient, as in Zennit's composites).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.runtime.lrp import lrp

torch = pytest.importorskip("torch", reason="the Zennit comparison needs torch")
try:   # zennit imports torchvision, which raises more than ImportError beside a foreign torch
    import zennit  # noqa: F401
except Exception as exc:
    pytest.skip(f"the Zennit comparison needs zennit to import: {exc}", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def torch_twin() -> Any:
    spec = importlib.util.spec_from_file_location("pbxc_example_models", EXAMPLES / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.load_model("digits_cnn")
    nn = torch.nn
    return nn.Sequential(net.conv1, nn.ReLU(), nn.MaxPool2d(2), net.conv2, nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), net.fc).double().eval()


def zennit_composite(name: str) -> Any:
    from zennit import composites, rules, types

    if name == "epsilon":
        return composites.LayerMapComposite(layer_map=[
            *composites.layer_map_base(), (types.Convolution, rules.Epsilon()),
            (torch.nn.Linear, rules.Epsilon())])
    if name == "epsilon-plus":
        return composites.EpsilonPlus()
    return composites.EpsilonGammaBox(low=0.0, high=1.0)


@pytest.mark.parametrize("name", ["epsilon", "epsilon-plus", "epsilon-gamma-box"])
def test_matches_zennit_on_digits_cnn(name: str) -> None:
    from zennit.attribution import Gradient

    from pbxc.runtime.lrp import get_composite

    model = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64")
    x = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"][:32].astype(np.float64)
    composite = get_composite(name, low=0.0, high=1.0) if name == "epsilon-gamma-box" else name
    ours = lrp(model, x, composite=composite)

    twin = torch_twin()
    data = torch.from_numpy(x).requires_grad_(True)
    with torch.no_grad():
        logits = twin(data)
    np.testing.assert_allclose(logits.numpy(), ours.outputs["logits"], rtol=1e-12, atol=1e-12)
    seed = torch.zeros_like(logits)
    rows = torch.arange(len(x))
    targets = torch.from_numpy(ours.targets)
    seed[rows, targets] = logits[rows, targets]
    with Gradient(model=twin, composite=zennit_composite(name)) as attributor:
        _, relevance = attributor(data, seed)
    theirs = relevance.detach().numpy()
    assert np.abs(theirs).max() > 1e-3
    np.testing.assert_allclose(ours.relevance["image"], theirs, rtol=1e-9, atol=1e-12)
