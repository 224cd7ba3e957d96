"""The verification report: a table for people, JSON for machines, tied to .pbx lines."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from typing import Any

from pbxc.errors import source_line
from pbxc.verify.search import Plan, PropertyResult


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "none" if value > 0 else "-inf"
    return f"{value:.2e}"


def node_sources(model: Any, nodes: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for name in nodes:
        if name not in model.graph.digraph:
            continue
        pos = model.graph.node(name).pos
        out.append({"node": name, "file": pos.file, "line": pos.line, "column": pos.column,
                    "source": (source_line(pos.file, pos.line) or "").strip()})
    return out


def to_json(model: Any, plan: Plan, results: Sequence[PropertyResult]) -> dict[str, Any]:
    props = []
    for r in results:
        entry: dict[str, Any] = {
            "property": r.config.name, "status": r.status, "tol": r.config.tol,
            "settings": r.config.settings,
            "worst": None if r.worst is None or not math.isfinite(r.worst) else r.worst,
            "samples": r.samples, "searched": r.searched, "seconds": round(r.seconds, 3),
        }
        if r.config.pos is not None:
            entry["declared_at"] = str(r.config.pos)
        if r.reason:
            entry["reason"] = r.reason
        if r.note:
            entry["note"] = r.note
        cx = r.counterexample
        if cx is not None:
            entry["counterexample"] = {
                "measured": cx.outcome.measured if math.isfinite(cx.outcome.measured) else str(
                    cx.outcome.measured),
                "origin": cx.origin, "detail": cx.outcome.detail, "file": cx.file,
                "replay": replay_command(model, cx.file) if cx.file else None,
                "nodes": node_sources(model, cx.outcome.nodes),
            }
        props.append(entry)
    return {"model": model.name, "source": model.graph.path, "dtype": model.dtype.name,
            "domains": {k: d.source for k, d in plan.domains.items()},
            "examples": plan.examples, "seed": plan.seed, "properties": props,
            "holds": all(r.status != "violated" for r in results)}


def replay_command(model: Any, file: str) -> str:
    """The command that re-checks a saved counterexample, as the shell reads it."""
    return (f"pbxc verify {shlex.quote(str(model.graph.path))} --replay "
            f"{shlex.quote(str(file))}")


def to_table(model: Any, plan: Plan, results: Sequence[PropertyResult]) -> str:
    lines = [f"pbxc verify: model '{model.name}' ({model.graph.path}), {model.dtype.name}"]
    for name, dom in plan.domains.items():
        lines.append(f"  domain {name}: {dom.source}")
    header = f"  {'property':<22} {'status':<9} {'worst':>9} {'tol':>9} {'samples':>8} " \
             f"{'searched':>8}  time"
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for r in results:
        lines.append(f"  {r.config.name:<22} {r.status:<9} {_fmt(r.worst):>9} "
                     f"{r.config.tol:>9.1e} {r.samples:>8} {r.searched:>8}  {r.seconds:.1f}s")
    for r in results:
        if r.status == "skipped":
            lines.append(f"\n{r.config.name}: skipped: {r.reason}")
        if r.note:
            lines.append(f"\n{r.config.name}: {r.note}")
        cx = r.counterexample
        if cx is None:
            continue
        seen = ("" if r.worst is None or _fmt(r.worst) == _fmt(cx.outcome.measured)
                else f" (the worst seen, in the table, {_fmt(r.worst)})")
        lines.append(f"\n{r.config.name}: VIOLATED ({cx.origin}): measured "
                     f"{_fmt(cx.outcome.measured)} at the counterexample{seen}, tolerance "
                     f"{r.config.tol:.1e}")
        if r.config.pos is not None:
            lines.append(f"  declared at {r.config.pos}")
        if cx.outcome.detail:
            lines.append(f"  {cx.outcome.detail}")
        for src in node_sources(model, cx.outcome.nodes):
            lines.append(f"  node '{src['node']}' at {src['file']}:{src['line']}: "
                         f"{src['source']}")
        if cx.file:
            if cx.origin != "replay":
                lines.append(f"  counterexample saved: {cx.file}")
            lines.append(f"  replay: {replay_command(model, cx.file)}")
    violated = sum(r.status == "violated" for r in results)
    lines.append("")
    lines.append(f"{violated} propert{'y' if violated == 1 else 'ies'} violated" if violated
                 else "every property holds")
    return "\n".join(lines) + "\n"
