"""The C printer: sympy expressions and routines -> C/CUDA ``__device__`` functions, strictly.

A ``C99CodePrinter`` subclass (tables only): named functions map to the helpers of
``C_PRELUDE``, math functions to the C library (``exp``/``expf``, ``log1p``/``log1pf``,
``erfc``/``erfcf``, ...) by precision, and numbers to literals of the precision (``0.5f``).
The source includes no header, so NVRTC compiles it as is; the helpers use only built-in math
functions. Anything the printer does not know is an :class:`UnsupportedOp` naming it.

Every activation routine is emitted twice, ``..._f64(double ...)`` and ``..._f32(float ...)``.
For a C++ compiler without the CUDA built-ins, compile with ``-D__device__=
-D__forceinline__=inline -include math.h`` (what the tests do with g++).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter

from pbxc.codegen.escape import c_text
from pbxc.codegen.numpy_printer import (
    ALLOWED_FUNCTIONS,
    ROUTINE_DOCS,
    Div,
    check_functions,
    live_assignments,
    protect_divisions,
)
from pbxc.errors import UnsupportedOp
from pbxc.parse import ast
from pbxc.symbolic.activations import ActivationKey
from pbxc.symbolic.calculus import DEFAULT_CONVENTION
from pbxc.symbolic.derive import ActivationCalculus, derive
from pbxc.symbolic.functions import SeriesPatch
from pbxc.symbolic.routine import Routine

_HELPERS = {
    "Sigmoid": "pbx_sigmoid", "Softplus": "pbx_softplus", "NormalCdf": "pbx_normal_cdf",
    "Gauss": "pbx_gauss", "Expm1Ratio": "pbx_expm1_ratio", "Log1pRatio": "pbx_log1p_ratio",
    "SinhRatio": "pbx_sinh_ratio", "SinRatio": "pbx_sin_ratio", "AtanRatio": "pbx_atan_ratio",
    "SumError": "pbx_sum_error",
}

_PRELUDE_TEMPLATE = """\
// pbxc device helpers ({T}); no headers: NVRTC's built-in math functions only
__device__ __forceinline__ {T} pbx_sigmoid({T} x) {{
    const {T} e = exp{s}(-fabs{s}(x));  // 1 / (1 + exp(-x)) without overflow
    return x >= {zero} ? {one} / ({one} + e) : e / ({one} + e);
}}
__device__ __forceinline__ {T} pbx_softplus({T} x) {{
    return fmax{s}(x, {zero}) + log1p{s}(exp{s}(-fabs{s}(x)));
}}
__device__ __forceinline__ {T} pbx_gauss({T} x) {{
    // exp(-x*x/2) with the rounding error of x*x recovered by fma
    const {T} p = x * x;
    const {T} e = fma{s}(x, x, -p);
    return fabs{s}(x) > {big} ? {zero} : exp{s}({half} * -p) * exp{s}({half} * -e);
}}
__device__ __forceinline__ {T} pbx_normal_cdf({T} x) {{
    // Phi(x) = erfc(y) / 2, y = -x / sqrt 2 carried as y + e: erfc(y + e) ~ erfc(y) - e erfc'(y)
    const {T} y = -x * {r_hi};
    const {T} e = fma{s}(-x, {r_hi}, -y) - x * {r_lo};
    return {half} * (erfc{s}(y) - e * ({two_over_sqrt_pi} * exp{s}(-y * y)));
}}
__device__ __forceinline__ {T} pbx_expm1_ratio({T} x) {{ return x == {zero} ? {one} : expm1{s}(x) / x; }}
__device__ __forceinline__ {T} pbx_log1p_ratio({T} x) {{ return x == {zero} ? {one} : log1p{s}(x) / x; }}
__device__ __forceinline__ {T} pbx_sinh_ratio({T} x) {{ return x == {zero} ? {one} : sinh{s}(x) / x; }}
__device__ __forceinline__ {T} pbx_sin_ratio({T} x) {{ return x == {zero} ? {one} : sin{s}(x) / x; }}
__device__ __forceinline__ {T} pbx_atan_ratio({T} x) {{ return x == {zero} ? {one} : atan{s}(x) / x; }}
// double-word arithmetic: error-free transformations (TwoSum, TwoProduct by fma)
__device__ __forceinline__ void pbx_two_sum({T} a, {T} b, {T}* s, {T}* e) {{
    *s = a + b;
    const {T} bb = *s - a;
    *e = (a - (*s - bb)) + (b - bb);
}}
__device__ __forceinline__ {T} pbx_sum_error({T} a, {T} b) {{
    {T} s, e;
    pbx_two_sum(a, b, &s, &e);
    return isfinite(s) ? e : {zero};
}}
__device__ __forceinline__ void pbx_fast_two_sum({T} a, {T} b, {T}* s, {T}* e) {{
    *s = a + b;
    *e = b - (*s - a);
}}
__device__ __forceinline__ void pbx_dd_add({T} ah, {T} al, {T} bh, {T} bl, {T}* h, {T}* l) {{
    {T} s, e;
    pbx_two_sum(ah, bh, &s, &e);
    pbx_fast_two_sum(s, e + (al + bl), h, l);
}}
__device__ __forceinline__ void pbx_dd_mul({T} ah, {T} al, {T} bh, {T} bl, {T}* h, {T}* l) {{
    const {T} p = ah * bh;
    const {T} e = fma{s}(ah, bh, -p);
    pbx_fast_two_sum(p, e + (ah * bl + al * bh), h, l);
}}
__device__ __forceinline__ {T} pbx_series_patch({T} z0, {T} z, {T} c, {T} radius,
                                                 const {T}* hi, const {T}* lo, int n) {{
    // sum_k a_k h_(k-1)(z0 - c, z - c) by Clenshaw's recurrence, in double-word arithmetic
    if (!(fabs{s}(z0 - c) <= radius && fabs{s}(z - c) <= radius)) return nan{s}("");
    {T} u0h, u0l, uh, ul, sh, sl, ph, pl;
    pbx_two_sum(z0, -c, &u0h, &u0l);
    pbx_two_sum(z, -c, &uh, &ul);
    pbx_dd_add(u0h, u0l, uh, ul, &sh, &sl);
    pbx_dd_mul(u0h, u0l, uh, ul, &ph, &pl);
    {T} y1h = {zero}, y1l = {zero}, y2h = {zero}, y2l = {zero};
    for (int k = n - 1; k >= 0; --k) {{
        {T} th, tl, qh, ql, yh, yl;
        pbx_dd_mul(sh, sl, y1h, y1l, &th, &tl);
        pbx_dd_mul(ph, pl, y2h, y2l, &qh, &ql);
        pbx_dd_add(th, tl, -qh, -ql, &th, &tl);
        pbx_dd_add(hi[k], lo[k], th, tl, &yh, &yl);
        y2h = y1h; y2l = y1l; y1h = yh; y1l = yl;
    }}
    return y1h + y1l;
}}
"""


_SOFTMAX_TEMPLATE = """\
// softmax and log_softmax over one row of n entries ({T}); the matrices are never stored:
// Jacobian and DFD multipliers are M = diag(a) - c b^T (pbxc.symbolic.softmax)
__device__ __forceinline__ {T} pbx_logsumexp(const {T}* x, int n) {{
    {T} top = x[0];
    for (int i = 1; i < n; ++i) top = fmax{s}(top, x[i]);
    if (!isfinite(top)) top = {zero};
    {T} total = {zero};
    for (int i = 0; i < n; ++i) total += exp{s}(x[i] - top);
    return top + log{s}(total);
}}
__device__ __forceinline__ void pbx_softmax_dfd_factors(const {T}* z0, const {T}* z, int n,
                                                        {T}* big, {T}* w) {{
    // L_i = [exp](log s_i(z0), log s_i(z)), w_j = [exp](z0_j, z_j) / [exp](lse0, lse)
    const {T} lse0 = pbx_logsumexp(z0, n);
    const {T} lse1 = pbx_logsumexp(z, n);
    const {T} hi = fmax{s}(lse0, lse1);
    const {T} lo = fmin{s}(lse0, lse1);
    {T} ratio = {zero};
    for (int j = 0; j < n; ++j) {{
        const {T} dz = z[j] - z0[j];
        const {T} sign = dz > {zero} ? {one} : (dz < {zero} ? -{one} : {zero});
        ratio += sign * exp{s}(fmax{s}(z0[j], z[j]) - lo) * -expm1{s}(-fabs{s}(dz));
    }}
    const {T} direct = lse1 - lse0;
    const {T} rsign = ratio > {zero} ? {one} : (ratio < {zero} ? -{one} : {zero});
    const {T} dlse = fabs{s}(direct) < {half} ? rsign * log1p{s}(fabs{s}(ratio)) : direct;
    const {T} norm = pbx_expm1_ratio(-fabs{s}(dlse));
    for (int j = 0; j < n; ++j) {{
        const {T} dz = z[j] - z0[j];
        w[j] = exp{s}(fmax{s}(z0[j], z[j]) - hi) * (pbx_expm1_ratio(-fabs{s}(dz)) / norm);
        const {T} dls = dz - dlse;
        big[j] = exp{s}(fmax{s}(z0[j] - lse0, z[j] - lse1)) * pbx_expm1_ratio(-fabs{s}(dls));
    }}
}}
__device__ __forceinline__ void pbx_softmax_jacobian_factors(const {T}* z, int n, {T}* s) {{
    const {T} lse = pbx_logsumexp(z, n);
    for (int j = 0; j < n; ++j) s[j] = exp{s}(z[j] - lse);
}}
__device__ __forceinline__ void pbx_diag_minus_outer_jvp(const {T}* a, const {T}* c,
                                                         const {T}* b, const {T}* v, int n,
                                                         {T}* out) {{
    // (diag(a) - c b^T) v; a or c may be null for a vector of ones
    {T} dot = {zero};
    for (int j = 0; j < n; ++j) dot += b[j] * v[j];
    for (int i = 0; i < n; ++i) out[i] = (a ? a[i] : {one}) * v[i] - (c ? c[i] : {one}) * dot;
}}
__device__ __forceinline__ void pbx_diag_minus_outer_vjp(const {T}* a, const {T}* c,
                                                         const {T}* b, const {T}* u, int n,
                                                         {T}* out) {{
    // u^T (diag(a) - c b^T)
    {T} dot = {zero};
    for (int i = 0; i < n; ++i) dot += (c ? c[i] : {one}) * u[i];
    for (int j = 0; j < n; ++j) out[j] = (a ? a[j] : {one}) * u[j] - b[j] * dot;
}}
"""


def softmax_source(single: bool) -> str:
    """C device functions for the softmax Jacobians and DFD multipliers, one precision."""
    def lit(v: float) -> str:
        return _literal(v, single)

    return _SOFTMAX_TEMPLATE.format(T="float" if single else "double", s="f" if single else "",
                                    zero=lit(0.0), one=lit(1.0), half=lit(0.5))



def _literal(value: float, single: bool) -> str:
    if single:
        value = float(np.float32(value))
    if not np.isfinite(value):
        raise UnsupportedOp(f"the C printer has no literal for {value}")
    text = repr(float(value))
    if "e" not in text and "." not in text:
        text += ".0"
    return text + ("f" if single else "")


def prelude(single: bool) -> str:
    t = "float" if single else "double"

    def lit(v: float) -> str:
        return _literal(v, single)

    r_hi, r_lo = (0.7071067690849304, 1.2101617485882343e-08) if single else (
        0.7071067811865476, -4.833646656726457e-17)
    return _PRELUDE_TEMPLATE.format(
        T=t, s="f" if single else "", zero=lit(0.0), one=lit(1.0), half=lit(0.5),
        big=lit(64.0), r_hi=lit(r_hi), r_lo=lit(r_lo),
        two_over_sqrt_pi=lit(1.1283791670955126))


#: the helpers every generated C source starts with, in both precisions
C_PRELUDE = prelude(single=False) + "\n" + prelude(single=True)
#: softmax / log_softmax device functions in both precisions (after ``C_PRELUDE``)
C_SOFTMAX = softmax_source(single=False) + "\n" + softmax_source(single=True)


class PbxCPrinter(C99CodePrinter):
    """Prints C for one precision (``single``: float, else double); raises on the unknown."""

    def __init__(self, single: bool = False, patch_names: Mapping[SeriesPatch, str] | None = None
                 ) -> None:
        settings: dict[str, Any] = {"math_macros": {}, "allow_unknown_functions": False}
        if single:
            settings["type_aliases"] = {real: float32}
        super().__init__(settings)
        known: dict[str, Any] = dict(getattr(self, "known_functions", {}))
        self.known_functions = {k: v for k, v in known.items() if k in ALLOWED_FUNCTIONS}
        self.single = single
        self.suffix = "f" if single else ""
        self.patch_names = dict(patch_names or {})

    def _lit(self, value: float) -> str:
        return _literal(value, self.single)

    # numbers: one literal of the precision, never integer arithmetic
    def _print_Float(self, expr: sympy.Float) -> str:
        return self._lit(float(expr))

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return self._lit(float(expr))

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return self._lit(float(expr))

    def _print_Exp1(self, expr: sympy.Expr) -> str:
        return self._lit(float(sympy.E))

    def _print_Pi(self, expr: sympy.Expr) -> str:
        return self._lit(float(sympy.pi))

    def _print_NaN(self, expr: sympy.Expr) -> str:
        return f"nan{self.suffix}(\"\")"

    def _print_BooleanTrue(self, expr: sympy.Expr) -> str:
        return "true"

    def _print_BooleanFalse(self, expr: sympy.Expr) -> str:
        return "false"

    def _print_Mul(self, expr: sympy.Mul, **kwargs: Any) -> str:
        if expr.is_number:
            return self._lit(float(expr))
        numeric = [a for a in expr.args if a.is_number]
        if len(numeric) > 1 or (numeric and not numeric[0].is_Rational):
            coeff = float(sympy.Mul(*numeric))
            rest = sympy.Mul(*[a for a in expr.args if not a.is_number], evaluate=False)
            return f"{self._lit(coeff)}*{self.parenthesize(rest, 50)}"
        return str(super()._print_Mul(expr, **kwargs))

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if expr.is_number:
            return self._lit(float(expr))
        b = self.parenthesize(base, 1000)
        if exponent == -1:
            return f"({self._lit(1.0)} / {b})"
        if exponent.is_Integer and 2 <= int(exponent) <= 4:
            return "(" + " * ".join([b] * int(exponent)) + ")"
        if exponent == sympy.Rational(1, 2):
            return f"sqrt{self.suffix}({self._print(base)})"
        if exponent == sympy.Rational(-1, 2):
            return f"({self._lit(1.0)} / sqrt{self.suffix}({self._print(base)}))"
        return f"pow{self.suffix}({self._print(base)}, {self._print(exponent)})"

    def _print_Div(self, expr: Div) -> str:
        a, b = expr.args
        return f"({self.parenthesize(a, 50)} / {self.parenthesize(b, 51)})"

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        *pieces, (last_value, last_cond) = expr.args
        if last_cond is not sympy.true:
            raise UnsupportedOp(f"Piecewise without a default branch: {expr}")
        out = self._print(last_value)
        for value, cond in reversed(pieces):
            out = f"(({self._print(cond)}) ? ({self._print(value)}) : ({out}))"
        return out

    def _print_And(self, expr: sympy.And) -> str:
        return "(" + " && ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Or(self, expr: sympy.Or) -> str:
        return "(" + " || ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Not(self, expr: sympy.Not) -> str:
        return f"(!({self._print(expr.args[0])}))"

    def _print_Max(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"fmax{self.suffix}({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"fmin{self.suffix}({out}, {self._print(a)})"
        return out

    def _print_sign(self, expr: sympy.Expr) -> str:
        x = self._print(expr.args[0])
        return (f"(({x}) > {self._lit(0.0)} ? {self._lit(1.0)} : (({x}) < {self._lit(0.0)} ? "
                f"{self._lit(-1.0)} : {self._lit(0.0)}))")

    def _print_IsFinite(self, expr: sympy.Expr) -> str:
        return f"isfinite({self._print(expr.args[0])})"

    def _print_SeriesPatch(self, expr: SeriesPatch) -> str:
        name = self.patch_names.get(expr.func(sympy.Symbol("z0", real=True),
                                              sympy.Symbol("z", real=True), *expr.args[2:]))
        if name is None:
            raise UnsupportedOp("a Taylor patch without an emitted helper")
        return f"{name}({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_Function(self, expr: sympy.Function) -> str:
        helper = _HELPERS.get(type(expr).__name__)
        if helper is not None:
            return f"{helper}({', '.join(self._print(a) for a in expr.args)})"
        return str(super()._print_Function(expr))

    def doprint(self, expr: Any, assign_to: Any = None) -> Any:
        check_functions(expr, "C")
        try:
            return super().doprint(expr, assign_to)
        except NotImplementedError as exc:  # sympy's PrintMethodNotImplementedError
            raise UnsupportedOp(f"the C printer has no rule for {exc}") from None

    def _print_not_supported(self, expr: Any) -> str:
        raise UnsupportedOp(f"the C printer has no rule for {type(expr).__name__}: {expr}")

    emptyPrinter = _print_not_supported


# ---------------------------------------------------------------------------- routines
def _patch_nodes(routines: Sequence[Routine]) -> list[SeriesPatch]:
    """Every distinct Taylor patch, normalised to arguments (z0, z)."""
    z0, z = sympy.Symbol("z0", real=True), sympy.Symbol("z", real=True)
    seen: dict[SeriesPatch, None] = {}
    for r in routines:
        for expr in [e for _, e in r.assignments] + [r.result]:
            for node in expr.atoms(SeriesPatch):
                seen.setdefault(node.func(z0, z, *node.args[2:]), None)
    return list(seen)


def render_patch(node: SeriesPatch, name: str) -> str:
    """The coefficient tables and the two precisions of one Taylor patch."""
    out = []
    for single in (False, True):
        t = "float" if single else "double"
        hi, lo = node.coefficients(single)
        tables = []
        for part, values in (("hi", hi), ("lo", lo)):
            body = ", ".join(_literal(v, single) for v in values)
            tables.append(f"__device__ const {t} {name}_{part}{32 if single else 64}[] = "
                          f"{{{body}}};")
        sfx = "f32" if single else "f64"
        out.extend(tables)
        out.append(
            f"__device__ __forceinline__ {t} {name}_{sfx}({t} z0, {t} z) {{\n"
            f"    return pbx_series_patch(z0, z, {_literal(node.centre, single)}, "
            f"{_literal(node.radius, single)}, {name}_hi{32 if single else 64}, "
            f"{name}_lo{32 if single else 64}, {len(hi)});\n}}")
    return "\n".join(out)


def render_c_routine(name: str, routine: Routine, single: bool,
                     patch_names: Mapping[SeriesPatch, str] | None = None, doc: str = "") -> str:
    if single and routine.widen_single and name.endswith("_f32"):
        # float32 computed by the float64 routine (printed before it), rounded once
        args = ", ".join(f"float {a.name}" for a in routine.args)
        call = ", ".join(f"(double){a.name}" for a in routine.args)
        lines = [f"// {c_text(doc, 400)}"] if doc else []
        lines.append(f"__device__ __forceinline__ float {name}({args}) {{\n"
                     f"    return (float){name[:-4]}_f64({call});\n}}")
        return "\n".join(lines)
    """One ``__device__ __forceinline__`` function computing ``routine`` in one precision."""
    return _render_c_routine(name, routine, single, tuple((patch_names or {}).items()), doc)


@functools.lru_cache(maxsize=1024)
def _render_c_routine(name: str, routine: Routine, single: bool,
                      patch_names: tuple[tuple[SeriesPatch, str], ...], doc: str) -> str:
    printer = PbxCPrinter(single, dict(patch_names))
    t = "float" if single else "double"
    exprs = [protect_divisions(e) for _, e in routine.assignments]
    exprs.append(protect_divisions(routine.result))
    taken = {s.name for s in routine.args} | {s.name for s, _ in routine.assignments}
    symbols = (sympy.Symbol(f"x{i}_", real=True) for i in itertools.count()
               if f"x{i}_" not in taken)
    replacements, reduced = sympy.cse(exprs, symbols=symbols, order="none")
    pending = dict(replacements)
    emitted: set[sympy.Symbol] = set()
    lines = [f"// {c_text(doc, 400)}"] if doc else []
    args = ", ".join(f"{t} {a.name}" for a in routine.args)
    lines.append(f"__device__ __forceinline__ {t} {name}({args}) {{")
    for c in routine.precision_constants:
        lines.append(f"    const {t} {c.symbol.name} = "
                     f"{_literal(c.single if single else c.double, single)};")

    booleans: set[sympy.Symbol] = set()

    def declare(sym: sympy.Symbol, value: sympy.Basic) -> None:
        # a sympy Symbol is also a Boolean: only relations and logic make a bool
        boolean = value in booleans if isinstance(value, sympy.Symbol) else isinstance(
            value, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational))
        if boolean:
            booleans.add(sym)
        lines.append(f"    const {'bool' if boolean else t} {sym.name} = "
                     f"{printer.doprint(value)};")

    def need(expr: sympy.Basic) -> None:
        for sym in sorted(expr.free_symbols, key=lambda x: x.name):
            if sym in pending and sym not in emitted:
                need(pending[sym])
                emitted.add(sym)
                declare(sym, pending[sym])

    used = live_assignments(routine.assignments, reduced, pending)
    for (sym, _), expr in zip(routine.assignments, reduced[:-1]):
        if sym in used:
            need(expr)
            declare(sym, expr)
    need(reduced[-1])
    lines.append(f"    return {printer.doprint(reduced[-1])};")
    lines.append("}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RenderedC:
    """C/CUDA source for f, f', f'' and m of a set of activations, in both precisions."""

    source: str
    names: dict[ActivationKey, dict[str, str]]  # key -> {"m": "pbx_act0_m", ...} (+ _f64/_f32)


def render_c_activation_functions(keys: Sequence[ActivationKey | str],
                                  definitions: Mapping[str, ast.ActivationDef] | None = None,
                                  convention: str = DEFAULT_CONVENTION, prefix: str = "pbx_act",
                                  prelude: bool = True) -> RenderedC:
    """``__device__`` functions ``{prefix}{i}_{f,df,d2f,m}_{f64,f32}`` for each activation."""
    calcs: list[ActivationCalculus] = []
    for k in keys:
        calc = derive(k, definitions, convention)
        if all(calc.key != c.key for c in calcs):
            calcs.append(calc)
    routines = [r for c in calcs for r in c.routines().values()]
    patches = _patch_nodes(routines)
    patch_names = {node: f"{prefix}_patch{i}" for i, node in enumerate(patches)}
    chunks = [C_PRELUDE] if prelude else []
    chunks.extend(render_patch(node, name) for node, name in patch_names.items())
    names: dict[ActivationKey, dict[str, str]] = {}
    for i, calc in enumerate(calcs):
        names[calc.key] = {}
        for kind, routine in calc.routines().items():
            base = f"{prefix}{i}_{kind}"
            names[calc.key][kind] = base
            for single in (False, True):
                fname = f"{base}_{'f32' if single else 'f64'}"
                try:
                    chunks.append(render_c_routine(
                        fname, routine, single,
                        {n: f"{v}_{'f32' if single else 'f64'}" for n, v in patch_names.items()},
                        f"{calc.label}: {ROUTINE_DOCS[kind]}"))
                except UnsupportedOp as exc:
                    raise UnsupportedOp(f"activation '{calc.label}': {exc.message}",
                                        calc.key.pos) from None
    return RenderedC("\n\n".join(chunks), names)
