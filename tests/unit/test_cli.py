"""The pbxc command: exit codes, diagnostics on stderr (never a traceback), files written whole."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main

MODEL = '''model m
weights "w.npz"
input x: float64[3] features ["a", "b", "c"]
h = relu(linear(x, @fc))
output y = linear(h, @out) classes ["no", "yes"]
'''
WEIGHTS = {"fc.weight": np.arange(12.0).reshape(4, 3) / 10, "fc.bias": np.ones(4),
           "out.weight": np.arange(8.0).reshape(2, 4) - 3, "out.bias": np.zeros(2)}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model(write_model: Callable[..., Path]) -> Path:
    return write_model(MODEL, WEIGHTS)


def test_check_ok(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    code, out, err = run(capsys, "check", str(model))
    assert code == 0 and err == ""
    assert "model 'm' is valid" in out and "output y: [2] (2 classes)" in out
    assert "holding 26 values" in out


def test_check_several_files(capsys: pytest.CaptureFixture[str], model: Path,
                             write_model: Callable[..., Path]) -> None:
    bad = write_model("model b\ninput x: float64[3]\noutput y = relu(q)\n", name="bad.pbx")
    code, out, err = run(capsys, "check", str(model), str(bad))
    assert code == 1 and "model 'm' is valid" in out
    assert f"{bad}:3:17: error: undefined name 'q'" in err and "1 of 2 files" in err


def test_check_syntax_error_format(capsys: pytest.CaptureFixture[str],
                                   write_model: Callable[..., Path]) -> None:
    path = write_model("model m\ninput x: float64[3]\noutput y = relu(x,, x)\n")
    code, out, err = run(capsys, "check", str(path))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}:3:19: error: unexpected ','; expected a name" or \
        lines[0].startswith(f"{path}:3:19: error: unexpected ','")
    assert lines[1].endswith("| output y = relu(x,, x)")
    assert lines[2].endswith("|                   ^")
    assert "Traceback" not in err


def test_several_errors_counted(capsys: pytest.CaptureFixture[str],
                                write_model: Callable[..., Path]) -> None:
    path = write_model("model m\ninput x: float64[3]\na = relu(q)\noutput y = tahn(a)\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    assert f"{path}:3:10: error: undefined name 'q'" in err
    assert f"{path}:4:12: error: unknown op 'tahn'; did you mean 'tanh'?" in err
    assert err.rstrip().endswith("2 errors")


def test_run_prints_and_saves(capsys: pytest.CaptureFixture[str], model: Path,
                              tmp_path: Path) -> None:
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    np.save(tmp_path / "x.npy", x)
    code, out, _ = run(capsys, "run", str(model), "--input", str(tmp_path / "x.npy"))
    assert code == 0 and "y: [2, 2] float64" in out and "-> yes" in out
    h = np.maximum(x @ WEIGHTS["fc.weight"].T + 1, 0)
    expected = h @ WEIGHTS["out.weight"].T
    code, out, _ = run(capsys, "run", str(model), "-i", str(tmp_path / "x.npy"),
                       "-o", str(tmp_path / "o" / "y.npz"), "--dtype", "float32")
    assert code == 0
    with np.load(tmp_path / "o" / "y.npz") as saved:
        assert saved["y"].dtype == np.float32
        np.testing.assert_allclose(saved["y"], expected, rtol=1e-6)


def test_run_npz_key_selection(capsys: pytest.CaptureFixture[str], model: Path,
                               tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.ones((1, 3)), b=np.zeros((2, 3)))
    code, _, err = run(capsys, "run", str(model), "-i", str(tmp_path / "d.npz"))
    assert code == 1 and "choose one with --key" in err
    code, out, _ = run(capsys, "run", str(model), "-i", str(tmp_path / "d.npz"), "--key", "b")
    assert code == 0 and "y: [2, 2]" in out
    code, _, err = run(capsys, "run", str(model), "-i", str(tmp_path / "d.npz"), "--key", "zz")
    assert code == 1 and "has no key 'zz'" in err


def test_run_bad_input_writes_nothing(capsys: pytest.CaptureFixture[str], model: Path,
                                      tmp_path: Path) -> None:
    x = np.ones((2, 3))
    x[0, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    out_file = tmp_path / "y.npz"
    code, _, err = run(capsys, "run", str(model), "-i", str(tmp_path / "x.npy"), "-o",
                       str(out_file))
    assert code == 1 and "non-finite" in err and "nan at index [0, 1]" in err
    assert not out_file.exists() and list(tmp_path.glob(".y.npz*")) == []
    np.save(tmp_path / "x4.npy", np.ones((2, 4)))
    code, _, err = run(capsys, "run", str(model), "-i", str(tmp_path / "x4.npy"))
    assert code == 1 and "has shape [2, 4]; expected [batch, 3]" in err


def test_graph_formats(capsys: pytest.CaptureFixture[str], model: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "graph", str(model), "--format", "json")
    assert code == 0
    data = json.loads(out)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["h/linear"]["shape"] == [4] and nodes["h/linear"]["source"]["line"] == 4
    assert nodes["h"]["op"] == "relu" and nodes["y"]["params"]["weight"] == "out.weight"
    code, out, _ = run(capsys, "graph", str(model), "-f", "dot")
    assert out.startswith('digraph "m" {') and '"h/linear" -> "h";' in out
    code, out, _ = run(capsys, "graph", str(model))
    assert "relu(h/linear)" in out
    code, _, _ = run(capsys, "graph", str(model), "-o", str(tmp_path / "g.txt"))
    assert code == 0 and "linear(" in (tmp_path / "g.txt").read_text()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", str(model)])  # --input missing
    assert info.value.code == 2
    assert main([]) == 2
    capsys.readouterr()


def test_missing_model_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "nope.pbx"))
    assert code == 1 and "no such file" in err


def test_console_script_runs_as_module(model: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pbxc.cli", "check", "-q", str(model)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("method", ["jacobian", "gradient", "input_x_gradient", "dfd"])
def test_explain_writes_attributions(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     method: str) -> None:
    out = tmp_path / "e.npz"
    ref = EXAMPLES / "breast_cancer_mlp_reference.npz"
    extra = ["--baseline", "mean", "--data", str(ref), "--data-key", "inputs"] \
        if method == "dfd" else []
    code, _, err = run(capsys, "explain", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-m", method,
                       "-i", str(ref), "--key", "inputs", "--batch-size", "50", "-o", str(out),
                       *extra)
    assert code == 0, err
    with np.load(out) as saved:
        assert saved["outputs"].shape == (143, 2) and saved["targets"].shape == (143,)
        att = saved["attributions"]
        assert att.shape == ((143, 2, 30) if method == "jacobian" else (143, 30))
        np.testing.assert_array_equal(saved["targets"], saved["outputs"].argmax(axis=1))
        if method == "dfd":
            assert saved["summation_error"].max() <= 1e-12
            np.testing.assert_allclose(att.sum(axis=1), saved["delta"], rtol=1e-12, atol=1e-12)


def test_explain_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    ref = str(EXAMPLES / "breast_cancer_mlp_reference.npz")
    model = str(EXAMPLES / "breast_cancer_mlp.pbx")
    code, _, err = run(capsys, "explain", model, "-m", "gradient", "-i", ref, "--key", "inputs",
                       "--baseline", "zeros")
    assert code == 2 and "--baseline applies to --method dfd" in err
    code, _, err = run(capsys, "explain", model, "-m", "gradient", "-i", ref, "--key", "inputs",
                       "--target", "first")
    assert code == 2 and "--target must be" in err
    code, _, err = run(capsys, "explain", model, "-m", "gradient", "-i", ref, "--key", "inputs",
                       "--target", "5")
    assert code == 1 and "target must be" in err


def test_explain_lrp_saves_the_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "l.npz"
    ref = EXAMPLES / "digits_cnn_reference.npz"
    code, _, err = run(capsys, "explain", str(EXAMPLES / "digits_cnn.pbx"), "-m", "lrp",
                       "-i", str(ref), "--key", "inputs", "--rule", "epsilon:0.01",
                       "--dtype", "float64", "-o", str(out))
    assert code == 0, err
    with np.load(out) as saved:
        start, inputs = saved["relevance_start"], saved["relevance_inputs"]
        absorbed = saved["absorbed_bias"] + saved["absorbed_stabiliser"]
        np.testing.assert_allclose(inputs + absorbed, start, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(saved["attributions"].reshape(len(start), -1).sum(axis=1),
                                   inputs, rtol=1e-12, atol=1e-12)
    code, _, err = run(capsys, "explain", str(EXAMPLES / "digits_cnn.pbx"), "-m", "lrp",
                       "-i", str(ref), "--key", "inputs", "--rule", "alphabeta:2:2")
    assert code == 1 and "alpha - beta = 1" in err


def test_explain_dfd_rule_revealcancel(tmp_path: Path) -> None:
    x = np.load(EXAMPLES / "breast_cancer_mlp_reference.npz")["inputs"][:7]
    np.save(tmp_path / "x.npy", x)
    outs = {}
    for rule in ("rescale", "revealcancel"):
        out = tmp_path / f"{rule}.npz"
        assert main(["explain", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-m", "dfd", "-i",
                     str(tmp_path / "x.npy"), "--dfd-rule", rule, "-o", str(out)]) == 0
        with np.load(out) as data:
            outs[rule] = dict(data)
    model = pbxc.load(EXAMPLES / "breast_cancer_mlp.pbx")
    want = model.dfd(x, rule="revealcancel").attributions["x"]
    np.testing.assert_allclose(outs["revealcancel"]["attributions"], want, rtol=1e-6)
    assert not np.allclose(outs["rescale"]["attributions"], want)
    np.testing.assert_allclose(outs["revealcancel"]["delta"], outs["rescale"]["delta"])
    assert main(["explain", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-m", "lrp", "-i",
                 str(tmp_path / "x.npy"), "--dfd-rule", "revealcancel"]) == 2


def test_graph_shows_an_onnx_source_comment_without_control_characters(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`pbxc graph` echoes the `# onnx:` comment `pbxc import` writes; what a hand-edited file
    puts there never brings a terminal escape sequence to the output."""
    f = tmp_path / "m.pbx"
    f.write_text("model m\ninput x: float64[2]\n"
                 "output y = relu(x)  # onnx: /r (Relu)\x1b[2J\x07\n", encoding="utf-8")
    assert main(["graph", str(f)]) == 0
    out = capsys.readouterr().out
    assert "<- onnx /r (Relu)?[2J?" in out
    assert "\x1b" not in out and "\x07" not in out
