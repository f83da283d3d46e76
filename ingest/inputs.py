"""The video list: a folder, a text file of paths, or a CSV/Parquet table with a ``path`` column (optional ``id``).

Every listed input keeps its ``source`` string exactly as written (that is what the ledgers record), gets a stable
shard key, and a list position that fixes which shard task it belongs to.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from soundnet.shards.schema import make_key

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".3gp", ".ogv", ".vob", ".mxf",
)  # fmt: skip


@dataclass(frozen=True)
class VideoInput:
    source: str  # as listed: a path (relative paths resolve from the working directory) or an http(s) URL
    key: str | None  # None: a second listing of a key already taken (recorded as a 'duplicate' failure)


class InputListError(Exception):
    """A --videos argument that cannot be read as a list of videos."""


def _from_folder(folder: Path) -> list[tuple[str, str | None]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    return [(str(p), None) for p in files]


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


def _from_text(path: Path) -> list[tuple[str, str | None]]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [(line, None) for line in lines if line and not line.startswith("#")]


def read_video_list(spec: str | Path) -> list[VideoInput]:
    """All inputs named by ``spec``, in a deterministic order, each with its key (duplicates marked)."""
    path = Path(spec)
    if path.is_dir():
        entries = _from_folder(path)
    elif not path.is_file():
        raise InputListError(f"--videos {spec}: no such file or folder")
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            entries = _from_table(list(csv.DictReader(f)), str(path))
    elif path.suffix.lower() in (".parquet", ".pq"):
        entries = _from_table(pq.read_table(path).to_pylist(), str(path))
    else:
        entries = _from_text(path)
    if not entries:
        raise InputListError(f"--videos {spec}: lists no videos")
    seen: set[str] = set()
    inputs = []
    for source, video_id in entries:
        try:
            key = make_key(source, video_id)
        except ValueError as exc:
            raise InputListError(f"--videos {spec}: {exc}") from exc
        inputs.append(VideoInput(source, None if key in seen else key))
        seen.add(key)
    return inputs
