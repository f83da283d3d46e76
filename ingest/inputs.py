"""The video list: one video file, a folder, a text file of paths, or a CSV/Parquet table with a ``path`` column
(optional ``id``).

Every listed input keeps its ``source`` string exactly as written (that is what the ledgers record), gets a stable
shard key derived from that string (or its ``id``), and a list position that fixes which shard task it belongs to.
A file listed again under another spelling (``/a/../a/x.mp4``, a symlink) is found by its resolved path and becomes
a ``duplicate`` failure under the spelling it came as, so the same video never becomes two samples.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from soundnet.media import container_signature, is_url
from soundnet.shards.schema import make_key

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".3gp", ".ogv", ".vob", ".mxf",
)  # fmt: skip
_HELP = "give a video file, a folder of videos, a UTF-8 text list (one path or URL per line), or a CSV/Parquet list"


@dataclass(frozen=True)
class VideoInput:
    source: str  # as listed: a path (relative paths resolve from the working directory) or an http(s) URL
    key: str | None  # None: a second listing of a video already listed (recorded as a 'duplicate' failure)


class InputListError(Exception):
    """A --videos argument that cannot be read as a list of videos."""


def _from_folder(folder: Path) -> list[tuple[str, str | None]]:
    """Video files under ``folder``; a name that is not UTF-8 cannot be recorded in a ledger: named and left out."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    entries = []
    for path in files:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            log.warning("%s: file name is not UTF-8, left out (rename it to UTF-8 to ingest it)", shown)
            continue
        entries.append((str(path), None))
    return entries


def _from_table(rows: list[dict], where: str) -> list[tuple[str, str | None]]:
    if rows and "path" not in rows[0]:
        raise InputListError(f"{where}: needs a 'path' column (has {sorted(rows[0])})")
    out = []
    for i, row in enumerate(rows):
        path = row.get("path")
        if path is None or not str(path).strip():
            raise InputListError(f"{where}: row {i + 1} has an empty path")
        video_id = row.get("id")
        out.append((str(path), None if video_id in (None, "") else str(video_id)))
    return out


def _read_utf8(path: Path) -> str:
    """The text of a list file (a UTF-8 byte order mark dropped), or an error naming the file and the line that is
    not UTF-8 text."""
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise InputListError(f"--videos {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"\0" in data:
        kind = container_signature(path)
        if kind:
            raise InputListError(
                f"--videos {path}: is a {kind} file without a video extension; rename it (e.g. to .mp4) "
                "to ingest it alone, or list it in a text file"
            )
        raise InputListError(f"--videos {path}: is binary data, not a list of videos; {_HELP}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputListError(
            f"--videos {path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x}); save the list as UTF-8"
        ) from exc


def _read_parquet(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InputListError(f"--videos {path}: not a readable Parquet file ({exc})") from exc


def _listed_path(line: str) -> str:
    """The source a text line names: stripped of surrounding blanks, unless only the unstripped name exists."""
    stripped = line.strip()
    if stripped != line and not is_url(stripped) and not os.path.lexists(stripped) and os.path.lexists(line):
        return line
    return stripped


def _from_text(path: Path) -> list[tuple[str, str | None]]:
    lines = (line.removesuffix("\r") for line in _read_utf8(path).split("\n"))
    return [(_listed_path(line), None) for line in lines if line.strip() and not line.strip().startswith("#")]


def _identity(source: str) -> str:
    """What makes two listings the same video: the resolved path of a file, the URL as written."""
    return source if is_url(source) else os.path.realpath(source)


def read_video_list(spec: str | Path) -> list[VideoInput]:
    """All inputs named by ``spec``, in a deterministic order, each with its key (duplicates marked)."""
    path = Path(spec)
    if path.is_dir():
        entries = _from_folder(path)
    elif not path.is_file():
        raise InputListError(f"--videos {spec}: no such file or folder")
    elif path.suffix.lower() == ".csv":
        entries = _from_table(list(csv.DictReader(io.StringIO(_read_utf8(path), newline=""))), str(path))
    elif path.suffix.lower() in (".parquet", ".pq"):
        entries = _from_table(_read_parquet(path), str(path))
    elif path.suffix.lower() in VIDEO_EXTENSIONS:
        entries = [(str(path), None)]
    else:
        entries = _from_text(path)
    if not entries:
        raise InputListError(f"--videos {spec}: lists no videos")
    seen_keys: set[str] = set()
    seen_videos: set[str] = set()
    inputs = []
    for source, video_id in entries:
        try:
            key = make_key(source, video_id)
        except ValueError as exc:
            raise InputListError(f"--videos {spec}: {exc}") from exc
        identity = _identity(source)
        inputs.append(VideoInput(source, None if key in seen_keys or identity in seen_videos else key))
        seen_keys.add(key)
        seen_videos.add(identity)
    return inputs
