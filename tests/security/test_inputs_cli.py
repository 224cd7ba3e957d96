"""Issue #10, command-line inputs of run, explain and score: every bad value is an ``error:``
line with exit 1 (2 for flag combinations, as argparse), within seconds, and nothing is left
behind; the also-fix items of the input side (specs/security.md, Inputs).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main

REPO = Path(__file__).resolve().parents[2]
MODEL = '''model m
weights "w.npz"
input x: float64[3]
h = relu(linear(x, @fc))
output y = linear(h, @out) classes ["no", "yes"]
'''
WEIGHTS = {"fc.weight": np.arange(12.0).reshape(4, 3) / 10 - 0.5, "fc.bias": np.ones(4),
           "out.weight": np.arange(8.0).reshape(2, 4) - 3, "out.bias": np.zeros(2)}
X = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0], [0.25, 0.75, 1.5], [2.0, 1.0, 0.0],
              [-1.0, -2.0, 0.5]])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    np.savez(tmp_path / "w.npz", **WEIGHTS)  # type: ignore[arg-type]
    (tmp_path / "m.pbx").write_text(MODEL, encoding="utf-8")
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "data.npz", a=X, b=X + 1)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], folder: Path, *argv: str) -> tuple[int, str, str]:
    before = sorted(p.name for p in folder.iterdir())
    start = time.monotonic()
    code = main([a.replace("DIR", str(folder)) for a in argv])
    out, err = capsys.readouterr()
    assert time.monotonic() - start < 60
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before  # no canary, nothing left
    return code, out, err


def test_baseline_npz_file_is_read(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    np.savez(folder / "base.npz", x=X[0])      # one sample, keyed by the input's name
    np.savez(folder / "per.npz", anything=X)   # one per sample, its only key
    np.savez(folder / "bad.npz", x=np.ones(7))
    for name in ("base", "per"):
        code, out, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "dfd", "-i",
                             "DIR/x.npy", "--baseline", f"DIR/{name}.npz")
        assert code == 0 and "summation-to-delta" in out, err
    code, _, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "dfd", "-i", "DIR/x.npy",
                       "--baseline", "DIR/bad.npz")
    assert code == 1
    assert err.startswith(f"error: --baseline '{folder / 'bad.npz'}' has shape [7]; expected "
                          "one sample [3] or one per input sample [5, 3]")
    code, _, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "dfd", "-i", "DIR/x.npy",
                       "--baseline", "DIR/missing.npz")
    assert code == 1 and "is not zeros, mean, a number or a file" in err


@pytest.mark.parametrize("size", ["0", "-1"])
def test_batch_size_must_be_positive(capsys: pytest.CaptureFixture[str], folder: Path,
                                     size: str) -> None:
    for command in (["explain", "DIR/m.pbx", "-m", "gradient", "-i", "DIR/x.npy"],
                    ["score", "DIR/m.pbx", "--data", "DIR/x.npy", "--labels", "DIR/x.npy"]):
        code, _, err = run(capsys, folder, *command, "--batch-size", size)
        assert code == 1
        assert re.match(r"error: --(png-max must be >= 0 and --)?batch-size", err), err


def test_unknown_output_name(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, _, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "jacobian", "-i",
                       "DIR/x.npy", "--output-name", "nope")
    assert code == 1
    assert err == "error: model 'm' has no output 'nope'; its outputs are ['y']\n"


def test_empty_batch_is_an_error_everywhere(capsys: pytest.CaptureFixture[str],
                                            folder: Path) -> None:
    np.save(folder / "empty.npy", X[:0])
    message = "input 'x' (declared at "
    for command in (["run", "DIR/m.pbx", "-i", "DIR/empty.npy"],
                    ["explain", "DIR/m.pbx", "-m", "gradient", "-i", "DIR/empty.npy"],
                    ["explain", "DIR/m.pbx", "-m", "lrp", "-i", "DIR/empty.npy"]):
        code, _, err = run(capsys, folder, *command)
        assert code == 1 and message in err and "is an empty batch (shape [0, 3]); give at " \
            "least one sample" in err, err
    model = pbxc.load(folder / "m.pbx")
    for method in (model.forward, model.gradient, model.jacobian, model.lrp, model.dfd,
                   model.input_x_gradient):
        with pytest.raises(pbxc.InputError, match=r"is an empty batch"):
            method(X[:0])


def test_data_without_data_key_names_the_right_flag(capsys: pytest.CaptureFixture[str],
                                                    folder: Path) -> None:
    code, _, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "dfd", "-i", "DIR/x.npy",
                       "--baseline", "mean", "--data", "DIR/data.npz")
    assert code == 1
    assert "has keys ['a', 'b']; choose one with --data-key" in err
    code, out, _ = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "dfd", "-i", "DIR/x.npy",
                       "--baseline", "mean", "--data", "DIR/data.npz", "--data-key", "a")
    assert code == 0 and "summation-to-delta" in out


def test_composite_names_take_underscores(capsys: pytest.CaptureFixture[str],
                                          folder: Path) -> None:
    results = []
    for name in ("epsilon_plus", "epsilon-plus"):
        code, out, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "lrp", "-i",
                             "DIR/x.npy", "--composite", name)
        assert code == 0, err
        results.append(out)
    assert results[0] == results[1]


def test_explain_plan_covers_every_chunk_and_kinks_is_one_count(
        capsys: pytest.CaptureFixture[str], folder: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> None:
    out_dir = tmp_path_factory.mktemp("out")
    counts = []
    for size in ("2", "5"):
        code, out, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "jacobian", "-i",
                             "DIR/x.npy", "--batch-size", size, "--explain-plan", "-o",
                             str(out_dir / f"j{size}.npz"))
        assert code == 0, err
        if size == "2":  # chunks of 2, 2 and 1 samples: each distinct plan, with its samples
            assert "samples 0-1, 2-3:\njacobian plan:" in out and "samples 4-4:\n" in out
            assert out.count("jacobian plan:") == 2
        else:
            assert out.startswith("jacobian plan:") and out.count("jacobian plan:") == 1
        with np.load(out_dir / f"j{size}.npz") as saved:
            assert saved["kinks"].shape == (1,)
            counts.append(int(saved["kinks"][0]))
    assert counts[0] == counts[1]


def test_explain_plan_with_another_method_is_not_silent(capsys: pytest.CaptureFixture[str],
                                                        folder: Path) -> None:
    # every method has a memory plan (specs/memory.md); the Jacobian adds its accumulation plan
    code, out, err = run(capsys, folder, "explain", "DIR/m.pbx", "-m", "gradient", "-i",
                         "DIR/x.npy", "--explain-plan")
    assert code == 0, err
    assert "memory plan: gradient, batch " in out and "predicted peak" in out
    assert "jacobian plan" not in out


def test_score_checks_labels_and_samples(capsys: pytest.CaptureFixture[str],
                                         folder: Path) -> None:
    np.save(folder / "y.npy", np.array([0, 1, 0]))
    np.save(folder / "y9.npy", np.array([0, 1, 9, 0, 1]))
    code, _, err = run(capsys, folder, "score", "DIR/m.pbx", "--data", "DIR/x.npy",
                       "--labels", "DIR/y.npy", "--methods", "gradient")
    assert code == 1 and err == "error: 5 samples but 3 labels\n"
    code, _, err = run(capsys, folder, "score", "DIR/m.pbx", "--data", "DIR/x.npy",
                       "--labels", "DIR/y9.npy", "--methods", "gradient")
    assert code == 1 and "labels must be class indices in [0, 1], got 0 to 9" in err
    code, _, err = run(capsys, folder, "score", "DIR/m.pbx", "--data", "DIR/x.npy",
                       "--labels", "DIR/y.npy", "--max-samples", "-2")
    assert code == 1 and "--max-samples must be a positive number, got -2" in err


def test_readme_python_example_names_the_real_input() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    model = pbxc.load(REPO / "examples" / "digits_cnn.pbx")
    line = next(x for x in readme.splitlines() if "model.input_shapes, model.output_shapes" in x)
    assert repr(model.input_shapes) in line
