"""Explain a whole data set in chunks of samples: lazily on Dask, or resumably into Zarr.

Two entry points (see ``specs/dask.md``):

* :func:`explain` returns a lazy ``dask.array.Array`` of attributions, one
  ``map_blocks`` task per chunk of samples; :func:`explain_all` returns every per-sample
  array (attributions, outputs, targets, DFD deltas, LRP ledgers, ...) as a dict of them.
* :func:`to_zarr` writes a Zarr store chunk by chunk, in this process or on a
  ``distributed`` cluster: each chunk's arrays are written (Zarr writes every chunk file
  atomically), then the chunk is marked in the store's ``done`` array. A rerun skips the
  marked chunks; a rerun with another model, method or options is refused.

Every chunk runs whole batches of ``batch_size`` samples aligned to the data set (batch k
holds samples ``[k * batch_size, (k + 1) * batch_size)``), exactly the batches
``pbxc explain --batch-size`` runs in one process, so the results are bit-identical to it
whatever the chunk size (BLAS results depend on the batch's shape, not on its neighbours).

Each worker process loads and compiles a model once: :func:`cached_model` keeps models by
the SHA-256 of the model text and its weight files' bytes.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pbxc.errors import InputError, PbxError
from pbxc.graph.build import build_graph
from pbxc.graph.frontend import frontend, weight_paths
from pbxc.parse.ast import Program
from pbxc.parse.parser import parse_file, parse_text
from pbxc.pipeline import BACKENDS, _on_backend
from pbxc.runtime.dfd import resolve_baseline
from pbxc.runtime.model import Model, resolve_dtype
from pbxc.symbolic.calculus import DEFAULT_CONVENTION

if TYPE_CHECKING:
    import dask.array as da

METHODS = ("jacobian", "gradient", "input_x_gradient", "lrp", "dfd")
#: the store layout's version, in its ``pbxc`` attributes
STORE_FORMAT = 1
#: a default chunk aims at about this many bytes of attributions
CHUNK_BYTES = 32 * 2**20
#: a chunk's inputs and results in memory at most (a larger --chunk is refused)
MAX_CHUNK_BYTES = 4 * 2**30
DEFAULT_BATCH = 256

# ---------------------------------------------------------------- the model, by content


@dataclass(frozen=True)
class ModelSource:
    """How a worker finds a model (a path, or the text itself) and its content hash."""

    origin: str                 # the path, or "<string>" for text
    text: str | None            # the .pbx text when given as text
    digest: str                 # sha256 of the text and every weight file's bytes
    dtype: str
    convention: str
    backend: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.digest, self.dtype, self.convention, self.backend)


def _content_digest(text: str, graph: Any) -> str:
    """SHA-256 over the model text and, in order, each weight file's name and bytes."""
    h = hashlib.sha256()
    h.update(b"pbx\0" + text.encode("utf-8") + b"\0")
    for path, pos in weight_paths(graph):
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise PbxError(f"cannot read weight file '{path}': {err.strerror or err}",
                           pos) from None
        h.update(str(path.name).encode("utf-8") + b"\0")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _is_model_text(source: str) -> bool:
    return "\n" in source or source.lstrip().startswith("model ")


def _read_model(source: str | Path) -> tuple[str, str | None, str]:
    """(text, text-if-given-as-text, origin) of a path or of .pbx text."""
    if isinstance(source, str) and _is_model_text(source):
        return source, source, "<string>"
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), None, str(path)
    except FileNotFoundError:
        raise InputError(f"model file not found: '{path}'") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read model '{path}': {err}") from None


def _identify(text: str, given_text: str | None, origin: str,
              dtype: Any) -> tuple[Program, str, str]:
    """(program, content hash, compute dtype) without loading the weights into a model."""
    program = parse_text(text, "<string>") if given_text is not None else parse_file(origin)
    graph = build_graph(program)
    declared = {i.dtype for i in graph.inputs}
    name = resolve_dtype(dtype).name if dtype is not None else (
        "float64" if "float64" in declared else "float32")
    return program, _content_digest(text, graph), name


#: per-process models by content hash (and dtype, kink convention, backend)
_MODELS: dict[tuple[str, str, str, str], Any] = {}
#: how many times this process built a model (the tests check the cache with it)
MODEL_LOADS: list[int] = [0]


def _numpy_model(program: Program, key: tuple[str, str, str, str]) -> Model:
    numpy_key = (*key[:3], "numpy")
    found = _MODELS.get(numpy_key)
    if found is None:
        graph, store = frontend(program)
        found = _MODELS[numpy_key] = Model(graph, store, key[1], key[2])
        MODEL_LOADS[0] += 1
    return found


def model_source(model: str | Path, dtype: Any = None, convention: str = DEFAULT_CONVENTION,
                 backend: str = "numpy") -> tuple[ModelSource, Model]:
    """Describe ``model`` (a .pbx path or text) for workers, and this process's NumPy model
    of it, which checks the data and options before any work is sent."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
    text, given, origin = _read_model(model)
    program, digest, dtype_name = _identify(text, given, origin, dtype)
    source = ModelSource(origin, given, digest, dtype_name, convention, backend)
    return source, _numpy_model(program, source.key)


def cached_model(source: ModelSource) -> Any:
    """This process's model for ``source``: built on first use, checked against its hash."""
    found = _MODELS.get(source.key)
    if found is not None:
        return found
    text, given, origin = _read_model(source.text if source.text is not None
                                      else source.origin)
    program, digest, _ = _identify(text, given, origin, source.dtype)
    if digest != source.digest:
        raise InputError(f"model '{origin}' changed since the run started (content hash "
                         f"{digest[:12]}, expected {source.digest[:12]})")
    on_backend = _on_backend(_numpy_model(program, source.key), source.backend)
    _MODELS[source.key] = on_backend
    return on_backend


# ---------------------------------------------------------------- reading samples


class Rows(abc.ABC):
    """Samples of a data set read by row ranges; pickles as its description, never its data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    description: dict[str, Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` as one NumPy array."""

    def __getitem__(self, index: Any) -> np.ndarray:
        """Dask's array protocol: ``index`` is a tuple of slices, sample axis first."""
        if not isinstance(index, tuple):
            index = (index,)
        first = index[0] if index else slice(None)
        if not isinstance(first, slice) or first.step not in (None, 1):
            return np.asarray(self.read(0, len(self)))[index]
        start, stop, _ = first.indices(len(self))
        rest: tuple[Any, ...] = (slice(None), *index[1:])
        return self.read(start, max(start, stop))[rest]


class MemoryRows(Rows):
    """An array already in memory (slices are sent with each task)."""

    def __init__(self, array: np.ndarray, label: str = "<array>") -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.description = {"source": label, "sha256": _array_digest(array)}

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


class MappedRows(Rows):
    """A .npy file, or an uncompressed .npz member, memory-mapped in each process."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                 fortran: bool, description: dict[str, Any]) -> None:
        self.path, self.offset, self.fortran = path, offset, fortran
        self.shape, self.dtype, self.description = shape, dtype, description
        self._map: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                                      shape=self.shape, order="F" if self.fortran else "C")
            except (OSError, ValueError) as err:
                raise InputError(f"cannot read '{self.path}': {err}") from None
        return np.array(self._map[start:stop])


class NpzMemberRows(Rows):
    """A compressed .npz member: read whole once per process (zip cannot seek into it)."""

    _cache: dict[tuple[str, str, float], np.ndarray] = {}  # noqa: RUF012  (per process)

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 description: dict[str, Any]) -> None:
        self.path, self.key = path, key
        self.shape, self.dtype, self.description = shape, dtype, description

    def read(self, start: int, stop: int) -> np.ndarray:
        stamp = (str(self.path), self.key, self.path.stat().st_mtime)
        if stamp not in self._cache:
            with np.load(self.path, allow_pickle=False) as archive:
                self._cache.clear()
                self._cache[stamp] = archive[self.key]
        return np.array(self._cache[stamp][start:stop])


class ZarrRows(Rows):
    """A Zarr array (a store path, and the array's path inside it)."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype,
                 description: dict[str, Any]) -> None:
        self.path, self.name = path, name
        self.shape, self.dtype, self.description = shape, dtype, description
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        import zarr

        if self._array is None:
            self._array = zarr.open_array(self.path, path=self.name, mode="r")
        return np.asarray(self._array[start:stop])


class DaskRows(Rows):
    """A dask array: each chunk is computed where it is explained."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.description = {"source": "<dask array>", "name": str(array.name)}

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop].compute())


def _array_digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return h.hexdigest()


def _check_real(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.hasobject or dtype.kind not in "fiub":
        raise InputError(f"{where} holds {dtype}; expected real numbers (pickled objects are "
                         "refused)")
    return dtype


def _npy_header(fh: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read {where}: {err}") from None
    return tuple(shape), bool(fortran), _check_real(np.dtype(dtype), where), fh.tell()


def _open_npy(path: Path) -> Rows:
    with open(path, "rb") as fh:
        shape, fortran, dtype, offset = _npy_header(fh, f"'{path}'")
    return MappedRows(path, offset, shape, dtype, fortran,
                      {"source": str(path.resolve()), "shape": list(shape)})


def _open_npz(path: Path, key: str | None, names: tuple[str, ...]) -> Rows:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read '{path}': {err}") from None
    with archive:
        keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key is None:
            picks = [n for n in names if n in keys] if len(names) == 1 else []
            key = picks[0] if picks else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InputError(f"'{path}' has keys {keys}; choose one with --key (the model's "
                                 f"inputs are {list(names)})")
        if key not in keys:
            raise InputError(f"'{path}' has no key '{key}'; it has {keys}")
        info = archive.getinfo(key + ".npy")
        where = f"key '{key}' of '{path}'"
        description = {"source": str(path.resolve()), "key": key}
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as fh:
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise InputError(f"cannot read {where}: bad zip member header")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                fh.seek(info.header_offset + 30 + name_len + extra_len)
                shape, fortran, dtype, offset = _npy_header(fh, where)
            return MappedRows(path, offset, shape, dtype, fortran,
                              {**description, "shape": list(shape)})
        with archive.open(info) as member:
            shape, fortran, dtype, _ = _npy_header(member, where)
        return NpzMemberRows(path, key, shape, dtype, {**description, "shape": list(shape)})


def _open_zarr(path: Path, key: str | None) -> Rows:
    import zarr

    node: Any
    try:
        node = zarr.open(path, mode="r")
    except Exception as err:  # zarr raises several kinds for a folder that is no store
        raise InputError(f"cannot read '{path}' as a Zarr store: {err}") from None
    name = ""
    if isinstance(node, zarr.Group):
        arrays = sorted(n for n, _ in node.arrays())
        if key is None:
            if len(arrays) != 1:
                raise InputError(f"Zarr group '{path}' holds arrays {arrays}; choose one with "
                                 "--key")
            key = arrays[0]
        if key not in arrays:
            raise InputError(f"Zarr group '{path}' has no array '{key}'; it has {arrays}")
        node = node[key]
        name = key
    elif key is not None:
        raise InputError(f"--key applies to Zarr groups; '{path}' is a single array")
    dtype = _check_real(np.dtype(node.dtype), f"Zarr array '{path}'")
    shape = tuple(int(s) for s in node.shape)
    return ZarrRows(path, name, shape, dtype,
                    {"source": str(path.resolve()), "key": name, "shape": list(shape)})


def is_zarr_path(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and ((p / "zarr.json").is_file()
                                                  or (p / ".zgroup").is_file()
                                                  or (p / ".zarray").is_file()))


def open_rows(data: Any, key: str | None = None, names: tuple[str, ...] = ()) -> Rows:
    """Samples from a path (.npy, .npz, Zarr), a NumPy, Zarr or dask array."""
    if isinstance(data, Rows):
        return data
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise InputError(f"input file not found: '{path}'")
        if is_zarr_path(path):
            return _open_zarr(path, key)
        if key is not None and path.suffix != ".npz":
            raise InputError(f"--key applies to .npz files and Zarr groups; '{path}' is a "
                             "single array")
        if path.suffix == ".npz" or zipfile.is_zipfile(path):
            return _open_npz(path, key, names)
        return _open_npy(path)
    if isinstance(data, np.ndarray):
        _check_real(data.dtype, "the input array")
        return MemoryRows(data)
    module = type(data).__module__
    if module.startswith("dask"):
        _check_real(np.dtype(data.dtype), "the input array")
        return DaskRows(data)
    if module.startswith("zarr"):
        _check_real(np.dtype(data.dtype), "the input array")
        return MemoryRows(np.asarray(data), label=f"<zarr array {getattr(data, 'path', '')}>")
    raise InputError(f"cannot explain data of type {type(data).__name__}; give a .npy, .npz or "
                     "Zarr path, or a NumPy, Zarr or dask array")


# ---------------------------------------------------------------- one chunk of samples


@dataclass(frozen=True)
class Options:
    """Everything that decides the numbers; part of the store's identity."""

    method: str
    output: str
    target: Any = None                 # None (predicted), an int, or per-sample Rows
    mode: str = "auto"                 # jacobian accumulation
    baseline: Any = "zeros"            # "zeros", a float, a shared array, or per-sample Rows
    dfd_rule: str = "rescale"
    rule: str | None = None
    composite: str | None = None
    batch_size: int = DEFAULT_BATCH
    strict: bool = False               # stop at non-finite samples (not part of the identity)
    identity: dict[str, Any] = field(default_factory=dict)


def _batch_edges(start: int, stop: int, batch: int) -> list[int]:
    """Cut [start, stop) at the data set's multiples of ``batch``."""
    first = (start // batch + 1) * batch
    return [start, *range(first, stop, batch), stop]


def _slice_option(value: Any, start: int, stop: int) -> Any:
    return value.read(start, stop) if isinstance(value, Rows) else value


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind != "f":
        return np.zeros(len(x), dtype=bool)
    return ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def _numpy_batch(model: Model, xb: np.ndarray, opts: Options, baseline: Any,
                 target: Any) -> dict[str, np.ndarray]:
    """One batch, with the calls ``pbxc explain`` makes for it (cli.cmd_explain)."""
    out: dict[str, np.ndarray] = {}
    name = model.input_names[0]
    outputs = model.outputs(xb)[opts.output]
    if opts.method == "jacobian":
        res = model.jacobian(xb, output=opts.output, mode=opts.mode)
        out["attributions"] = res.jacobian
        out["targets"] = model.targets(outputs, target)
    elif opts.method in ("gradient", "input_x_gradient"):
        fn = model.gradient if opts.method == "gradient" else model.input_x_gradient
        out["attributions"] = fn(xb, target=target, output=opts.output)
        out["targets"] = model.targets(outputs, target)
    elif opts.method == "dfd":
        res_d = model.dfd(xb, baseline=baseline, target=target, output=opts.output,
                          rule=opts.dfd_rule)
        out["attributions"] = res_d.attributions[name]
        out["delta"] = res_d.delta
        out["summation_error"] = res_d.summation_error
        out["targets"] = res_d.targets
    else:
        res_l = model.lrp(xb, target=target, output=opts.output, rule=opts.rule,
                          composite=opts.composite)
        out["attributions"] = res_l.relevance[name]
        out.update(res_l.ledger_arrays())
        out["targets"] = res_l.targets
    out["outputs"] = outputs
    return out


def _cupy_batch(model: Any, xb: np.ndarray, opts: Options, baseline: Any,
                target: Any) -> dict[str, np.ndarray]:
    """One batch on the CUDA kernels (the compiled module's narrower signatures)."""
    import cupy

    from pbxc.runtime.lrp import _relative

    def host(a: Any) -> np.ndarray:
        return np.ascontiguousarray(cupy.asnumpy(a))

    x_dev = cupy.asarray(np.ascontiguousarray(xb, dtype=model.reference.dtype))
    forward = model.forward(x_dev)
    outputs = host(forward[opts.output] if isinstance(forward, dict) else forward)
    targets = model.reference.targets(outputs, target)
    out: dict[str, np.ndarray] = {"targets": targets, "outputs": outputs}
    if opts.method == "jacobian":
        out["attributions"] = host(model.jacobian(x_dev))
    elif opts.method == "gradient":
        out["attributions"] = host(model.gradient(x_dev, target=targets))
    elif opts.method == "input_x_gradient":
        out["attributions"] = host(model.input_x_gradient(x_dev, target=targets))
    elif opts.method == "dfd":
        if isinstance(baseline, str):   # "zeros"; "mean" arrives as its array
            baseline = 0.0
        elif isinstance(baseline, np.ndarray):
            baseline = cupy.asarray(baseline)
        contributions, delta = model.dfd(x_dev, baseline=baseline, target=targets)
        att, d = host(contributions), host(delta)
        total = att.reshape(len(att), -1).sum(axis=1)
        out["attributions"], out["delta"] = att, d
        out["summation_error"] = np.abs(total - d) / np.maximum(np.abs(d),
                                                                np.finfo(d.dtype).tiny)
    else:
        relevance, ledger = model.lrp(x_dev, target=targets, composite=opts.composite)
        got = {k: host(v) for k, v in ledger.items()}
        out["attributions"] = host(relevance)
        out.update({"relevance_start": got["start"], "relevance_inputs": got["inputs"],
                    "absorbed_bias": got["bias"], "absorbed_stabiliser": got["stabiliser"],
                    "conservation_error": _relative(got["inputs"],
                                                    [got["bias"], got["stabiliser"]],
                                                    got["start"])})
    return out


def explain_rows(model: Any, x: np.ndarray, start: int, opts: Options) -> dict[str, np.ndarray]:
    """Every per-sample result for samples ``[start, start + len(x))`` of the data set.

    Samples with a NaN or infinity are computed as zeros (so every batch keeps its shape and
    its neighbours their exact values) and come back as NaN, target -1 and ``nonfinite``
    True; with ``opts.strict`` they stop the run with an error naming them.
    """
    bad = _nonfinite_rows(x)
    if bad.any():
        where = (np.flatnonzero(bad) + start).tolist()
        if opts.strict:
            shown = ", ".join(map(str, where[:20])) + (" ..." if len(where) > 20 else "")
            raise InputError(f"{len(where)} sample(s) hold NaN or infinity: {shown} (--strict "
                             "stops there; without it they are listed and skipped)")
        x = np.where(bad.reshape(-1, *([1] * (x.ndim - 1))), np.zeros((), x.dtype), x)
    batch = _numpy_batch if isinstance(model, Model) else _cupy_batch
    parts: dict[str, list[np.ndarray]] = {}
    kinks = 0
    edges = _batch_edges(start, start + len(x), opts.batch_size)
    for a, b in itertools.pairwise(edges):
        xb = x[a - start:b - start]
        result = batch(model, xb, opts, _slice_option(opts.baseline, a, b),
                       _slice_option(opts.target, a, b))
        for key, value in result.items():
            parts.setdefault(key, []).append(np.asarray(value))
        if opts.method in ("jacobian", "gradient", "input_x_gradient") and \
                isinstance(model, Model):
            good = ~bad[a - start:b - start]
            kinks += sum(model.kinks_hit(xb if good.all() else xb[good]).values()) \
                if good.any() else 0
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if bad.any():
        for value in out.values():
            value[bad] = -1 if value.dtype.kind in "iu" else np.nan
    out["nonfinite"] = bad
    if opts.method in ("jacobian", "gradient", "input_x_gradient"):
        out["kinks"] = np.array([kinks], dtype=np.int64)
    return out


# ---------------------------------------------------------------- options and identity


def _rows_or_value(value: Any, n: int, per_sample_ndim: int, name: str) -> tuple[Any, Any]:
    """(what workers get, what the store records) for a target or a baseline."""
    if (isinstance(value, (str, Path)) and (Path(value).suffix in (".npy", ".npz")
                                             or is_zarr_path(value))) or \
            isinstance(value, (Rows, np.ndarray)) or type(value).__module__.startswith(
                ("dask", "zarr")):
        rows = open_rows(value)
        if rows.ndim == per_sample_ndim and len(rows) == n:
            return rows, {"per_sample": rows.description}
        array = rows.read(0, len(rows))
        return array, {"array_sha256": _array_digest(array), "shape": list(array.shape)}
    return value, value


def make_options(model: Model, n: int, method: str, *, target: Any = None,
                 output: str | None = None, mode: str = "auto", baseline: Any = "zeros",
                 baseline_data: Any = None, dfd_rule: str = "rescale", rule: str | None = None,
                 composite: str | None = None, batch_size: int = DEFAULT_BATCH,
                 strict: bool = False, backend: str = "numpy") -> Options:
    """Check the options against the model and method; record what decides the numbers."""
    if method not in METHODS:
        raise InputError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")
    if len(model.input_names) != 1:
        raise InputError(f"explain takes models with one input; this model has "
                         f"{list(model.input_names)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    output = output or model.output_names[0]
    model._io(output, None)
    if method != "dfd" and (not (baseline is None or (isinstance(baseline, str) and
                                                       baseline == "zeros"))
                            or baseline_data is not None):
        raise InputError("baseline and baseline_data apply to method 'dfd'")
    if method != "dfd" and dfd_rule != "rescale":
        raise InputError("dfd_rule applies to method 'dfd'")
    if method != "lrp" and (rule or composite):
        raise InputError("rule and composite apply to method 'lrp'")
    if method != "jacobian" and mode != "auto":
        raise InputError("mode applies to method 'jacobian'")
    name = model.input_names[0]
    in_ndim = 1 + len(model.input_shapes[name])
    if isinstance(target, str) and target == "predicted":
        target = None
    if isinstance(target, (bool, float)) or (target is not None and not isinstance(
            target, (int, np.integer, str, Path, np.ndarray, Rows))
            and not type(target).__module__.startswith("dask")):
        raise InputError(f"target must be 'predicted', a class index or one index per sample, "
                         f"got {target!r}")
    if isinstance(target, np.integer):
        target = int(target)
    target, target_id = _rows_or_value(target, n, 1, "target")
    if isinstance(target, np.ndarray):
        raise InputError(f"per-sample targets need one index per sample ({n}); got shape "
                         f"{list(target.shape)}")
    if isinstance(target, int):
        model.targets(np.zeros((1, *model.output_shapes[output])), target)
    if baseline is None:
        baseline = "zeros"
    if isinstance(baseline, str) and baseline == "mean":
        if baseline_data is None:
            raise InputError("baseline 'mean' needs baseline_data to average (the training "
                             "inputs; --data)")
        rows = open_rows(baseline_data)
        mean = resolve_baseline(model, {name: np.zeros((1, *model.input_shapes[name]),
                                                       model.dtype)},
                                "mean", rows.read(0, len(rows)))[name][0]
        baseline_id: Any
        baseline, baseline_id = mean, {"mean_of": rows.description,
                                       "array_sha256": _array_digest(mean)}
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        baseline, baseline_id = float(baseline), float(baseline)
    elif isinstance(baseline, str) and baseline == "zeros":
        baseline_id = "zeros"
    else:
        baseline, baseline_id = _rows_or_value(baseline, n, in_ndim, "baseline")
        probe = baseline.read(0, 1) if isinstance(baseline, Rows) else baseline
        resolve_baseline(model, {name: np.zeros((1, *model.input_shapes[name]), model.dtype)},
                         probe)
    if backend == "cupy":
        unsupported = []
        if method == "dfd" and dfd_rule != "rescale":
            unsupported.append(f"dfd_rule '{dfd_rule}'")
        if method == "lrp" and rule:
            unsupported.append("rule (give a composite)")
        if method == "jacobian" and mode not in ("auto", "reverse"):
            unsupported.append(f"mode '{mode}'")
        if output != model.output_names[0]:
            unsupported.append(f"output '{output}' (it explains the first output)")
        if unsupported:
            raise InputError(f"the cupy backend does not take {', '.join(unsupported)}")
    identity: dict[str, Any] = {"method": method, "output": output, "target": target_id, "batch_size":
                batch_size, "backend": backend}
    if method == "jacobian":
        identity["mode"] = mode
    if method == "dfd":
        identity.update(baseline=baseline_id, dfd_rule=dfd_rule)
    if method == "lrp":
        block = model.graph.lrp_block
        identity.update(rule=rule, composite=composite,
                        lrp_block=None if block is None or rule or composite else str(block.pos))
    return Options(method, output, target, mode, baseline, dfd_rule, rule, composite,
                   batch_size, strict, json.loads(json.dumps(identity, default=str)))


# ---------------------------------------------------------------- lazy dask arrays


def _default_chunk(per_sample_bytes: int, batch_size: int, n: int) -> int:
    batches = max(1, min(16, CHUNK_BYTES // max(1, per_sample_bytes * batch_size)))
    return max(1, min(batches * batch_size, n))


def _check_chunk(chunk: int, batch_size: int, n: int) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive number of samples, got {chunk!r}")
    if chunk % batch_size and chunk < n:
        raise InputError(f"chunk ({chunk}) must be a multiple of batch_size ({batch_size}): "
                         "each chunk runs whole batches, so its results are bit-identical to "
                         "the single-process run")


@dataclass(frozen=True)
class Plan:
    """A checked explain job: the model, the samples, the options, the result's layout."""

    source: ModelSource
    rows: Rows
    options: Options
    chunk: int
    layout: dict[str, tuple[tuple[int, ...], str]]   # per-sample shape and dtype, by name

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    def span(self, index: int) -> tuple[int, int]:
        return index * self.chunk, min(self.n, (index + 1) * self.chunk)


def plan(model: str | Path, data: Any, method: str, *, key: str | None = None,
         chunk: int | None = None, dtype: Any = None, kinks: str = DEFAULT_CONVENTION,
         backend: str = "numpy", **options: Any) -> Plan:
    """Load and check everything an explain job needs, before any sample is computed."""
    source, local = model_source(model, dtype, kinks, backend)
    name = local.input_names[0] if len(local.input_names) == 1 else ""
    rows = open_rows(data, key, local.input_names)
    if name:
        declared = local.input_shapes[name]
        if rows.shape[1:] != declared or rows.ndim != 1 + len(declared):
            hint = "; add a batch axis" if rows.shape == declared else ""
            raise InputError(f"input data has shape {list(rows.shape)}; model "
                             f"'{local.name}' takes [samples, "
                             f"{', '.join(map(str, declared))}] for input '{name}' (declared "
                             f"at {local.graph.inputs[0].pos}){hint}")
    if len(rows) == 0:
        raise InputError("the input data holds no samples")
    opts = make_options(local, len(rows), method, backend=backend, **options)
    probe = explain_rows(local, np.zeros((1, *rows.shape[1:]), local.dtype), 0,
                         replace(opts, target=_slice_option(opts.target, 0, 1),
                                 baseline=_slice_option(opts.baseline, 0, 1), strict=False))
    layout = {k: (tuple(v.shape[1:]), v.dtype.str) for k, v in probe.items()}
    att_bytes = int(np.prod(layout["attributions"][0])) * np.dtype(local.dtype).itemsize
    chunk = chunk if chunk is not None else _default_chunk(att_bytes, opts.batch_size, len(rows))
    _check_chunk(chunk, opts.batch_size, len(rows))
    per_sample = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in
                     layout.values()) + int(np.prod(rows.shape[1:])) * rows.dtype.itemsize
    if min(chunk, len(rows)) * per_sample > MAX_CHUNK_BYTES:
        raise InputError(f"a chunk of {chunk} samples would hold "
                         f"{min(chunk, len(rows)) * per_sample / 2**30:.1f} GiB of inputs and "
                         f"results in memory (at most {MAX_CHUNK_BYTES / 2**30:.0f} GiB); "
                         "choose a smaller chunk")
    return Plan(source, rows, opts, min(chunk, len(rows)), layout)


def _block_result(block: np.ndarray, job: Plan, field_name: str,
                  block_info: Any = None) -> np.ndarray:
    start = block_info[0]["array-location"][0][0] if block_info else 0
    return explain_rows(cached_model(job.source), block, start, job.options)[field_name]


def _as_dask(job: Plan) -> da.Array:
    import dask.array as da

    rows = job.rows
    chunks = (job.chunk, *rows.shape[1:])
    if isinstance(rows, DaskRows):
        arr = rows.array
        aligned = all(c % job.options.batch_size == 0 for c in arr.chunks[0][:-1])
        return arr.rechunk(chunks) if not aligned or any(
            len(c) > 1 for c in arr.chunks[1:]) else arr
    if isinstance(rows, MemoryRows):
        return da.from_array(rows.array, chunks=chunks)
    return da.from_array(rows, chunks=chunks, asarray=True, lock=False,
                         meta=np.empty((0,) * rows.ndim, rows.dtype))


def explain(model_path_or_text: str | Path, data: Any, method: str = "lrp",
            **options: Any) -> da.Array:
    """Attributions for every sample of ``data``, lazily: a dask array, one task per chunk.

    ``data``: a .npy / .npz / Zarr path, or a NumPy, Zarr or dask array of shape
    (samples, *input shape). ``options``: ``chunk`` (samples per task, a multiple of
    ``batch_size``), ``batch_size`` (256), ``key`` (.npz key / Zarr array), ``dtype``,
    ``kinks``, ``backend`` ("numpy" or "cupy" on workers with a GPU), ``target``,
    ``output``, and per method ``mode`` (jacobian), ``baseline``/``dfd_rule``
    (dfd; ``baseline_data`` is what the "mean" baseline averages), ``rule``/``composite``
    (lrp), as in ``pbxc explain``. Samples holding NaN or
    infinity give NaN rows (``strict=True`` raises instead).
    """
    job = plan(model_path_or_text, data, method, **options)
    return _field_array(_task_job(job), "attributions", _as_dask(job))


def _field_array(job: Plan, field_name: str, x: da.Array) -> da.Array:
    shape, dtype = job.layout[field_name]
    blocks: Any = x
    return blocks.map_blocks(_block_result, job=job, field_name=field_name, dtype=np.dtype(dtype),
                        drop_axis=list(range(1, x.ndim)), new_axis=list(range(1, 1 + len(shape))),
                        chunks=(x.chunks[0], *shape), meta=np.empty((0,) * (1 + len(shape)),
                                                                    np.dtype(dtype)),
                        token=f"pbxc-{field_name}")


def explain_all(model_path_or_text: str | Path, data: Any, method: str = "lrp",
                **options: Any) -> dict[str, da.Array]:
    """Every per-sample array (attributions, outputs, targets, nonfinite, and per method
    delta/summation_error or the LRP ledger) as lazy dask arrays; compute them together
    (``dask.compute(*arrays.values())``) so each chunk is explained once."""
    import dask
    import dask.array as da

    job = plan(model_path_or_text, data, method, **options)
    x = _as_dask(job)
    light = _task_job(job)
    blocks = [dask.delayed(_block_result_all)(b, light, int(sum(x.chunks[0][:i])))
              for i, b in enumerate(x.to_delayed().reshape(-1))]
    out = {}
    for name, (shape, dtype) in job.layout.items():
        if name == "kinks":
            continue
        parts = [da.from_delayed(blk[name], shape=(n, *shape), dtype=np.dtype(dtype))
                 for blk, n in zip(blocks, x.chunks[0])]
        out[name] = da.concatenate(parts)
    return out


def _block_result_all(block: np.ndarray, job: Plan, start: int) -> dict[str, np.ndarray]:
    return explain_rows(cached_model(job.source), block, start, job.options)


# ---------------------------------------------------------------- the Zarr store


def _run_metadata(job: Plan) -> dict[str, Any]:
    from pbxc import __version__

    rows = job.rows
    ends = [rows.read(0, min(len(rows), job.options.batch_size)),
            rows.read(max(0, len(rows) - job.options.batch_size), len(rows))]
    meta = {
        "format": STORE_FORMAT, "pbxc_version": __version__,
        "model": job.source.origin, "model_hash": job.source.digest,
        "dtype": job.source.dtype, "kinks": job.source.convention,
        "method": job.options.method, "options": job.options.identity,
        "input": {**rows.description, "shape": list(rows.shape), "dtype": rows.dtype.str,
                  "fingerprint": hashlib.sha256(b"".join(
                      np.ascontiguousarray(e).tobytes() for e in ends)).hexdigest()},
        "samples": job.n, "chunk": job.chunk, "chunks": job.n_chunks,
    }
    return json.loads(json.dumps(meta, default=str))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old != new:
        return [f"{prefix[:-1]}: the store has {json.dumps(old)}, this run {json.dumps(new)}"]
    return []


def _storage_error(err: OSError, out: Path, what: str) -> PbxError:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (
        err.strerror or str(err))
    return InputError(f"cannot write '{out}' ({what}): {reason}; the chunks already marked "
                      "done are kept: free space or fix the path and rerun the same command "
                      "to resume")


def _open_or_create(job: Plan, out: Path) -> tuple[Any, int]:
    """The store for ``job`` at ``out``: a new one (made in a sibling, then renamed into
    place), or an existing one written by the same run; returns (group, chunks done)."""
    import zarr

    meta = _run_metadata(job)
    if out.exists():
        try:
            group = zarr.open_group(out, mode="r+")
            found = group.attrs.asdict().get("pbxc")
        except Exception:  # not a Zarr group at all
            found = None
        if not isinstance(found, dict) or "model_hash" not in found:
            raise InputError(f"'{out}' exists and is not a pbxc attribution store; choose "
                             "another --out or remove it")
        diffs = _differences(found, meta)
        if diffs:
            raise InputError("\n  ".join([
                f"'{out}' holds another run's results; rerun with the same model, method, "
                "options and data to resume it, or choose another --out:", *diffs]))
        done: Any = group["done"]
        return group, int(np.count_nonzero(done[:]))
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        group = zarr.open_group(tmp, mode="w-", attributes={"pbxc": meta})
        for name, (shape, dtype) in job.layout.items():
            dt = np.dtype(dtype)
            if name == "kinks":
                group.create_array(name, shape=(job.n_chunks,), chunks=(1,), dtype=dt,
                                   fill_value=-1)
                continue
            fill = np.nan if dt.kind == "f" else (False if dt.kind == "b" else -1)
            group.create_array(name, shape=(job.n, *shape), chunks=(job.chunk, *shape),
                               dtype=dt, fill_value=fill)
        group.create_array("done", shape=(job.n_chunks,), chunks=(1,), dtype=bool,
                           fill_value=False)
        os.rename(tmp, out)
    except OSError as err:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(err, out, "creating the store") from None
    return zarr.open_group(out, mode="r+"), 0


_GROUPS: dict[str, Any] = {}   # per process: open stores by path and run


@dataclass(frozen=True)
class ChunkDone:
    index: int
    samples: int
    seconds: float


def write_chunk(job: Plan, out: str, index: int, x: np.ndarray | None = None) -> ChunkDone:
    """Explain chunk ``index`` and write it into the store at ``out``, then mark it done.

    The results are written before the mark, and Zarr writes each chunk file through a
    temporary file and a rename, so an interrupted chunk is left unmarked and is redone.
    """
    import zarr

    t0 = time.perf_counter()
    start, stop = job.span(index)
    rows = x if x is not None else job.rows.read(start, stop)
    result = explain_rows(cached_model(job.source), rows, start, job.options)
    group: Any = _GROUPS.get(out)
    if group is None:
        group = _GROUPS[out] = zarr.open_group(out, mode="r+")
    for name, value in result.items():
        if name == "kinks":
            group[name][index:index + 1] = value
        else:
            group[name][start:stop] = value
    group["done"][index:index + 1] = True
    return ChunkDone(index, stop - start, time.perf_counter() - t0)


@dataclass
class Summary:
    """What a :func:`to_zarr` run did, and the store's worst errors over all its samples."""

    out: str
    samples: int
    chunks: int
    computed_chunks: int
    computed_samples: int
    seconds: float
    worst: dict[str, float]
    nonfinite: list[int]
    kinks: int | None = None     # gradient methods: units exactly on a kink, all samples

    @property
    def samples_per_second(self) -> float:
        return self.computed_samples / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        skipped = self.chunks - self.computed_chunks
        if not self.computed_chunks:
            text = f"{self.samples} samples: all {self.chunks} chunks were already done"
        else:
            text = (f"{self.samples} samples in {self.chunks} chunks ({self.computed_chunks} "
                    "computed" + (f", {skipped} already done" if skipped else "") +
                    f") in {self.seconds:.2f} s: {self.samples_per_second:,.0f} samples/s")
        for key, value in self.worst.items():
            text += f"; worst {key.replace('_', ' ')} {value:.2e}"
        return text

    def nonfinite_line(self) -> str | None:
        if not self.nonfinite:
            return None
        shown = ", ".join(map(str, self.nonfinite[:20]))
        more = f" and {len(self.nonfinite) - 20} more" if len(self.nonfinite) > 20 else ""
        return (f"{len(self.nonfinite)} sample(s) hold NaN or infinity and were skipped "
                f"(NaN attributions, target -1): {shown}{more}")


def _summarise(group: Any, job: Plan, out: Path, computed: int, computed_samples: int,
               seconds: float) -> Summary:
    worst: dict[str, float] = {}
    for key in ("summation_error", "conservation_error"):
        if key in job.layout:
            values = np.asarray(group[key][:])
            finite = values[np.isfinite(values)]
            worst[key] = float(finite.max()) if finite.size else 0.0
    nonfinite = np.flatnonzero(np.asarray(group["nonfinite"][:])).tolist()
    kinks = int(np.asarray(group["kinks"][:]).sum()) if "kinks" in job.layout else None
    summary = Summary(str(out), job.n, job.n_chunks, computed, computed_samples, seconds,
                      worst, nonfinite, kinks)
    attrs = dict(group.attrs.asdict())
    attrs["pbxc_result"] = {"complete": True, **worst, "nonfinite_samples": len(nonfinite)}
    group.attrs.update(attrs)
    return summary


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    # ``disable=None``: a bar only when stderr is a terminal
    return tqdm(total=total, unit="chunk", desc="explain", leave=False,
                disable=(None if enabled is None else not enabled))


def to_zarr(model_path_or_text: str | Path | Plan, data: Any, out: str | Path, method: str = "lrp", *,
            client: Any = None, progress: bool | None = None,
            on_chunk: Callable[[ChunkDone], None] | None = None, **options: Any) -> Summary:
    """Explain every sample of ``data`` into the Zarr store ``out``, chunk by chunk; resumable.

    ``client``: a ``distributed.Client`` to run the chunks on its workers (they must see
    ``data``, the model and ``out`` at the same paths, as with any Dask-to-Zarr write), or
    None to run them here one after another. ``options`` as in :func:`explain`, plus
    ``strict`` (stop at the first sample holding NaN or infinity); a :class:`Plan` from
    :func:`plan` may stand for the model, data and options. A rerun skips the
    chunks marked done; a store of another run is refused with the differences.
    """
    out = Path(out)
    job = model_path_or_text if isinstance(model_path_or_text, Plan) else \
        plan(model_path_or_text, data, method, **options)
    group, _ = _open_or_create(job, out)
    done = np.asarray(group["done"][:])
    todo = [i for i in range(job.n_chunks) if not done[i]]
    t0 = time.perf_counter()
    computed_samples = 0
    path = str(out)
    bar = _progress(len(todo), progress)
    try:
        if client is None:
            for i in todo:
                try:
                    res = write_chunk(job, path, i)
                except OSError as err:
                    raise _storage_error(err, out, f"chunk {i}") from None
                computed_samples += res.samples
                bar.update(1)
                if on_chunk is not None:
                    on_chunk(res)
        else:
            computed_samples = _run_on_cluster(client, job, path, out, todo, bar, on_chunk)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    try:
        return _summarise(group, job, out, len(todo), computed_samples, seconds)
    except OSError as err:
        raise _storage_error(err, out, "the summary") from None


def _run_on_cluster(client: Any, job: Plan, path: str, out: Path, todo: list[int], bar: Any,
                    on_chunk: Callable[[ChunkDone], None] | None) -> int:
    from distributed import as_completed

    shipped: Any = None      # None: the worker reads its rows from the data set's path
    futures = []
    run = uuid.uuid4().hex[:8]
    for i in todo:
        start, stop = job.span(i)
        if isinstance(job.rows, MemoryRows):
            shipped = job.rows.read(start, stop)
        elif isinstance(job.rows, DaskRows):
            shipped = client.compute(job.rows.array[start:stop])
        futures.append(client.submit(write_chunk, _light(job, start, stop), path, i, shipped,
                                     key=f"pbxc-chunk-{job.source.digest[:8]}-{run}-{i}",
                                     pure=False))
    samples = 0
    try:
        for future in as_completed(futures):
            try:
                res: ChunkDone = future.result()
            except OSError as err:
                raise _storage_error(err, out, "a chunk") from None
            samples += res.samples
            bar.update(1)
            if on_chunk is not None:
                on_chunk(res)
    except BaseException:
        client.cancel(futures)
        raise
    return samples


def _task_job(job: Plan) -> Plan:
    """The job inside lazy tasks, whose samples arrive as the dask array's blocks: without
    the samples themselves, which would otherwise travel with every task."""
    if isinstance(job.rows, (MemoryRows, DaskRows)):
        return replace(job, rows=_Shape(job.rows.shape, job.rows.dtype, job.rows.description))
    return job


def _light(job: Plan, start: int, stop: int) -> Plan:
    """The job as sent to workers for samples [start, stop): in-memory samples, targets and
    baselines travel chunk by chunk, not whole."""
    if isinstance(job.rows, (MemoryRows, DaskRows)):
        job = replace(job, rows=_Shape(job.rows.shape, job.rows.dtype, job.rows.description))
    opts = job.options
    moved: dict[str, Any] = {name: _OffsetRows(value.read(start, stop), start)
                             for name, value in (("target", opts.target),
                                                 ("baseline", opts.baseline))
                             if isinstance(value, (MemoryRows, DaskRows))}
    return replace(job, options=replace(opts, **moved)) if moved else job


class _OffsetRows(Rows):
    """Rows [start, start + len(array)) of a per-sample option, sent with their chunk."""

    def __init__(self, array: np.ndarray, start: int) -> None:
        self.array, self.start = array, start
        self.shape, self.dtype, self.description = tuple(array.shape), array.dtype, {}

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start - self.start:stop - self.start]


class _Shape(Rows):
    """The shape of samples that are sent with each task."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype,
                 description: dict[str, Any]) -> None:
        self.shape, self.dtype, self.description = shape, dtype, description

    def read(self, start: int, stop: int) -> np.ndarray:
        raise InputError("these samples travel with each task")


@contextlib.contextmanager
def local_cluster(workers: int) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded processes, and its client."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


#: seconds a client waits for a scheduler
CONNECT_TIMEOUT = 10.0


def connect(address: str, timeout: float | None = None) -> Any:
    """A client of the running scheduler at ``address``; an error when it cannot be reached."""
    from distributed import Client

    try:
        return Client(address, timeout=f"{timeout or CONNECT_TIMEOUT}s")
    except (OSError, TimeoutError, ValueError) as err:
        raise InputError(f"cannot reach the Dask scheduler at '{address}': "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from None


__all__ = ["ChunkDone", "Summary", "cached_model", "connect", "explain", "explain_all",
           "explain_rows", "local_cluster", "open_rows", "plan", "to_zarr"]

