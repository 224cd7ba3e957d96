"""A PyTorch state_dict saved with safetensors.torch.save_file loads as .pbx weights directly,
keys as PyTorch writes them; integer num_batches_tracked entries are ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pbxc

torch = pytest.importorskip("torch", reason="torch is not installed")
st_torch = pytest.importorskip("safetensors.torch", reason="safetensors.torch is unavailable")

PBX = """model net
weights "net.safetensors"
input x: float64[2, 6, 6]
h = relu(batchnorm(conv2d(x, @features.0, padding=1, bias=false), @features.1))
output y = linear(flatten(h), @head)
"""


def test_state_dict_safetensors_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.features = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=False),
                                       torch.nn.BatchNorm2d(3))
    net.head = torch.nn.Linear(3 * 6 * 6, 4)
    net.train()
    with torch.no_grad():   # move the running statistics off their defaults
        for _ in range(3):
            net.features(torch.randn(8, 2, 6, 6))
    net.eval()
    state = net.state_dict()
    assert state["features.1.num_batches_tracked"].dtype == torch.int64
    st_torch.save_file(state, str(tmp_path / "net.safetensors"))
    (tmp_path / "net.pbx").write_text(PBX, encoding="utf-8")
    model = pbxc.load(tmp_path / "net.pbx")
    x = np.random.default_rng(0).normal(size=(5, 2, 6, 6))
    with torch.no_grad():
        h = torch.relu(net.features(torch.from_numpy(x).float()))
        ref = net.head(h.flatten(1)).double().numpy()
    assert np.abs(model.forward(x) - ref).max() < 1e-5 * np.abs(ref).max()
