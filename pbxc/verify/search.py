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
from pbxc.outputs import write_npz
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
    try:  # sizes checked before reading, only the member used (specs/security.md, Inputs)
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
    note: str = ""                    # what the check says about itself (backends it ran)


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
    result.note = ctx.cache.get("notes", {}).get(cfg.name, "")
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


#: the format of counterexample files written now; format 1 (no dtype) still replays
COUNTEREXAMPLE_FORMAT = "pbxc-verify-counterexample-2"
FORMATS = ("pbxc-verify-counterexample-1", COUNTEREXAMPLE_FORMAT)
#: the most a counterexample file may hold, uncompressed (checked before reading a member)
MAX_REPLAY_BYTES = 256 * 2**20
#: the longest text field (model path, settings JSON, ...)
MAX_TEXT = 65536
#: text fields: name -> required (format-1 files lack the newer ones)
_TEXT_FIELDS = {"format": True, "model": True, "property": True, "settings": True,
                "nodes": False, "origin": False, "model_name": False, "dtype": False}
_NUMBER_FIELDS = {"tol": True, "measured": False}
#: array fields by prefix: input values, the property's extra arrays, and what the check needs
#: besides the inputs (per-element scales of finite-difference steps, the data set's mean)
_ARRAY_PREFIXES = ("input__", "extra__", "scale__", "data_mean__")


def save_counterexample(path: Path, model_path: str, cfg: CheckConfig, cx: Counterexample, *,
                        model_name: str | None = None, dtype: Any = None,
                        scales: Mapping[str, Array] | None = None,
                        data_mean: Mapping[str, Array] | None = None) -> None:
    """Everything the check needs to run again as it ran: the inputs, the property with its
    tolerance and settings, the compute dtype, the finite-difference scales and the data
    set's mean (the 'mean' baseline), the model (its path and name)."""
    arrays: dict[str, Array] = {
        "format": np.array(COUNTEREXAMPLE_FORMAT),
        "model": np.array(str(Path(model_path).resolve())),
        "property": np.array(cfg.name),
        "tol": np.array(cfg.tol),
        "settings": np.array(json.dumps(cfg.settings, sort_keys=True)),
        "measured": np.array(cx.outcome.measured),
        "nodes": np.array(json.dumps(list(cx.outcome.nodes))),
        "origin": np.array(cx.origin),
    }
    if model_name is not None:
        arrays["model_name"] = np.array(str(model_name))
    if dtype is not None:
        arrays["dtype"] = np.array(np.dtype(dtype).name)
    for name, value in cx.inputs.items():
        arrays[f"input__{name}"] = np.asarray(value)
    for name, value in cx.outcome.arrays.items():
        arrays[f"extra__{name}"] = np.asarray(value)
    for name, value in (scales or {}).items():
        arrays[f"scale__{name}"] = np.asarray(value, dtype=np.float64)
    for name, value in (data_mean or {}).items():
        arrays[f"data_mean__{name}"] = np.asarray(value, dtype=np.float64)
    write_npz(path, arrays)


@dataclass
class Replay:
    model_path: str
    config: CheckConfig
    inputs: dict[str, Array]
    recorded: float
    extras: dict[str, Array] = field(default_factory=dict)
    model_name: str | None = None
    dtype: str | None = None            # None: a format-1 file (float64 was the only one)
    scales: dict[str, Array] = field(default_factory=dict)
    data_mean: dict[str, Array] = field(default_factory=dict)

    def check_model(self, model: Any, file: Path) -> None:
        """The model given for the replay must be the one the file was saved for: its name,
        and inputs of the shapes the file holds."""
        if self.model_name is not None and model.name != self.model_name:
            raise InputError(f"counterexample '{file}' was saved for model "
                             f"'{self.model_name}', not '{model.name}' ({model.graph.path})")
        expected = set(model.input_names)
        for group, arrays in (("input", self.inputs), ("scale", self.scales),
                              ("data_mean", self.data_mean)):
            if group == "input" and set(arrays) != expected:
                raise InputError(f"counterexample '{file}' holds inputs {sorted(arrays)}; model "
                                 f"'{model.name}' takes {sorted(expected)}")
            for name, value in arrays.items():
                if name not in expected:
                    raise InputError(f"counterexample '{file}': '{group}__{name}' names no "
                                     f"input of model '{model.name}'")
                shape = tuple(model.input_shapes[name])
                want = (1, *shape) if group == "input" else shape
                if value.shape != want:
                    raise InputError(f"counterexample '{file}': '{group}__{name}' has shape "
                                     f"{list(value.shape)}; model '{model.name}' needs "
                                     f"{list(want)}")


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"'{path}' is not a valid pbxc verify counterexample: {why}")


def _member_sizes(path: Path) -> dict[str, int]:
    """Each .npz member's declared uncompressed size, read from the zip directory alone."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return {info.filename.removesuffix(".npy"): info.file_size
                    for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise _bad(path, f"not an .npz archive ({err})") from None


def _text(data: Any, key: str, path: Path) -> str:
    value = data[key]
    if value.shape != () or value.dtype.kind != "U":
        raise _bad(path, f"'{key}' must be a text scalar, got {value.dtype}{list(value.shape)}")
    text = str(value)
    if len(text) > MAX_TEXT or "\x00" in text:
        raise _bad(path, f"'{key}' is longer than {MAX_TEXT} characters or holds NUL")
    return text


def _number(data: Any, key: str, path: Path) -> float:
    value = data[key]
    if value.shape != () or value.dtype.kind not in "fiu":
        raise _bad(path, f"'{key}' must be a number, got {value.dtype}{list(value.shape)}")
    return float(value)


def _json(text: str, key: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise _bad(path, f"'{key}' is not valid JSON ({type(err).__name__})") from None


def _setting(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (
        isinstance(value, str) and len(value) <= 4096)


def load_counterexample(path: Path, dtype: Any = None) -> Replay:
    """Read and validate a counterexample file against its schema (specs/verify.md): known
    fields only, each of its type, a known property with known settings, finite real input
    arrays. Anything else is an InputError naming the field; nothing in it is executed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"counterexample file not found: '{path}'")
    sizes = _member_sizes(path)
    if sum(sizes.values()) > MAX_REPLAY_BYTES:
        raise _bad(path, f"its members hold {sum(sizes.values())} bytes, over the limit of "
                   f"{MAX_REPLAY_BYTES}")
    for key in sizes:
        if key not in _TEXT_FIELDS and key not in _NUMBER_FIELDS and not (
                key.startswith(_ARRAY_PREFIXES) and key.partition("__")[2]):
            raise _bad(path, f"unknown field '{key}'")
    for key, required in {**_TEXT_FIELDS, **_NUMBER_FIELDS}.items():
        if required and key not in sizes:
            raise _bad(path, f"the field '{key}' is missing")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read counterexample '{path}': {err}") from None
    if not hasattr(data, "files"):
        raise _bad(path, "it is a single array (.npy), not an .npz of fields")
    try:
        with data:
            return _read_replay(data, sizes, path, dtype)
    except (OSError, ValueError, EOFError, KeyError) as err:
        if isinstance(err, PbxError):
            raise
        raise _bad(path, f"{type(err).__name__}: {err}") from None


def _read_replay(data: Any, sizes: Mapping[str, int], path: Path, dtype: Any) -> Replay:
    fmt = _text(data, "format", path)
    if fmt not in FORMATS:
        raise InputError(f"'{path}' is not a pbxc verify counterexample (format {fmt[:80]!r})")
    name = _text(data, "property", path)
    if name not in PROPERTIES:
        raise _bad(path, f"unknown property {name[:80]!r}; properties: {', '.join(PROPERTIES)}")
    settings = _json(_text(data, "settings", path), "settings", path)
    if not isinstance(settings, dict):
        raise _bad(path, "'settings' must be a JSON object")
    known = PROPERTIES[name].settings
    for key, value in settings.items():
        if key not in known:
            raise _bad(path, f"{name} has no setting {key[:80]!r}; settings: "
                       f"{', '.join(known) or 'none'}")
        if not _setting(value):
            raise _bad(path, f"setting '{key}' must be a number, text or true/false")
    tol = _number(data, "tol", path)
    if not (math.isfinite(tol) and tol >= 0):
        raise _bad(path, f"'tol' must be a finite number >= 0, got {tol!r}")
    stored_dtype = _text(data, "dtype", path) if "dtype" in sizes else None
    if stored_dtype is not None and stored_dtype not in ("float32", "float64"):
        raise _bad(path, f"'dtype' must be float32 or float64, got {stored_dtype[:40]!r}")
    model_name = _text(data, "model_name", path) if "model_name" in sizes else None
    if "nodes" in sizes:
        nodes = _json(_text(data, "nodes", path), "nodes", path)
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise _bad(path, "'nodes' must be a JSON list of names")
    if "origin" in sizes:
        _text(data, "origin", path)
    groups: dict[str, dict[str, Array]] = {prefix: {} for prefix in _ARRAY_PREFIXES}
    for key in sizes:
        prefix = next((p for p in _ARRAY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            continue
        value = data[key]
        numeric = "f" if prefix != "extra__" else "fiub"
        if value.dtype.kind not in numeric or value.dtype.hasobject:
            raise _bad(path, f"'{key}' must be a real {'float ' if numeric == 'f' else ''}"
                       f"array, got {value.dtype}")
        if prefix != "extra__" and not np.isfinite(value).all():
            raise _bad(path, f"'{key}' has non-finite values")
        if prefix == "input__" and (value.ndim < 1 or value.shape[0] != 1):
            raise _bad(path, f"'{key}' must hold one sample, shape [1, ...], got "
                       f"{list(value.shape)}")
        groups[prefix][key[len(prefix):]] = np.asarray(value)
    if not groups["input__"]:
        raise _bad(path, "it holds no input__ arrays")
    cfg = config_for(name, dtype or stored_dtype or "float64", {**settings, "tol": tol})
    measured = _number(data, "measured", path) if "measured" in sizes else math.nan
    return Replay(_text(data, "model", path), cfg, groups["input__"], measured,
                  groups["extra__"], model_name, stored_dtype, groups["scale__"],
                  groups["data_mean__"])
