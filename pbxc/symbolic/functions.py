"""Named sympy functions that keep activation expressions compact and printable stably.

``Sigmoid`` and ``Softplus`` differentiate symbolically, rewrite to exp/log for limits and
series, evaluate at any precision, and map to overflow-free library calls in every printer.
"""

from __future__ import annotations

import sympy
from sympy import S, exp, log


class Sigmoid(sympy.Function):
    """sigma(x) = 1 / (1 + exp(-x))."""

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.is_zero:
            return S.Half
        if arg is S.Infinity:
            return S.One
        if arg is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return 1 / (1 + exp(-arg))

    def _eval_rewrite_as_tanh(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return (1 + sympy.tanh(arg / 2)) / 2

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self._eval_rewrite_as_exp(self.args[0])._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class Softplus(sympy.Function):
    """softplus(x) = log(1 + exp(x))."""

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.is_zero:
            return log(2)
        if arg is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return Sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return log(1 + exp(arg))

    def _eval_rewrite_as_log(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return log(1 + exp(arg))

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self._eval_rewrite_as_exp(self.args[0])._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class NormalCdf(sympy.Function):
    """Phi(x) = erfc(-x / sqrt 2) / 2, the standard normal CDF.

    Kept as one function because sympy rewrites erfc(-x) to 2 - erfc(x), which cancels
    catastrophically for x << 0.
    """

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.is_zero:
            return S.Half
        if arg is S.Infinity:
            return S.One
        if arg is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        x = self.args[0]
        return exp(-x**2 / 2) / sympy.sqrt(2 * sympy.pi)

    def _eval_rewrite_as_erfc(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return sympy.erfc(-arg / sympy.sqrt(2)) / 2

    def _eval_rewrite_as_erf(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return (1 + sympy.erf(arg / sympy.sqrt(2))) / 2

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self._eval_rewrite_as_erf(self.args[0])._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real


NAMED_FUNCTIONS = (Sigmoid, Softplus, NormalCdf)
