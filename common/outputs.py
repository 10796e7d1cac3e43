"""The one way stepcache writes what a run produces: checked before any model work, moved into place when done.

* :func:`check_output_file` / :func:`check_output_dir` run while arguments are checked, before a model loads, so
  a path that cannot be written fails in a second instead of after the whole generation. They create nothing.
* :func:`atomic_file` and :func:`write_text` write to a temporary name beside the target and ``os.replace`` it
  into place, so an interrupted or failed run never leaves half a file under the real name.
* :func:`atomic_dir` builds a whole output folder beside the target and swaps it in when the body succeeds, so a
  folder never mixes one run's files with an earlier run's.
* Files are created with the process umask (``tempfile.mkstemp`` alone would give 0600).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputError


class OutputError(InputError):
    """An output path that cannot be written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (mkdir -p would then succeed)."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r}: folder {str(ancestor)!r} is not writable")


def check_output_file(path: str | os.PathLike, flag: str, suffixes: Sequence[str] = ()) -> Path:
    """An output file path that can be written: a known suffix (when ``suffixes`` is given), not a folder, in a
    folder that exists or can be made. Creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {str(path)!r} exists and is not writable")
    _writable_parent(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """An output folder path that can be written: a folder or nothing yet, in a writable place. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a file; give a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r} is not writable")
    _writable_parent(path, flag)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, require_content: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that choose a format by it still do) for a
    writer that takes a file name; on success it replaces ``path``, on any exception it is removed. With
    ``require_content``, a body that left the file empty (a writer that failed quietly) is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        if require_content and (not os.path.exists(tmp) or os.path.getsize(tmp) == 0):
            raise OSError(f"nothing was written to {path}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on any exception it is removed."""
    with atomic_path(path, require_content=False) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a whole text file atomically."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data, **dumps) -> Path:
    """Write a JSON file atomically (indent 1 and a final newline unless ``dumps`` says otherwise): the one way
    stats, profiles, settings and reports are written."""
    import json
    return write_text(path, json.dumps(data, **{"indent": 1, **dumps}) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder's whole content in a temporary folder beside ``path``; on success it takes ``path``'s place
    (an earlier folder there is removed only then), on any exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=str(path.parent)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=str(path.parent)))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
