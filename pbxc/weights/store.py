"""Weight files: .npz (never pickles) and .safetensors, merged into one keyed store.

Loading checks what a file alone can tell (readable, no objects, unique keys); binding to the
graph checks presence, dtype, finiteness and shape against each op (see ``graph.bind``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pbxc.errors import Diagnostic, SourcePos, WeightError, nearest
from pbxc.weights.arrays import ArrayFileError, ArrayInfo, npz_directory, safetensors_directory

WEIGHT_SUFFIXES = (".npz", ".safetensors")


@dataclass
class WeightEntry:
    """One tensor of a weight file: its declared shape and dtype, read when first used."""

    key: str
    info: ArrayInfo
    file: str
    pos: SourcePos | None = None
    _array: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            try:
                array = self.info.read()
            except ArrayFileError as err:
                raise WeightError(f"weight file '{self.file}': {err}", self.pos) from None
            if array.shape != self.info.shape or array.dtype != self.info.dtype:
                raise WeightError(f"weight file '{self.file}': key '{self.key}' changed "
                                  "between its header and its data", self.pos)
            self._array = array
        return self._array


@dataclass
class WeightStore(Mapping[str, np.ndarray]):
    """Every tensor of every weight file a model names, by key; a tensor is read from its file
    only when it is first looked up (a model reads only the keys it binds)."""

    entries: dict[str, WeightEntry] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.entries[key].array

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def file_of(self, key: str) -> str:
        return self.entries[key].file

    def nearest_keys(self, key: str, n: int = 5) -> list[str]:
        return nearest(key, self.entries, n)


def weight_directory(path: str | Path, pos: SourcePos | None = None) -> dict[str, ArrayInfo]:
    """The keys of one weight file with their declared shapes and dtypes, every size checked
    (``arrays.py``); nothing is read beyond the headers."""
    p = Path(path)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise WeightError(f"weight file '{p}' has suffix '{p.suffix}'; expected one of "
                          + ", ".join(WEIGHT_SUFFIXES), pos)
    if not p.is_file():
        hint = ""
        if p.parent.is_dir():
            siblings = [c.name for c in p.parent.iterdir() if c.suffix in WEIGHT_SUFFIXES]
            close = nearest(p.name, siblings, 3)
            if close:
                hint = "; nearby weight files: " + ", ".join(close)
        raise WeightError(f"weight file not found: '{p}'{hint}", pos)
    try:
        return npz_directory(p) if p.suffix == ".npz" else safetensors_directory(p)
    except ArrayFileError as err:
        reason = str(err)
        if reason.startswith(("key ", "refused")):
            raise WeightError(f"weight file '{p}': {reason}", pos) from None
        raise WeightError(f"cannot read weight file '{p}': {reason}", pos) from None
    except OSError as err:
        raise WeightError(f"cannot read weight file '{p}': {err.strerror or err}", pos) from None


def load_weight_file(path: str | Path, pos: SourcePos | None = None) -> dict[str, np.ndarray]:
    """Read every array of one weight file (all of them: for tools; a model reads only the
    keys it binds, through :func:`load_weight_files`); errors cite ``pos``."""
    arrays = {}
    for key, info in weight_directory(path, pos).items():
        arrays[key] = WeightEntry(key, info, str(path), pos).array
    return arrays


def load_weight_files(files: list[tuple[Path, SourcePos | None]]) -> WeightStore:
    """The directory of several files as one store; a key defined by two files is an error.
    Tensors are read when first looked up."""
    store = WeightStore()
    problems: list[Diagnostic] = []
    for path, pos in files:
        try:
            directory = weight_directory(path, pos)
        except WeightError as err:
            problems.extend(err.diagnostics)
            continue
        for key, info in directory.items():
            if key in store.entries:
                problems.append(Diagnostic(
                    f"weight key '{key}' is in both '{store.file_of(key)}' and '{path}'", pos))
                continue
            store.entries[key] = WeightEntry(key, info, str(path), pos)
    if problems:
        raise WeightError(problems)
    return store
