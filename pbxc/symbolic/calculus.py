"""The exact calculus of one elementwise activation: f, f', f'', kinks, DFD multiplier.

``derive_calculus(expr)`` derives everything a pass needs from the one sympy expression f(z),
at compile time:

* the smooth pieces of f and the breakpoints between them (``pieces.py``), with the one-sided
  derivatives at each kink and the value a *convention* picks there;
* f' and f'' of every piece, in forms without cancellation: f' is the divided difference of
  ``difference.py`` at z0 = z (so sigmoid' prints as s(z) s(-z), tanh' as 4 s(2z) s(-2z)), and
  near a critical point a Taylor patch (``patches.py``);
* the DFD multiplier m(z0, z) = (f(z) - f(z0)) / (z - z0) (seed 004, eq. 16), with the exact
  limit f'(z0) at z = z0 (eq. 17), as a routine of branches chosen per element.

The results are sympy expressions and routines; the code generators print them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import mpmath
import numpy as np
import sympy
from sympy import Abs, And, Eq, Max, Min, Piecewise, S
from sympy.codegen.cfunctions import expm1
from sympy.codegen.rewriting import FuncMinusOneOptim, optimize, optims_c99

from pbxc.symbolic.activations import Z
from pbxc.symbolic.difference import DELTA, Z0, DividedDifference, NoRule
from pbxc.symbolic.evaluate import evaluate
from pbxc.symbolic.functions import IsFinite, Sigmoid, Softplus
from pbxc.symbolic.mpeval import mp_function
from pbxc.symbolic.patches import Patch, find_patches, patch_value
from pbxc.symbolic.pieces import Breakpoint, decompose, one_sided
from pbxc.symbolic.precision import BAR, BUDGET, DTYPES, FLOOR, UNIT
from pbxc.symbolic.routine import PrecisionConstant, Routine

#: kink conventions: the derivative used at a point where f is not differentiable
CONVENTIONS = ("owner", "left", "right", "mean")
#: "owner": the one-sided derivative of the piece that f, as written, evaluates at the point
#: (the branch whose condition holds there), and the mean of the two where no piece owns it.
#: For the built-ins this is PyTorch's choice: relu'(0) = 0, leaky_relu'(0) = alpha,
#: elu'(0) = alpha (alpha != 1), hardtanh'(+-1) = 0, hardsigmoid'(+-3) = 0, abs'(0) = 0 (|x| is
#: written x if x > 0, -x if x < 0, 0 if x == 0: a point piece, the mean of -1 and 1).
DEFAULT_CONVENTION = "owner"

#: z0 of the accuracy grid spans [-SCALE_RANGE, SCALE_RANGE]; s_f = max |f'| there
SCALE_RANGE = 30.0
#: f evaluated to this many units in the last place, for the secant's switch
KAPPA = 2.0
#: the derivative's condition number above which a patch replaces the difference form
PATCH_CONDITION = min(BAR[dt] / (2 * KAPPA * UNIT[dt]) for dt in DTYPES)
#: order of the Taylor fallback for pieces without an exact divided-difference rule
FALLBACK_ORDER = 6

FALLBACK_BUDGET = sympy.Symbol("taylor_budget", positive=True)
_KAPPA_S_DOC = "measured error of f, in units in the last place"
_KAPPA_D_DOC = "measured error of the difference form per unit of its condition number"
SMALLEST = sympy.Symbol("smallest_normal", positive=True)
_SMALLEST_CONSTANT = PrecisionConstant(
    SMALLEST, float(np.finfo(np.float64).tiny), float(np.finfo(np.float32).tiny),
    "the smallest normal number")
SAFE_WIDTH = sympy.Symbol("safe_width", positive=True)
_SAFE_WIDTH_CONSTANT = PrecisionConstant(
    SAFE_WIDTH, float(np.finfo(np.float64).tiny) / UNIT[DTYPES[0]],
    float(np.finfo(np.float32).tiny) / UNIT[DTYPES[1]],
    "the smallest |z - z0| whose piece changes are normal numbers")
_FALLBACK_CONSTANT = PrecisionConstant(
    FALLBACK_BUDGET, BUDGET[DTYPES[0]], BUDGET[DTYPES[1]],
    "truncation error the Taylor fallback may have, relative to its value")


class DerivationError(Exception):
    """The activation cannot be analysed (e.g. branch conditions sympy cannot solve)."""


@dataclass(frozen=True)
class Kink:
    """A point where f or f' is discontinuous, with the one-sided derivatives."""

    point: sympy.Expr
    left: sympy.Expr         # f'(c-)
    right: sympy.Expr        # f'(c+)
    owner: str               # "left", "right" or "point"
    owner_slope: sympy.Expr  # derivative of the expression f evaluates at c
    value: sympy.Expr        # f(c)
    jump: sympy.Expr         # f(c+) - f(c-); 0 where f is continuous
    left_second: sympy.Expr = S.Zero
    right_second: sympy.Expr = S.Zero

    def slope(self, convention: str = DEFAULT_CONVENTION) -> sympy.Expr:
        if convention == "left":
            return self.left
        if convention == "right":
            return self.right
        if convention == "mean":
            return (self.left + self.right) / 2
        return self.owner_slope

    def second(self, convention: str = DEFAULT_CONVENTION) -> sympy.Expr:
        if convention == "left" or (convention == "owner" and self.owner == "left"):
            return self.left_second
        if convention == "right" or (convention == "owner" and self.owner == "right"):
            return self.right_second
        return (self.left_second + self.right_second) / 2


@dataclass(frozen=True)
class PieceCalculus:
    """One smooth piece: f, f', f'' there and how its multiplier is computed."""

    lower: sympy.Expr
    upper: sympy.Expr
    expr: sympy.Expr                 # stable form of f on the piece
    df: sympy.Expr                   # stable f' (without patches)
    d2f: sympy.Expr
    rule: str                        # "constant", "linear", "exact" or "taylor"
    difference: sympy.Expr | None    # the divided-difference form [f](z0, z), in Z0, Z, DELTA
    patches: tuple[Patch, ...] = ()
    notes: tuple[str, ...] = ()
    #: measured error of evaluating f on the piece, in units of the last place (double, single)
    kappa: tuple[float, float] = (KAPPA, KAPPA)
    #: measured error of the difference form per unit of its condition number (double, single)
    kappa_difference: tuple[float, float] = (KAPPA, KAPPA)

    @property
    def slope(self) -> sympy.Expr | None:
        return self.df if self.rule in ("constant", "linear") else None


@dataclass(frozen=True)
class Branch:
    """One branch of a routine, for reports: its name, where it applies and what it computes."""

    name: str
    condition: str
    formula: str


@dataclass(frozen=True)
class Calculus:
    """Everything derived from f; see ``ActivationCalculus`` for the keyed, public form."""

    f: sympy.Expr
    f_stable: sympy.Expr
    df: sympy.Expr
    d2f: sympy.Expr
    pieces: tuple[PieceCalculus, ...]
    breakpoints: tuple[Breakpoint, ...]
    kinks: tuple[Kink, ...]
    convention: str
    slope_scale: float
    value: Routine
    derivative: Routine
    second_derivative: Routine
    multiplier: Routine
    branches: tuple[Branch, ...]
    notes: tuple[str, ...] = field(default=())

    def point_slopes(self) -> dict[float, sympy.Expr]:
        """f' at every breakpoint: the convention's value at kinks, else the (two-sided) limit."""
        out: dict[float, sympy.Expr] = {}
        kinks = {k.point: k for k in self.kinks}
        for b in self.breakpoints:
            k = kinks.get(b.point)
            out[_as_float(b.point)] = (k.slope(self.convention) if k is not None
                                       else one_sided(self.pieces[b.index].df, b.point))
        return out

    @property
    def exact(self) -> bool:
        """Whether every piece has a cancellation-free rule (no Taylor fallback)."""
        return all(p.rule != "taylor" for p in self.pieces) and not self.notes


# ---------------------------------------------------------------------------- stable forms
def stabilize(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite forms that cancel or overflow into ones that do not (sympy.codegen.rewriting)."""
    out = expr.replace(lambda e: isinstance(e, (sympy.log, sympy.Pow)), _named)
    out = out.replace(lambda e: isinstance(e, sympy.Add), _complements)
    out = out.replace(lambda e: isinstance(e, sympy.Add), _rationalize)
    out = out.replace(lambda e: isinstance(e, sympy.Add), _expm1)
    # log(1 + x) -> log1p(x) and the like; optims_c99's own exp(x) - 1 rule is left out, as it
    # also recombines unrelated sums (1 - 1/(z + 1) back into z/(z + 1))
    return optimize(out, [o for o in optims_c99 if not isinstance(o, FuncMinusOneOptim)])


def _expm1(expr: sympy.Add) -> sympy.Expr:
    """c exp(a) - c as c expm1(a): no cancellation for a near 0."""
    numbers = [t for t in expr.args if t.is_number]
    if len(numbers) != 1:
        return expr
    number = numbers[0]
    for term in expr.args:
        coeff, rest = term.as_coeff_Mul()
        if isinstance(rest, sympy.exp) and coeff == -number:
            others = [t for t in expr.args if t is not term and t is not number]
            return sympy.Add(*others, coeff * expm1(rest.args[0]))
    return expr


def _one_plus_exp(e: sympy.Expr) -> sympy.Expr | None:
    """x where e = 1 + exp(x), else None."""
    if isinstance(e, sympy.Add) and len(e.args) == 2 and S.One in e.args:
        other = e.args[0] if e.args[1] == 1 else e.args[1]
        if isinstance(other, sympy.exp):
            return other.args[0]
    return None


def _named(e: sympy.Expr) -> sympy.Expr:
    """log(1 + exp(x)) as Softplus(x), 1 / (1 + exp(-x)) as Sigmoid(x): no overflow."""
    if isinstance(e, sympy.log):
        x = _one_plus_exp(e.args[0])
        return Softplus(x) if x is not None else e
    if isinstance(e, sympy.Pow) and e.exp == -1:
        x = _one_plus_exp(e.base)
        return Sigmoid(-x) if x is not None else e
    return e


def _complements(e: sympy.Add) -> sympy.Expr:
    """1 - Sigmoid(x) as Sigmoid(-x), 1 - tanh(x)**2 as 4 Sigmoid(2x) Sigmoid(-2x)."""
    if len(e.args) != 2 or S.One not in e.args:
        return e
    other = e.args[0] if e.args[1] == 1 else e.args[1]
    coeff, rest = other.as_coeff_Mul()
    if coeff != -1:
        return e
    if isinstance(rest, Sigmoid):
        return Sigmoid(-rest.args[0])
    if isinstance(rest, sympy.Pow) and rest.exp == 2 and isinstance(rest.base, sympy.tanh):
        x = rest.base.args[0]
        return 4 * Sigmoid(2 * x) * Sigmoid(-2 * x)
    return e


def _rationalize(expr: sympy.Add) -> sympy.Expr:
    """c sqrt(A) - c B (B > 0 a number) as c (A - B**2) / (sqrt(A) + B): no cancellation where
    sqrt(A) is close to B (sqrt(z*z + 1) - 1 near z = 0)."""
    numbers = [t for t in expr.args if t.is_number]
    if len(numbers) != 1:
        return expr
    number = numbers[0]
    for term in expr.args:
        coeff, rest = term.as_coeff_Mul()
        if isinstance(rest, sympy.Pow) and rest.exp == S.Half and rest.has(Z):
            b = -number / coeff
            if b.is_positive:
                others = [t for t in expr.args if t is not term and t is not number]
                return sympy.Add(*others, coeff * sympy.expand(rest.base - b**2) / (rest + b))
    return expr


def _as_float(value: sympy.Expr) -> float:
    return float(sympy.N(value, 20))


def _is_affine(expr: sympy.Expr) -> bool:
    return bool(expr.is_polynomial(Z)) and sympy.degree(expr, Z) <= 1


def _addends(expr: sympy.Expr) -> list[sympy.Expr]:
    return list(expr.args) if isinstance(expr, sympy.Add) else [expr]


# ---------------------------------------------------------------------------- pieces
def _candidates(g: sympy.Expr) -> list[sympy.Expr]:
    """Equivalent forms of a piece to try: as written, and partial fractions if rational."""
    out = [g]
    if g.is_rational_function(Z):
        try:
            split = stabilize(sympy.apart(sympy.cancel(g), Z))
        except (NotImplementedError, sympy.PolynomialError):
            split = g
        if split != g:
            out.append(split)
    return out


def _mean_log_condition(terms: Sequence[sympy.Expr], lower: sympy.Expr, upper: sympy.Expr
                        ) -> float:
    """How much the derivative's terms cancel on the piece: mean of log(sum|t| / |sum t|)."""
    lo = max(-40.0, -np.inf if lower.is_infinite else _as_float(lower))
    hi = min(40.0, np.inf if upper.is_infinite else _as_float(upper))
    if len(terms) < 2 or hi <= lo:
        return 0.0
    grid = np.linspace(lo, hi, 803)[1:-1]
    values = np.array([evaluate(t, {Z: grid}) for t in terms])
    with np.errstate(all="ignore"):
        cond = np.abs(values).sum(axis=0) / np.abs(values.sum(axis=0))
    cond = cond[np.isfinite(cond)]
    return float(np.mean(np.log(np.maximum(cond, 1.0)))) if cond.size else 0.0


def _piece(lower: sympy.Expr, upper: sympy.Expr, expr: sympy.Expr
           ) -> tuple[PieceCalculus, list[sympy.Expr]]:
    g = stabilize(expr)
    if not g.has(Z):
        return PieceCalculus(lower, upper, g, S.Zero, S.Zero, "constant", S.Zero), []
    if _is_affine(g):
        slope = sympy.diff(g, Z)
        return PieceCalculus(lower, upper, g, slope, S.Zero, "linear", slope), []
    best: tuple[float, PieceCalculus, list[sympy.Expr]] | None = None
    for form in _candidates(g):
        try:
            difference: sympy.Expr | None = DividedDifference()(form)
            diagonal = DividedDifference(diagonal=True)(form)
            rule = "exact"
        except NoRule:
            difference = None
            diagonal = stabilize(sympy.diff(form, Z))
            rule = "taylor"
        terms = _addends(diagonal)
        score = _mean_log_condition(terms, lower, upper)
        if best is None or score < best[0] - 1e-9:
            df = stabilize(diagonal)
            d2f = stabilize(sympy.diff(df, Z))
            best = (score, PieceCalculus(lower, upper, form, df, d2f, rule, difference), terms)
    assert best is not None
    return best[1], best[2]


def evaluation_error(g: sympy.Expr, lower: sympy.Expr, upper: sympy.Expr, scale: float = 1.0
                     ) -> tuple[float, float]:
    """The largest relative error of evaluating ``g`` (as printed), in units of the last place
    of float64 and float32, on its piece within the grid's reach [-130, 130]. Values far
    below the function's scale (the bar's floor, 1e-8 * ``scale``) count on absolute error."""
    lo = max(-130.0, -np.inf if lower.is_infinite else _as_float(lower))
    hi = min(130.0, np.inf if upper.is_infinite else _as_float(upper))
    if hi <= lo:
        return (KAPPA, KAPPA)
    pts = np.concatenate([np.linspace(lo, hi, 521)[1:-1],
                          [s * 10.0 ** k for k in range(-12, 1) for s in (1, -1)],
                          np.linspace(max(lo, -4), min(hi, 4), 81)])
    pts = np.unique(pts[(pts > lo) & (pts < hi)])
    fn = mp_function(g)
    out = []
    for dt in DTYPES:
        x = pts.astype(dt)
        values = evaluate(g, {Z: x}, dt)
        worst = 0.0
        with mpmath.workdps(30):
            for xi, vi in zip(x, values):
                ref = fn(mpmath.mpf(float(xi)))
                if ref == 0 or not mpmath.isfinite(ref) or abs(ref) > np.finfo(dt).max:
                    continue
                err = abs(mpmath.mpf(float(vi)) - ref) / (abs(ref) + FLOOR * scale)
                worst = max(worst, float(err))
        out.append(min(worst / UNIT[dt], 1e12))
    return (out[0], out[1])


def difference_error(diagonal_terms: Sequence[sympy.Expr], lower: sympy.Expr,
                     upper: sympy.Expr, scale: float = 1.0) -> tuple[float, float]:
    """The error of the difference form at z0 = z (the derivative it becomes), per unit of its
    condition number sum|t| / |sum t|, in units of the last place (float64, float32), with
    the bar's floor (1e-8 * ``scale``, the slope scale)."""
    lo = max(-60.0, -np.inf if lower.is_infinite else _as_float(lower))
    hi = min(60.0, np.inf if upper.is_infinite else _as_float(upper))
    if hi <= lo:
        return (KAPPA, KAPPA)
    pts = np.unique(np.concatenate([np.linspace(lo, hi, 301)[1:-1],
                                    np.linspace(max(lo, -4), min(hi, 4), 81)[1:-1]]))
    fn = mp_function(sympy.Add(*diagonal_terms))  # the same form, exactly: rounding alone
    out = []
    for dt in DTYPES:
        x = pts.astype(dt)
        values = np.array([evaluate(t, {Z: x}, dt) for t in diagonal_terms], dtype=np.float64)
        total = values.sum(axis=0)
        condition = np.abs(values).sum(axis=0) / np.maximum(np.abs(total), 1e-300)
        worst = 0.0
        with mpmath.workdps(30):
            for xi, vi, ci in zip(x, total, condition):
                ref = fn(mpmath.mpf(float(xi)))
                if ref == 0 or not mpmath.isfinite(ref) or abs(ref) > np.finfo(dt).max:
                    continue
                err = abs(mpmath.mpf(float(dt.type(vi))) - ref) / (abs(ref) + FLOOR * scale)
                worst = max(worst, float(err) / max(float(ci), 1.0))
        out.append(min(max(worst / UNIT[dt], 1.0), 1e12))
    return (out[0], out[1])


def _with_patches(piece: PieceCalculus, terms: Sequence[sympy.Expr], slope_scale: float
                  ) -> PieceCalculus:
    lower = -np.inf if piece.lower.is_infinite else _as_float(piece.lower)
    upper = np.inf if piece.upper.is_infinite else _as_float(piece.upper)
    patches, notes = find_patches(piece.expr, terms, lower, upper, PATCH_CONDITION,
                                  slope_scale)
    return dataclasses.replace(piece, patches=tuple(patches), notes=tuple(notes))


def _taylor_fallback(g: sympy.Expr) -> sympy.Expr:
    """sum_k g^(k+1)(z0) d^k / (k+1)!, used where its next term is within the budget."""
    derivs = [g]
    for _ in range(FALLBACK_ORDER + 2):
        derivs.append(stabilize(sympy.diff(derivs[-1], Z)))
    at0 = [e.xreplace({Z: Z0}) for e in derivs]
    series = sympy.Add(*[at0[k + 1] / sympy.factorial(k + 1) * DELTA**k
                         for k in range(FALLBACK_ORDER + 1)])
    nxt = at0[FALLBACK_ORDER + 2] / sympy.factorial(FALLBACK_ORDER + 2) \
        * DELTA**(FALLBACK_ORDER + 1)
    secant = (g - g.xreplace({Z: Z0})) / DELTA
    return Piecewise((series, Abs(nxt) <= FALLBACK_BUDGET * Abs(series)), (secant, True))


def piece_multiplier(piece: PieceCalculus, index: int) -> Routine:
    """m(z0, z) on one smooth piece, as a routine of (Z0, Z)."""
    if piece.rule in ("constant", "linear"):
        return Routine(f"m_piece{index}", (Z0, Z), (), piece.df)
    g1, g0 = (sympy.Symbol(n, real=True) for n in ("f1", "f0"))
    secant = sympy.Symbol("secant", real=True)
    difference = sympy.Symbol("difference", real=True)
    size = sympy.Symbol("difference_terms", real=True)
    kappa_s = sympy.Symbol(f"kappa_secant{index}", positive=True)
    kappa_d = sympy.Symbol(f"kappa_difference{index}", positive=True)
    constants = [
        PrecisionConstant(kappa_s, piece.kappa[0], piece.kappa[1], _KAPPA_S_DOC),
        PrecisionConstant(kappa_d, piece.kappa_difference[0], piece.kappa_difference[1],
                          _KAPPA_D_DOC),
        _SMALLEST_CONSTANT]
    assignments: list[tuple[sympy.Symbol, sympy.Expr]] = [
        (DELTA, Z - Z0), (g1, piece.expr), (g0, piece.expr.xreplace({Z: Z0})),
        (secant, (g1 - g0) / DELTA)]
    if piece.difference is not None:
        terms = _addends(piece.difference)
        names = [sympy.Symbol(f"term{k}", real=True) for k in range(len(terms))]
        assignments += list(zip(names, terms))
        assignments += [(difference, sympy.Add(*names)),
                        (size, sympy.Add(*[Abs(t) for t in names]))]
    else:
        assignments += [(difference, _taylor_fallback(piece.expr)), (size, Abs(difference))]
        constants.append(_FALLBACK_CONSTANT)
    # Each form's error is bounded by kappa * (its condition number) units in the last place:
    # the secant's condition is (|f(z)| + |f(z0)|) / |f(z) - f(z0)|, the difference form's
    # sum |terms| / |sum terms|. Take the secant where its bound is no larger (compared
    # without divisions); never where f(z) - f(z0) is 0 (z = z0, or both underflow) or
    # subnormal (it has lost its relative precision).
    safe = And(kappa_s * (Abs(g1) + Abs(g0)) * Abs(difference)
               <= kappa_d * size * Abs(g1 - g0), Abs(g1 - g0) >= SMALLEST)
    branches: list[tuple[sympy.Expr, sympy.Basic]] = []
    for patch in piece.patches:
        branches.append(patch_value(patch, Z0, Z))
    branches += [(secant, safe), (difference, IsFinite(difference)), (secant, S.true)]
    return Routine(f"m_piece{index}", (Z0, Z), tuple(assignments), Piecewise(*branches),
                   tuple(constants))


def piece_derivative(piece: PieceCalculus, index: int, z: sympy.Expr = Z
                     ) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], sympy.Expr]:
    """f'(z) on one piece: the stable derivative, and the Taylor patches near critical points."""
    df = piece.df.xreplace({Z: z})
    if not piece.patches:
        return [], df
    branches = [patch_value(patch, z, z, core=True) for patch in piece.patches]
    branches.append((df, S.true))
    return [], Piecewise(*branches)


# ---------------------------------------------------------------------------- kinks
def _membership(pieces: Sequence[PieceCalculus], breakpoints: Sequence[Breakpoint], j: int,
                x: sympy.Expr) -> sympy.Basic:
    """x lies in piece j (its open interval, and each end the piece owns)."""
    conds: list[sympy.Basic] = []
    if j > 0:
        b = breakpoints[j - 1]
        c = sympy.Float(_as_float(b.point), 17)
        conds.append(x >= c if b.owner == "right" else x > c)
    if j < len(pieces) - 1:
        b = breakpoints[j]
        c = sympy.Float(_as_float(b.point), 17)
        conds.append(x <= c if b.owner == "left" else x < c)
    return And(*conds) if conds else S.true


def _kinks(pieces: Sequence[PieceCalculus], breakpoints: Sequence[Breakpoint]) -> list[Kink]:
    kinks = []
    for b in breakpoints:
        left, right = pieces[b.index - 1], pieces[b.index]
        c = b.point
        fl, fr = one_sided(left.expr, c), one_sided(right.expr, c)
        dl, dr = one_sided(left.df, c), one_sided(right.df, c)
        d2l, d2r = one_sided(left.d2f, c), one_sided(right.d2f, c)
        # a point that belongs to neither piece (|x| at 0, written 0 there) has no slope of
        # its own: the owner convention takes the mean of the one-sided slopes (sign(0) = 0)
        owner_slope = {"left": dl, "right": dr}.get(b.owner, (dl + dr) / 2)
        jump = sympy.nsimplify(fr - fl) if (fr - fl).is_Float else sympy.simplify(fr - fl)
        if sympy.simplify(dl - dr) == 0 and jump == 0:
            continue  # f is differentiable here; only higher derivatives change
        kinks.append(Kink(c, dl, dr, b.owner, owner_slope, one_sided(b.point_expr, c), jump,
                          d2l, d2r))
    return kinks


# ---------------------------------------------------------------------------- routines
def _printable(value: sympy.Expr) -> sympy.Expr:
    """A constant at a kink as a 20-digit number where it holds functions of numbers (the
    slope at z = tan(1/2) holds tan, which no printer has); exact rationals stay exact."""
    if value.is_number and value.atoms(sympy.Function):
        return sympy.Float(sympy.N(value, 20), 20)
    return value


def _piecewise_routines(pieces: Sequence[PieceCalculus], breakpoints: Sequence[Breakpoint],
                        kinks: Sequence[Kink], convention: str
                        ) -> tuple[Routine, Routine, Routine]:
    """(f', f'', m) for an activation of several pieces."""
    kink_at = {k.point for k in kinks}
    # f'(z) and f''(z)
    d_steps: list[tuple[sympy.Symbol, sympy.Expr]] = []
    d_branches: list[tuple[sympy.Expr, sympy.Basic]] = []
    s_branches: list[tuple[sympy.Expr, sympy.Basic]] = []
    for k in kinks:
        c = sympy.Float(_as_float(k.point), 17)
        d_branches.append((_printable(k.slope(convention)), Eq(Z, c)))
        s_branches.append((_printable(k.second(convention)), Eq(Z, c)))
    for b in breakpoints:
        if b.owner == "point" and b.point not in kink_at:  # a point piece where f is smooth
            c = sympy.Float(_as_float(b.point), 17)
            d_branches.append((_printable(one_sided(pieces[b.index].df, b.point)), Eq(Z, c)))
            s_branches.append((_printable(one_sided(pieces[b.index].d2f, b.point)), Eq(Z, c)))
    for j, piece in enumerate(pieces):
        steps, value = piece_derivative(piece, j)
        d_steps.extend(steps)
        member = _membership(pieces, breakpoints, j, Z)
        d_branches.append((value, member))
        s_branches.append((piece.d2f, member))
    d_branches.append((S.NaN, S.true))
    s_branches.append((S.NaN, S.true))
    derivative = Routine("df", (Z,), tuple(d_steps), Piecewise(*d_branches))
    second = Routine("d2f", (Z,), (), Piecewise(*s_branches))

    # m(z0, z)
    lo, hi, width = (sympy.Symbol(n, real=True) for n in ("lo", "hi", "width"))
    steps = [(DELTA, Z - Z0), (lo, Min(Z0, Z)), (hi, Max(Z0, Z)), (width, hi - lo)]
    constants: list[PrecisionConstant] = []
    branches: list[tuple[sympy.Expr, sympy.Basic]] = []
    for k in kinks:
        c = sympy.Float(_as_float(k.point), 17)
        branches.append((_printable(k.slope(convention)), And(Eq(Z0, c), Eq(Z, c))))
    for b in breakpoints:
        if b.owner == "point" and b.point not in kink_at:  # a point piece where f is smooth
            c = sympy.Float(_as_float(b.point), 17)
            slope = _printable(one_sided(pieces[b.index].df, b.point))
            branches.append((slope, And(Eq(Z0, c), Eq(Z, c))))
    crossing_terms: list[sympy.Expr] = []
    numerator_terms: list[sympy.Expr] = []
    for j, piece in enumerate(pieces):
        routine = piece_multiplier(piece, j)
        constants.extend(routine.precision_constants)
        body, value = routine.inline({Z0: Z0, Z: Z}, prefix=f"p{j}_")
        steps.extend(body)
        member = And(_membership(pieces, breakpoints, j, Z0),
                     _membership(pieces, breakpoints, j, Z))
        branches.append((value, member))
        start: sympy.Expr = lo
        end: sympy.Expr = hi
        if j > 0:
            c = sympy.Float(_as_float(pieces[j].lower), 17)
            start, end = Max(start, c), Max(end, c)
        if j < len(pieces) - 1:
            c = sympy.Float(_as_float(pieces[j].upper), 17)
            start, end = Min(start, c), Min(end, c)
        sa, sb = sympy.Symbol(f"a{j}", real=True), sympy.Symbol(f"b{j}", real=True)
        sw = sympy.Symbol(f"w{j}", real=True)  # a symbol: sympy would distribute 1/6 * (b - a)
        steps += [(sa, start), (sb, end), (sw, sb - sa)]
        if piece.rule == "constant":
            continue
        # m = sum_j m_j(a_j, b_j) (b_j - a_j) / (hi - lo): as one quotient of the summed
        # changes (the changes of abs, -5.1 and 4.9, add exactly); where the width is so small
        # that the changes would be subnormal, as a sum of weights (b_j - a_j) / (hi - lo)
        share = sympy.Symbol(f"share{j}", real=True)
        steps.append((share, sw / width))
        if piece.rule == "linear":
            numerator_terms.append(piece.df * sw)
            crossing_terms.append(piece.df * share)
        else:
            body, value = routine.inline({Z0: sa, Z: sb}, prefix=f"x{j}_")
            steps.extend(body)
            numerator_terms.append(Piecewise((value * sw, sw > 0), (0, True)))
            crossing_terms.append(Piecewise((value * share, sw > 0), (0, True)))
    for b in breakpoints:
        c = sympy.Float(_as_float(b.point), 17)
        left, right = pieces[b.index - 1], pieces[b.index]
        at = one_sided(b.point_expr, b.point)
        into = sympy.nsimplify(at - one_sided(left.expr, b.point))   # left limit -> f(c)
        out_of = sympy.nsimplify(one_sided(right.expr, b.point) - at)  # f(c) -> right limit
        for jump, cond in ((into, And(lo < c, hi >= c)), (out_of, And(lo <= c, hi > c))):
            if jump != 0:
                numerator_terms.append(Piecewise((_as_float(jump), cond), (0, True)))
                crossing_terms.append(Piecewise((_as_float(jump) / width, cond), (0, True)))
    numerator = sympy.Symbol("numerator", real=True)
    steps.append((numerator, sympy.Add(*numerator_terms)))
    constants.append(_SAFE_WIDTH_CONSTANT)
    crossing = Piecewise((numerator / width, width >= SAFE_WIDTH),
                         (sympy.Add(*crossing_terms), True))
    branches.append((crossing, S.true))
    seen: dict[sympy.Symbol, PrecisionConstant] = {c.symbol: c for c in constants}
    multiplier = Routine("m", (Z0, Z), tuple(steps), Piecewise(*branches),
                         tuple(seen.values()))
    return derivative, second, multiplier


def measured(piece: PieceCalculus, terms: Sequence[sympy.Expr], scale: float) -> PieceCalculus:
    """The piece with its measured evaluation errors (kappa of f and of the difference form)."""
    kappa = evaluation_error(piece.expr, piece.lower, piece.upper, scale)
    kappa_d = (difference_error(terms, piece.lower, piece.upper, scale)
               if piece.rule == "exact" else (KAPPA, KAPPA))
    return dataclasses.replace(piece, kappa=kappa, kappa_difference=kappa_d)


def is_even(f: sympy.Expr) -> bool:
    """f(-z) = f(z): checked at a few points in mpmath, then confirmed by sympy."""
    mirrored = f.xreplace({Z: -Z})
    if mirrored == f:
        return True
    fn = mp_function(f)
    with mpmath.workdps(30):
        for x in ("0.37", "1.3", "2.9", "5.1"):
            a, b = fn(mpmath.mpf(x)), fn(-mpmath.mpf(x))
            if abs(a - b) > mpmath.mpf(10) ** -25 * (abs(a) + mpmath.mpf(10) ** -30):
                return False
    return bool(sympy.simplify(mirrored - f) == 0)


def even_multiplier(routine: Routine) -> Routine:
    """m(z0, z) of an even f from its multiplier on the half line: m(|z0|, |z|) times
    (|z| - |z0|) / (z - z0) (sign(z0) at z = z0). Mirror pairs z = -z0, where f(z) = f(z0)
    and every form that adds terms of opposite sign cancels, become a product with 0."""
    body, value = routine.inline({Z0: Abs(Z0), Z: Abs(Z)}, prefix="e_")
    ratio = sympy.Symbol("mirror_ratio", real=True)
    steps = [(DELTA, Z - Z0), *body,
             (ratio, Piecewise((sympy.sign(Z0), Eq(DELTA, 0)), ((Abs(Z) - Abs(Z0)) / DELTA, True)))]
    return Routine(routine.name, routine.args, tuple(steps), value * ratio,
                   routine.precision_constants, routine.doc)


def _slope_scale(derivative: Routine, kinks: Sequence[Kink]) -> float:
    grid = np.linspace(-SCALE_RANGE, SCALE_RANGE, 60001)
    from pbxc.symbolic.evaluate import run_routine
    values = np.abs(run_routine(derivative, [grid]))
    scale = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
    for k in kinks:
        if abs(_as_float(k.point)) <= SCALE_RANGE:
            scale = max(scale, abs(_as_float(k.left)), abs(_as_float(k.right)))
    return scale if scale > 0 else 1.0


def _branches(pieces: Sequence[PieceCalculus], kinks: Sequence[Kink], convention: str
              ) -> tuple[Branch, ...]:
    out: list[Branch] = []
    for k in kinks:
        out.append(Branch("kink", f"z0 = z = {k.point}",
                          f"f'({k.point}) by the '{convention}' convention = "
                          f"{k.slope(convention)}"))
    multi = len(pieces) > 1
    for j, p in enumerate(pieces):
        where = f"z0, z in piece {j} ({p.lower}, {p.upper}); " if multi else ""
        if p.rule in ("constant", "linear"):
            out.append(Branch("slope", where.rstrip("; ") or "every pair", f"m = {p.df}"))
            continue
        for patch in p.patches:
            out.append(Branch(
                "patch", f"{where}|z0 - c|, |z - c| <= {patch.radius:.4g}, c = {patch.center!r}",
                f"Taylor series about c (critical point {patch.critical_point:.17g}), degree "
                f"{patch.degree}, Clenshaw's recurrence in s = u0 + u, p = u0 u, double-word"))
        out.append(Branch(
            "secant", f"{where}z != z0 and kS (|f(z)| + |f(z0)|) / |f(z) - f(z0)| <= kD "
            f"sum|terms| / |sum terms| of the difference form (the two error bounds); kS = "
            f"{p.kappa[0]:.3g}, kD = {p.kappa_difference[0]:.3g} (float64), kS = "
            f"{p.kappa[1]:.3g}, kD = {p.kappa_difference[1]:.3g} (float32), measured",
            "m = (f(z) - f(z0)) / (z - z0)"))
        if p.rule == "exact":
            out.append(Branch("difference", f"{where}otherwise, and at z = z0 (where it is "
                              "the limit f'(z0))", f"m = {_compact(p.difference)}"))
        else:
            out.append(Branch("taylor", f"{where}otherwise, while the next term is within "
                              "the budget", f"Taylor series in d of order {FALLBACK_ORDER}"))
    if multi:
        out.append(Branch("crossing", "z0 and z in different pieces",
                          "m = (sum over pieces of m_piece(a, b) (b - a) + jumps) / |z - z0|, "
                          "a, b = [min, max](z0, z) clipped to the piece"))
    return tuple(out)


def _compact(expr: sympy.Expr | None) -> str:
    """The difference form for reports, with Phi's Hermite series shown as T(z0 d, d**2)."""
    if expr is None:
        return ""
    series = sympy.Function("T")

    def shorten(e: sympy.Expr) -> sympy.Expr:
        if isinstance(e, sympy.Piecewise) and e.has(sympy.Abs(DELTA)) and len(e.args) == 3:
            value, cond = e.args[0]
            gauss = [g for g in value.atoms(sympy.Function) if type(g).__name__ == "Gauss"]
            if gauss:
                a0 = gauss[0].args[0]
                near = gauss[0] * series(a0 * DELTA, DELTA**2) / sympy.sqrt(2 * sympy.pi)
                return sympy.Piecewise((near, cond), *e.args[1:])
        return e

    return sympy.sstr(expr.replace(lambda e: isinstance(e, sympy.Piecewise), shorten))


def derive_calculus(f: sympy.Expr, convention: str = DEFAULT_CONVENTION) -> Calculus:
    """Everything about f(z); see the module docstring."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown kink convention '{convention}'; one of {CONVENTIONS}")
    from pbxc.symbolic.pieces import PieceError
    try:
        raw_pieces, breakpoints = decompose(f)
    except PieceError as exc:
        raise DerivationError(str(exc)) from None
    built = [_piece(p.lower, p.upper, p.expr) for p in raw_pieces]
    pieces = [p for p, _ in built]
    kinks = _kinks(pieces, breakpoints)
    f_stable = stabilize(f)
    value = Routine("f", (Z,), (), f_stable)

    even = len(pieces) == 1 and pieces[0].rule in ("exact", "taylor") and is_even(f)

    def routines(ps: Sequence[PieceCalculus]) -> tuple[Routine, Routine, Routine]:
        if len(ps) == 1:
            steps, df_value = piece_derivative(ps[0], 0)
            multiplier = piece_multiplier(ps[0], 0)
            return (Routine("df", (Z,), tuple(steps), df_value),
                    Routine("d2f", (Z,), (), ps[0].d2f),
                    even_multiplier(multiplier) if even else multiplier)
        return _piecewise_routines(ps, breakpoints, kinks, convention)

    derivative, _, _ = routines(pieces)
    scale = _slope_scale(derivative, kinks)
    pieces = [_with_patches(p, terms, scale) if p.rule == "exact" else p
              for p, (_, terms) in zip(pieces, built)]
    pieces = [measured(p, terms, scale) if p.rule in ("exact", "taylor") else p
              for p, (_, terms) in zip(pieces, built)]
    derivative, second, multiplier = routines(pieces)
    df = derivative.expand()
    notes = tuple(n for p in pieces for n in p.notes)
    branches = _branches(pieces, kinks, convention)
    if even:
        even_branch = Branch("even", "f(-z) = f(z): every pair",
                             "m(z0, z) = m(|z0|, |z|) (|z| - |z0|) / (z - z0), sign(z0) at "
                             "z = z0; the branches below run on |z0|, |z|, where pairs near "
                             "the level set f(z) = f(z0) (the mirror pairs z = -z0) do not "
                             "cancel")
        branches = (even_branch, *branches)
    return Calculus(f, f_stable, df, second.expand(), tuple(pieces), tuple(breakpoints),
                    tuple(kinks), convention, scale, value, derivative, second, multiplier,
                    branches, notes)


__all__ = ["CONVENTIONS", "DEFAULT_CONVENTION", "Branch", "Calculus", "DerivationError", "Kink",
           "PieceCalculus", "derive_calculus", "evaluate", "stabilize"]
