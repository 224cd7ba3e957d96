"""Pictures (valid PNG files) for image and tabular models and Jacobians; CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.evaluate import score_methods
from pbxc.evaluate.plots import (
    draw_attributions,
    draw_co_boxplots,
    draw_gax_history,
    draw_jacobian,
    input_kind,
    is_png,
)

REPO = Path(__file__).resolve().parents[3]
EX = REPO / "examples"


def pngs(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.png"))
    assert files and all(is_png(f) and f.stat().st_size > 1000 for f in files)
    assert not list(folder.rglob("*.tmp"))   # written atomically, nothing left behind
    return files


def test_input_kind() -> None:
    assert input_kind((30,)) == "tabular"
    assert input_kind((1, 8, 8)) == "image" and input_kind((8, 8)) == "image"
    assert input_kind((3, 1, 40)) == "matrix"


def test_image_and_tabular_pictures(tmp_path: Path) -> None:
    cnn = pbxc.load(EX / "digits_cnn.pbx")
    x = np.load(EX / "digits_cnn_reference.npz")["inputs"][:3]
    files = draw_attributions(x, cnn.gradient(x), tmp_path / "img", method="gradient",
                              class_names=cnn.class_names["logits"], max_files=2)
    assert [f.name for f in files] == ["sample_0000_gradient.png", "sample_0001_gradient.png"]
    assert pngs(tmp_path / "img") == files
    mlp = pbxc.load(EX / "breast_cancer_mlp.pbx")
    xb = np.load(EX / "breast_cancer_mlp_reference.npz")["inputs"][:2]
    files = draw_attributions(xb, mlp.input_x_gradient(xb), tmp_path / "tab", top_k=3,
                              feature_names=mlp.feature_names["x"])
    assert len(files) == 2 and pngs(tmp_path / "tab") == files
    with pytest.raises(ValueError, match="differ"):
        draw_attributions(xb, xb[:, :3], tmp_path / "bad")


def test_jacobian_boxplot_and_gax_pictures(tmp_path: Path) -> None:
    mlp = pbxc.load(EX / "breast_cancer_mlp.pbx")
    ref = np.load(EX / "breast_cancer_mlp_reference.npz")
    xb, y = ref["inputs"][:20], ref["labels"][:20]
    files = draw_jacobian(mlp.jacobian(xb).jacobian, tmp_path / "jac", max_files=1,
                          class_names=mlp.class_names["logits"],
                          feature_names=mlp.feature_names["x"])
    assert [f.name for f in files] == ["sample_0000_jacobian.png"]
    report = score_methods(mlp, xb, y, ["gradient", "dfd"], progress=False)
    draw_co_boxplots(report, tmp_path / "box" / "co.png")
    draw_gax_history(np.array([[0.0, 1.0, 2.0], [0.0, 3.0, np.nan]]), tmp_path / "g.png", 2.0)
    assert len(pngs(tmp_path)) == 3


def test_explain_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = EX / "digits_cnn_reference.npz"
    code = main(["explain", str(EX / "digits_cnn.pbx"), "-m", "lrp", "--rule", "epsilon",
                 "-i", str(ref), "--key", "inputs", "--png", str(tmp_path / "p"),
                 "--png-max", "3"])
    assert code == 0 and "wrote 3 PNG" in capsys.readouterr().out
    assert len(pngs(tmp_path / "p")) == 3
    code = main(["explain", str(EX / "wine_swish_mlp.pbx"), "-m", "jacobian", "-i",
                 str(EX / "wine_swish_mlp_reference.npz"), "--key", "inputs",
                 "--png", str(tmp_path / "j"), "--png-max", "1"])
    assert code == 0 and [f.name for f in pngs(tmp_path / "j")] == ["sample_0000_jacobian.png"]


def test_score_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(EX / "breast_cancer_mlp_reference.npz")
    model = str(EX / "breast_cancer_mlp.pbx")
    out = tmp_path / "r.json"
    code = main(["score", model, "--data", data, "--key", "inputs", "--labels-key", "labels",
                 "--methods", "gradient,lrp-epsilon,gax", "--gax-steps", "5",
                 "--max-samples", "30", "--out", str(out), "--png", str(tmp_path / "png"),
                 "--png-max", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "lrp-epsilon" in text and "gax" in text
    report = json.loads(out.read_text())
    assert report["samples"] == 30 and [m["method"] for m in report["methods"]] == \
        ["gradient", "lrp-epsilon", "gax"]
    assert {"median_gap", "rank_biserial"} <= set(report["methods"][0]["sum"]["gap"])
    names = {f.name for f in pngs(tmp_path / "png")}
    assert {"co_scores_sum.png", "co_scores_product.png", "gax_history_0.png"} <= names
    np.save(tmp_path / "y.npy", np.zeros(143, dtype=np.int64))
    assert main(["score", model, "--data", data, "--key", "inputs",
                 "--labels", str(tmp_path / "y.npy"), "--methods", "input", "--ax", "sum"]) == 0
    # usage errors exit 2, bad input exits 1
    assert main(["score", model, "--data", data, "--key", "inputs"]) == 2
    assert main(["score", model, "--data", data, "--key", "inputs", "--labels-key", "labels",
                 "--ax", "diff"]) == 2
    assert main(["score", model, "--data", data, "--key", "inputs", "--labels-key", "labels",
                 "--methods", "saliency"]) == 1
    assert main(["score", model, "--data", data, "--key", "inputs", "--labels-key", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown heatmap method 'saliency'" in err and "no key 'nope'" in err
