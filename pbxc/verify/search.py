"""Running the checks: the given samples first, then a Hypothesis search of the input domain.

A violation found by the search is shrunk by Hypothesis to a minimal counterexample and saved
as an ``.npz`` (never a pickle) that ``pbxc verify --replay FILE`` re-checks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from pbxc.errors import InputError, PbxError, PbxValidationError, SourcePos, did_you_mean
from pbxc.parse import ast
from pbxc.verify.properties import (
    PROPERTIES,
    CheckConfig,
    Context,
    Outcome,
    Property,
    Skip,
    default_tol,
)

Array = np.ndarray


# ---------------------------------------------------------------- the plan


@dataclass
class Domain:
    """Per-element bounds of one input, and where they come from."""

    low: Array
    high: Array
    source: str


@dataclass
class Plan:
    checks: list[CheckConfig]
    domains: dict[str, Domain]
    examples: int = 100
    seed: int = 0


def _setting_value(value: Any) -> Any:
    if isinstance(value, ast.NumberLit):
        return value.value
    if isinstance(value, ast.Ref):
        return value.name
    if isinstance(value, (ast.StrLit, ast.BoolLit)):
        return value.value
    return value  # pragma: no cover


def config_for(name: str, dtype: Any, given: Mapping[str, Any] | None = None,
               pos: SourcePos | None = None, setting_pos: Mapping[str, SourcePos] | None = None
               ) -> CheckConfig:
    """A property's configuration: defaults, overridden by ``given`` (with ``tol``)."""
    prop = PROPERTIES.get(name)
    if prop is None:
        raise PbxValidationError(f"unknown property '{name}'" + did_you_mean(name, PROPERTIES),
                                 pos) if pos else InputError(
            f"unknown property '{name}'" + did_you_mean(name, PROPERTIES)
            + f"; properties: {', '.join(PROPERTIES)}")
    settings = dict(prop.settings)
    tol = default_tol(prop, dtype)
    for key, value in (given or {}).items():
        where = (setting_pos or {}).get(key, pos)
        if key == "tol":
            if not isinstance(value, (int, float)) or not value >= 0:
                raise PbxValidationError(f"'tol' of {name} must be a number >= 0", where)
            tol = float(value)
        elif key not in settings:
            known = ["tol", *settings]
            raise PbxValidationError(f"{name} has no setting '{key}'" + did_you_mean(key, known)
                                     + f"; settings: {', '.join(known)}", where)
        else:
            settings[key] = value
    return CheckConfig(name, tol, settings, pos)


def _data_domain(mean: Array, std: Array, k: float, source: str) -> Domain:
    return Domain(mean - k * std, mean + k * std, source)


def plan_from_model(model: Any, properties: Sequence[str] = (), data: dict[str, Array] | None
                    = None, base_dir: Path = Path()) -> Plan:
    """The checks and domains of the model's ``verify`` blocks; ``properties`` (command line)
    replaces the block's list; without either, every property with its defaults."""
    checks: list[CheckConfig] = []
    domains: dict[str, Domain] = {}
    examples, seed_value = 100, 0
    for block in model.graph.verify_blocks:
        for stmt in block.statements:
            if isinstance(stmt, ast.VerifyCheck):
                given_settings = {s.name: _setting_value(s.value) for s in stmt.settings}
                if stmt.name == "search":
                    examples = int(given_settings.get("examples", examples))
                    seed_value = int(given_settings.get("seed", seed_value))
                    continue
                checks.append(config_for(stmt.name, model.dtype, given_settings, stmt.pos,
                                         {s.name: s.pos for s in stmt.settings}))
            elif isinstance(stmt, ast.DomainBox):
                shape = model.input_shapes[stmt.input]
                domains[stmt.input] = Domain(np.full(shape, stmt.low), np.full(shape, stmt.high),
                                             f"[{stmt.low:g}, {stmt.high:g}]")
            else:
                path = base_dir / stmt.path.value
                arr = _load_data(path, stmt.key.value if stmt.key else None, stmt.input,
                                 stmt.path.pos)
                shape = model.input_shapes[stmt.input]
                if arr.shape[1:] != shape:
                    raise PbxValidationError(f"data in '{path}' has samples of shape "
                                             f"{list(arr.shape[1:])}; input '{stmt.input}' is "
                                             f"{list(shape)}", stmt.path.pos)
                domains[stmt.input] = _data_domain(arr.mean(axis=0), arr.std(axis=0), stmt.k,
                                                   f"within {stmt.k:g} std of {stmt.path.value}")
    if properties:
        declared = {c.name: c for c in checks}
        checks = [declared.get(n) or config_for(n, model.dtype) for n in properties]
    elif not checks:
        checks = [config_for(n, model.dtype) for n in PROPERTIES]
    for name, shape in model.input_shapes.items():
        if name in domains:
            continue
        if data is not None and name in data:
            domains[name] = _data_domain(data[name].mean(axis=0), data[name].std(axis=0), 3.0,
                                         "within 3 std of the data (default)")
        else:
            domains[name] = Domain(np.full(shape, -1.0), np.full(shape, 1.0),
                                   "[-1, 1] (default: no domain declared)")
    return Plan(checks, domains, examples, seed_value)


def _load_data(path: Path, key: str | None, name: str, pos: SourcePos | None = None) -> Array:
    from pbxc.weights.arrays import ArrayFileError, read_array_file

    if not path.is_file():
        raise InputError(f"data file not found: '{path}'", pos)
    try:  # sizes checked before reading, only the member used (specs/security_inputs.md)
        loaded = read_array_file(path, key, prefer=name)
    except ArrayFileError as err:
        raise InputError(f"cannot read '{path}': {err} (with key \"K\")", pos) from None
    except OSError as err:
        raise InputError(f"cannot read '{path}': {err}", pos) from None
    if loaded.dtype.kind not in "fiub":
        raise InputError(f"'{path}' holds {loaded.dtype} values; expected real numbers", pos)
    return np.asarray(loaded, dtype=np.float64)


# ---------------------------------------------------------------- results


@dataclass
class Counterexample:
    inputs: dict[str, Array]          # (1, *shape) each
    outcome: Outcome
    origin: str                       # "sample 12", "search (shrunk)", "replay"
    file: str | None = None


@dataclass
class PropertyResult:
    config: CheckConfig
    status: str                       # "holds", "violated", "skipped", "error"
    worst: float | None = None        # the worst measured value over everything checked
    samples: int = 0
    searched: int = 0
    reason: str = ""
    counterexample: Counterexample | None = None
    seconds: float = 0.0


class _Violation(Exception):
    def __init__(self, inputs: dict[str, Array], outcome: Outcome) -> None:
        super().__init__(f"measured {outcome.measured!r}")
        self.inputs = inputs
        self.outcome = outcome


# ---------------------------------------------------------------- strategies


def input_strategy(model: Any, domains: Mapping[str, Domain], data: dict[str, Array] | None
                   ) -> st.SearchStrategy[dict[str, Array]]:
    """Inputs in the domain: anywhere in the box, near a data sample, or near the low corner
    of the box by a small power-of-ten step (where DFD's differences are tiny)."""

    @st.composite
    def draw(drawn: st.DrawFn) -> dict[str, Array]:
        out: dict[str, Array] = {}
        mode = drawn(st.sampled_from(["box", "near_data", "near_corner"]
                                     if data else ["box", "near_corner"]))
        for name, dom in domains.items():
            low, high = dom.low.ravel(), dom.high.ravel()
            n = low.size
            if mode == "near_data" and data is not None and name in data:
                base = data[name][drawn(st.integers(0, len(data[name]) - 1))].ravel().copy()
                for i in drawn(st.lists(st.integers(0, n - 1), max_size=min(n, 8))):
                    base[i] = drawn(st.floats(float(low[i]), float(high[i]))) if high[i] > low[
                        i] else low[i]
            elif mode == "near_corner":
                k = drawn(st.integers(1, 15))
                unit = drawn(st.lists(st.floats(0, 1), min_size=n, max_size=n))
                base = low + (high - low) * np.asarray(unit) * 10.0 ** -k
            else:
                base = np.array([drawn(st.floats(float(lo), float(hi))) if hi > lo else lo
                                 for lo, hi in zip(low, high)], dtype=np.float64)
            out[name] = np.clip(base, low, high).reshape(1, *dom.low.shape)
        return out

    return draw()


# ---------------------------------------------------------------- running


def _measure(prop: Property, ctx: Context, cfg: CheckConfig, inputs: dict[str, Array]
             ) -> list[Outcome]:
    try:
        return prop.check(ctx, ctx.model.prepare_inputs(inputs), cfg)
    except Skip:
        raise
    except (PbxError, FloatingPointError, ValueError, ZeroDivisionError) as err:
        message = err.message if isinstance(err, PbxError) else str(err)
        batch = len(next(iter(inputs.values())))
        return [Outcome(math.nan, (), f"raised {type(err).__name__}: {message}")] * batch


def run_property(ctx: Context, cfg: CheckConfig, samples: dict[str, Array] | None,
                 plan: Plan, progress: Callable[[int], None] | None = None,
                 chunk: int = 64) -> PropertyResult:
    prop = PROPERTIES[cfg.name]
    result = PropertyResult(cfg, "holds")
    started = time.perf_counter()
    worst = None

    def note(outcome: Outcome) -> None:
        nonlocal worst
        v = outcome.measured
        if worst is None or (v < worst if prop.lower_is_violation else not v <= worst):
            worst = v

    try:
        # 1. the given samples
        if samples is not None:
            n = len(next(iter(samples.values())))
            if prop.sample_cap is not None:
                n = min(n, prop.sample_cap)
            for start in range(0, n, chunk):
                part = {k: v[start:min(start + chunk, n)] for k, v in samples.items()}
                for i, outcome in enumerate(_measure(prop, ctx, cfg, part)):
                    note(outcome)
                    if not prop.holds(outcome.measured, cfg.tol) and (
                            result.counterexample is None or _worse(
                                prop, outcome, result.counterexample.outcome)):
                        idx = start + i
                        result.counterexample = Counterexample(
                            {k: v[idx:idx + 1] for k, v in samples.items()}, outcome,
                            f"sample {idx}")
                result.samples += len(next(iter(part.values())))
                if progress:
                    progress(len(next(iter(part.values()))))
        # 2. the search (only when the samples hold)
        budget = plan.examples if prop.search_cap is None else min(plan.examples,
                                                                   prop.search_cap)
        if result.counterexample is None and budget > 0:
            result.searched, found = _search(prop, ctx, cfg, plan, budget, note, progress)
            if found is not None:
                result.counterexample = found
    except Skip as skip:
        result.status, result.reason = "skipped", str(skip)
    result.worst = worst
    if result.counterexample is not None:
        result.status = "violated"
    result.seconds = time.perf_counter() - started
    return result


def _worse(prop: Property, a: Outcome, b: Outcome) -> bool:
    if math.isnan(a.measured):
        return not math.isnan(b.measured)
    return a.measured < b.measured if prop.lower_is_violation else a.measured > b.measured


def _search(prop: Property, ctx: Context, cfg: CheckConfig, plan: Plan, budget: int,
            note: Callable[[Outcome], None], progress: Callable[[int], None] | None
            ) -> tuple[int, Counterexample | None]:
    strategy = input_strategy(ctx.model, plan.domains, ctx.data)
    count = 0
    last: list[_Violation] = []

    @seed(plan.seed)
    @settings(max_examples=budget, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def probe(inputs: dict[str, Array]) -> None:
        nonlocal count
        count += 1
        if progress and count <= budget:
            progress(1)
        outcome = _measure(prop, ctx, cfg, inputs)[0]
        note(outcome)
        if not prop.holds(outcome.measured, cfg.tol):
            violation = _Violation(inputs, outcome)
            last.append(violation)
            raise violation

    try:
        probe()
    except _Violation as v:
        return min(count, budget), Counterexample(v.inputs, v.outcome, "search (shrunk)")
    except HypothesisException:  # e.g. the strategy could not satisfy its assumptions
        pass
    return min(count, budget), None


# ---------------------------------------------------------------- counterexample files


def save_counterexample(path: Path, model_path: str, cfg: CheckConfig, cx: Counterexample
                        ) -> None:
    arrays: dict[str, Array] = {
        "format": np.array("pbxc-verify-counterexample-1"),
        "model": np.array(str(model_path)),
        "property": np.array(cfg.name),
        "tol": np.array(cfg.tol),
        "settings": np.array(json.dumps(cfg.settings, sort_keys=True)),
        "measured": np.array(cx.outcome.measured),
        "nodes": np.array(json.dumps(list(cx.outcome.nodes))),
        "origin": np.array(cx.origin),
    }
    for name, value in cx.inputs.items():
        arrays[f"input__{name}"] = np.asarray(value)
    for name, value in cx.outcome.arrays.items():
        arrays[f"extra__{name}"] = np.asarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


@dataclass
class Replay:
    model_path: str
    config: CheckConfig
    inputs: dict[str, Array]
    recorded: float
    extras: dict[str, Array] = field(default_factory=dict)


def load_counterexample(path: Path, dtype: Any = "float64") -> Replay:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read counterexample '{path}': {err}") from None
    with data:
        files = set(data.files)
        if "format" not in files or str(data["format"]) != "pbxc-verify-counterexample-1":
            raise InputError(f"'{path}' is not a pbxc verify counterexample")
        name = str(data["property"])
        settings = json.loads(str(data["settings"]))
        given_settings = {k: v for k, v in settings.items() if k in PROPERTIES[name].settings}
        cfg = config_for(name, dtype, {**given_settings, "tol": float(data["tol"])})
        inputs = {f[len("input__"):]: np.asarray(data[f]) for f in files
                  if f.startswith("input__")}
        extras = {f[len("extra__"):]: np.asarray(data[f]) for f in files
                  if f.startswith("extra__")}
        return Replay(str(data["model"]), cfg, inputs, float(data["measured"]), extras)
