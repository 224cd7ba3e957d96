"""The CUDA backend in-process: ``pbxc.load(path, backend="cupy")``.

:func:`load_cuda_module` renders the model's CUDA source and launcher module (the very text
``pbxc compile --target cuda`` writes) and loads it with the model's weights on a device:
``"cupy"`` (a GPU through cupy.RawModule) or ``"shim"`` (the same source compiled as C++ with
the serial grid shim, on NumPy arrays; see :mod:`pbxc.codegen.cuda_shim`).

:class:`CupyModel` wraps a :class:`~pbxc.runtime.model.Model` (the NumPy reference, which
keeps the description, input checks and every option the generated module lacks) and sends
the passes the module has to the generated kernels: ``forward``, ``gradient``,
``input_x_gradient``, ``jacobian``, ``dfd`` and ``lrp`` with the model's defaults. Results
are device arrays.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pbxc.codegen.cuda_shim import ShimDevice, build_shim
from pbxc.errors import InputError, PbxError, UnsupportedOp
from pbxc.runtime.codeload import load_generated_module
from pbxc.runtime.compile import render_cuda_module
from pbxc.runtime.model import Model

DEVICES = ("cupy", "shim")


def cupy_unavailable() -> str | None:
    """Why the cupy backend cannot run here, or None."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed"
    try:
        import cupy
    except Exception as exc:  # a broken install reports here
        return f"cupy does not import: {exc}"
    try:
        if not cupy.is_available():
            return "cupy finds no CUDA GPU"
    except Exception as exc:
        return f"cupy finds no CUDA GPU: {exc}"
    return None


@dataclass
class CudaModule:
    """A loaded generated CUDA module, its source and the device it runs on."""

    module: ModuleType
    source: str
    device: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def load_cuda_module(model: Model, device: str = "cupy",
                     cache_dir: str | Path | None = None) -> CudaModule:
    """The model's generated CUDA module with its weights, on ``device`` ("cupy" or "shim")."""
    if device not in DEVICES:
        raise PbxError(f"unknown device '{device}'; expected one of {', '.join(DEVICES)}")
    cu, py = render_cuda_module(model)
    module = load_generated_module(py, f"{model.name}_cuda")
    module.set_weights({k: np.asarray(v) for k, v in model.weights.items()})
    if device == "shim":
        dev: Any = ShimDevice(build_shim(cu, module.KERNELS, cache_dir), module.KERNELS)
    else:
        reason = cupy_unavailable()
        if reason is not None:
            raise PbxError(f"backend 'cupy' is unavailable: {reason}; pip install pbxc[cuda] "
                           "on a machine with an NVIDIA GPU")
        dev = module.CupyDevice(cu)
    module.set_device(dev)
    return CudaModule(module, cu, dev)


class CupyModel:
    """A :class:`Model` whose passes run on the generated CUDA kernels (see module doc)."""

    def __init__(self, model: Model, device: str = "cupy") -> None:
        self.reference = model
        self.cuda = load_cuda_module(model, device)
        self.backend = "cupy" if device == "cupy" else "cuda-shim"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reference, name)

    def __repr__(self) -> str:
        return repr(self.reference).replace("<pbxc.Model", f"<pbxc.Model[{self.backend}]")

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.cuda.module, fn)(*args, **kwargs)
        except self.cuda.module.KernelArgumentError as exc:
            raise InputError(str(exc)) from None

    def _x(self, x: Any) -> Any:
        if isinstance(x, dict):
            if len(x) != 1:
                raise InputError(f"model '{self.name}' takes one input on the cupy backend")
            x = next(iter(x.values()))
        dtype = self.reference.dtype
        shape = self.reference.graph.inputs[0].shape
        got = tuple(getattr(x, "shape", np.shape(x)))
        if got[1:] != tuple(shape) or len(got) != len(shape) + 1:
            raise InputError(f"input '{self.input_names[0]}' has shape {list(got)}; expected "
                             f"[batch, {', '.join(map(str, shape))}]")
        return x, dtype

    def forward(self, x: Any) -> Any:
        x, dtype = self._x(x)
        outs = self._call("forward", x, dtype=dtype)
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    __call__ = forward

    def gradient(self, x: Any, *, target: Any = None) -> Any:
        x, dtype = self._x(x)
        return self._call("gradient", x, target=target, dtype=dtype)

    def input_x_gradient(self, x: Any, *, target: Any = None) -> Any:
        x, dtype = self._x(x)
        return self._call("input_x_gradient", x, target=target, dtype=dtype)

    def jacobian(self, x: Any) -> Any:
        """The Jacobian array (B, *out_shape, *in_shape), reverse accumulation."""
        x, dtype = self._x(x)
        return self._call("jacobian", x, dtype=dtype)

    def hessian(self, *args: Any, **kwargs: Any) -> Any:
        """Not on the cupy backend: the CUDA target has no second-order kernels yet."""
        raise UnsupportedOp("the hessian pass has no CUDA kernels (cupy backend); use the "
                            "NumPy backend: pbxc.load(path).hessian(...)")

    def hvp(self, *args: Any, **kwargs: Any) -> Any:
        """Not on the cupy backend: the CUDA target has no second-order kernels yet."""
        raise UnsupportedOp("the hessian pass (hvp) has no CUDA kernels (cupy backend); use "
                            "the NumPy backend: pbxc.load(path).hvp(...)")

    def interactions(self, *args: Any, **kwargs: Any) -> Any:
        """Not on the cupy backend (it needs the Hessian for its Taylor term)."""
        raise UnsupportedOp("interactions are not available on the cupy backend; use the "
                            "NumPy backend: pbxc.load(path).interactions(...)")

    def dfd(self, x: Any, *, baseline: Any = 0.0, target: Any = None) -> tuple[Any, Any]:
        """(contributions, delta) with the rescale rule, as the compiled module's dfd."""
        x, dtype = self._x(x)
        if isinstance(baseline, str):
            if baseline != "zeros":
                raise InputError("the cupy backend takes baseline 'zeros', a number or an array")
            baseline = 0.0
        return self._call("dfd", x, baseline=baseline, target=target, dtype=dtype)

    def lrp(self, x: Any, *, target: Any = None, composite: str | None = None,
            low: float | None = None, high: float | None = None) -> tuple[Any, Any]:
        """(relevance, ledger) for a registered composite ('model': the .pbx lrp block)."""
        x, dtype = self._x(x)
        kwargs: dict[str, Any] = {"target": target, "low": low, "high": high, "dtype": dtype}
        if composite is not None:
            kwargs["composite"] = composite
        return self._call("lrp", x, **kwargs)
