"""Weight files: .npz (never pickles) and .safetensors, merged into one keyed store.

Loading checks what a file alone can tell (readable, no objects, unique keys); binding to the
graph checks presence, dtype, finiteness and shape against each op (see ``graph.bind``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pbxc.errors import Diagnostic, SourcePos, WeightError, nearest

WEIGHT_SUFFIXES = (".npz", ".safetensors")


@dataclass(frozen=True)
class WeightEntry:
    key: str
    array: np.ndarray
    file: str


@dataclass
class WeightStore(Mapping[str, np.ndarray]):
    """Every tensor of every weight file a model names, by key."""

    entries: dict[str, WeightEntry] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.entries[key].array

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e.array.shape) for k, e in self.entries.items()}

    def file_of(self, key: str) -> str:
        return self.entries[key].file

    def nearest_keys(self, key: str, n: int = 5) -> list[str]:
        return nearest(key, self.entries, n)


def _load_npz(path: Path, pos: SourcePos | None) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise WeightError(f"cannot read weight file '{path}': {err}", pos) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        archive_type = type(archive).__name__
        raise WeightError(f"weight file '{path}' is a single array ({archive_type}), "
                          "not an .npz archive of named arrays", pos)
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = np.asarray(archive[key])
            except ValueError as err:
                if "pickle" in str(err).lower() or "object" in str(err).lower():
                    raise WeightError(
                        f"refused to load key '{key}' of '{path}': it holds pickled Python "
                        "objects, which could run code; save plain numeric arrays instead",
                        pos) from None
                raise WeightError(f"cannot read key '{key}' of '{path}': {err}", pos) from None
            except (OSError, zipfile.BadZipFile, EOFError) as err:
                raise WeightError(f"cannot read key '{key}' of '{path}': {err}", pos) from None
    return arrays


def _load_safetensors(path: Path, pos: SourcePos | None) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:  # pragma: no cover - safetensors is a core dependency
        raise WeightError("reading .safetensors needs the 'safetensors' package", pos) from None
    try:
        return dict(load_file(str(path)))
    except Exception as err:  # safetensors raises its own SafetensorError and TypeErrors
        reason = str(err) or type(err).__name__
        if "bfloat16" in reason.lower() or "bf16" in reason.lower():
            reason += " (convert bfloat16 tensors to float32 before saving)"
        raise WeightError(f"cannot read weight file '{path}': {reason}", pos) from None


def load_weight_file(path: str | Path, pos: SourcePos | None = None) -> dict[str, np.ndarray]:
    """Read one weight file into a dict of arrays; errors cite ``pos`` (the `weights` line)."""
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
    return _load_npz(p, pos) if p.suffix == ".npz" else _load_safetensors(p, pos)


def load_weight_files(files: list[tuple[Path, SourcePos | None]]) -> WeightStore:
    """Load several files into one store; a key defined by two files is an error."""
    store = WeightStore()
    problems: list[Diagnostic] = []
    for path, pos in files:
        try:
            arrays = load_weight_file(path, pos)
        except WeightError as err:
            problems.extend(err.diagnostics)
            continue
        for key, array in arrays.items():
            if key in store.entries:
                problems.append(Diagnostic(
                    f"weight key '{key}' is in both '{store.file_of(key)}' and '{path}'", pos))
                continue
            store.entries[key] = WeightEntry(key, array, str(path))
    if problems:
        raise WeightError(problems)
    return store
