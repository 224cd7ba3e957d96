"""Every file and folder pbxc writes goes through this module (specs/security.md).

The promises, in one place:

* An output is written to a temporary sibling (a short hidden name, so a target name near
  the file system's limit still works) and renamed into place: a reader never sees half a
  file, and a failure or Ctrl-C leaves the old one and no temporary behind.
* It replaces only a regular file, or a directory that pbxc wrote (its ``manifest.json``
  names pbxc and lists, with their hashes, exactly the files there). A symlink, a device
  node, a FIFO or any other directory is refused; ``force=True`` (``--force``) allows a
  symlink or special file to be replaced (the link itself, never its target) and a pbxc
  directory whose files were changed, but never a directory pbxc did not write.
* Files get mode 0666 and folders 0777, less the umask, as any other program's.
* File-system errors (read-only, permission, name too long, no space) become
  :class:`~pbxc.errors.OutputError`, an ``error:`` line and exit 1, never a traceback.

This module is a foundation: it imports only :mod:`pbxc.errors`, and every stage may use it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pbxc.errors import OutputError

#: the file in a pbxc-written directory that says so
MANIFEST = "manifest.json"
#: the manifest's ``generator`` of directories pbxc wrote
GENERATOR = "pbxc"

#: what :func:`pbxc_directory_problem` says of a directory whose files vanish while it reads
#: them (another process is swapping its own output in)
BEING_REPLACED = "another process is replacing it"

#: fills an open binary file (its return value is ignored)
Writer = Callable[[IO[bytes]], object]


def _describe(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is not a directory"
    return err.strerror or str(err)


def _fail(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write '{path}': {_describe(err)}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _fail(path, err) from None


def check_file_target(path: str | os.PathLike[str], force: bool = False) -> Path:
    """``path`` as a file output: absent, a regular file, or (with ``force``) a link or a
    special file. Raises OutputError otherwise; checks the parent folder too."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"cannot write '{path}': it names a directory; give a file name")
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write '{path}': it is a directory; give a file name")
        if not force:
            raise OutputError(f"refusing to replace '{path}': it is {_kind(st.st_mode)}, not a "
                              "regular file (--force replaces it)")
    try:
        parent_is_dir = stat.S_ISDIR(os.stat(path.parent).st_mode)
    except FileNotFoundError:
        parent_is_dir = True                    # created on writing
    except OSError as err:
        raise _fail(path, err) from None
    if not parent_is_dir:
        raise OutputError(f"cannot write '{path}': '{path.parent}' is not a directory")
    return path


def _temp_name(parent: Path, kind: str) -> Path:
    return parent / f".pbxc-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _mkdirs(folder: Path, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)   # 0777 less the umask
    except FileExistsError:
        raise OutputError(f"cannot write '{shown}': '{folder}' is not a directory") from None
    except OSError as err:
        raise _fail(shown, err) from None


def _write_temp(tmp: Path, write: Writer) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o666)                         # the umask applies, as for any program
    with os.fdopen(fd, "wb") as fh:
        write(fh)


def write_file(path: str | os.PathLike[str], write: Writer, *, force: bool = False) -> Path:
    """Write one file: ``write(fh)`` fills a temporary sibling, renamed over ``path``."""
    path = check_file_target(path, force)
    _mkdirs(path.parent, path)
    tmp = _temp_name(path.parent, "tmp")
    try:
        _write_temp(tmp, write)
        check_file_target(path, force)          # again: it may have changed meanwhile
        os.replace(tmp, path)
    except OSError as err:
        raise _fail(path, err) from None
    finally:
        _remove(tmp)
    return path


def write_with(path: str | os.PathLike[str], write: Callable[[Path], object], *,
                force: bool = False) -> Path:
    """As :func:`write_file`, for writers that take a path (``savefig``): ``write(tmp)``
    fills the temporary sibling ``tmp``, which already exists with the umask's mode."""
    path = check_file_target(path, force)
    _mkdirs(path.parent, path)
    tmp = _temp_name(path.parent, "tmp")
    try:
        _write_temp(tmp, lambda fh: None)
        write(tmp)
        check_file_target(path, force)
        os.replace(tmp, path)
    except OSError as err:
        raise _fail(path, err) from None
    finally:
        _remove(tmp)
    return path


def write_text(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    data = text.encode("utf-8", "surrogateescape")
    return write_file(path, lambda fh: fh.write(data), force=force)


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any], *,
              force: bool = False) -> Path:
    """An .npz of named arrays (never pickled objects)."""
    import numpy as np

    def write(fh: IO[bytes]) -> None:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return write_file(path, write, force=force)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def _staging(parent: Path, shown: Path) -> Iterator[Path]:
    """A hidden folder beside the output, removed however the block ends."""
    _mkdirs(parent, shown)
    folder = _temp_name(parent, "staging")
    try:
        folder.mkdir()
    except OSError as err:
        raise _fail(shown, err) from None
    try:
        yield folder
    finally:
        _remove(folder)


def write_files(folder: str | os.PathLike[str], files: Mapping[str, Writer], *,
                force: bool = False, validate: Callable[[Path], object] | None = None
                ) -> list[Path]:
    """Several files into ``folder`` (kept as it is otherwise), all or none: each is written
    and ``validate(staged_folder)`` runs before any of them is renamed into place; a failure
    puts back what was replaced."""
    folder = Path(folder)
    targets = {name: check_file_target(folder / name, force) for name in files}
    with _staging(folder, folder) as staged:
        try:
            for name, write in files.items():
                _write_temp(staged / name, write)
        except OSError as err:
            raise _fail(folder / name, err) from None
        if validate is not None:
            validate(staged)
        done: list[tuple[Path, Path | None]] = []
        try:
            for name, target in targets.items():
                check_file_target(target, force)
                backup = None
                if _lstat(target) is not None:
                    backup = staged / f".old-{name}"
                    os.replace(target, backup)
                done.append((target, backup))
                os.replace(staged / name, target)
        except (OSError, OutputError) as err:
            for target, backup in reversed(done):   # put back what was there
                if backup is not None:
                    os.replace(backup, target)
                else:
                    _remove(target)
            if isinstance(err, OutputError):
                raise
            raise _fail(target, err) from None
    return list(targets.values())


# ---------------------------------------------------------------- pbxc-written directories


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pbxc_directory_problem(path: Path) -> str | None:
    """Why ``path`` (an existing directory) is not one pbxc wrote and left untouched, or
    None. It is when its manifest names pbxc and lists exactly its files with their hashes."""
    try:
        entries = {e.name: e for e in os.scandir(path)}
    except FileNotFoundError:
        return BEING_REPLACED
    except OSError as err:
        return _describe(err)
    if not entries:
        return None                                   # an empty directory loses nothing
    if MANIFEST not in entries:
        return "it has no manifest.json"
    try:
        manifest = json.loads(Path(path, MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return BEING_REPLACED
    except (OSError, ValueError):
        return "its manifest.json is not pbxc's"
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return "its manifest.json does not name pbxc as its writer"
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        return "its manifest.json lists no files"
    present = set(entries) - {MANIFEST}
    if present != set(listed):
        extra = sorted(present - set(listed))
        return (f"it holds files pbxc did not write: {', '.join(extra[:5])}" if extra
                else "files pbxc wrote are missing from it")
    for name, digest in listed.items():
        entry = entries[name]
        if not entry.is_file(follow_symlinks=False):
            return f"'{name}' is not a regular file"
        try:
            if _sha256(Path(path, name)) != digest:
                return f"'{name}' was changed since pbxc wrote it"
        except OSError:        # it went while being read: another process is replacing it
            return BEING_REPLACED
    return None


def write_directory(path: str | os.PathLike[str], files: Mapping[str, Writer],
                    manifest: Mapping[str, Any], *, force: bool = False) -> list[Path]:
    """A whole directory pbxc owns (``pbxc compile -o``): ``files`` and ``manifest.json``
    (``manifest`` plus ``generator`` and ``files``: name -> sha256). It replaces only an
    absent or empty directory or one :func:`pbxc_directory_problem` accepts (with ``force``
    also a pbxc directory whose files were changed). When two processes write one directory
    at once, each ends cleanly: the directory is one of theirs, whole, and a process that
    finds the other's output appear after it started reports an OutputError."""
    path = Path(path)
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is written by write_directory itself")
    _refuse_directory(path, force)
    with _staging(path.parent, path) as staged:
        listed = {}
        try:
            for name, write in files.items():
                _write_temp(staged / name, write)
                listed[name] = _sha256(staged / name)
            text = json.dumps({**manifest, "generator": GENERATOR, "files": listed},
                              indent=2) + "\n"
            _write_temp(staged / MANIFEST, lambda fh: fh.write(text.encode("utf-8")))
        except OSError as err:
            raise _fail(path, err) from None
        _swap_in(staged, path, force)
    return [path / name for name in files] + [path / MANIFEST]


def check_directory_output(path: str | os.PathLike[str], force: bool = False) -> Path:
    """``path`` as a :func:`write_directory` output: refused now, before any work, if it may
    not be replaced (checked again when it is)."""
    path = Path(path)
    _refuse_directory(path, force)
    return path


def _refuse_directory(path: Path, force: bool) -> None:
    st = _lstat(path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISLNK(st.st_mode) and not force:
            raise OutputError(f"refusing to replace '{path}': it is a symbolic link (--force "
                              "replaces the link, not what it points to)")
        if not stat.S_ISLNK(st.st_mode):
            raise OutputError(f"refusing to replace '{path}': it is {_kind(st.st_mode)}, not a "
                              "directory pbxc wrote; choose another directory")
        return
    problem = pbxc_directory_problem(path)
    if problem == BEING_REPLACED:
        if _lstat(path) is None:                      # it went: nothing there to lose
            return
        problem = pbxc_directory_problem(path)        # it came back: judge what is there now
        if problem == BEING_REPLACED:
            raise OutputError(f"cannot write '{path}': another process is writing it at the "
                              "same moment; it keeps that output")
    if problem is None:
        return
    if force and "changed since" in problem:
        return
    raise OutputError(f"refusing to replace '{path}': {problem}; it was not written by pbxc "
                      "compile (choose another directory, or remove it yourself)")


def _swap_in(staged: Path, path: Path, force: bool) -> None:
    """Rename ``staged`` to ``path``, moving a pbxc directory there aside first (and deleting
    it after); nothing is deleted that was not checked to be pbxc's a moment before."""
    aside = _temp_name(path.parent, "old")
    st = _lstat(path)
    moved = False
    try:
        if st is not None:
            _refuse_directory(path, force)
            try:
                os.rename(path, aside)
                moved = True
            except FileNotFoundError:                 # another process moved it first
                pass
            if moved and os.path.isdir(aside) and not os.path.islink(aside):
                problem = pbxc_directory_problem(aside)
                if problem is not None and not (force and "changed since" in problem):
                    os.rename(aside, path)            # it changed under us: put it back
                    moved = False
                    raise OutputError(f"refusing to replace '{path}': {problem}")
        try:
            os.rename(staged, path)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                if moved:
                    _remove(aside)
                    moved = False
                raise OutputError(f"'{path}' was written by another process while this one "
                                  "ran; it keeps that output") from None
            raise
    except OSError as err:
        if moved:
            try:
                os.rename(aside, path)
                moved = False
            except OSError:
                pass
        raise _fail(path, err) from None
    finally:
        if moved:
            _remove(aside)


def check_directory_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder outputs go into (``--png DIR``): absent or a directory (a link to
    one included); a file or special file there is refused."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as err:
        raise _fail(path, err) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write into '{path}': it is {_kind(st.st_mode)}, not a "
                          "directory")
    return path


def prepare_directory(path: str | os.PathLike[str]) -> Path:
    """A folder outputs are written into, created if absent (see check_directory_target)."""
    path = check_directory_target(path)
    _mkdirs(path, path)
    return path
