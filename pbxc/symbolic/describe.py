"""``describe_activation``: a readable report of an activation's derived calculus.

f, f', f'' (stable forms), the kinks with their one-sided derivatives and the convention's
value, the multiplier's branches with their switch points, and the accuracy measured on the
grid in float64 and float32 (the issue-3 bar). The CLI prints it for ``pbxc activation NAME``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import sympy

from pbxc.parse import ast
from pbxc.symbolic.accuracy import (
    Measure,
    measure_derivative,
    measure_multiplier,
    z0_grid,
)
from pbxc.symbolic.activations import ActivationKey, Z
from pbxc.symbolic.calculus import DEFAULT_CONVENTION
from pbxc.symbolic.derive import ActivationCalculus, derive
from pbxc.symbolic.difference import DELTA, Z0
from pbxc.symbolic.evaluate import evaluate, run_routine
from pbxc.symbolic.precision import BAR, FLOOR
from pbxc.symbolic.routine import bind

#: z0 step of the accuracy grid in the report (the bench uses 0.1)
REPORT_STEP = 0.5


def _text(expr: sympy.Expr, width: int = 400) -> str:
    out = sympy.sstr(expr, full_prec=False)
    return out if len(out) <= width else out[: width - 20] + f" ... ({len(out)} chars)"


def secant_switch_points(calc: ActivationCalculus, dtype: str = "float64",
                         points: tuple[float, ...] = (-5.0, -1.0, 0.0, 1.0, 5.0)
                         ) -> list[tuple[float, float | None]]:
    """For each z0: the smallest d = 10^(k/4) > 0 from which the routine takes the secant.

    The switch is decided per element by comparing the two forms' error bounds (kS times the
    secant's condition number against kD times the difference form's); this samples where it
    falls, for activations of one smooth piece. Inside a Taylor patch neither is used.
    """
    pieces = calc.pieces
    if len(pieces) != 1 or pieces[0].difference is None:
        return []
    piece = pieces[0]
    dt = np.dtype(dtype)
    single = dt == np.float32
    kappa_s, kappa_d = piece.kappa[single], piece.kappa_difference[single]
    terms = list(piece.difference.args) if isinstance(piece.difference, sympy.Add) else [
        piece.difference]
    steps = 10.0 ** (np.arange(-64, 9) / 4)
    out: list[tuple[float, float | None]] = []
    for z0 in points:
        a = np.full(steps.shape, z0, dtype=dt)
        b = (a.astype(np.float64) + steps).astype(dt)
        env = {Z0: a, Z: b, DELTA: b - a}
        values = [evaluate(t, env, dt).astype(np.float64) for t in terms]
        total = np.abs(np.sum(values, axis=0))
        size = np.sum(np.abs(values), axis=0)
        with np.errstate(all="ignore"):
            f0 = run_routine(calc.value, [a], dt).astype(np.float64)
            f1 = run_routine(calc.value, [b], dt).astype(np.float64)
            secant = (kappa_s * (np.abs(f1) + np.abs(f0)) * total
                      <= kappa_d * size * np.abs(f1 - f0)) & (
                np.abs(f1 - f0) >= np.finfo(dt).tiny)
        inside = np.zeros(steps.shape, dtype=bool)
        for patch in piece.patches:
            inside |= (np.abs(a - patch.center) <= patch.radius) & (
                np.abs(b - patch.center) <= patch.radius)
        secant &= ~inside
        first = int(np.argmax(secant)) if secant.any() else None
        out.append((z0, float(steps[first]) if first is not None else None))
    return out


def measure(calc: ActivationCalculus, step: float = REPORT_STEP
            ) -> dict[str, tuple[Measure, Measure]]:
    """(multiplier, derivative) measures per dtype on the grid with z0 spaced ``step``."""
    ref = calc.reference()
    z0 = z0_grid(step)
    kinks = tuple(float(k.point) for k in calc.kinks)
    out = {}
    for name in ("float64", "float32"):
        dt = np.dtype(name)
        m = measure_multiplier(bind(calc.multiplier, dt), ref, calc.slope_scale, dt, z0,
                               value=bind(calc.value, dt))
        d = measure_derivative(bind(calc.derivative, dt), ref, calc.slope_scale, dt,
                               z0_grid(step / 4), kinks)
        out[name] = (m, d)
    return out


def describe_activation(name_or_key: str | ActivationKey,
                        definitions: Mapping[str, ast.ActivationDef] | None = None,
                        convention: str = DEFAULT_CONVENTION, step: float = REPORT_STEP,
                        accuracy: bool = True) -> str:
    """A readable report of everything pbxc derives for one activation."""
    calc = derive(name_or_key, definitions, convention)
    key = calc.key
    lines = [f"activation {key.label}" + (f"  (defined at {key.pos})" if key.pos else "")]
    lines.append(f"  f(z)   = {_text(calc.f)}")
    if calc.f_stable != calc.f:
        lines.append(f"  stable = {_text(calc.f_stable)}")
    pieces = calc.pieces
    if len(pieces) == 1:
        lines.append(f"  f'(z)  = {_text(pieces[0].df)}")
        lines.append(f"  f''(z) = {_text(pieces[0].d2f)}")
    else:
        lines.append("  pieces:")
        for p in pieces:
            lines.append(f"    on ({p.lower}, {p.upper}):  f = {_text(p.expr)},  "
                         f"f' = {_text(p.df)},  f'' = {_text(p.d2f)}")
    if calc.kinks:
        lines.append(f"  kinks (convention '{calc.convention}'):")
        for k in calc.kinks:
            jump = f", jump {k.jump}" if k.jump != 0 else ""
            lines.append(f"    z = {k.point}: f'(z-) = {k.left}, f'(z+) = {k.right}, "
                         f"owner {k.owner}; f'({k.point}) := {k.slope(calc.convention)}{jump}")
    else:
        lines.append("  kinks: none (f is differentiable everywhere)")
    lines.append("  multiplier m(z0, z) = (f(z) - f(z0)) / (z - z0), m(z0, z0) = f'(z0) "
                 "(seed 004, eq. 16-17); branches, first match wins:")
    for b in calc.branches:
        lines.append(f"    [{b.name}] where {b.condition}")
        lines.append(f"        {b.formula if len(b.formula) <= 300 else b.formula[:280] + ' ...'}")
    for name in ("float64", "float32"):
        switches = secant_switch_points(calc, name)
        if not switches:
            continue
        shown = ", ".join(f"z0={z0:g}: d >= {d:.2g}" if d is not None else
                          f"z0={z0:g}: never" for z0, d in switches)
        lines.append(f"  secant from ({name}, d > 0; the difference form below): {shown}")
    if accuracy:
        lines.append(f"  accuracy on the grid (z0 = {step:g} * i on [-30, 30]; z = fl(z0 +- "
                     f"10^k), k = -300..2, and z = z0; 50-digit references; "
                     f"err = |m - ref| / (|ref| + {FLOOR:g} * s_f), s_f = "
                     f"{calc.slope_scale:.6g}):")
        for name, (m, d) in measure(calc, step).items():
            bar = BAR[np.dtype(name)]
            verdict = "meets" if m.passed and d.passed else "MISSES"
            excluded = f", {m.excluded} pairs overflow {name} and are excluded" \
                if m.excluded else ""
            lines.append(f"    {name}: multiplier {m.max_error:.2e} (worst at z0={m.worst[0]!r}, "
                         f"z={m.worst[1]!r}; {m.pairs} pairs{excluded}), f' {d.max_error:.2e}"
                         f" -- {verdict} the bar {bar:g}" if m.worst is not None else
                         f"    {name}: no pairs")
    return "\n".join(lines)
