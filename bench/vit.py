"""The ``--models vit`` section of ``bench/passes.py``: a ViT-like transformer through pbxc,
LXT and Captum.

    python bench/passes.py --models vit [--batches 1 32] [--dtypes float32 float64] [--quick]

The model: 1x32x32 images, patch 4 (a Conv2d with stride = kernel: 64 tokens), dimension
64, a learned positional embedding, 2 pre-norm layers (LayerNorm, 4-head softmax attention
with separate q/k/v linears and the 1/sqrt(16) scale, residual; LayerNorm, 64-128-64 GELU
MLP, residual), a final LayerNorm and a linear head on the mean token (10 classes). Its
weights come from ``torch.manual_seed(0)`` (LayerNorm affine drawn around (1, 0)); the bench
writes them to ``vit.npz`` and the same model as ``vit.pbx`` (cached under
``$PBXC_BENCH_CACHE``, as bench/cnn.py), so the torch module and the .pbx are one model.

Passes, each with the predicted class as the target:
* lrp: pbxc ``model.lrp(x, composite="attnlrp")`` beside LXT's efficient AttnLRP (gradient x
  input with the std detached, ``identity_rule_implicit`` on GELU, ``divide_gradient`` on the
  two matmuls; the rules of lxt.efficient, applied to this module's explicit ops, as
  tests/unit/lrp/test_attnlrp_lxt.py checks to 1e-8) and beside Captum's InputXGradient;
* dfd: pbxc ``model.dfd(x, baseline="zeros")`` beside Captum's DeepLift (zeros baseline; it
  runs on this module, but its rules cover only nn.Softmax among the modules here: GELU,
  LayerNorm and the products of attention get gradients, so it is not DFD's exact
  summation-to-delta) and Captum's InputXGradient.

Each measurement runs in its own subprocess (bench/cnn.py's ``measure``: wall and CPU time,
first call and warm median, peak memory as VmHWM - VmRSS before the call).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cnn  # noqa: E402
from cnn import cache_dir  # noqa: E402

IMAGE, PATCH, DIM, LAYERS, HEADS, HIDDEN, CLASSES = 32, 4, 64, 2, 4, 128, 10
TOKENS = (IMAGE // PATCH) ** 2
DH = DIM // HEADS
LN_EPS = 1e-5
#: (pass, library) -> label of the peers
PEERS = {("lrp", "lxt"): "lxt AttnLRP (efficient)", ("lrp", "ixg"): "captum InputXGradient",
         ("dfd", "deeplift"): "captum DeepLift", ("dfd", "ixg"): "captum InputXGradient"}
PBXC = {"lrp": "attnlrp", "dfd": "dfd zeros"}


def torch_vit() -> Any:
    """The ViT as a torch module whose forward takes an ``ops`` object (plain torch, or
    LXT's efficient rules)."""
    import torch
    from torch import nn

    class Plain:
        def layernorm(self, x: Any, m: Any) -> Any:
            return nn.functional.layer_norm(x, (DIM,), m.weight, m.bias, m.eps)

        def matmul(self, a: Any, b: Any) -> Any:
            return a @ b

        def gelu(self, x: Any) -> Any:
            return nn.functional.gelu(x)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM, eps=LN_EPS), nn.LayerNorm(DIM, eps=LN_EPS)
            self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

        def forward(self, x: Any, ops: Any) -> Any:
            b = x.shape[0]
            a = ops.layernorm(x, self.ln1)
            q = self.q(a).reshape(b, TOKENS, HEADS, DH).transpose(1, 2)
            k = self.k(a).reshape(b, TOKENS, HEADS, DH).permute(0, 2, 3, 1)
            v = self.v(a).reshape(b, TOKENS, HEADS, DH).transpose(1, 2)
            w = torch.softmax(ops.matmul(q, k) / math.sqrt(DH), -1)
            c = ops.matmul(w, v).transpose(1, 2).reshape(b, TOKENS, DIM)
            h = x + self.o(c)
            return h + self.fc2(ops.gelu(self.fc1(ops.layernorm(h, self.ln2))))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, DIM, PATCH, stride=PATCH)
            self.pos = nn.Parameter(0.02 * torch.randn(TOKENS, DIM))
            for i in range(LAYERS):
                setattr(self, f"b{i}", Block())
            self.lnf = nn.LayerNorm(DIM, eps=LN_EPS)
            self.head = nn.Linear(DIM, CLASSES)
            self.ops = Plain()

        def forward(self, x: Any) -> Any:
            ops = self.ops
            t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            for i in range(LAYERS):
                t = getattr(self, f"b{i}")(t, ops)
            return self.head(ops.layernorm(t, self.lnf).mean(1))

    torch.manual_seed(0)
    net = ViT().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    net.requires_grad_(False)
    net.plain_ops = Plain
    return net


def pbx_text(dtype: str = "float32") -> str:
    lines = ["model vit", 'weights "vit.npz"', f"input x: {dtype}[1, {IMAGE}, {IMAGE}]",
             f"p = conv2d(x, @patch, stride={PATCH})",
             f"t0 = add(transpose(reshape(p, shape=({DIM}, {TOKENS})), perm=(1, 0)), @pos)"]
    shape = f"({TOKENS}, {HEADS}, {DH})"
    for i in range(LAYERS):
        b, t = f"b{i}", f"t{i}"
        lines += [
            f"a{i} = layernorm({t}, @{b}.ln1, eps={LN_EPS})",
            f"q{i} = transpose(reshape(linear(a{i}, @{b}.q), shape={shape}), perm=(1, 0, 2))",
            f"k{i} = transpose(reshape(linear(a{i}, @{b}.k), shape={shape}), perm=(1, 2, 0))",
            f"v{i} = transpose(reshape(linear(a{i}, @{b}.v), shape={shape}), perm=(1, 0, 2))",
            f"w{i} = softmax(div(matmul(q{i}, k{i}), value={math.sqrt(DH)!r}), axis=-1)",
            f"c{i} = reshape(transpose(matmul(w{i}, v{i}), perm=(1, 0, 2)), "
            f"shape=({TOKENS}, {DIM}))",
            f"h{i} = add({t}, linear(c{i}, @{b}.o))",
            f"m{i} = linear(gelu(linear(layernorm(h{i}, @{b}.ln2, eps={LN_EPS}), @{b}.fc1)), "
            f"@{b}.fc2)",
            f"t{i + 1} = add(h{i}, m{i})",
        ]
    lines.append(f"output logits = linear(mean(layernorm(t{LAYERS}, @lnf, eps={LN_EPS}), "
                 "axes=(0,)), @head)")
    return "\n".join(lines) + "\n"


def exported() -> Path:
    """vit.pbx and vit.npz (the torch module's state dict), written once."""
    import numpy as np

    folder = cache_dir()
    pbx = folder / "vit.pbx"
    if not pbx.exists() or pbx.read_text() != pbx_text():
        net = torch_vit()
        np.savez(folder / "vit.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
        pbx.write_text(pbx_text())
    return pbx


def lxt_efficient_rules() -> Any:
    """``lxt/efficient/rules.py`` (torch only), loaded from its file: importing the package
    ``lxt.efficient`` imports LXT's Hugging Face patches, which need a transformers release
    with ``modeling_attn_mask_utils``."""
    import importlib.util

    spec = importlib.util.find_spec("lxt")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "efficient" / "rules.py"
    loaded = importlib.util.spec_from_file_location("_lxt_efficient_rules", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def efficient_ops(plain: type) -> Any:
    """LXT's efficient AttnLRP on the module's ops: the std detached
    (lxt.efficient.patches.layer_norm_forward), the identity rule on GELU, the matmuls'
    gradient halved (the uniform rule)."""
    import torch

    rules = lxt_efficient_rules()

    class Efficient(plain):  # type: ignore[misc, valid-type]
        def layernorm(self, x: Any, m: Any) -> Any:
            mean = x.mean(dim=-1, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
            return (x - mean) / rules.stop_gradient((var + m.eps).sqrt()) * m.weight + m.bias

        def matmul(self, a: Any, b: Any) -> Any:
            return rules.divide_gradient(a @ b, 2)

        def gelu(self, x: Any) -> Any:
            return rules.identity_rule_implicit(torch.nn.functional.gelu, x)

    return Efficient()


# ---------------------------------------------------------------- in the subprocess

def _pass_fn(spec: dict[str, Any]) -> Any:
    import numpy as np

    x = np.random.default_rng(0).normal(size=(spec["batch"], 1, IMAGE, IMAGE)).astype(
        spec["dtype"])
    if spec["lib"] == "pbxc":
        import pbxc

        model = pbxc.load(spec["pbx"], dtype=spec["dtype"])
        if spec["pass"] == "lrp":
            return lambda: model.lrp(x, composite="attnlrp")
        return lambda: model.dfd(x, baseline="zeros")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    net = torch_vit().to(getattr(torch, spec["dtype"]))
    xt = torch.from_numpy(x)
    if spec["lib"] == "lxt":
        net.ops = efficient_ops(net.plain_ops)

        def lxt() -> Any:
            xg = xt.clone().requires_grad_(True)
            out = net(xg)
            out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
            return (xg.grad * xg).detach()
        return lxt
    from captum.attr import DeepLift, InputXGradient

    explainer = DeepLift(net) if spec["lib"] == "deeplift" else InputXGradient(net)

    def captum() -> Any:
        with torch.no_grad():
            target = net(xt).argmax(1)
        if spec["lib"] == "deeplift":
            return explainer.attribute(xt, torch.zeros_like(xt), target=target)
        return explainer.attribute(xt.clone().requires_grad_(True), target=target)
    return captum


def measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    return cnn.timed(_pass_fn(spec), spec["repeat"])


def measure(spec: dict[str, Any], max_gb: float, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh subprocess with an address-space limit."""
    return cnn.measure(spec, max_gb, timeout, module="vit")


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_vit(batches: list[int], dtypes: list[str], max_gb: float, repeat: int,
            timeout: float) -> None:
    print(f"ViT {IMAGE}x{IMAGE}, patch {PATCH}, dim {DIM}, {LAYERS} layers, {HEADS} heads, "
          f"mean token; one subprocess per measurement, address space <= {max_gb:g} GB; "
          "peak = VmHWM - VmRSS before the call")
    missing = [p for p in ("lxt", "captum") if not _have(p)]
    print("missing peers (not installed): " + (", ".join(missing) or "none"))
    header = (f"{'model':<6} {'dtype':<8} {'batch':>5}  {'pass':<11} {'pbxc s':>8} "
              f"{'cpu s':>8} {'first s':>8} {'pbxc MiB':>9}  {'peer':<24} {'peer s':>8} "
              f"{'cpu s':>8} {'peer MiB':>9} {'t ratio':>7} {'m ratio':>7}")
    print(header)
    pbx = exported()

    def cols(r: dict[str, Any], first: bool) -> str:
        return cnn.result_columns(r, first, 4)

    for dtype in dtypes:
        for batch in batches:
            for pass_name in ("lrp", "dfd"):
                spec = {"pbx": str(pbx), "dtype": dtype, "batch": batch, "pass": pass_name,
                        "repeat": repeat}
                ours = measure({**spec, "lib": "pbxc"}, max_gb, timeout)
                for (p, lib), label in PEERS.items():
                    if p != pass_name or not _have("lxt" if lib == "lxt" else "captum"):
                        continue
                    peer = measure({**spec, "lib": lib}, max_gb, timeout)
                    ratio_t = ratio_m = "-"
                    if "error" not in ours and "error" not in peer:
                        ratio_t = f"{ours['warm_s'] / peer['warm_s']:.2f}"
                        ratio_m = f"{ours['peak_bytes'] / max(peer['peak_bytes'], 1):.2f}"
                    line = (f"{'vit':<6} {dtype:<8} {batch:>5}  {PBXC[pass_name]:<11} "
                            f"{cols(ours, True)}  {label:<24} {cols(peer, False)} "
                            f"{ratio_t:>7} {ratio_m:>7}")
                    for who, r in (("pbxc", ours), (label, peer)):
                        if "error" in r:
                            line += f"\n    ({who} failed: {r['error']})"
                    print(line, flush=True)
