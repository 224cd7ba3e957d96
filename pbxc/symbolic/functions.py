"""Named sympy functions that keep activation expressions compact and printable stably.

``Sigmoid`` and ``Softplus`` differentiate symbolically, rewrite to exp/log for limits and
series, evaluate at any precision, and map to overflow-free library calls in every printer.
"""

from __future__ import annotations

import sympy
from sympy import S, exp, log
from sympy.logic.boolalg import BooleanFunction


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
        # sigma' = sigma(x) sigma(-x): the same value as sigma (1 - sigma), without the
        # cancellation of 1 - sigma(x) for x >> 0
        return self * Sigmoid(-self.args[0])

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
        return Gauss(self.args[0]) / sympy.sqrt(2 * sympy.pi)

    def _eval_rewrite_as_erfc(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return sympy.erfc(-arg / sympy.sqrt(2)) / 2

    def _eval_rewrite_as_erf(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return (1 + sympy.erf(arg / sympy.sqrt(2))) / 2

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self._eval_rewrite_as_erf(self.args[0])._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real


class Gauss(sympy.Function):
    """exp(-x**2 / 2), evaluated with x**2 split exactly into two parts.

    exp(-x*x/2) computed directly carries the rounding of x*x, amplified by x**2/2 (a relative
    error of 18 units at x = 6); the printers square a split x = hi + lo (hi*hi exact) or use
    fma to recover the rounding error of x*x, so the result is good to a few units for any x.
    """

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.is_zero:
            return S.One
        if arg.is_infinite:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return -self.args[0] * self

    def _eval_rewrite_as_exp(self, arg: sympy.Expr, **kwargs: object) -> sympy.Expr:
        return exp(-arg**2 / 2)

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self._eval_rewrite_as_exp(self.args[0])._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class _Ratio(sympy.Function):
    """``g(x) / x`` for an odd-at-0 function with g(0) = 0 and g'(0) = 1; the value at 0 is 1.

    These are the building blocks of the divided-difference forms (see ``difference.py``):
    each is evaluated by one accurate library call and one division, so it keeps full relative
    precision for every x, including x -> 0, where the quotient is replaced by its limit.
    """

    nargs = 1

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        raise NotImplementedError

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Expr | None:
        if arg.is_zero:
            return S.One
        return None

    def as_quotient(self) -> sympy.Expr:
        x = self.args[0]
        return self.numerator(x) / x

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        x = self.args[0]
        return (sympy.diff(self.numerator(x), x) - self) / x

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        x = self.args[0].evalf(prec)
        if x.is_zero:
            return sympy.Float(1, prec)
        return (self.numerator(x) / x).evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real


class Expm1Ratio(_Ratio):
    """expm1(x) / x (1 at 0)."""

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        return exp(arg) - 1


class Log1pRatio(_Ratio):
    """log1p(x) / x (1 at 0), for x > -1."""

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        return log(1 + arg)


class SinhRatio(_Ratio):
    """sinh(x) / x (1 at 0)."""

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        return sympy.sinh(arg)


class SinRatio(_Ratio):
    """sin(x) / x (1 at 0)."""

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        return sympy.sin(arg)


class AtanRatio(_Ratio):
    """atan(x) / x (1 at 0)."""

    @classmethod
    def numerator(cls, arg: sympy.Expr) -> sympy.Expr:
        return sympy.atan(arg)


class SumError(sympy.Function):
    """(x + y) - fl(x + y): the rounding error of one addition in the working precision.

    Exact (Knuth's TwoSum); mathematically 0, so it appears only as a correction term, e.g. the
    midpoint c = fl(z0/2 + z/2) of a divided difference is c + SumError(z0/2, z/2) exactly.
    """

    nargs = 2

    @classmethod
    def eval(cls, x: sympy.Expr, y: sympy.Expr) -> sympy.Expr | None:
        if x == y or x.is_zero or y.is_zero:
            return S.Zero  # x + x = 2x and x + 0 are exact
        return None

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return sympy.Float(0)

    def _eval_is_real(self) -> bool | None:
        return True


class IsFinite(BooleanFunction):
    """True where the argument is a finite number (not inf, not nan): a branch condition."""

    nargs = 1

    @classmethod
    def eval(cls, arg: sympy.Expr) -> sympy.Basic | None:
        if arg.is_number:
            return sympy.true if arg.is_finite else sympy.false
        return None


class SeriesPatch(sympy.Function):
    """The multiplier of a Taylor patch, evaluated in double-word arithmetic (``patches.py``).

    SeriesPatch(z0, z, c, rho, hi64, lo64, hi32, lo32) = sum_k a_k h_(k-1)(z0 - c, z - c) where
    |z0 - c|, |z - c| <= rho, and NaN elsewhere. The coefficients a_k are given as unevaluated
    sums hi + lo of two numbers of the working type (one tuple pair per type), and the sum is
    evaluated with error-free transformations, so its error is about one rounding even where
    its terms cancel (pairs z0, z near the level set of f).
    """

    nargs = 8

    @classmethod
    def eval(cls, *args: sympy.Basic) -> sympy.Expr | None:
        return None

    @property
    def centre(self) -> float:
        return float(self.args[2])

    @property
    def radius(self) -> float:
        return float(self.args[3])

    def coefficients(self, single: bool = False) -> tuple[tuple[float, ...], tuple[float, ...]]:
        hi, lo = (self.args[6], self.args[7]) if single else (self.args[4], self.args[5])
        return tuple(float(x) for x in hi), tuple(float(x) for x in lo)

    def _eval_is_real(self) -> bool | None:
        return True


NAMED_FUNCTIONS = (Sigmoid, Softplus, NormalCdf, Gauss)
RATIO_FUNCTIONS = (Expm1Ratio, Log1pRatio, SinhRatio, SinRatio, AtanRatio)
