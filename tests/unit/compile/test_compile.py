"""pbxc compile: the generated NumPy module runs with numpy alone and agrees with the runtime."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.runtime.compile import compile_model

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMES = ["breast_cancer_mlp", "digits_cnn", "digits_resnet", "wine_swish_mlp"]


def load_generated(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_generated_module_agrees_with_runtime(tmp_path: Path, name: str) -> None:
    model = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    files = compile_model(model, tmp_path / "out")
    assert [f.name for f in files] == [f"{name}.py", "weights.npz", "manifest.json"]
    gen = load_generated(files[0])
    x = np.load(EXAMPLES / f"{name}_reference.npz")["inputs"][:6].astype(np.float64)
    for key, value in model.outputs(x).items():
        np.testing.assert_allclose(gen.forward(x)[key], value, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(gen.gradient(x), model.gradient(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gen.input_x_gradient(x, target=1),
                               model.input_x_gradient(x, target=1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-12,
                               atol=1e-13)
    contributions, delta = gen.dfd(x, baseline=0.1)
    ref = model.dfd(x, baseline=0.1)
    np.testing.assert_allclose(contributions, ref.attributions[model.input_names[0]],
                               rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(contributions.reshape(6, -1).sum(axis=1), delta, rtol=1e-12,
                               atol=1e-12)
    for composite in ("epsilon", "lrp0", "epsilon-plus", "epsilon-gamma-box"):
        relevance, ledger = gen.lrp(x, composite=composite)
        ref_lrp = model.lrp(x, composite=composite)
        np.testing.assert_allclose(relevance, ref_lrp.relevance[model.input_names[0]],
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ledger["inputs"] + ledger["bias"] + ledger["stabiliser"],
                                   ledger["start"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown composite"):
        gen.lrp(x, composite="nope")
    manifest = json.loads(files[2].read_text())
    assert manifest["model"] == name and {"jacobian", "lrp", "dfd"} <= set(manifest["passes"])


def test_generated_module_needs_only_numpy(tmp_path: Path) -> None:
    model = pbxc.load(EXAMPLES / "wine_swish_mlp.pbx")
    files = compile_model(model, tmp_path / "wine")
    np.save(tmp_path / "x.npy", np.load(EXAMPLES / "wine_swish_mlp_reference.npz")["inputs"][:3])
    script = (
        "import sys\n"
        "for blocked in ('pbxc', 'sympy', 'scipy', 'lark', 'networkx', 'torch', 'numba',\n"
        "                'llvmlite'):\n"
        "    sys.modules[blocked] = None  # importing it now fails\n"
        "import importlib.util, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('wine', {str(files[0])!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "print(mod.forward(x)['logits'].argmax(axis=1).tolist(), mod.gradient(x).shape)\n"
        "print(np.isfinite(mod.lrp(x)[0]).all())\n"   # LRP's kernels without numba too
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = model.forward(np.load(tmp_path / "x.npy")).argmax(axis=1).tolist()
    assert proc.stdout.strip() == f"{expected} (3, 13)\nTrue"


def test_compile_refuses_foreign_directory_and_leaves_nothing(tmp_path: Path) -> None:
    model = pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(pbxc.PbxError, match="was not written by pbxc compile"):
        compile_model(model, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # a pbxc-written directory is replaced whole
    out = tmp_path / "out"
    compile_model(model, out)
    compile_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_generated_code_cites_pbx_lines(tmp_path: Path) -> None:
    model = pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx")
    text = compile_model(model, tmp_path / "o")[0].read_text()
    assert "breast_cancer_mlp.pbx:" in text and "relu(linear(s, @fc1))" in text


def test_cli_compile_and_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["compile", str(EXAMPLES / "digits_cnn.pbx"), "-o", str(tmp_path / "d"),
                 "--explain-plan", "--batch", "32"])
    out = capsys.readouterr().out
    assert code == 0 and "jacobian plan:" in out and "<- chosen" in out
    assert (tmp_path / "d" / "digits_cnn.py").is_file()
    assert main(["compile", str(EXAMPLES / "digits_cnn.pbx")]) == 2
