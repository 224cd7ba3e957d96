"""CUDA C kernel templates: the generic elementwise kernels, and builders of per-node kernels.

A kernel is data (:class:`Kernel`): a name, typed arguments and a body that runs once per
element inside a grid-stride loop. It is rendered twice, ``<name>_f64`` (``double``) and
``<name>_f32`` (``float``), by substituting ``$T`` (the type) and ``$S`` (``f64``/``f32``,
the suffix of the activation routines that :mod:`pbxc.codegen.c_printer` prints). The math
lives in ``__device__`` functions; the bodies are index arithmetic and calls, so the serial
grid shim (:mod:`pbxc.codegen.cuda_shim`) runs the very same text on the CPU.

Argument conventions (every kernel): inputs, then outputs, then scalars, then ``total``, the
number of elements of the first output, which the loop runs over. No kernel uses shared
memory, warp shuffles or atomics: reductions are one thread per row (or the array
library's own), scatters are gathers.
The source includes no header (NVRTC rejects ``<cmath>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pbxc.codegen.escape import c_text

#: argument kinds: floating arrays of the kernel's precision, int32 arrays, scalars
ARG_KINDS = ("const T*", "T*", "const int*", "int*", "T", "int", "long long")


@dataclass(frozen=True)
class Arg:
    """One kernel argument: its kind (:data:`ARG_KINDS`), name, and for arrays the number of
    elements the launcher checks: an int, ``"total"`` (the loop's length) or ``""`` (any)."""

    kind: str
    name: str
    extent: int | str = ""

    def c_decl(self, t: str) -> str:
        ctype = self.kind.replace("T", t) if "T" in self.kind else self.kind
        restrict = " __restrict__" if ctype.endswith("*") else ""
        return f"{ctype}{restrict} {self.name}"


@dataclass(frozen=True)
class Kernel:
    """A grid-stride kernel: ``body`` runs for each ``i`` in ``[0, total)``."""

    name: str
    args: tuple[Arg, ...]
    body: str
    doc: str

    def signature(self) -> tuple[tuple[str, str, int | str], ...]:
        """(kind, name, extent) of every argument, ``total`` last: the launcher's check table."""
        return (*((a.kind, a.name, a.extent) for a in self.args), ("long long", "total", ""))


def subst(text: str, single: bool) -> str:
    return text.replace("$T", "float" if single else "double").replace(
        "$S", "f32" if single else "f64")


def render_kernel(kernel: Kernel, single: bool) -> str:
    t = "float" if single else "double"
    sfx = "f32" if single else "f64"
    args = ",\n        ".join([a.c_decl(t) for a in kernel.args] + ["const long long total"])
    body = "\n".join("        " + line if line else "" for line in
                     subst(kernel.body, single).strip("\n").splitlines())
    doc = "\n".join(f"// {c_text(line, 400)}" for line in kernel.doc.split("\n"))
    return (f"{doc}\nextern \"C\" __global__ void {kernel.name}_{sfx}(\n        {args}) {{\n"
            f"    typedef {t} T;\n    (void)sizeof(T);\n"
            f"    PBX_FOR(i, total) {{\n{body}\n    }}\n}}")


def render_kernels(kernels: Iterable[Kernel]) -> str:
    """Both precisions of every kernel, double first."""
    kernels = list(kernels)
    return "\n\n".join(render_kernel(k, single) for single in (False, True) for k in kernels)


#: the source's first lines: the grid-stride loop and precision-overloaded math helpers
PREAMBLE = """\
// Grid-stride loop over [0, n): every kernel is one of these. The CPU shim defines
// threadIdx, blockIdx, blockDim and gridDim and runs the grid serially.
#define PBX_FOR(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; \\
                           i < (n); i += (long long)blockDim.x * gridDim.x)
"""

_DEVICE_TEMPLATE = """\
// ---- kernel helpers ($T)
__device__ __forceinline__ $T pbx_exp_$S($T x) { return $EXP(x); }
__device__ __forceinline__ $T pbx_log_$S($T x) { return $LOG(x); }
__device__ __forceinline__ $T pbx_lrp_modify_$S(int code, $T param, $T a) {
    // LRP modifiers (numpy_kernels.lrp_modify): same, pos, neg, ones, square, gamma, const
    switch (code) {
        case 1: return a > ($T)0 ? a : ($T)0;
        case 2: return a < ($T)0 ? a : ($T)0;
        case 3: return ($T)1;
        case 4: return a * a;
        case 5: return a + param * (a > ($T)0 ? a : ($T)0);
        case 6: return param;
        default: return a;
    }
}
__device__ __forceinline__ $T pbx_lrp_stabilise_$S($T z, $T eps, int placement) {
    // z + eps (placement 1, the slides) or z + eps sign(z), sign(0) = +1 (placement 0)
    return placement == 1 ? z + eps : z + eps * (z >= ($T)0 ? ($T)1 : ($T)-1);
}
__device__ __forceinline__ $T pbx_relu_multiplier_$S($T d0, $T d) {
    // (relu(d) - relu(d0)) / (d - d0), relu'(0) = 0 where d == d0 (seed 004 eq. 13)
    if (d == d0) return d > ($T)0 ? ($T)1 : ($T)0;
    return ((d > ($T)0 ? d : ($T)0) - (d0 > ($T)0 ? d0 : ($T)0)) / (d - d0);
}
__device__ $T pbx_maxpool_share_$S(const $T* x, const $T* x0, int H, int W, int h0, int w0,
                                   int KH, int KW, int e, $T m, $T* s) {
    // DFD of a window maximum as pairwise maxima max(u, v) = u + relu(v - u), each relu by
    // the rescale rule (eq. 13; numpy_kernels.maxpool2d_dfd): the share of window element e
    // of the multiplier m. Padding never wins; s holds the KH*KW slopes.
    bool have = false;
    $T run = ($T)0, run0 = ($T)0;
    for (int k = 0; k < KH * KW; ++k) {
        const int h = h0 + k / KW, w = w0 + k % KW;
        const bool pad = h < 0 || h >= H || w < 0 || w >= W;
        s[k] = ($T)0;
        if (pad) continue;
        const $T v = x[h * W + w], v0 = x0[h * W + w];
        if (!have) {
            s[k] = ($T)1;
            run = v;
            run0 = v0;
            have = true;
            continue;
        }
        const $T d = v - run, d0 = v0 - run0;
        s[k] = pbx_relu_multiplier_$S(d0, d);
        run = run + (d > ($T)0 ? d : ($T)0);
        run0 = run0 + (d0 > ($T)0 ? d0 : ($T)0);
    }
    $T g = m;
    for (int k = KH * KW - 1; k > e; --k) g = g * (($T)1 - s[k]);
    // the first element takes what the later ones left (its slope is 1 by construction)
    return e == 0 ? g : g * s[e];
}
"""


def device_helpers() -> str:
    """The kernels' own ``__device__`` helpers, both precisions."""
    double = _DEVICE_TEMPLATE.replace("$EXP", "exp").replace("$LOG", "log")
    single = _DEVICE_TEMPLATE.replace("$EXP", "expf").replace("$LOG", "logf")
    return subst(double, False) + "\n" + subst(single, True)


def _a(kind: str, name: str, extent: int | str = "total") -> Arg:
    return Arg(kind, name, extent)


#: kernels every model's source holds (used by the runtime's LRP engine and the passes)
GENERIC: tuple[Kernel, ...] = (
    Kernel("pbx_add", (_a("const T*", "a"), _a("const T*", "b"), _a("T*", "out")),
           "out[i] = a[i] + b[i];", "out = a + b (cotangents of a value used twice)"),
    Kernel("pbx_mul", (_a("const T*", "a"), _a("const T*", "b"), _a("T*", "out")),
           "out[i] = a[i] * b[i];", "out = a * b (input x gradient)"),
    Kernel("pbx_contribution", (_a("const T*", "m"), _a("const T*", "x"), _a("const T*", "x0"),
                                _a("T*", "out")),
           "out[i] = m[i] * (x[i] - x0[i]);",
           "DFD contributions C = m (x - x0) (seed 004 eq. 3)"),
    Kernel("pbx_scale", (_a("const T*", "a"), _a("T*", "out"), _a("T", "w", "")),
           "out[i] = w * a[i];", "out = w a: a unit-weight op's modified weight (LRP)"),
    Kernel("pbx_modify", (_a("const T*", "a"), _a("T*", "out"), _a("int", "code", ""),
                          _a("T", "param", "")),
           "out[i] = pbx_lrp_modify_$S(code, param, a[i]);",
           "an LRP input or weight modifier, elementwise"),
    Kernel("pbx_axpy", (_a("const T*", "zt"), _a("T*", "z"), _a("T", "sign", "")),
           "z[i] = z[i] + sign * zt[i];", "z += sign z_t: one term of an LRP rule group"),
    Kernel("pbx_lrp_bias", (_a("const T*", "b", ""), _a("T*", "zt"), _a("T*", "zb", "total"),
                            _a("long long", "inner", ""), _a("long long", "count", ""),
                            _a("int", "code", ""), _a("T", "param", ""), _a("T", "sign", "")),
           "const T bt = pbx_lrp_modify_$S(code, param, b[(i / inner) % count]);\n"
           "zt[i] = zt[i] + bt;\nzb[i] = zb[i] + sign * bt;",
           "a term's modified bias rho(b), broadcast onto z_t; zb collects what biases absorb"),
    Kernel("pbx_lrp_divide", (_a("const T*", "r"), _a("const T*", "z"), _a("T*", "s"),
                              _a("T", "eps", ""), _a("int", "placement", "")),
           "const T zs = pbx_lrp_stabilise_$S(z[i], eps, placement);\n"
           "s[i] = zs != (T)0 ? r[i] / zs : (T)0;",
           "s = R / stab(z), 0 where the stabilised denominator is 0 (the generic rule)"),
    Kernel("pbx_lrp_accumulate", (_a("const T*", "ins"), _a("const T*", "c"), _a("T*", "r"),
                                  _a("T", "cs", "")),
           "r[i] = r[i] + (cs * ins[i]) * c[i];",
           "R_j += coef sign in(a)_j c_j: the last step of the generic rule"),
    Kernel("pbx_lrp_ledger_terms", (_a("const T*", "r"), _a("const T*", "s"),
                                    _a("const T*", "z"), _a("const T*", "zb"),
                                    _a("T*", "absorbed"), _a("T*", "kept")),
           "absorbed[i] = s[i] * zb[i];\nkept[i] = r[i] - s[i] * z[i];",
           "the ledger's terms: relevance absorbed by the biases, and R - s z, the part the\n"
           "stabiliser keeps (summed per sample by the launcher)"),
    Kernel("pbx_diag", (_a("const T*", "x"), _a("const T*", "w", ""), _a("T*", "out"),
                        _a("long long", "inner", ""), _a("long long", "count", "")),
           "out[i] = x[i] * w[(i / inner) % count];",
           "x times a per-channel or per-element weight (LRP of batchnorm and normalize)"),
)


def kernel_table(kernels: Iterable[Kernel]) -> dict[str, tuple[tuple[str, str, int | str], ...]]:
    return {k.name: k.signature() for k in kernels}
