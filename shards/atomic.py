"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

Place = Callable[[Path, Path], None]
"""Puts a complete temporary file (first argument) under its final name (second)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, place: Place = os.replace) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and put in place by ``place``
    (``os.replace`` by default; ``os.link`` keeps a file that is already there and raises FileExistsError).

    The temporary name starts with ``.`` and ends with ``.tmp`` so that shard globs never pick it up and a
    resumed run can sweep leftovers from a killed one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        place(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Write ``path`` complete and only if it does not exist yet: of several writers at once, exactly one creates
    it (True), and no reader ever sees it partly written. Works on shared filesystems that have hard links."""
    try:
        with atomic_path(path, place=os.link) as tmp:
            tmp.write_text(text)
    except FileExistsError:
        return False
    return True


def unwritable_out(out: Path) -> str | None:
    """Why the folder ``out`` (created if missing) cannot be written, as one line naming it, or None: checked before
    any work, so that the message names the folder rather than a temporary file met later."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return f"--out {out} is not writable ({exc.strerror or exc}): choose another folder"
    return None
