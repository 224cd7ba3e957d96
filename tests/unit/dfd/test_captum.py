"""DFD against Captum's DeepLift (rescale rule) on models written with nn.Module activations.

Captum hooks nn.ReLU / nn.Tanh modules only, so the peers are rebuilt here as nn.Sequential
from the shipped weights. Skipped without the peers extra (torch, captum).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pbxc

torch = pytest.importorskip("torch", reason="the peers extra (torch) is not installed")
captum_attr = pytest.importorskip("captum.attr", reason="the peers extra (captum) is not "
                                                        "installed")
nn = torch.nn
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


class Standardize(nn.Module):  # type: ignore[misc]
    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return (x - self.mean) / self.std


def linear(w: np.lib.npyio.NpzFile, key: str) -> nn.Linear:
    weight = w[f"{key}.weight"].astype(np.float64)
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    layer.weight.data = torch.from_numpy(weight)
    layer.bias.data = torch.from_numpy(w[f"{key}.bias"].astype(np.float64))
    return layer


def conv(w: np.lib.npyio.NpzFile, key: str) -> nn.Conv2d:
    weight = w[f"{key}.weight"].astype(np.float64)
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=1).double()
    layer.weight.data = torch.from_numpy(weight)
    layer.bias.data = torch.from_numpy(w[f"{key}.bias"].astype(np.float64))
    return layer


def test_breast_cancer_matches_captum_deeplift() -> None:
    w = np.load(EXAMPLES / "breast_cancer_mlp.npz")
    net = nn.Sequential(Standardize(w["scaler.mean"].astype(np.float64),
                                    w["scaler.std"].astype(np.float64)),
                        linear(w, "fc1"), nn.ReLU(), linear(w, "fc2"), nn.ReLU(),
                        linear(w, "out")).eval()
    data = np.load(EXAMPLES / "breast_cancer_mlp_reference.npz")["inputs"]
    x, baseline = data[:32], data.mean(axis=0)
    model = pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx", dtype="float64")
    ours = model.dfd(x, baseline=baseline, target=1)
    theirs = captum_attr.DeepLift(net).attribute(
        torch.from_numpy(x), torch.from_numpy(np.broadcast_to(baseline, x.shape).copy()),
        target=1).detach().numpy()
    np.testing.assert_allclose(ours.attributions["x"], theirs, rtol=1e-9,
                               atol=1e-12 * np.abs(theirs).max())


def test_digits_cnn_matches_captum_deeplift_with_a_uniform_default() -> None:
    """Captum's max-pool rule assumes uniform defaults (seed 004 eq. 13); so does this test."""
    w = np.load(EXAMPLES / "digits_cnn.npz")
    net = nn.Sequential(conv(w, "conv1"), nn.ReLU(), nn.MaxPool2d(2), conv(w, "conv2"),
                        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), linear(w, "fc")).eval()
    x = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"][:16].astype(np.float64)
    x = x + 1e-3 * np.random.default_rng(0).normal(size=x.shape)  # no exact max-pool ties
    model = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64")
    ours = model.dfd(x, baseline=0.0)
    targets = torch.from_numpy(ours.targets)
    theirs = captum_attr.DeepLift(net).attribute(torch.from_numpy(x),
                                                 torch.zeros(x.shape, dtype=torch.float64),
                                                 target=targets).detach().numpy()
    np.testing.assert_allclose(ours.attributions[model.input_names[0]], theirs, rtol=1e-7,
                               atol=1e-9 * np.abs(theirs).max())
