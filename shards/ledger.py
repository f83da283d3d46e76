"""Index and failure ledgers, and the layout of a run directory.

Every input of a run ends up either as a row of ``index.parquet`` (a sample was written) or of
``failures.parquet`` (why not). Each task (one slice of the input list) writes its own shard, its stats and two
ledger parts, in that order, each stamped with the writer's attempt (its claim on the task): a task is complete
exactly when all four exist and agree (same attempt, the shard of the size its stats record), so a write that came
late from a run that had lost the task, or a shard another run removed, is never counted; a resumed run redoes
the rest. ``RunLayout.finalize`` merges the parts of the complete tasks into the two run-level tables.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from soundnet.shards.atomic import atomic_path

Kind = Literal["index", "failures"]

INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("audio_seconds", pa.float64(), nullable=False),
        pa.field("sha256", pa.map_(pa.string(), pa.string()), nullable=False),  # member -> digest at write time
        # The sample's bytes [offset, offset + size) in its shard, tar headers included: one ranged read fetches it.
        # Null in rows merged from parts written before byte ranges were recorded.
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
    ]
)
BYTE_RANGE_COLUMNS = ("offset", "size")
INDEX_SCHEMA_BEFORE_BYTE_RANGES = pa.schema([f for f in INDEX_SCHEMA if f.name not in BYTE_RANGE_COLUMNS])
"""The index as written before byte ranges were recorded: still read (and merged) as an index."""
FAILURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("error_class", pa.string(), nullable=False),
    ]
)
SCHEMAS: dict[str, pa.Schema] = {"index": INDEX_SCHEMA, "failures": FAILURE_SCHEMA}


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def _schema(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise ValueError(f"ledger kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
    return SCHEMAS[kind]


def to_table(rows: Sequence[dict[str, Any]], kind: Kind) -> pa.Table:
    """Build a typed table; rows with missing, extra or null columns are rejected (a typo is not a null)."""
    schema = _schema(kind)
    names = set(schema.names)
    for i, row in enumerate(rows):
        if set(row) != names:
            raise ValueError(
                f"{kind} row {i}: missing {sorted(names - set(row))}, unexpected {sorted(set(row) - names)}"
            )
        nulls = [name for name in schema.names if row[name] is None]
        if nulls:
            raise ValueError(f"{kind} row {i}: null values in {nulls}")
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_table(
    path: str | os.PathLike, rows: Sequence[dict[str, Any]], kind: Kind, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``rows`` as a parquet ledger atomically; zero rows still gives a typed, readable file. ``metadata``
    goes into the file's key-value metadata (the schema itself stays the ledger's)."""
    table = to_table(rows, kind)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(path: str | os.PathLike, kind: Kind | None = None) -> pa.Table:
    """Read a ledger; with ``kind``, raise ValueError unless its columns and types are the ledger schema."""
    table = pq.read_table(path)
    if kind == "index" and table.schema.equals(INDEX_SCHEMA_BEFORE_BYTE_RANGES, check_metadata=False):
        return table
    if kind is not None and not table.schema.equals(_schema(kind), check_metadata=False):
        raise ValueError(f"{path}: not a {kind} ledger; schema is\n{table.schema}")
    return table


def merge_parts(part_paths: Iterable[str | os.PathLike], out_path: str | os.PathLike, kind: Kind) -> Path:
    """Concatenate ledger parts, in the order given, into one ledger written atomically."""
    schema = _schema(kind)
    tables = [read_table(p, kind).replace_schema_metadata(None) for p in part_paths]  # parts' attempts stay there
    merged = pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
    with atomic_path(out_path) as tmp:
        pq.write_table(merged, tmp)
    return Path(out_path)


ATTEMPT_KEY = "soundnet.attempt"  # key-value metadata of a ledger part: the attempt that wrote it
_TASK_RE = re.compile(r"shard-(\d{6,})(?:\.tar|\.index\.parquet|\.failures\.parquet|_stats\.json)")
_TEMP_TASK_RE = re.compile(r"\.shard-(\d{6,})[._].*\.tmp")


class RunLayout:
    """Names of everything in a run directory, and the bookkeeping that makes a run resumable.

    ``OUT/shard-000012.tar``, its statistics ``OUT/shard-000012_stats.json``,
    ``OUT/parts/shard-000012.index.parquet``, ``OUT/parts/shard-000012.failures.parquet``, the claim of a run
    writing it ``OUT/claims/shard-000012.claim``, and after ``finalize`` ``OUT/index.parquet``,
    ``OUT/failures.parquet`` (and ``OUT/summary.json``, written by ``ingest run``).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / "parts"
        self.index_path = self.out_dir / "index.parquet"
        self.failures_path = self.out_dir / "failures.parquet"
        self.claims_dir = self.out_dir / "claims"
        self.manifest_path = self.out_dir / "run.json"
        self.summary_path = self.out_dir / "summary.json"

    def shard_path(self, task: int) -> Path:
        return self.out_dir / f"shard-{task:06d}.tar"

    def stats_path(self, task: int) -> Path:
        return self.out_dir / f"shard-{task:06d}_stats.json"

    def claim_path(self, task: int) -> Path:
        return self.claims_dir / f"shard-{task:06d}.claim"

    def part_paths(self, task: int) -> tuple[Path, Path]:
        """(index part, failures part) of a task."""
        stem = f"shard-{task:06d}"
        return self.parts_dir / f"{stem}.index.parquet", self.parts_dir / f"{stem}.failures.parquet"

    def is_complete(self, task: int) -> bool:
        """Whether ``task`` is done: its two parts exist and were written by one attempt, its stats name that attempt
        and the size of its shard, and the shard is there with that size. Parts without an attempt (written by
        tools, or by runs before attempts were recorded) count when both exist and the shard their samples are in
        does too."""
        try:
            index, failures = (pq.read_metadata(p) for p in self.part_paths(task))
            stamps = {_attempt(index), _attempt(failures)}
            if len(stamps) != 1:
                return False
            (attempt,) = stamps
            if attempt is None:
                return index.num_rows == 0 or self.shard_path(task).exists()
            stats = json.loads(self.stats_path(task).read_text())
            return stats.get("attempt") == attempt and self.shard_path(task).stat().st_size == stats.get("bytes")
        except (OSError, ValueError, pa.ArrowException):  # missing, or being replaced by another run right now
            return False

    def write_part(self, task: int, kind: Kind, rows: Sequence[dict[str, Any]], attempt: str | None = None) -> None:
        """Write one ledger part of ``task``, stamped with ``attempt``; the two parts come after the shard and stats."""
        index_part, failures_part = self.part_paths(task)
        path = index_part if kind == "index" else failures_part
        write_table(path, rows, kind, {ATTEMPT_KEY: attempt} if attempt else None)

    def write_parts(
        self,
        task: int,
        index_rows: Sequence[dict[str, Any]],
        failure_rows: Sequence[dict[str, Any]],
        attempt: str | None = None,
    ) -> None:
        """Record a task as done; call only after its shard (and, with ``attempt``, its stats) are in place."""
        self.write_part(task, "failures", failure_rows, attempt)
        self.write_part(task, "index", index_rows, attempt)

    def task_files(self, task: int) -> tuple[Path, ...]:
        """What a task leaves in the run folder, in the order to delete it: the stats first, so that a shard is
        never gone while stats and parts that describe it remain."""
        return (self.stats_path(task), *self.part_paths(task), self.shard_path(task))

    def discard_task(
        self, task: int, still_ours: Callable[[], bool] = lambda: True, temporaries: bool = True
    ) -> list[Path]:
        """Delete what earlier attempts left of an incomplete ``task`` (its files, and its temporaries unless
        ``temporaries`` is False), checking ``still_ours()`` before each deletion and stopping when it is False.
        Returns the removed paths."""
        folders = (self.out_dir, self.parts_dir) if temporaries else ()
        leftovers = [p for f in folders if f.is_dir() for p in f.glob(f".shard-{task:06d}[._]*.tmp")]
        removed = []
        for path in (*self.task_files(task), *leftovers):
            if not path.exists():
                continue
            if not still_ours():
                break
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def _tasks_in(self, folder: Path) -> set[int]:
        if not folder.is_dir():
            return set()
        return {int(m.group(1)) for p in folder.iterdir() if (m := _TASK_RE.fullmatch(p.name))}

    def completed_tasks(self) -> list[int]:
        return sorted(t for t in self._tasks_in(self.parts_dir) if self.is_complete(t))

    def shard_paths(self) -> list[Path]:
        """Existing shard files, in task order."""
        return [self.shard_path(t) for t in sorted(self._tasks_in(self.out_dir)) if self.shard_path(t).exists()]

    def sweep_temporaries(self, busy: Collection[int] = (), min_age_s: float = 0.0) -> list[Path]:
        """Delete what a killed run left: ``.*.tmp`` files, and shards, stats and parts of incomplete tasks.

        Tasks in ``busy`` (held by a live run) are left alone, and so are temporaries of no task (a ledger or
        summary being written, a claim being made) younger than ``min_age_s``. Returns the removed paths.
        """
        now = time.time()
        removed: list[Path] = []
        for folder in (self.out_dir, self.parts_dir, self.claims_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                task = _TEMP_TASK_RE.fullmatch(path.name) if folder != self.claims_dir else None
                if task is not None and int(task.group(1)) in busy:
                    continue
                if task is None and now - _mtime(path, now) < min_age_s:
                    continue
                removed.append(path)
        for task in self._tasks_in(self.out_dir) | self._tasks_in(self.parts_dir):
            if task not in busy and not self.is_complete(task):
                removed += [p for p in self.task_files(task) if p.exists()]
        for path in removed:
            path.unlink(missing_ok=True)
        return sorted(removed)

    def finalize(self) -> tuple[Path, Path]:
        """Merge the parts of all complete tasks into ``index.parquet`` and ``failures.parquet``."""
        tasks = self.completed_tasks()
        index = merge_parts([self.part_paths(t)[0] for t in tasks], self.index_path, "index")
        failures = merge_parts([self.part_paths(t)[1] for t in tasks], self.failures_path, "failures")
        return index, failures


def _attempt(part: pq.FileMetaData) -> str | None:
    metadata = part.metadata or {}
    value = metadata.get(ATTEMPT_KEY.encode())
    return value.decode() if value is not None else None
