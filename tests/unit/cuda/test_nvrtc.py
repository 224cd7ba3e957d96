"""Every generated kernel compiles with NVRTC (cupy's compiler) to a cubin for sm_80 and
sm_90, without warnings, register spills or stack frames beyond the pooling slopes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.codegen.cuda_shim import nvrtc_compile, nvrtc_version
from pbxc.runtime.compile import render_cuda_module

from .conftest import MODELS
from .test_shim_numerics import COVERAGE, COVERAGE_1D, coverage_weights

ARCHS = ("sm_80", "sm_90")


def check(source: str, kernels: int, arch: str) -> None:
    cubin = nvrtc_compile(source, arch)
    assert cubin.image[:4] == b"\x7fELF"
    assert not cubin.warnings, cubin.warnings[:5]
    assert len(cubin.resources) == kernels
    worst = max(cubin.resources.items(), key=lambda kv: kv[1][0])
    spills = {k: v for k, v in cubin.resources.items() if v[1] > 0}
    assert not spills, spills
    print(f"\nNVRTC {nvrtc_version()} {arch}: {kernels} kernels, {len(cubin.image)} bytes, "
          f"most registers {worst[1][0]} ({worst[0]}), no spills")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", MODELS)
def test_examples_compile(name: str, arch: str, sources: dict[str, tuple[str, str]],
                          needs_nvrtc: None) -> None:
    cu, py = sources[name]
    kernels = py.split("KERNELS = {", 1)[1].split("\n}\n", 1)[0].count("': (")
    check(cu, 2 * kernels, arch)


def test_coverage_models_compile(tmp_path: Path, needs_nvrtc: None) -> None:
    """Softmax rows, grouped and dilated convolutions, padded pooling windows, conv1d."""
    np.savez(tmp_path / "w.npz", **coverage_weights(np.random.default_rng(1)))
    for k, text in enumerate((COVERAGE, COVERAGE_1D)):
        if k == 1:
            weights = coverage_weights(np.random.default_rng(1))
            weights["out.weight"] = np.ones((6, 4))
            np.savez(tmp_path / "w.npz", **weights)
        (tmp_path / "m.pbx").write_text(text)
        cu, py = render_cuda_module(pbxc.load(tmp_path / "m.pbx"))
        kernels = py.split("KERNELS = {", 1)[1].split("\n}\n", 1)[0].count("': (")
        check(cu, 2 * kernels, "sm_90" if k else "sm_80")
