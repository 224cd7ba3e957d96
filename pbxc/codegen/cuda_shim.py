"""Run and check generated CUDA C without a GPU: a serial grid shim for g++, and NVRTC.

**The shim.** The CUDA source compiles as C++ with ``-D__global__= -D__device__=
-D__host__= -D__forceinline__=inline`` plus :data:`SHIM_HEADER`, which defines ``threadIdx``,
``blockIdx``, ``blockDim`` and ``gridDim``. For every kernel a ``pbx_launch_<kernel>``
wrapper loops over the launch grid serially, block by block and thread by thread, calling the
kernel body as a plain function. :class:`ShimDevice` loads the library with ctypes and
launches on NumPy arrays, so the generated module (the same text that runs on cupy) runs its
passes on the CPU. No kernel uses shared memory, warp shuffles or atomics, so a serial grid
computes what the GPU computes, up to the order of floating-point operations that the GPU's
fused multiply-adds change (the shim builds with ``-ffp-contract=off``).

**NVRTC.** :func:`nvrtc_compile` compiles a source to a cubin for one architecture through
the NVRTC library (the compiler cupy uses), loaded with ctypes from the
``nvidia-cuda-nvrtc-cu12`` wheel, ``$CUDA_HOME`` or the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.errors import PbxError

SHIM_HEADER = """\
// pbxc serial grid shim: CUDA's launch built-ins on the host, one thread at a time
struct pbx_uint3 { unsigned int x, y, z; };
static pbx_uint3 threadIdx, blockIdx, blockDim, gridDim;
"""

SHIM_FLAGS = ("-D__global__=", "-D__device__=", "-D__host__=", "-D__forceinline__=inline")

Signature = Sequence[tuple[str, str, Any]]


class ShimError(PbxError):
    """The CUDA source did not compile as C++ for the CPU shim, or NVRTC rejected it."""


def _c_type(kind: str, t: str) -> str:
    return kind.replace("T", t) if "T" in kind else kind


def launch_wrappers(kernels: Mapping[str, Signature]) -> str:
    """``extern "C" pbx_launch_<kernel>_<f64|f32>(grid, block, args...)``: the serial grid."""
    out = []
    for name, signature in kernels.items():
        for t, sfx in (("double", "f64"), ("float", "f32")):
            params = ", ".join(f"{_c_type(kind, t)} a{k}" for k, (kind, _, _) in
                               enumerate(signature))
            args = ", ".join(f"a{k}" for k in range(len(signature)))
            out.append(
                f'extern "C" void pbx_launch_{name}_{sfx}(unsigned int grid, unsigned int block, '
                f"{params}) {{\n"
                "    gridDim = pbx_uint3{grid, 1, 1};\n    blockDim = pbx_uint3{block, 1, 1};\n"
                "    for (unsigned int b = 0; b < grid; ++b) {\n"
                "        for (unsigned int t = 0; t < block; ++t) {\n"
                "            blockIdx = pbx_uint3{b, 0, 0};\n"
                "            threadIdx = pbx_uint3{t, 0, 0};\n"
                f"            {name}_{sfx}({args});\n"
                "        }\n    }\n}")
    return "\n".join(out)


def gxx() -> str | None:
    return shutil.which("g++")


def build_shim(source: str, kernels: Mapping[str, Signature],
               cache_dir: str | Path | None = None, optimise: str = "-O0") -> Path:
    """Compile ``source`` + launch wrappers into a shared library; cached by content.

    ``-O0`` by default: it builds in half the time of ``-O1``, and the small batches the
    checks run do not need faster code (x86-64 evaluates float and double in SSE registers at
    every level, so the results are the same)."""
    compiler = gxx()
    if compiler is None:
        raise ShimError("the CUDA CPU shim needs g++, which is not on PATH")
    text = source + "\n// ---- serial launch wrappers\n" + launch_wrappers(kernels) + "\n"
    digest = hashlib.sha256((optimise + text).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "pbxc-cuda-shim"
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"shim-{digest}.so"
    if lib.is_file():
        return lib
    src = folder / f"shim-{digest}.cpp"
    header = folder / "pbx_shim.h"
    header.write_text(SHIM_HEADER, encoding="utf-8")
    src.write_text(text, encoding="utf-8")
    tmp = folder / f".shim-{digest}-{os.getpid()}.so"
    # -ffp-contract=off: the host compiler must not fuse a*b + c where the source does not
    cmd = [compiler, "-x", "c++", "-std=c++14", optimise, "-ffp-contract=off", "-fPIC", "-shared",
           "-Wall", "-Wno-unused-function", *SHIM_FLAGS, "-include", "math.h", "-include",
           str(header), str(src), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ShimError(f"g++ rejected the generated CUDA source ({src}):\n"
                        f"{result.stderr[:4000]}")
    os.replace(tmp, lib)
    return lib


_CTYPES = {"double": ctypes.c_double, "float": ctypes.c_float, "int": ctypes.c_int32,
           "long long": ctypes.c_int64}


class ShimDevice:
    """The generated kernels compiled for the CPU; ``xp`` is numpy."""

    name = "cuda-shim"
    xp = np

    def __init__(self, library: str | Path, kernels: Mapping[str, Signature]) -> None:
        self.library = ctypes.CDLL(str(library))
        self.functions: dict[str, Any] = {}
        for name, signature in kernels.items():
            for t, sfx in (("double", "f64"), ("float", "f32")):
                fn = getattr(self.library, f"pbx_launch_{name}_{sfx}")
                types: list[Any] = [ctypes.c_uint, ctypes.c_uint]
                for kind, _, _ in signature:
                    types.append(ctypes.c_void_p if kind.endswith("*")
                                 else _CTYPES[_c_type(kind, t)])
                fn.argtypes = types
                fn.restype = None
                self.functions[f"{name}_{sfx}"] = fn
        self.launches = 0

    def launch(self, name: str, grid: int, block: int, args: Sequence[Any]) -> None:
        converted = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray)
                     else a.item() for a in args]
        self.functions[name](grid, block, *converted)
        self.launches += 1


# ---------------------------------------------------------------- NVRTC
NVRTC_ARCHS = ("sm_80", "sm_90")


def _nvrtc_candidates() -> list[str]:
    found = []
    try:  # the nvidia-cuda-nvrtc-cu12 wheel
        wheel = importlib.import_module("nvidia.cuda_nvrtc")
        for root in wheel.__path__:
            found += sorted(glob.glob(os.path.join(root, "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return [f for f in found if "builtins" not in f and ".alt." not in f]


_NVRTC: list[Any] = []


def load_nvrtc() -> Any | None:
    """The NVRTC library through ctypes, or None where none is installed."""
    if _NVRTC:
        return _NVRTC[0]
    for path in _nvrtc_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _NVRTC.append(lib)
        return lib
    return None


def nvrtc_version() -> tuple[int, int] | None:
    lib = load_nvrtc()
    if lib is None:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


@dataclass(frozen=True)
class Cubin:
    """NVRTC's output for one architecture: the cubin, the log, and per kernel the ptxas
    resource report (registers, spill stores + loads in bytes, stack frame in bytes)."""

    arch: str
    image: bytes
    log: str
    resources: dict[str, tuple[int, int, int]]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.log.splitlines() if "warning" in line]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                          r"spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _resources(log: str) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    current, frame, spills = "", 0, 0
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current, frame, spills = m.group(1), 0, 0
        elif m := _PTXAS_FRAME.search(line):
            frame, spills = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif (m := _PTXAS_REGS.search(line)) and current:
            out[current] = (int(m.group(1)), spills, frame)
    return out


def nvrtc_compile(source: str, arch: str = "sm_80", name: str = "pbxc.cu",
                  options: Sequence[str] = ("--std=c++14",)) -> Cubin:
    """Compile CUDA C to a cubin for ``arch`` with NVRTC (what cupy.RawModule does), so that
    syntax, types and resource problems (ptxas's register and spill report) all surface."""
    lib = load_nvrtc()
    if lib is None:
        raise ShimError("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")
    prog = ctypes.c_void_p()

    def check(status: int, what: str) -> None:
        if status != 0:
            message = lib.nvrtcGetErrorString(status).decode()
            raise ShimError(f"NVRTC {what} failed for {arch}: {message}")

    def log() -> str:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buffer)
        return buffer.value.decode(errors="replace")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                 None), "program creation")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options),
                b"--ptxas-options=-v"]
        array = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), array)
        if status != 0:
            raise ShimError(f"NVRTC rejected the source for {arch}:\n{log()[:4000]}")
        text = log()
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return Cubin(arch, cubin.raw, text, _resources(text))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
