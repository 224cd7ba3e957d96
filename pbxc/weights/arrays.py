"""Arrays from .npy, .npz and .safetensors files, read only when asked for and only after every
size the file declares has been checked (specs/security.md, Inputs, "Weight and input files").

``np.load`` of an .npz decompresses any member it is asked for and allocates whatever its
header claims before reading a byte of data. Here an archive is first read as a directory
(names, shapes and dtypes from each member's .npy header, nothing decompressed); a member is
read only when a caller asks for it, and only if

* its dtype holds no Python objects (those are pickles, which could run code);
* its declared size is within ``PBXC_MAX_ARRAY_BYTES``;
* the size its header declares is the size the archive says the member has, and deflate could
  have produced that from its compressed size (at most ~1032:1); the member lies within the
  file on disk.

A file that fails any check is refused with an error naming it and the key, never a
``MemoryError`` or a traceback.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from pbxc.weights.limits import MAX_DEFLATE_RATIO, describe_bytes, max_array_bytes

_READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, TypeError,
                SyntaxError, MemoryError, RuntimeError, KeyError, OverflowError)


class ArrayFileError(Exception):
    """A file or one of its arrays cannot be read safely; the message says why."""


@dataclass(frozen=True)
class ArrayInfo:
    """What a file declares about one array, before it is read."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _header(fp: BinaryIO, what: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran_order, dtype, bytes of the header) of an .npy stream."""
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise ArrayFileError(f"{what} has .npy format version {version}, which is not read")
    except ArrayFileError:
        raise
    except _READ_ERRORS as err:
        raise ArrayFileError(f"{what} is not a valid .npy array: {err}") from None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArrayFileError(f"{what} declares an invalid shape {shape}")
    return tuple(shape), bool(fortran), dtype, fp.tell()


def _check_declared(what: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """The declared size in bytes; objects (pickles) are refused."""
    if dtype.hasobject:
        raise ArrayFileError(f"refused to load {what}: it holds pickled Python objects, which "
                             "could run code; save plain numeric arrays instead")
    return math.prod(shape) * dtype.itemsize


def _check_limit(what: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """Before an array is allocated: its declared size within ``PBXC_MAX_ARRAY_BYTES``."""
    nbytes = math.prod(shape) * dtype.itemsize
    limit = max_array_bytes()
    if nbytes > limit:
        raise ArrayFileError(f"{what} declares shape {_fmt(shape)} of {dtype} "
                             f"({describe_bytes(nbytes)}), over the limit of "
                             f"{describe_bytes(limit)} for one array (PBXC_MAX_ARRAY_BYTES)")


def _read_npy(fp: BinaryIO, what: str) -> np.ndarray:
    try:
        return np.asarray(npy_format.read_array(fp, allow_pickle=False))
    except _READ_ERRORS as err:
        raise ArrayFileError(f"cannot read {what}: {err}") from None


# ---------------------------------------------------------------------------- .npz
def npz_directory(path: Path) -> dict[str, ArrayInfo]:
    """Every .npy member of an .npz archive by key, with its declared shape and dtype, checked;
    nothing is decompressed beyond each member's header."""
    on_disk = path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise ArrayFileError(f"{err}") from None
    out: dict[str, ArrayInfo] = {}
    with archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            what = f"key '{key}'"
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArrayFileError(f"{what} is compressed with method {info.compress_type}; "
                                     "only stored and deflated members are read (np.savez, "
                                     "np.savez_compressed)")
            if info.header_offset + info.compress_size > on_disk:
                raise ArrayFileError(f"{what} claims {info.compress_size} compressed bytes "
                                     "beyond the end of the file")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise ArrayFileError(f"{what} is stored uncompressed but claims "
                                     f"{info.file_size} bytes in {info.compress_size}")
            if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                raise ArrayFileError(f"{what} claims {describe_bytes(info.file_size)} from "
                                     f"{describe_bytes(info.compress_size)} compressed, more "
                                     "than deflate can produce: the archive lies about its size")
            try:
                with archive.open(info) as fp:
                    shape, _, dtype, header_len = _header(fp, what)  # type: ignore[arg-type]
            except ArrayFileError:
                raise
            except _READ_ERRORS as err:
                raise ArrayFileError(f"cannot read {what}: {err}") from None
            nbytes = _check_declared(what, shape, dtype)
            if header_len + nbytes != info.file_size:
                raise ArrayFileError(
                    f"{what} declares shape {_fmt(shape)} of {dtype} ({describe_bytes(nbytes)}) "
                    f"but the archive member holds {info.file_size - header_len} bytes of data: "
                    "the file is corrupt or lies about its size")
            out[key] = ArrayInfo(key, shape, dtype,
                                 _member_reader(path, info.filename, what, shape, dtype))
    return out


def _member_reader(path: Path, member: str, what: str, shape: tuple[int, ...],
                   dtype: np.dtype[Any]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        _check_limit(what, shape, dtype)
        try:
            with zipfile.ZipFile(path) as archive, archive.open(member) as fp:
                return _read_npy(fp, what)  # type: ignore[arg-type]
        except ArrayFileError:
            raise
        except _READ_ERRORS as err:
            raise ArrayFileError(f"cannot read {what}: {err}") from None
    return read


# ---------------------------------------------------------------------------- .npy
def read_npy(path: Path) -> np.ndarray:
    """One .npy file, after its header's size has been checked against the file's."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        shape, _, dtype, header_len = _header(fh, f"'{path.name}'")
        nbytes = _check_declared(f"'{path.name}'", shape, dtype)
        _check_limit(f"'{path.name}'", shape, dtype)
        if header_len + nbytes != size:
            raise ArrayFileError(f"'{path.name}' declares shape {_fmt(shape)} of {dtype} "
                                 f"({describe_bytes(nbytes)}) but holds {size - header_len} "
                                 "bytes of data: the file is corrupt or lies about its size")
        fh.seek(0)
        return _read_npy(fh, f"'{path.name}'")


def is_npy(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"


def read_array_file(path: Path, key: str | None = None, prefer: str | None = None
                    ) -> np.ndarray:
    """One array from an .npy file, or one member of an .npz (``key``; else ``prefer`` if it is
    there; else the only member), with every check above; only that member is read."""
    if is_npy(path):
        return read_npy(path)
    directory = npz_directory(path)
    files = list(directory)
    pick = key or (prefer if prefer in directory else files[0] if len(files) == 1 else None)
    if pick is None or pick not in directory:
        raise ArrayFileError(f"it has keys {files}; name one of them")
    return directory[pick].read()


# ---------------------------------------------------------------------------- .safetensors
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                       "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def safetensors_directory(path: Path) -> dict[str, ArrayInfo]:
    """Every tensor of a .safetensors file by key with its declared shape and dtype, checked;
    read on demand by the safetensors library (which validates the header and offsets)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ArrayFileError(str(err) or type(err).__name__) from None
    out: dict[str, ArrayInfo] = {}
    with handle:
        keys = handle.keys()
        for key in keys:
            view = handle.get_slice(key)
            code = str(view.get_dtype())
            shape = tuple(int(d) for d in view.get_shape())
            if code not in _SAFETENSORS_DTYPES:
                hint = (" (convert bfloat16 tensors to float32 before saving)"
                        if code.upper() in ("BF16", "BFLOAT16") else "")
                raise ArrayFileError(f"key '{key}' has dtype {code}, which NumPy cannot hold"
                                     + hint)
            dtype = np.dtype(_SAFETENSORS_DTYPES[code])
            _check_declared(f"key '{key}'", shape, dtype)
            out[key] = ArrayInfo(key, shape, dtype, _tensor_reader(path, key, shape, dtype))
    return out


def _tensor_reader(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]
                   ) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from safetensors import safe_open

        _check_limit(f"key '{key}'", shape, dtype)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                return np.asarray(handle.get_tensor(key))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ArrayFileError(f"cannot read key '{key}': {err}") from None
    return read
