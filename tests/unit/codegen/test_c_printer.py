"""Generated C/CUDA device functions: they compile (g++, nvcc), and compute what NumPy does."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sympy

from pbxc.codegen.c_printer import (
    C_PRELUDE,
    C_SOFTMAX,
    PbxCPrinter,
    render_c_activation_functions,
)
from pbxc.codegen.numpy_printer import render_activation_functions
from pbxc.errors import UnsupportedOp
from pbxc.ops import BUILTIN_ACTIVATIONS
from pbxc.runtime.codeload import load_generated_module
from pbxc.symbolic import derive
from pbxc.symbolic.accuracy import measure_multiplier, z0_grid
from pbxc.symbolic.activations import Z
from pbxc.symbolic.softmax import softmax_dfd

NAMES = sorted(BUILTIN_ACTIVATIONS)
SHIM = ["-D__device__=", "-D__forceinline__=inline", "-include", "math.h"]


@pytest.fixture(scope="module")
def rendered():
    return render_c_activation_functions(NAMES)


def test_source_has_no_includes_and_both_precisions(rendered) -> None:
    assert "#include" not in rendered.source
    assert rendered.source.startswith(C_PRELUDE)
    tanh = rendered.names[derive("tanh").key]["m"]
    double = rendered.source.split(f"{tanh}_f64(")[1].split("\n}")[0]
    single = rendered.source.split(f"{tanh}_f32(")[1].split("\n}")[0]
    assert "double" in double and "float" not in double
    assert "float" in single and "double" not in single
    gelu = rendered.names[derive("gelu").key]["f"]
    assert "pbx_normal_cdf" in rendered.source.split(f"{gelu}_f32(")[1].split("\n}")[0]
    assert "expf(" in C_PRELUDE and "erfcf(" in C_PRELUDE and "log1pf(" in C_PRELUDE


def test_printer_picks_the_precision() -> None:
    expr = sympy.exp(Z) * sympy.Rational(1, 3) + sympy.erfc(Z) + sympy.Abs(Z) + Z**2
    assert PbxCPrinter(single=False).doprint(expr) == \
        "((z) * (z)) + (0.3333333333333333)*exp(z) + fabs(z) + erfc(z)"
    assert PbxCPrinter(single=True).doprint(expr) == \
        "((z) * (z)) + (0.3333333432674408f)*expf(z) + fabsf(z) + erfcf(z)"
    with pytest.raises(UnsupportedOp, match="no rule for gamma"):
        PbxCPrinter().doprint(sympy.gamma(Z))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_compiles_with_gxx(rendered, tmp_path: Path) -> None:
    source = tmp_path / "activations.cu"
    source.write_text(rendered.source)
    result = subprocess.run(["g++", "-x", "c++", "-fsyntax-only", "-Wall", "-Werror", *SHIM,
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:2000]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_with_nvcc(rendered, tmp_path: Path, arch: str) -> None:
    # nvcc's front end accepts what NVRTC does for a source without includes
    m = rendered.names[derive("gelu").key]["m"]
    kernel = (f'extern "C" __global__ void k(const double* a, const double* b, double* out) '
              f'{{ int i = threadIdx.x; out[i] = {m}_f64(a[i], b[i]); }}\n'
              f'extern "C" __global__ void kf(const float* a, const float* b, float* out) '
              f'{{ int i = threadIdx.x; out[i] = {m}_f32(a[i], b[i]); }}\n')
    source = tmp_path / "kernels.cu"
    source.write_text(rendered.source + "\n" + kernel)
    result = subprocess.run(["nvcc", f"-arch={arch}", "-c", str(source), "-o",
                             str(tmp_path / "kernels.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:2000]


@pytest.fixture(scope="module")
def library(rendered, tmp_path_factory: pytest.TempPathFactory):
    """The C source as a host library (the serial shim), with array wrappers for ctypes."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    wrappers = []
    for names in rendered.names.values():
        for kind, base in names.items():
            for t, sfx in (("double", "f64"), ("float", "f32")):
                fn = f"{base}_{sfx}"
                if kind == "m":
                    wrappers.append(f'extern "C" void w_{fn}(const {t}* a, const {t}* b, '
                                    f'{t}* out, int n) {{ for (int i = 0; i < n; ++i) '
                                    f'out[i] = {fn}(a[i], b[i]); }}')
                else:
                    wrappers.append(f'extern "C" void w_{fn}(const {t}* a, {t}* out, int n) '
                                    f'{{ for (int i = 0; i < n; ++i) out[i] = {fn}(a[i]); }}')
    folder = tmp_path_factory.mktemp("clib")
    source = folder / "lib.cpp"
    source.write_text(rendered.source + "\n" + "\n".join(wrappers))
    # -ffp-contract=off: the host compiler must not fuse a*b + c where the source does not
    result = subprocess.run(["g++", "-x", "c++", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                             *SHIM, str(source), "-o", str(folder / "lib.so")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:2000]
    return ctypes.CDLL(str(folder / "lib.so"))


def _call(library, name: str, *args: np.ndarray) -> np.ndarray:
    arrays = [np.ascontiguousarray(a) for a in args]
    out = np.empty_like(arrays[0])
    ptrs = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays]
    getattr(library, f"w_{name}")(*ptrs, out.ctypes.data_as(ctypes.c_void_p),
                                  ctypes.c_int(out.size))
    return out


def _pairs(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    z0 = rng.uniform(-30, 30, 2000)
    z = z0 + rng.choice([-1, 1], 2000) * 10.0 ** rng.uniform(-20, 2, 2000)
    z[::7] = z0[::7]
    z0[:300] = rng.uniform(-2.5, 1, 300)
    z[:300] = z0[:300] + rng.uniform(-1.5, 1.5, 300)
    return z0.astype(dtype), z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_c_computes_what_numpy_computes(rendered, library, dtype: type) -> None:
    numpy_source = render_activation_functions(NAMES)
    module = load_generated_module(numpy_source.source, "c_vs_numpy")
    z0, z = _pairs(dtype)
    sfx = "f32" if dtype is np.float32 else "f64"
    eps = np.finfo(dtype).eps
    for name in NAMES:
        calc = derive(name)
        c_names, np_names = rendered.names[calc.key], numpy_source.names[calc.key]
        for kind in ("f", "df", "m"):
            args = [z0, z] if kind == "m" else [z]
            c = _call(library, f"{c_names[kind]}_{sfx}", *args)
            py = getattr(module, np_names[kind])(*args)
            same = (c == py) | (np.isnan(c) & np.isnan(py))
            with np.errstate(invalid="ignore"):
                gap = np.abs(c - py) / (np.abs(py) + 1e-8 * calc.slope_scale)
            # libm and NumPy's own exp/log may differ by an ulp; fma in the C helpers is exact.
            # gelu_tanh's sigmoid(v), v = 2 sqrt(2/pi) (z + 0.044715 z^3), has condition |v| in
            # its argument: the two printers round v differently by an ulp or two
            cond = 1 + (np.abs(1.6 * (z + 0.044715 * z**3)) if name == "gelu_tanh" else 0)
            ok = same | (gap <= 32 * eps * cond)
            assert ok.all(), (name, kind, z0[~ok][:3], z[~ok][:3], c[~ok][:3], py[~ok][:3])


@pytest.mark.parametrize("name", ["gelu", "mish", "tanh", "hardtanh"])
def test_c_multiplier_meets_the_bar(rendered, library, name: str) -> None:
    calc = derive(name)
    names = rendered.names[calc.key]
    for dtype, sfx, bar in (("float64", "f64", 1e-14), ("float32", "f32", 1e-6)):
        measure = measure_multiplier(
            lambda a, b, n=f"{names['m']}_{sfx}": _call(library, n, a, b), calc.reference(),
            calc.slope_scale, dtype, z0_grid(3.0),
            value=lambda x, n=f"{names['f']}_{sfx}": _call(library, n, x))
        assert measure.max_error <= bar, (dtype, measure)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_c_softmax_matches_numpy(tmp_path: Path) -> None:
    wrappers = []
    for t, sfx in (("double", "f64"), ("float", "f32")):
        wrappers.append(
            f'extern "C" void dfd_{sfx}(const {t}* z0, const {t}* z, int rows, int n, {t}* big, '
            f'{t}* w) {{ for (int r = 0; r < rows; ++r) pbx_softmax_dfd_factors(z0 + r * n, '
            f'z + r * n, n, big + r * n, w + r * n); }}\n'
            f'extern "C" void vjp_{sfx}(const {t}* a, const {t}* b, const {t}* u, int rows, '
            f'int n, {t}* out) {{ for (int r = 0; r < rows; ++r) pbx_diag_minus_outer_vjp('
            f'a + r * n, a + r * n, b + r * n, u + r * n, n, out + r * n); }}')
    source = tmp_path / "softmax.cpp"
    source.write_text(C_PRELUDE + C_SOFTMAX + "\n".join(wrappers))
    lib_path = tmp_path / "softmax.so"
    result = subprocess.run(["g++", "-x", "c++", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                             *SHIM, str(source), "-o", str(lib_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:2000]
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(5)
    for dtype, sfx in ((np.float64, "f64"), (np.float32, "f32")):
        z0 = (rng.normal(size=(4, 6)) * 3).astype(dtype)
        z = (z0 + rng.normal(size=(4, 6)) * np.array([[1e-9], [1e-3], [1.0], [20.0]])).astype(dtype)
        big, w = np.empty_like(z), np.empty_like(z)
        ptr = [a.ctypes.data_as(ctypes.c_void_p) for a in (z0, z, big, w)]
        getattr(lib, f"dfd_{sfx}")(ptr[0], ptr[1], 4, 6, ptr[2], ptr[3])
        rule = softmax_dfd(z0, z)
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(big, rule.a, rtol=64 * eps)
        np.testing.assert_allclose(w, rule.b, rtol=64 * eps)
        u = rng.normal(size=(4, 6)).astype(dtype)
        out = np.empty_like(u)
        getattr(lib, f"vjp_{sfx}")(*(a.ctypes.data_as(ctypes.c_void_p) for a in (big, w, u)),
                                   4, 6, out.ctypes.data_as(ctypes.c_void_p))
        np.testing.assert_allclose(out, rule.vjp(u), rtol=256 * eps, atol=256 * eps)
