"""Split an activation into smooth pieces on intervals, and find its breakpoints.

Every non-smooth construct (``Piecewise`` from ``where``/``max``/``min``/``heaviside``, ``Abs``,
``sign``) is rewritten as a ``Piecewise``, folded to the top, and sympy's set solver turns each
branch condition into a set of real z. The real line is then cut at every set endpoint into
open intervals and boundary points; adjacent intervals with the same expression are merged.

A boundary point belongs to exactly one of: the piece on its left, the piece on its right, or
neither (a *point piece*, as ``Abs`` and ``sign`` produce: |x| is written ``x if x > 0, -x if
x < 0, 0 if x == 0``). Which one is the point's *owner*: the expression that the activation,
as written, evaluates there, and the default derivative convention at a kink.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy
from sympy import Piecewise

from pbxc.symbolic.activations import Z


class PieceError(Exception):
    """The conditions of a piecewise activation could not be solved for z."""


@dataclass(frozen=True)
class Piece:
    """``expr`` is smooth on the open interval (lower, upper); either end may be infinite."""

    lower: sympy.Expr
    upper: sympy.Expr
    expr: sympy.Expr


@dataclass(frozen=True)
class Breakpoint:
    """A boundary between piece ``index - 1`` (left) and piece ``index`` (right)."""

    index: int
    point: sympy.Expr
    owner: str             # "left", "right" or "point"
    point_expr: sympy.Expr  # the expression evaluated at the point


def _abs_piecewise(a: sympy.Expr) -> sympy.Expr:
    return Piecewise((a, a > 0), (-a, a < 0), (0, True))


def _sign_piecewise(a: sympy.Expr) -> sympy.Expr:
    return Piecewise((1, a > 0), (-1, a < 0), (0, True))


def _max_piecewise(*args: sympy.Expr) -> sympy.Expr:
    out = args[0]
    for b in args[1:]:
        out = Piecewise((out, out >= b), (b, True))
    return out


def _min_piecewise(*args: sympy.Expr) -> sympy.Expr:
    out = args[0]
    for b in args[1:]:
        out = Piecewise((out, out <= b), (b, True))
    return out


def _heaviside_piecewise(a: sympy.Expr, h0: sympy.Expr = sympy.S.Half) -> sympy.Expr:
    return Piecewise((1, a > 0), (0, a < 0), (h0, True))


def _as_piecewise(expr: sympy.Expr) -> sympy.Expr:
    out = expr.replace(sympy.Abs, _abs_piecewise)
    out = out.replace(sympy.sign, _sign_piecewise)
    out = out.replace(sympy.Max, _max_piecewise)
    out = out.replace(sympy.Min, _min_piecewise)
    out = out.replace(sympy.Heaviside, _heaviside_piecewise)
    return sympy.piecewise_fold(out)


def _set_parts(s: sympy.Set) -> list[sympy.Set]:
    if isinstance(s, sympy.Union):
        return [p for a in s.args for p in _set_parts(a)]
    if isinstance(s, sympy.FiniteSet):
        return [sympy.FiniteSet(a) for a in s.args]
    return [s]


def _endpoints(s: sympy.Set) -> set[sympy.Expr]:
    points: set[sympy.Expr] = set()
    for part in _set_parts(s):
        if isinstance(part, sympy.Interval):
            points |= {p for p in (part.start, part.end) if p.is_finite}
        elif isinstance(part, sympy.FiniteSet):
            points |= set(part.args)
        elif part is sympy.S.EmptySet:
            continue
        else:
            raise PieceError(f"cannot split the real line at {part}")
    return points


def _containing(pairs: list[tuple[sympy.Expr, sympy.Set]], x: sympy.Expr) -> sympy.Expr:
    for expr, s in pairs:
        if s.contains(x) is sympy.true:
            return expr
    raise PieceError(f"no branch of the activation covers z = {x}")


def decompose(expr: sympy.Expr) -> tuple[tuple[Piece, ...], tuple[Breakpoint, ...]]:
    """The smooth pieces of ``expr`` (left to right) and the breakpoints between them."""
    folded = _as_piecewise(expr)
    if not isinstance(folded, Piecewise):
        return (Piece(sympy.S.NegativeInfinity, sympy.S.Infinity, folded),), ()
    try:
        pairs = [(e, s) for e, s in folded.as_expr_set_pairs(sympy.Interval(-sympy.oo, sympy.oo))
                 if s is not sympy.S.EmptySet]
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise PieceError(f"cannot solve the branch conditions for z: {exc}") from None
    points: set[sympy.Expr] = set()
    for _, s in pairs:
        points |= _endpoints(s)
    for p in points:
        if not (p.is_real and p.is_number):
            raise PieceError(f"a branch boundary is not a real number: {p}")
    cuts = sorted(points, key=lambda p: float(p))
    bounds = [sympy.S.NegativeInfinity, *cuts, sympy.S.Infinity]
    interval_exprs = []
    for lo, hi in itertools.pairwise(bounds):
        if lo.is_infinite and hi.is_infinite:
            mid = sympy.S.Zero
        elif lo.is_infinite:
            mid = hi - 1
        elif hi.is_infinite:
            mid = lo + 1
        else:
            mid = (lo + hi) / 2
        interval_exprs.append(_containing(pairs, mid))
    point_exprs = [_containing(pairs, c) for c in cuts]

    # merge neighbours that are the same expression through their common point
    pieces: list[Piece] = []
    breaks: list[tuple[sympy.Expr, sympy.Expr]] = []
    lower = bounds[0]
    current = interval_exprs[0]
    for k, c in enumerate(cuts):
        right = interval_exprs[k + 1]
        at = point_exprs[k]
        if _same(right, current) and _same(at, current):
            continue
        pieces.append(Piece(lower, c, current))
        breaks.append((c, at))
        lower, current = c, right
    pieces.append(Piece(lower, bounds[-1], current))

    breakpoints = []
    for k, (c, at) in enumerate(breaks):
        left, right = pieces[k].expr, pieces[k + 1].expr
        if _same(at, left):
            owner = "left"
        elif _same(at, right):
            owner = "right"
        else:
            owner = "point"
        breakpoints.append(Breakpoint(k + 1, c, owner, at))
    return tuple(pieces), tuple(breakpoints)


def one_sided(expr: sympy.Expr, point: sympy.Expr) -> sympy.Expr:
    """``expr`` at ``point`` (a limit where direct substitution is undefined)."""
    value = expr.subs(Z, point)
    if value.has(sympy.nan, sympy.zoo):
        value = sympy.limit(expr, Z, point)
    return value


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return bool(a == b or sympy.expand(a - b) == 0)
