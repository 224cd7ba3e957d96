"""The ``--models`` section of ``bench/passes.py``: torchvision CNNs through pbxc and its peers.

    python bench/passes.py --models resnet18,resnet50,densenet121 [--size 224]
        [--batches 1 32] [--dtypes float32 float64] [--passes gradient,lrp,dfd] [--max-gb 10]

Models: torchvision's, with ``weights=None`` after ``torch.manual_seed(0)`` (inference mode:
batch norm uses its running statistics). pbxc gets them through ONNX:
``torch.onnx.export(..., dynamo=False)`` (which folds each batch norm into the convolution
before it, exactly up to float32 rounding of the folded weights), ``onnxslim`` (folds the
exporter's Identity ops on constants), then ``pbxc import``; they are cached under
``$PBXC_BENCH_CACHE`` (default: a ``pbxc-bench-models`` folder in the temp dir).

Peers, per pass, each with the predicted class as the target:
* gradient: torch autograd, d f_c / d x (parameters with ``requires_grad=False``, as pbxc
  computes no weight gradients);
* lrp: Zennit, Epsilon(1e-6) on convolutions and linear layers, Norm on average pooling,
  activations passed, with ``ResNetCanonizer`` (batch-norm fold and a rule-able residual sum)
  for the ResNets; DenseNet's batch norms follow concatenations, which Zennit's
  ``SequentialMergeBatchNorm`` cannot fold, and stay unfolded; pbxc runs its "epsilon"
  composite (on ONNX's graph, batch norms folded where a convolution precedes them);
* dfd: Captum ``DeepLift`` against the zeros baseline (the ResNet blocks get one ReLU module
  per use, which Captum requires); the target needs a forward pass of its own, which is timed.

Each measurement runs in its own subprocess, one at a time: the model and input are built,
then the peak resident set is reset (``/proc/self/clear_refs``) and the pass's first call is
timed; then warm calls (the median wall time, and the median CPU time of the process, all
threads: on a shared machine the wall time of a multi-threaded peer suffers most). The time
ratio is of wall times. Peak memory is the largest ``VmHWM - VmRSS before the call`` over
the calls: the pass's own memory, measured the same way for pbxc and every peer (weights,
caches built on an earlier call and the interpreter are not counted; pbxc's first call
includes the dense convolution cache it builds). Each subprocess has an address-space limit
of ``--max-gb`` so that a configuration too big for the machine fails with a MemoryError
instead of swapping.

Under each row, a note on pbxc's first call: its minor page faults and system time beside
the warm calls' (memory the process touches for the first time; on a virtual machine whose
host reclaims idle guest memory each such fault can cost tens of microseconds), and for DFD
the time of one more call after the kept default is forgotten: the default's forward pass
again, on memory already touched, i.e. what the first call costs without first touches.

The last column, ``limit s``, is the time the pass's multiply-adds would take at the GEMM
rate measured at 512^3 in this run (the gradient and LRP two forward passes' worth, DFD two
and one row for the shared default): no library computing the same products with the same
GEMMs beats it by much, so a time target below it is out of reach on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("resnet18", "resnet50", "densenet121")
PASSES = ("gradient", "lrp", "dfd")
PEERS = {"gradient": "torch autograd", "lrp": "zennit epsilon", "dfd": "captum DeepLift"}
HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    folder = Path(os.environ.get("PBXC_BENCH_CACHE",
                                 Path(tempfile.gettempdir()) / "pbxc-bench-models"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def torch_model(name: str, dtype: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(getattr(torch, dtype))


def exported(name: str, size: int) -> Path:
    """The .pbx of torchvision ``name`` at ``size`` x ``size`` (exported once, cached)."""
    folder = cache_dir()
    pbx = folder / f"{name}_{size}.pbx"
    if pbx.exists():
        return pbx
    import onnx
    import onnxslim
    import torch

    net = torch_model(name, "float32")
    raw = folder / f"{name}_{size}_raw.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, size, size), str(raw), dynamo=False,
                      input_names=["x"], output_names=["logits"])
    slim = folder / f"{name}_{size}.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(raw))), str(slim))
    from pbxc.cli import main

    if main(["import", str(slim), "-o", str(pbx)]) != 0:
        raise RuntimeError(f"pbxc import failed for {slim}")
    return pbx


# ---------------------------------------------------------------- in the subprocess

def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS


def _captum_ready(net: Any) -> Any:
    """ResNet blocks with one ReLU module per use (Captum's DeepLift keys its rule by module)."""
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def forward_basic(block: Any, x: torch.Tensor) -> torch.Tensor:
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu_a(block.bn1(block.conv1(x)))
        return block.relu_b(block.bn2(block.conv2(out)) + identity)

    def forward_bottleneck(block: Any, x: torch.Tensor) -> torch.Tensor:
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu_a(block.bn1(block.conv1(x)))
        out = block.relu_b(block.bn2(block.conv2(out)))
        return block.relu_c(block.bn3(block.conv3(out)) + identity)

    for module in net.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            module.relu_a, module.relu_b, module.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
            fn = forward_basic if isinstance(module, BasicBlock) else forward_bottleneck
            module.forward = fn.__get__(module)
        if hasattr(module, "relu") and isinstance(module.relu, nn.ReLU):
            module.relu.inplace = False
    return net


def _pass_fn(spec: dict[str, Any]) -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(spec["batch"], 3, spec["size"], spec["size"])).astype(spec["dtype"])
    if spec["lib"] == "pbxc":
        import pbxc

        model = pbxc.load(spec["pbx"], dtype=spec["dtype"])
        if spec["pass"] == "dfd":
            def dfd() -> Any:
                return model.dfd(x, baseline="zeros")
            dfd.forget = model.default_points.clear  # type: ignore[attr-defined]
            return dfd
        return {"gradient": lambda: model.gradient(x),
                "lrp": lambda: model.lrp(x, composite="epsilon")}[spec["pass"]]
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    net = torch_model(spec["model"], spec["dtype"])
    xt = torch.from_numpy(x)
    if spec["pass"] == "gradient":
        def gradient() -> Any:
            xg = xt.clone().requires_grad_(True)
            out = net(xg)
            out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
            return xg.grad
        return gradient
    if spec["pass"] == "lrp":
        from zennit.attribution import Gradient
        from zennit.composites import LayerMapComposite
        from zennit.rules import Epsilon, Norm, Pass
        from zennit.torchvision import ResNetCanonizer
        from zennit.types import Activation, AvgPool, Convolution, Linear

        # DenseNet's batch norms follow concatenations, which SequentialMergeBatchNorm
        # cannot fold (it fails on a shape mismatch): there they stay, without a rule
        canonizers = [ResNetCanonizer()] if spec["model"].startswith("resnet") else []
        composite = LayerMapComposite(
            layer_map=[(Activation, Pass()), (Convolution, Epsilon(1e-6)),
                       (Linear, Epsilon(1e-6)), (AvgPool, Norm())], canonizers=canonizers)

        def lrp() -> Any:
            with Gradient(model=net, composite=composite) as attributor:
                xg = xt.clone().requires_grad_(True)
                return attributor(xg, lambda out: torch.nn.functional.one_hot(
                    out.argmax(1), out.shape[1]).to(out.dtype) * out)[1]
        return lrp
    from captum.attr import DeepLift

    net = _captum_ready(net)
    explainer = DeepLift(net)

    def deeplift() -> Any:
        with torch.no_grad():
            target = net(xt).argmax(1)
        return explainer.attribute(xt, torch.zeros_like(xt), target=target)
    return deeplift


def timed(fn: Any, repeat: int) -> dict[str, Any]:
    """``fn`` called 1 + ``repeat`` times: the first call's time, the median warm wall and
    CPU time, and the peak memory above the resident size before each call. Also each
    call's minor page faults (first touches of memory the process has not used before) and
    system CPU time, where a first call's excess over the warm calls tends to go. ``fn`` may
    carry ``forget``, a callable that drops what its calls keep for the next (pbxc's DFD
    default): then one more call after it is timed, ``again_s``, which does that work again
    on memory already touched."""
    import gc
    import resource

    times, cpus, peaks, faults, system = [], [], [], [], []
    for _ in range(1 + repeat):
        gc.collect()
        _reset_peak()
        base = _status("VmRSS")
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        peaks.append(_status("VmHWM") - base)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        system.append(r1.ru_stime - r0.ru_stime)
        del result

    def median(values: list[Any]) -> Any:
        rest = values[1:] or values
        return sorted(rest)[len(rest) // 2]

    out = {"first_s": times[0], "warm_s": median(times), "cpu_s": median(cpus),
           "peak_bytes": max(peaks), "first_faults": faults[0], "warm_faults": median(faults),
           "first_sys_s": system[0], "warm_sys_s": median(system)}
    forget = getattr(fn, "forget", None)
    if forget is not None:
        forget()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out["again_s"] = time.perf_counter() - t0
    return out


def measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    return timed(_pass_fn(spec), spec["repeat"])


def result_columns(r: dict[str, Any], first: bool, digits: int) -> str:
    """A measurement's columns: warm s, CPU s, (first s), peak MiB; or "failed"."""
    if "error" in r:
        return f"{'failed':>8} {'':>8} {'':>8} {'':>9}" if first else \
            f"{'failed':>8} {'':>8} {'':>9}"
    text = f"{r['warm_s']:>8.{digits}f} {r['cpu_s']:>8.{digits}f} "
    if first:
        text += f"{r['first_s']:>8.{digits}f} "
    return text + f"{r['peak_bytes'] / (1 << 20):>9.1f}"


def measure(spec: dict[str, Any], max_gb: float, timeout: float, module: str = "cnn"
            ) -> dict[str, Any]:
    """Run one measurement (``module``'s ``measure_here``) in a fresh subprocess with an
    address-space limit."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(HERE)!r}); "
            f"limit = int({max_gb!r} * (1 << 30)); "
            "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
            f"from {module} import measure_here; "
            "print('RESULT', json.dumps(measure_here(json.loads(sys.argv[1]))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:160]}


def run_models(models: list[str], size: int, batches: list[int], dtypes: list[str],
               passes: list[str], max_gb: float, repeat: int, timeout: float) -> None:
    from common import forward_macs, gemm_rate

    import pbxc

    rates = {dtype: gemm_rate(dtype) for dtype in dtypes}
    print(f"torchvision CNNs at 3x{size}x{size}; one subprocess per measurement, address "
          f"space <= {max_gb:g} GB; peak = VmHWM - VmRSS before the call")
    print("GEMM rate at 512^3: " + ", ".join(f"{d} {2 * r / 1e9:.1f} GFLOP/s"
                                             for d, r in rates.items())
          + "; limit = the pass's multiply-adds at that rate (gradient and LRP: two forward "
          "passes, DFD: two and one row)")
    header = (f"{'model':<12} {'dtype':<8} {'batch':>5}  {'pass':<9} {'pbxc s':>8} "
              f"{'cpu s':>8} {'first s':>8} {'pbxc MiB':>9}  {'peer':<16} {'peer s':>8} "
              f"{'cpu s':>8} {'peer MiB':>9} {'t ratio':>7} {'m ratio':>7} {'limit s':>8}")
    print(header)
    for name in models:
        pbx = exported(name, size)
        macs = forward_macs(pbxc.load(pbx, dtype="float32"))
        for dtype in dtypes:
            for batch in batches:
                for pass_name in passes:
                    spec = {"model": name, "pbx": str(pbx), "dtype": dtype, "batch": batch,
                            "size": size, "pass": pass_name, "repeat": repeat}
                    ours = measure({**spec, "lib": "pbxc"}, max_gb, timeout)
                    peer = measure({**spec, "lib": "peer"}, max_gb, timeout)
                    forwards = 2 + 1 / batch if pass_name == "dfd" else 2
                    limit = forwards * macs * batch / rates[dtype]
                    print(_row(name, dtype, batch, pass_name, ours, peer, limit), flush=True)


def _row(name: str, dtype: str, batch: int, pass_name: str, ours: dict[str, Any],
         peer: dict[str, Any], limit: float) -> str:
    def cols(r: dict[str, Any], first: bool) -> str:
        return result_columns(r, first, 3)

    ratio_t = ratio_m = "-"
    if "error" not in ours and "error" not in peer:
        ratio_t = f"{ours['warm_s'] / peer['warm_s']:.2f}"
        ratio_m = f"{ours['peak_bytes'] / max(peer['peak_bytes'], 1):.2f}"
    line = (f"{name:<12} {dtype:<8} {batch:>5}  {pass_name:<9} {cols(ours, True)}  "
            f"{PEERS[pass_name]:<16} {cols(peer, False)} {ratio_t:>7} {ratio_m:>7} "
            f"{limit:>8.3f}")
    if "error" not in ours:
        line += "\n    " + first_call_note(ours)
    for who, r in (("pbxc", ours), (PEERS[pass_name], peer)):
        if "error" in r:
            line += f"\n    ({who} failed: {r['error']})"
    return line


def first_call_note(r: dict[str, Any]) -> str:
    """What pbxc's first call did that the warm calls did not: page faults, system time, and
    (DFD) how long a call takes that recomputes the default on memory already touched."""
    text = (f"(pbxc first call {r['first_s'] / r['warm_s']:.2f}x warm: "
            f"{r['first_faults']} page faults and {r['first_sys_s']:.3f} s system time, "
            f"warm {r['warm_faults']} and {r['warm_sys_s']:.3f} s")
    if "again_s" in r:
        text += (f"; a call with the default forgotten, on touched memory, "
                 f"{r['again_s']:.3f} s = {r['again_s'] / r['warm_s']:.2f}x warm")
    return text + ")"
