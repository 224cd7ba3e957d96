"""Divided differences without cancellation: [g](z0, z) = (g(z) - g(z0)) / (z - z0).

This is the DFD multiplier of one smooth piece (seed 004, eq. 16), built by sympy from the
expression tree of g with one exact identity per node, so that it never subtracts two nearly
equal values and reduces to g'(z0) at z = z0 (eq. 17) without a 0/0. With a = a(z), a0 =
a(z0), the increment Delta = [a] * d and hi/lo = max/min(a0, a):

=================  ==========================================================================
node               [node]
=================  ==========================================================================
u + v              [u] + [v]
u * v              [u] v + u0 [v]                     (u v - u0 v0 = (u - u0) v + u0 (v - v0))
a**n, n >= 2       [a] * sum_j a**j a0**(n-1-j)
1 / a              -[a] / (a0 a)
sqrt(a)            [a] / (sqrt(a0) + sqrt(a))
exp(a), expm1(a)   exp(hi) E1(-|Delta|) [a]           (e^a - e^a0 = e^hi (1 - e^-|Delta|))
log(a)             [a] L1(|Delta| / lo) / lo          (log hi - log lo = log1p((hi - lo)/lo))
log1p(a)           [a] L1(|Delta| / (1 + lo)) / (1 + lo)
sigmoid(a)         s(hi) s(-lo) E1(-|Delta|) [a]
tanh(a)            4 s(2 hi) s(-2 lo) E1(-2|Delta|) [a]    (tanh a = 2 s(2a) - 1)
softplus(a)        [a] E1(-|Delta|) L1(X) / (e^-|Delta| + e^-hi),  X = -expm1(-|Delta|) / (..)
sin(a), cos(a)     cos(c) S(Delta/2) [a],  -sin(c) S(Delta/2) [a]     (c = (a0 + a)/2)
sinh(a), cosh(a)   cosh(c) Sh(Delta/2) [a],  sinh(c) Sh(Delta/2) [a]
atan(a)            [a] A(Delta/q) / q,  q = 1 + a0 a >= 1/2  (atan a - atan a0 = atan(Delta/q))
Phi(a), erf, erfc  phi(c) * (Hermite series in c h, h^2) near the diagonal; the tail secant
=================  ==========================================================================

E1(x) = expm1(x)/x, L1(x) = log1p(x)/x, S = sin(x)/x, Sh = sinh(x)/x, A = atan(x)/x, each 1 at
0 (``functions.py``). Every factor is a product or quotient of values computed to a few units
in the last place, so [g] is accurate wherever no sum of the table cancels; sums cancel only
near the critical points of g, where ``patches.py`` takes over.
"""

from __future__ import annotations

import functools
import math

import mpmath
import sympy
from sympy import Abs, Max, Min, Piecewise, S
from sympy.codegen.cfunctions import expm1, log1p

from pbxc.symbolic.activations import Z
from pbxc.symbolic.functions import (
    AtanRatio,
    Expm1Ratio,
    Gauss,
    Log1pRatio,
    NormalCdf,
    Sigmoid,
    SinhRatio,
    SinRatio,
    Softplus,
    SumError,
)
from pbxc.symbolic.precision import BUDGET, DTYPES, UNIT

#: the default activation value z0 (the routine's first argument) ...
Z0 = sympy.Symbol("z0", real=True)
#: ... and d = z - z0, computed once at the top of every multiplier routine
DELTA = sympy.Symbol("d", real=True)


class NoRule(Exception):
    """A node with no cancellation-free divided-difference identity."""


class DividedDifference:
    """[g](z0, z) for expressions g in ``Z``: an expression in ``Z0``, ``Z`` and ``DELTA``."""

    def __init__(self, diagonal: bool = False) -> None:
        #: diagonal: the limit z0 = z, d = 0 of every rule, i.e. a stable form of g'
        self.diagonal = diagonal
        self.memo: dict[sympy.Basic, sympy.Expr] = {}

    def __call__(self, e: sympy.Expr) -> sympy.Expr:
        hit = self.memo.get(e)
        if hit is None:
            hit = self._rule(e)
            self.memo[e] = hit
        return hit

    def at0(self, e: sympy.Expr) -> sympy.Expr:
        return e if self.diagonal else e.xreplace({Z: Z0})

    def _increment(self, a: sympy.Expr) -> sympy.Expr:
        return S.Zero if self.diagonal else self(a) * DELTA

    def _rule(self, e: sympy.Expr) -> sympy.Expr:
        if not e.has(Z):
            return S.Zero
        if e == Z:
            return S.One
        if isinstance(e, sympy.Add):
            return sympy.Add(*[self(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            const = sympy.Mul(*[f for f in e.args if not f.has(Z)])
            var = [f for f in e.args if f.has(Z)]
            if len(var) == 1:
                return const * self(var[0])
            u, v = var[0], sympy.Mul(*var[1:])
            return const * (self(u) * v + self.at0(u) * self(v))
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        func = type(e)
        if func in (sympy.exp, expm1):
            return self._exp(e.args[0])
        if func is sympy.log:
            a = e.args[0]
            lo = Min(self.at0(a), a)
            return self(a) * Log1pRatio(Abs(self._increment(a)) / lo) / lo
        if func is log1p:
            a = e.args[0]
            lo1 = 1 + Min(self.at0(a), a)
            return self(a) * Log1pRatio(Abs(self._increment(a)) / lo1) / lo1
        if func is Sigmoid:
            a = e.args[0]
            hi, lo = Max(self.at0(a), a), Min(self.at0(a), a)
            return Sigmoid(hi) * Sigmoid(-lo) * Expm1Ratio(-Abs(self._increment(a))) * self(a)
        if func is sympy.tanh:
            a = e.args[0]
            hi, lo = Max(self.at0(a), a), Min(self.at0(a), a)
            return (4 * Sigmoid(2 * hi) * Sigmoid(-2 * lo)
                    * Expm1Ratio(-2 * Abs(self._increment(a))) * self(a))
        if func is Softplus:
            a = e.args[0]
            hi = Max(self.at0(a), a)
            step = Abs(self._increment(a))
            denominator = sympy.exp(-step) + sympy.exp(-hi)
            x = -expm1(-step) / denominator
            return self(a) * Expm1Ratio(-step) * Log1pRatio(x) / denominator
        if func is NormalCdf:
            return self._normal_cdf(e.args[0])
        if func is sympy.erf:
            return self(2 * NormalCdf(sympy.sqrt(2) * e.args[0]) - 1)
        if func is sympy.erfc:
            return self(2 * NormalCdf(-sympy.sqrt(2) * e.args[0]))
        if func in (sympy.sin, sympy.cos, sympy.sinh, sympy.cosh):
            # the midpoint c = fl(a0/2 + a/2) rounds; cos(c) near a zero of cos would carry
            # that rounding |c tan c| times over, so add the first-order correction for the
            # exact error err = SumError(a0/2, a/2): cos(c + err) = cos c - err sin c
            a = e.args[0]
            h0, h1 = self.at0(a) / 2, a / 2
            mid = h0 + h1
            err = SumError(h0, h1)
            half = self._increment(a) / 2
            if func is sympy.sin:
                return (sympy.cos(mid) - err * sympy.sin(mid)) * SinRatio(half) * self(a)
            if func is sympy.cos:
                return -(sympy.sin(mid) + err * sympy.cos(mid)) * SinRatio(half) * self(a)
            if func is sympy.sinh:
                return (sympy.cosh(mid) + err * sympy.sinh(mid)) * SinhRatio(half) * self(a)
            return (sympy.sinh(mid) + err * sympy.cosh(mid)) * SinhRatio(half) * self(a)
        if func is sympy.atan:
            a = e.args[0]
            if self.diagonal:
                return self(a) / (1 + a * a)
            q = 1 + self.at0(a) * a
            exact = self(a) * AtanRatio(self._increment(a) / q) / q
            secant = (sympy.atan(a) - sympy.atan(self.at0(a))) / DELTA
            return Piecewise((exact, q >= S.Half), (secant, True))
        raise NoRule(f"no divided-difference rule for {func.__name__}")

    def _exp(self, a: sympy.Expr) -> sympy.Expr:
        hi = Max(self.at0(a), a)
        return sympy.exp(hi) * Expm1Ratio(-Abs(self._increment(a))) * self(a)

    def _pow(self, e: sympy.Pow) -> sympy.Expr:
        base, exponent = e.args
        if exponent.has(Z):
            return self(sympy.exp(exponent * sympy.log(base)))
        b0, b1, db = self.at0(base), base, self(base)
        if exponent.is_Integer:
            n = int(exponent)
            if n >= 2:
                return db * sympy.Add(*[b1**j * b0**(n - 1 - j) for j in range(n)])
            if n == -1:
                return -db / (b0 * b1)
            inner = base**(-n)
            return -self(inner) / (self.at0(inner) * inner)
        if exponent == S.Half:
            return db / (sympy.sqrt(b0) + sympy.sqrt(b1))
        if exponent == -S.Half:
            r0, r1 = sympy.sqrt(b0), sympy.sqrt(b1)
            return -db / (r0 * r1 * (r0 + r1))
        # a**p = exp(p log a), a > 0: exp(max(p log a0, p log a)) = max(a0**p, a**p)
        inner = exponent * sympy.log(base)
        return Max(b0**exponent, b1**exponent) * Expm1Ratio(-Abs(self._increment(inner))) \
            * self(inner)

    def _normal_cdf(self, a: sympy.Expr) -> sympy.Expr:
        density = 1 / sympy.sqrt(2 * sympy.pi)
        if self.diagonal:
            return self(a) * Gauss(a) * density
        a0 = self.at0(a)
        theta, terms = normal_cdf_switch()
        step = self._increment(a)
        series = normal_cdf_series(a0 * step, step * step, terms)
        mid = a0 + step / 2
        upper = (NormalCdf(-a0) - NormalCdf(-a)) / step
        lower = (NormalCdf(a) - NormalCdf(a0)) / step
        near = sympy.And(Abs(step) <= theta, Abs(a0 * step) <= theta)
        return self(a) * Piecewise((density * Gauss(a0) * series, near), (upper, mid >= 0),
                                   (lower, True))


def normal_cdf_series(p: sympy.Expr, q: sympy.Expr, terms: int) -> sympy.Expr:
    """T = (Phi(c + D) - Phi(c)) / (D phi(c)) to ``terms`` terms, in p = c D and q = D**2.

    From the generating function of the Hermite polynomials, phi(c + t) = phi(c) sum_n
    He_n(-c) t^n / n!, so T = sum_n (-1)^n He_n(c) D^n / (n + 1)!, and He_n(c) D^n is a
    polynomial in c D and D^2: T = sum_(k,m) (-1)^(k+m) p^k q^m / (k! m! 2^m (k + 2m + 1)),
    k + 2m < terms. Printed in Horner form (outer in q, inner in p); |p|, |D| <= theta.
    """
    outer: sympy.Expr = S.Zero
    for m in reversed(range((terms + 1) // 2)):
        inner: sympy.Expr = S.Zero
        for k in reversed(range(terms - 2 * m)):
            coeff = sympy.Rational((-1) ** (k + m),
                                   math.factorial(k) * math.factorial(m) * 2**m * (k + 2 * m + 1))
            inner = coeff + p * inner if inner != 0 else coeff
        outer = inner + q * outer if outer != 0 else inner
    return outer


@functools.lru_cache(maxsize=1)
def normal_cdf_switch() -> tuple[float, int]:
    """(theta, terms): where [Phi](c, c + D) switches from its series to the tail secant.

    theta: the smallest switch point (a multiple of 1/20) at which the secant of the smaller
    tail Q, (Q(c) - Q(c + D)) / D, has condition number (Q(c) + Q(c + D)) / |Q(c) - Q(c + D)|
    within the float32 budget (the stricter one, relative to its unit roundoff) wherever the
    series is not used: |D| = theta / max(1, |c|), both signs of D, every c.
    terms: the fewest series terms whose truncation error, relative to the sum, is within an
    eighth of the float64 budget everywhere on the series side of the switch.
    """
    limit = min(BUDGET[dt] / UNIT[dt] - 2.0 for dt in DTYPES)
    centres = [mpmath.mpf(i) / 4 for i in range(-40, 41)] + [
        mpmath.mpf(s * x) for x in (12, 15, 20, 25, 30, 40) for s in (1, -1)]
    with mpmath.workdps(30):
        def tail(x: mpmath.mpf, upper: bool) -> mpmath.mpf:
            return mpmath.erfc((x if upper else -x) / mpmath.sqrt(2)) / 2

        def condition(c: mpmath.mpf, step: mpmath.mpf) -> mpmath.mpf:
            upper = c + step / 2 >= 0
            q0, q1 = tail(c, upper), tail(c + step, upper)
            return (q0 + q1) / abs(q0 - q1)

        def steps(c: mpmath.mpf, theta: mpmath.mpf) -> list[mpmath.mpf]:
            size = theta / max(1, abs(c))
            return [size, -size]

        def secant_ok(k: int) -> bool:
            t = mpmath.mpf(k) / 20
            return all(condition(c, h) <= limit for c in centres for h in steps(c, t))

        low, high = 4, 80  # the condition falls as theta grows: bisect for the smallest
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if secant_ok(middle) else (middle + 1, high)
        theta = mpmath.mpf(low) / 20
        target = BUDGET[DTYPES[0]] / 8
        count = 48
        worst = [mpmath.mpf(0)] * count
        for c in centres:
            phi = mpmath.exp(-c * c / 2) / mpmath.sqrt(2 * mpmath.pi)
            he = [mpmath.mpf(1), c]  # He_(n+1) = c He_n - n He_(n-1)
            for n in range(1, count):
                he.append(c * he[n] - n * he[n - 1])
            for step in steps(c, theta):
                upper = c + step / 2 >= 0
                truth = (tail(c, upper) - tail(c + step, upper)) / (step * phi)
                if not upper:
                    truth = -truth
                total = mpmath.mpf(0)
                for n in range(count):
                    total += (-1) ** n * he[n] * step**n / mpmath.factorial(n + 1)
                    worst[n] = max(worst[n], abs(total / truth - 1))
        terms = next(n + 1 for n in range(count) if worst[n] <= target)
        return float(theta), terms
