"""The NumPy printer: sympy expressions -> NumPy source, strictly.

Tables only: named functions map to overflow-free library calls, and anything the printer does
not know is an :class:`UnsupportedOp` naming the construct (never silently printed).
"""

from __future__ import annotations

import inspect
from typing import Any

import sympy
from sympy.codegen.rewriting import optimize, optims_c99
from sympy.printing.numpy import NumPyPrinter

from pbxc.errors import UnsupportedOp
from pbxc.symbolic import numeric

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

    def _print_NormalCdf(self, expr: sympy.Expr) -> str:
        return f"_normal_cdf({self._print(expr.args[0])})"

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


def stable_form(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite exp(x)-1 and log(1+x) into expm1/log1p, which avoid cancellation."""
    return optimize(expr, optims_c99)


def print_numpy(expr: sympy.Expr) -> str:
    return str(PbxNumPyPrinter().doprint(stable_form(expr)))


def render_function(name: str, args: list[str], expr: sympy.Expr, doc: str = "") -> str:
    """A Python function returning ``expr`` of ``args``, as source text."""
    body = print_numpy(expr)
    doc_line = f'    """{doc}"""\n' if doc else ""
    return f"def {name}({', '.join(args)}):\n{doc_line}    return {body}\n"
