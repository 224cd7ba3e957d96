"""The emitted CUDA source and launcher module: their shape, and the golden files.

The golden files (``tests/golden/cuda/breast_cancer_mlp.cu`` and ``.py``) are what the
compiler writes for the smallest example, for reviewers to read; regenerate them with
``pytest tests/unit/cuda --update-golden`` (or ``PBXC_UPDATE_GOLDEN=1``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pbxc
from pbxc.errors import UnsupportedOp
from pbxc.runtime.compile import render_cuda_module

from .conftest import GOLDEN, MODELS, REPO


@pytest.mark.parametrize("name", MODELS)
def test_source_is_nvrtc_shaped(name: str, sources: dict[str, tuple[str, str]]) -> None:
    cu, py = sources[name]
    assert not re.search(r"^\s*#\s*include", cu, re.M)
    namespace: dict[str, object] = {}
    table_text = py.split("KERNELS = ", 1)[1].split("\n}\n", 1)[0] + "\n}"
    kernels = ast.literal_eval(table_text)
    for kernel, signature in kernels.items():
        for sfx in ("f64", "f32"):
            assert f'extern "C" __global__ void {kernel}_{sfx}(' in cu, kernel
        assert signature[-1][:2] == ("long long", "total")
    # the float kernels call only float routines, the double ones only double routines
    for body in re.split(r'extern "C" __global__ void ', cu)[1:]:
        head = body.split("(", 1)[0]
        other = "_f64(" if head.endswith("_f32") else "_f32("
        assert other not in body.split("\n}\n", 1)[0], head
    assert namespace == {}


@pytest.mark.parametrize("name", MODELS)
def test_module_imports_only_numpy_and_os(name: str, sources: dict[str, tuple[str, str]]
                                          ) -> None:
    """The artifact runs with cupy and numpy alone: cupy is imported inside CupyDevice."""
    _, py = sources[name]
    tree = ast.parse(py)
    top = {alias.name for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= {"numpy", "os"}, top
    inner = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    assert inner <= {"numpy", "os", "cupy"}, inner
    assert "pbxc" not in {n.split(".")[0] for n in inner}


def test_golden_files(update_golden: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)   # positions in comments read "examples/..." on every machine
    cu, py = render_cuda_module(pbxc.load("examples/breast_cancer_mlp.pbx"))
    files = {"breast_cancer_mlp.cu": cu, "breast_cancer_mlp.py": py}
    if update_golden:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
        pytest.skip("golden files rewritten")
    for name, text in files.items():
        path = GOLDEN / name
        assert path.is_file(), f"{path} is missing; run pytest tests/unit/cuda --update-golden"
        golden = path.read_text(encoding="utf-8")
        if golden != text:
            diff = next(i for i, (a, b) in enumerate(zip(golden.splitlines(), text.splitlines()))
                        if a != b) if golden.splitlines()[:1] else 0
            pytest.fail(f"{name} differs from its golden file from line {diff + 1}; if the "
                        "change is intended, run pytest tests/unit/cuda --update-golden")


def test_fusion_and_named_kernels(sources: dict[str, tuple[str, str]]) -> None:
    cu, py = sources["breast_cancer_mlp"]
    # relu is computed in the linear epilogue: no standalone activation forward kernel
    assert "fused: h1" in cu and "fused: h2" in cu
    assert "C.matmul(" in py and "cupy.RawModule" in py
    assert "lrp_rule_step(C, _lrp1(C, P), R_h1__linear" in py


def test_unsupported_op_names_the_target(write_model: object, tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "w.npz", **{"a.weight": np.ones((2, 3)), "b.weight": np.ones((2, 3))})
    (tmp_path / "m.pbx").write_text(
        'model cat\nweights "w.npz"\ninput x: float64[3]\n'
        "output y = concat(linear(x, @a, bias=false), linear(x, @b, bias=false))\n")
    model = pbxc.load(tmp_path / "m.pbx")
    with pytest.raises(UnsupportedOp, match="the cuda target has no kernels for op 'concat'"):
        render_cuda_module(model)
