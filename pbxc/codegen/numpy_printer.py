"""The NumPy printer: sympy expressions -> NumPy source, strictly.

Tables only: named functions map to overflow-free library calls, and anything the printer does
not know is an :class:`UnsupportedOp` naming the construct (never silently printed).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
from sympy.codegen.rewriting import optimize, optims_c99
from sympy.printing.numpy import NumPyPrinter

from pbxc.codegen.escape import py_text
from pbxc.errors import UnsupportedOp
from pbxc.parse import ast
from pbxc.symbolic import numeric
from pbxc.symbolic.activations import ActivationKey
from pbxc.symbolic.calculus import DEFAULT_CONVENTION
from pbxc.symbolic.derive import ActivationCalculus, derive
from pbxc.symbolic.functions import Sigmoid, Softplus
from pbxc.symbolic.routine import Routine

#: Helpers every printed module defines: the source of ``pbxc.symbolic.numeric``, verbatim, so
#: a generated module computes exactly what the in-process evaluator computes and needs only
#: numpy (scipy, when present, for a faster erf/erfc).
NUMPY_PRELUDE = inspect.getsource(numeric)

class PbxNumPyPrinter(NumPyPrinter):
    """Prints with ``np.`` and pbxc's stable helpers; raises on unsupported constructs."""

    _kf: dict[str, str] = {  # noqa: RUF012 - sympy reads this class attribute
        **NumPyPrinter._kf,
    }

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__({"fully_qualified_modules": False, "allow_unknown_functions": False,
                          **(settings or {})})
        self.module_imports.clear()

    def _module_format(self, fqn: str, register: bool = True) -> str:
        # numpy.exp -> np.exp
        if fqn.startswith("numpy."):
            return "np." + fqn[len("numpy."):]
        return super()._module_format(fqn, register)

    def _print_Sigmoid(self, expr: sympy.Expr) -> str:
        return f"_sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr: sympy.Expr) -> str:
        return f"_softplus({self._print(expr.args[0])})"

    def _print_NegAbsExp(self, expr: sympy.Expr) -> str:
        return f"_neg_abs_exp({self._print(expr.args[0])})"

    def _print_SigmoidOf(self, expr: sympy.Expr) -> str:
        return f"_sigmoid_of({', '.join(self._print(a) for a in expr.args)})"

    def _print_SigmoidPair(self, expr: sympy.Expr) -> str:
        return f"_sigmoid_pair({', '.join(self._print(a) for a in expr.args)})"

    def _print_SoftplusOf(self, expr: sympy.Expr) -> str:
        return f"_softplus_of({', '.join(self._print(a) for a in expr.args)})"

    def _print_NormalCdf(self, expr: sympy.Expr) -> str:
        return f"_normal_cdf({self._print(expr.args[0])})"

    def _print_Div(self, expr: sympy.Expr) -> str:
        a, b = expr.args
        return f"({self.parenthesize(a, 50)} / {self.parenthesize(b, 51)})"

    def _print_Gauss(self, expr: sympy.Expr) -> str:
        return f"_gauss({self._print(expr.args[0])})"

    def _print_Expm1Ratio(self, expr: sympy.Expr) -> str:
        return f"_expm1_ratio({self._print(expr.args[0])})"

    def _print_Log1pRatio(self, expr: sympy.Expr) -> str:
        return f"_log1p_ratio({self._print(expr.args[0])})"

    def _print_SinhRatio(self, expr: sympy.Expr) -> str:
        return f"_sinh_ratio({self._print(expr.args[0])})"

    def _print_SinRatio(self, expr: sympy.Expr) -> str:
        return f"_sin_ratio({self._print(expr.args[0])})"

    def _print_AtanRatio(self, expr: sympy.Expr) -> str:
        return f"_atan_ratio({self._print(expr.args[0])})"

    def _print_IsFinite(self, expr: sympy.Expr) -> str:
        return f"np.isfinite({self._print(expr.args[0])})"

    def _print_SumError(self, expr: sympy.Expr) -> str:
        return f"_sum_error({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_SeriesPatch(self, expr: sympy.Expr) -> str:
        z0, z, centre, radius, *tables = expr.args
        printed = ", ".join("(" + ", ".join(repr(float(x)) for x in t) + ",)" for t in tables)
        return (f"_series_patch({self._print(z0)}, {self._print(z)}, {float(centre)!r}, "
                f"{float(radius)!r}, {printed})")

    def _print_Max(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"np.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"np.minimum({out}, {self._print(a)})"
        return out

    def _print_sign(self, expr: sympy.Expr) -> str:
        return f"np.sign({self._print(expr.args[0])})"

    def _print_NaN(self, expr: sympy.Expr) -> str:
        return "np.nan"

    def _print_And(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"np.logical_and({out}, {self._print(a)})"  # pairwise: operands broadcast
        return out

    def _print_Or(self, expr: sympy.Expr) -> str:
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"np.logical_or({out}, {self._print(a)})"
        return out

    def _print_Not(self, expr: sympy.Expr) -> str:
        return f"np.logical_not({self._print(expr.args[0])})"

    def doprint(self, expr: Any, assign_to: Any = None) -> Any:
        check_functions(expr, "NumPy")
        try:
            return super().doprint(expr, assign_to)
        except NotImplementedError as exc:  # sympy's PrintMethodNotImplementedError
            raise UnsupportedOp(f"the NumPy printer has no rule for {exc}") from None

    def _print_BooleanTrue(self, expr: sympy.Expr) -> str:
        return "True"

    def _print_BooleanFalse(self, expr: sympy.Expr) -> str:
        return "False"

    def _print_Abs(self, expr: sympy.Expr) -> str:
        return f"np.abs({self._print(expr.args[0])})"

    def _print_erf(self, expr: sympy.Expr) -> str:
        return f"_erf({self._print(expr.args[0])})"

    def _print_erfc(self, expr: sympy.Expr) -> str:
        return f"_erfc({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        # Nested np.where: the first true condition wins, as in sympy.
        *pieces, (last_value, last_cond) = expr.args
        if last_cond is not sympy.true:
            raise UnsupportedOp(f"Piecewise without a default branch: {expr}")
        out = self._print(last_value)
        for value, cond in reversed(pieces):
            out = f"np.where({self._print(cond)}, {self._print(value)}, {out})"
        return out

    def _print_Float(self, expr: sympy.Float) -> str:
        return repr(float(expr))

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return repr(float(expr))

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return f"{int(expr)}.0"

    def _print_Exp1(self, expr: sympy.Expr) -> str:
        return repr(float(sympy.E))

    def _print_Pi(self, expr: sympy.Expr) -> str:
        return repr(float(sympy.pi))

    def _print_Mul(self, expr: sympy.Mul) -> str:
        # fold numeric factors such as -sqrt(2)/2 into one float literal
        if expr.is_number:
            return repr(float(expr))
        numeric = [a for a in expr.args if a.is_number]
        if len(numeric) > 1 or (numeric and not numeric[0].is_Rational):
            coeff = float(sympy.Mul(*numeric))
            rest = sympy.Mul(*[a for a in expr.args if not a.is_number], evaluate=False)
            return f"{coeff!r}*{self.parenthesize(rest, 50)}"
        return str(super()._print_Mul(expr))

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if expr.is_number:
            return repr(float(expr))
        if exponent == -1:
            return f"(1 / {self.parenthesize(base, 1000)})"
        if exponent == 2:
            b = self.parenthesize(base, 1000)
            return f"({b} * {b})"
        if exponent == sympy.Rational(1, 2):
            return f"np.sqrt({self._print(base)})"
        return f"{self.parenthesize(base, 1000)} ** {self.parenthesize(exponent, 1000)}"

    def _print_not_supported(self, expr: Any) -> str:
        raise UnsupportedOp(f"the NumPy printer has no rule for {type(expr).__name__}: {expr}")

    emptyPrinter = _print_not_supported


#: the functions an activation expression may contain (the whitelist of the language, their
#: stable rewrites, and pbxc's named functions); every other function is UnsupportedOp
ALLOWED_FUNCTIONS = frozenset({
    "exp", "log", "sin", "cos", "tanh", "sinh", "cosh", "atan", "Abs", "sign", "erf", "erfc",
    "expm1", "log1p", "sqrt", "Max", "Min", "Piecewise",
})
#: pbxc's own functions (``symbolic.functions``) and the printers' division node
OWN_FUNCTIONS = frozenset({
    "Sigmoid", "Softplus", "NormalCdf", "Gauss", "Expm1Ratio", "Log1pRatio", "SinhRatio",
    "SinRatio", "AtanRatio", "SumError", "IsFinite", "SeriesPatch", "Div", "NegAbsExp",
    "SigmoidOf", "SoftplusOf", "SigmoidPair",
})


def check_functions(expr: Any, target: str) -> None:
    """Every function in ``expr`` is one the printers know; else UnsupportedOp naming it."""
    if not isinstance(expr, sympy.Basic):
        return
    for node in expr.atoms(sympy.Function):
        name = type(node).__name__
        if name not in ALLOWED_FUNCTIONS and name not in OWN_FUNCTIONS:
            raise UnsupportedOp(f"the {target} printer has no rule for {name}: {node}")


def stable_form(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite exp(x)-1 and log(1+x) into expm1/log1p, which avoid cancellation."""
    return optimize(expr, optims_c99)


def print_numpy(expr: sympy.Expr) -> str:
    return str(PbxNumPyPrinter().doprint(stable_form(expr)))


def render_function(name: str, args: list[str], expr: sympy.Expr, doc: str = "") -> str:
    """A Python function returning ``expr`` of ``args``, as source text."""
    body = print_numpy(expr)
    doc_line = f'    """{py_text(doc, 400)}"""\n' if doc else ""
    return f"def {name}({', '.join(args)}):\n{doc_line}    return {body}\n"


# ---------------------------------------------------------------------------- routines
class Div(sympy.Function):
    """a / b, kept whole: sympy.cse would otherwise share 1/b between quotients, and a
    reciprocal rounds once more and overflows where the quotient does not (b subnormal)."""

    nargs = 2


def protect_divisions(expr: sympy.Basic) -> sympy.Basic:
    """Every x * y**-n as Div(x, y**n), so each quotient is printed as one division."""
    if expr.is_Atom or not expr.args:
        return expr
    args = [protect_divisions(a) for a in expr.args]
    if isinstance(expr, sympy.Mul):
        num, den = [], []
        for a, original in zip(args, expr.args):
            if isinstance(original, sympy.Pow) and original.exp.is_Number and original.exp < 0:
                den.append(protect_divisions(original.base ** -original.exp))
            else:
                num.append(a)
        if den:
            return Div(sympy.Mul(*num) if num else sympy.S.One, sympy.Mul(*den))
        return sympy.Mul(*args)
    if isinstance(expr, sympy.Pow) and expr.exp.is_Number and expr.exp < 0:
        return Div(sympy.S.One, protect_divisions(expr.base ** -expr.exp))
    return expr.func(*args)


class NegAbsExp(sympy.Function):
    """exp(-|x|), printed as ``_neg_abs_exp``: the exponential inside sigmoid(x) and
    softplus(x). Its argument's sign is canonical (NegAbsExp(-x) is NegAbsExp(x), bit for bit
    in floating point: |-x| == |x|), so that sympy.cse computes it once for sigmoid(x) and
    sigmoid(-x) together: tanh' = 4 sigmoid(2z) sigmoid(-2z), SiLU', softplus and its
    derivatives pay one exponential instead of two."""

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.could_extract_minus_sign():
            return cls(-arg)
        if isinstance(arg, Div) and arg.args[0].could_extract_minus_sign():
            return cls(Div(-arg.args[0], arg.args[1]))   # (-a) / b == -(a / b)
        return None


class SigmoidOf(sympy.Function):
    """sigmoid(x) from (x, exp(-|x|), 1 + exp(-|x|)), printed as ``_sigmoid_of``: bit for bit
    ``_sigmoid(x)``, its exponential and denominator shared with sigmoid(-x)."""

    nargs = 3


class SigmoidPair(sympy.Function):
    """sigmoid(x) * sigmoid(-x) from (exp(-|x|), 1 + exp(-|x|)), printed as
    ``_sigmoid_pair``: e / (1 + e)^2, one division where the two factors take two and a
    product (three roundings either way; not bit for bit the product of the two)."""

    nargs = 2


class SoftplusOf(sympy.Function):
    """softplus(x) from (x, exp(-|x|)), printed as ``_softplus_of``: bit for bit
    ``_softplus(x)``."""

    nargs = 2


def share_exponentials(exprs: Sequence[sympy.Basic]) -> list[sympy.Basic]:
    """Each Sigmoid and Softplus whose exponential exp(-|x|) another one of ``exprs`` also
    needs (sigmoid(x) with sigmoid(-x) or softplus(+-x)) written over a shared NegAbsExp, which
    CSE then computes once; the helpers give the same bits as ``_sigmoid``/``_softplus``. The
    others stay as they are (renaming would only let CSE reorder their products)."""
    uses: dict[sympy.Basic, set[sympy.Basic]] = {}
    for expr in exprs:
        for node in expr.atoms(Sigmoid, Softplus):
            uses.setdefault(NegAbsExp(node.args[0]), set()).add(node)
    shared = {node: e for e, nodes in uses.items() if len(nodes) > 1 for node in nodes}
    if not shared:
        return list(exprs)

    def rewritten(node: sympy.Basic) -> sympy.Basic:
        e, arg = shared[node], node.args[0]
        return SigmoidOf(arg, e, 1 + e) if isinstance(node, Sigmoid) else SoftplusOf(arg, e)

    return [pair_sigmoids(expr.xreplace({n: rewritten(n) for n in shared if expr.has(n)}))
            for expr in exprs]


def pair_sigmoids(expr: sympy.Basic) -> sympy.Basic:
    """In every product, each sigmoid(x) * sigmoid(-x) over a shared exponential written as
    one SigmoidPair (e / (1 + e)^2): tanh' = 4 sigmoid(2z) sigmoid(-2z) and sigmoid' take
    one division instead of two divisions and a product; powers pair as far as they go."""
    def paired(mul: sympy.Mul) -> sympy.Basic:
        powers = mul.as_powers_dict()
        pairs: list[sympy.Basic] = []
        for base in list(powers):
            if not isinstance(base, SigmoidOf) or base not in powers:
                continue
            x, e, one_plus_e = base.args
            other = SigmoidOf(-x, e, one_plus_e)
            p, q = powers[base], powers.get(other, 0)
            if other == base or not (p.is_Integer and p > 0 and getattr(q, "is_Integer", False)
                                     and q > 0):
                continue
            n = min(int(p), int(q))
            for factor in (base, other):
                powers[factor] -= n
                if powers[factor] == 0:
                    del powers[factor]
            pairs.append(SigmoidPair(e, one_plus_e) ** n)
        if not pairs:
            return mul
        return sympy.Mul(*pairs, *(b ** k for b, k in powers.items()))

    return expr.replace(lambda node: isinstance(node, sympy.Mul), paired)


def live_assignments(assignments: Sequence[tuple[sympy.Symbol, sympy.Expr]],
                     reduced: Sequence[sympy.Basic],
                     replacements: Mapping[sympy.Symbol, sympy.Basic]) -> set[sympy.Symbol]:
    """The assigned symbols the result needs (through later assignments and CSE temporaries)."""
    def uses(expr: sympy.Basic, seen: set[sympy.Symbol]) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for sym in expr.free_symbols:
            if sym in replacements and sym not in seen:
                seen.add(sym)
                out |= uses(replacements[sym], seen)
            out.add(sym)
        return out

    live = uses(reduced[-1], set())
    for (sym, _), expr in reversed(list(zip(assignments, reduced[:-1]))):
        if sym in live:
            live |= uses(expr, set())
    return live


def routine_lines(routine: Routine, printer: Any) -> list[str]:
    """``name = value`` lines for a routine's assignments and common subexpressions, then the
    result as the last entry (``printer`` prints one expression; CSE by sympy.cse).

    A common subexpression is emitted just before its first use, so it never refers to a
    temporary that is not yet assigned.
    """
    exprs = [protect_divisions(expr) for _, expr in routine.assignments]
    exprs.append(protect_divisions(routine.result))
    exprs = share_exponentials(exprs)
    taken = {s.name for s in routine.args} | {s.name for s, _ in routine.assignments} | {
        c.symbol.name for c in routine.precision_constants}
    symbols = (sympy.Symbol(f"_x{i}", real=True) for i in itertools.count()
               if f"_x{i}" not in taken)
    replacements, reduced = sympy.cse(exprs, symbols=symbols, order="none")
    pending = dict(replacements)
    emitted: set[sympy.Symbol] = set()
    lines: list[str] = []

    def need(expr: sympy.Basic) -> None:
        for sym in sorted(expr.free_symbols, key=lambda x: x.name):
            if sym in pending and sym not in emitted:
                value = pending[sym]
                need(value)
                emitted.add(sym)
                lines.append(f"{sym.name} = {printer.doprint(value)}")

    used = live_assignments(routine.assignments, reduced, pending)
    for (sym, _), expr in zip(routine.assignments, reduced[:-1]):
        if sym in used:
            need(expr)
            lines.append(f"{sym.name} = {printer.doprint(expr)}")
    need(reduced[-1])
    lines.append(printer.doprint(reduced[-1]))
    return lines


@functools.lru_cache(maxsize=1024)
def render_routine(name: str, routine: Routine, doc: str = "") -> str:
    """A NumPy function computing ``routine`` elementwise, in float32 or float64 (its args')."""
    printer = PbxNumPyPrinter()
    args = [a.name for a in routine.args]
    body = routine_lines(routine, printer)
    out = [f"def {name}({', '.join(args)}):"]
    if doc:
        out.append(f'    """{py_text(doc, 400)}"""')
    if routine.widen_single:   # float32 in float64, rounded once (derive._widen_if_needed)
        out.append(f"    if all(_is_single(a) for a in ({', '.join(args)},)):")
        out.append(f"        return {name}({', '.join(f'np.asarray({a}, np.float64)' for a in args)})"
                   ".astype(np.float32)")
    out.append(f"    {', '.join(args)}{',' if len(args) == 1 else ''} = _args({', '.join(args)})")
    out.append('    with np.errstate(all="ignore"):')
    for c in routine.precision_constants:
        out.append(f"        {c.symbol.name} = {c.single!r} if _is_single({args[0]}) else "
                   f"{c.double!r}")
    for line in body[:-1]:
        out.append(f"        {line}")
    out.append(f"        return _finish({body[-1]}, {', '.join(args)})")
    if routine.widen_single:
        out.append(f"\n\n{name}.widen_single = True")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class RenderedActivations:
    """NumPy source for f, f', f'' and m of a set of activations, and the names in it."""

    source: str
    names: dict[ActivationKey, dict[str, str]]  # key -> {"f": ..., "df": ..., "d2f": ..., "m": ...}


ROUTINE_DOCS = {
    "f": "f(z)",
    "df": "f'(z), the diagonal of the Jacobian; the kink convention at kinks",
    "d2f": "f''(z) (one-sided at kinks, by the convention)",
    "m": "the DFD multiplier (f(z) - f(z0)) / (z - z0), and f'(z0) at z = z0 (seed 004, "
         "eq. 16-17)",
}


def render_activation_functions(keys: Sequence[ActivationKey | str],
                                definitions: Mapping[str, ast.ActivationDef] | None = None,
                                convention: str = DEFAULT_CONVENTION, prefix: str = "act",
                                prelude: bool = True, warn_for: str | None = None
                                ) -> RenderedActivations:
    """NumPy source defining ``{prefix}{i}_{f,df,d2f,m}`` for each activation (i in order).

    With ``prelude`` the source starts with ``NUMPY_PRELUDE`` and runs standalone (numpy only).
    An unsupported construct is an :class:`UnsupportedOp` naming the activation and its line.
    ``warn_for`` limits accuracy warnings to one dtype (see :func:`derive`).
    """
    chunks = [NUMPY_PRELUDE] if prelude else []
    names: dict[ActivationKey, dict[str, str]] = {}
    for calc in _calculi(keys, definitions, convention, warn_for):
        if calc.key in names:
            continue
        i = len(names)
        names[calc.key] = {}
        for kind, routine in calc.routines().items():
            fname = f"{prefix}{i}_{kind}"
            try:
                chunks.append(render_routine(fname, routine,
                                             f"{calc.label}: {ROUTINE_DOCS[kind]}"))
            except UnsupportedOp as exc:
                raise UnsupportedOp(f"activation '{calc.label}': {exc.message}",
                                    calc.key.pos) from None
            names[calc.key][kind] = fname
    return RenderedActivations("\n\n".join(chunks), names)


def _calculi(keys: Sequence[ActivationKey | str],
             definitions: Mapping[str, ast.ActivationDef] | None, convention: str,
             warn_for: str | None = None) -> list[ActivationCalculus]:
    return [derive(k, definitions, convention, warn_for) for k in keys]
