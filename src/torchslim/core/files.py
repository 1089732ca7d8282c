"""Atomic file writes: an output appears complete or not at all, and a failure keeps the old one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torchslim.errors import OutputError


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A path that cannot take a file (empty, a folder, under a regular file, not writable, a full
    disk) is an :class:`OutputError` naming ``path``; nothing is left behind and an earlier file
    at ``path`` is kept."""
    path = output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot write {path}: {_file_above(path)} is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create the folder {path.parent} for {path.name}: {exc.strerror}") from None
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror} in {path.parent}; choose a writable folder") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(
                f"cannot write {path}: {exc.strerror or exc}; the file there (if any) is unchanged"
            ) from None
        raise
    return path


def output_path(path: str | os.PathLike) -> Path:
    """``path`` as a file path, or an :class:`OutputError` when it cannot name a file."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise OutputError(f"output path {path!r}: give a file name, e.g. 'model.tslim'")
    out = Path(path)
    if out.is_dir() or str(os.fspath(path)).endswith(os.sep):
        raise OutputError(f"{out} names a folder: give a file name inside it, e.g. {out / 'model.tslim'}")
    return out


def _file_above(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` that is not a folder (the one blocking it)."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else path.parent
    return path.parent


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
