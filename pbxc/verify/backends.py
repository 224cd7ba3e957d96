"""Backends compared with the NumPy runtime (the reference semantics) by ``backend_parity``.

A backend is an entry of :data:`BACKENDS`: a name, an availability test that says why not,
and a builder returning a :class:`Runner` with the passes of a compiled module (forward,
gradient, jacobian, dfd, lrp). The CUDA module runs twice: compiled as C++ with the serial
grid shim on the CPU ("cuda-on-cpu", wherever g++ is) and through cupy on a GPU ("cupy");
unavailable ones are skipped with their reason.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


class Runner(Protocol):
    name: str

    def forward(self, x: Any) -> dict[str, Any]: ...
    def gradient(self, x: Any) -> Any: ...
    def jacobian(self, x: Any) -> Any: ...
    def dfd(self, x: Any, baseline: Any) -> tuple[Any, Any]: ...
    def lrp(self, x: Any, composite: str) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class Backend:
    name: str
    unavailable: Callable[[Any], str | None]   # a reason, or None when it can run
    build: Callable[[Any], Runner]


@dataclass
class ModuleRunner:
    """A generated module with the standalone API (``pbxc compile``'s NumPy module)."""

    name: str
    module: Any          # a module, or anything with its passes
    directory: tempfile.TemporaryDirectory[str]

    def forward(self, x: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.module.forward(x)
        return result

    def gradient(self, x: Any) -> Any:
        return self.module.gradient(x)

    def jacobian(self, x: Any) -> Any:
        return self.module.jacobian(x)

    def dfd(self, x: Any, baseline: Any) -> tuple[Any, Any]:
        result: tuple[Any, Any] = self.module.dfd(x, baseline=baseline)
        return result

    def lrp(self, x: Any, composite: str) -> tuple[Any, Any]:
        result: tuple[Any, Any] = self.module.lrp(x, composite=composite)
        return result


def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a file we just wrote
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled_numpy(model: Any) -> Runner:
    from pbxc.runtime.compile import compile_model

    tmp = tempfile.TemporaryDirectory(prefix="pbxc-verify-")
    files = compile_model(model, Path(tmp.name) / "module")
    module = _load_module(files[0], f"pbxc_verify_{model.name}")
    return ModuleRunner("numpy-compiled", module, tmp)


def _one_input(model: Any) -> str | None:
    if len(model.input_names) != 1:
        return "the compiled module's passes take models with one input"
    return None


def _cuda_shim_unavailable(model: Any) -> str | None:
    from pbxc.codegen.cuda_module import unsupported
    from pbxc.codegen.cuda_shim import gxx

    reason = unsupported(model.graph)
    if reason is not None:
        return reason
    if gxx() is None:
        return "the CUDA CPU shim needs g++, which is not on PATH"
    return None


def _cuda_runner(model: Any, device: str) -> Runner:
    from pbxc.runtime.cupy_backend import load_cuda_module

    tmp = tempfile.TemporaryDirectory(prefix="pbxc-verify-cuda-")
    cuda = load_cuda_module(model, device, Path(tmp.name))
    name = "cuda-on-cpu" if device == "shim" else "cupy"
    return ModuleRunner(name, _HostModule(cuda.module), tmp)


class _HostModule:
    """A generated CUDA module whose results come back as NumPy arrays."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _to_host(fn(*args, **kwargs))
        return call


def _to_host(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    get = getattr(value, "get", None)
    return get() if callable(get) and not isinstance(value, dict) else value


def _cupy(model: Any) -> str | None:
    from pbxc.codegen.cuda_module import unsupported
    from pbxc.runtime.cupy_backend import cupy_unavailable

    return unsupported(model.graph) or cupy_unavailable()


#: the backends compared with the runtime, in order
BACKENDS: list[Backend] = [
    Backend("numpy-compiled", _one_input, _compiled_numpy),
    Backend("cuda-on-cpu", _cuda_shim_unavailable, lambda m: _cuda_runner(m, "shim")),
    Backend("cupy", _cupy, lambda m: _cuda_runner(m, "cupy")),
]


def available_backends(model: Any) -> tuple[list[Runner], list[tuple[str, str]]]:
    """Runners for every available backend, and (name, reason) for every skipped one."""
    runners: list[Runner] = []
    skipped: list[tuple[str, str]] = []
    for backend in BACKENDS:
        reason = backend.unavailable(model)
        if reason is not None:
            skipped.append((backend.name, reason))
            continue
        runners.append(backend.build(model))
    return runners, skipped
