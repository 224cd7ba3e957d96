"""What a new user found beside the security items (issue 10, "also fix"), one test each."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import mpmath
import numpy as np
import pytest

import pbxc
from pbxc.cli import build_parser, main
from pbxc.symbolic.derive import AccuracyWarning

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def test_wine_swish_float32_multiplier_meets_its_bar() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)   # the bar is met: no warning
        model = pbxc.load(EXAMPLES / "wine_swish_mlp.pbx", dtype="float32")
    # the pair verify reported at 1.06e-06 (float32 bar 1e-06)
    z0 = np.array([-5.5149030685424805], dtype=np.float32)
    z = np.array([-4.919435977935791], dtype=np.float32)
    m = model.activations.multiplier("h1", z0, z, f0=z0 * 0 + 1, f1=z * 0 + 2)[0]
    m_full = model.activations.multiplier("h1", z0, z)[0]
    with mpmath.workdps(50):
        def f(t: float) -> mpmath.mpf:
            x = mpmath.mpf(t)
            return x / (1 + mpmath.exp(-1.5 * x))
        ref = (f(float(z[0])) - f(float(z0[0]))) / (mpmath.mpf(float(z[0])) - float(z0[0]))
        err = float(abs(mpmath.mpf(float(m_full)) - ref) / abs(ref))
    assert m_full.dtype == np.float32 and err < 1e-7
    assert m == m_full          # the runtime's fast secant does not bypass the widened form
    from pbxc.runtime.compile import render_cuda_module

    cu, _ = render_cuda_module(model)
    assert re.search(r"float act0_m_f32\(float z0, float z\) \{\n    return \(float\)"
                     r"act0_m_f64\(\(double\)z0, \(double\)z\);", cu) or \
        re.search(r"float pbx_act\d+_m_f32\(float z0, float z\) \{\n    return \(float\)"
                  r"pbx_act\d+_m_f64\(\(double\)z0, \(double\)z\);", cu)


def test_compile_explain_plan_shows_the_order_the_module_uses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(EXAMPLES / "breast_cancer_mlp.pbx"), "--explain-plan"]) == 0
    out = capsys.readouterr().out
    chosen = [line for line in out.splitlines() if "<- chosen" in line]
    assert chosen and all(line.split()[0] == "reverse" for line in chosen), out
    assert "the compiled module accumulates in reverse" in out
    # --batch sizes the estimate only: without --explain-plan it is refused, not ignored
    assert main(["compile", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-o",
                 str(tmp_path / "o"), "--batch", "8"]) == 2
    assert "--batch N (N >= 1) sizes the cost estimate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["compile", str(EXAMPLES / "breast_cancer_mlp.pbx"), "--explain-plan",
                 "--batch", "0"]) == 2
    capsys.readouterr()
    assert main(["compile", str(EXAMPLES / "breast_cancer_mlp.pbx"), "--explain-plan",
                 "--batch", "8"]) == 0
    assert "batch 8" in capsys.readouterr().out


def test_readme_verify_usage_parses() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `pbxc verify"))
    usage = row.split("`")[1].replace("\\|", "|")
    assert "[--json REPORT|-]" in usage
    args = build_parser().parse_args(["verify", "model.pbx", "--json", "-", "--replay",
                                      "CX.npz"])
    assert args.json == "-" and args.replay == "CX.npz"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["verify", "model.pbx", "--json"])   # needs its argument
    spec = (REPO / "specs" / "verify.md").read_text(encoding="utf-8")
    assert "until pbxc has a CUDA code generator" not in spec and "cuda-on-cpu" in spec


def test_backend_parity_says_which_backends_ran(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-p", "backend_parity",
                 "--examples", "1", "-q", "--json", "-"])
    import json

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    note = report["properties"][0]["note"]
    assert note.startswith("ran numpy-compiled")
    assert "cupy" in note          # ran, or skipped with its reason
