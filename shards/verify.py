"""Check a finished run: every shard read strictly, every sample against the schema and its recorded digests, and
the ledgers against the shards, so that nothing lost or silently changed passes as OK.

Unlike the training reader (which skips damage and goes on), this reads each shard with no tolerance: the first
damaged byte is a problem to name, with the shard and how many samples were readable before it.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm
from webdataset import tariterators

from soundnet.shards.ledger import INDEX_SCHEMA, Kind, RunLayout, read_table, to_table
from soundnet.shards.reader import data_follows
from soundnet.shards.schema import META_MEMBER, decode_sample, member_digests, validate_sample

DIGEST_COLUMN = "sha256"
LEGACY_INDEX_SCHEMA = INDEX_SCHEMA.remove(INDEX_SCHEMA.get_field_index(DIGEST_COLUMN))
"""The index as written before checksums: still readable, verified for structure only."""

DUPLICATE_REASON = "duplicate"
"""A failure row that records a second listing of an input; its first listing may well be a sample."""

ShardRow = dict[str, Any]


def read_index(path: str | os.PathLike) -> tuple[pa.Table, bool]:
    """Read an index ledger; also one written before checksums. Returns (table, whether it holds digests)."""
    try:
        return read_table(path, "index"), True
    except ValueError:
        table = read_table(path)
        if not table.schema.equals(LEGACY_INDEX_SCHEMA, check_metadata=False):
            raise
        return table, False


def read_ledger(path: str | os.PathLike, kind: Kind) -> tuple[pa.Table, bool]:
    """Read either ledger; the flag says whether per-member digests are present (always True for failures)."""
    return read_index(path) if kind == "index" else (read_table(path, kind), True)


def run_ledger(layout: RunLayout, kind: Kind) -> tuple[pa.Table, bool, str]:
    """The run-level ledger, or the merged parts of a run that is not finalized yet; says where it came from."""
    path = layout.index_path if kind == "index" else layout.failures_path
    if path.exists():
        return *read_ledger(path, kind), path.name
    parts = [layout.part_paths(t)[0 if kind == "index" else 1] for t in layout.completed_tasks()]
    tables = [read_ledger(p, kind) for p in parts]
    table = pa.concat_tables([t for t, _ in tables]) if tables else to_table([], kind)
    return table, all(has for _, has in tables), f"{len(parts)} parts (run not finalized)"


def not_a_run_message(layout: RunLayout) -> str | None:
    """Why ``layout.out_dir`` is not a run folder at all (a typo, the wrong folder), or None."""
    if layout.shard_paths() or layout.index_path.exists() or layout.parts_dir.is_dir():
        return None
    return f"{layout.out_dir} holds no run: no shard-*.tar, index.parquet or parts/ (give the --out of `ingest run`)"


def shard_samples(path: Path, damage: list[BaseException]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, grouped as the training reader groups them, up to the first damaged byte.

    Reading stops at the first damage, which is appended to ``damage``; every sample before it is still
    yielded (the last one may lack members cut off by the damage: the schema and digest checks name that).
    """

    def files() -> Iterator[dict[str, Any]]:
        try:
            yield from tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
        except (tarfile.TarError, OSError, EOFError) as exn:
            damage.append(exn)

    with open(path, "rb") as stream:
        yield from tariterators.group_by_keys(files())
        stopped = stream.tell()
        if not damage and data_follows(stream, stopped):
            reason = f"a bad or zeroed tar header ends the archive near byte {stopped}, yet data follows"
            damage.append(tarfile.ReadError(reason))


def _damage(path: Path, exn: BaseException, read: int) -> str:
    reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__  # wds appends " @ <stream>"
    if isinstance(exn, OSError):
        return f"{path.name}: cannot be read ({exn})"
    if read == 0:
        return f"{path.name}: not a readable tar file ({reason}); no sample could be read from it"
    return f"{path.name}: damaged after {read} sample(s) ({reason}); the rest of the shard cannot be read"


def _digest_problems(where: str, recorded: dict[str, str] | None, raw: dict[str, Any]) -> list[str]:
    """Name every member whose bytes differ from its digest at write time, and members added or lost."""
    if recorded is None:
        return []  # the sample is not in the index: reported by the ledger check
    found = member_digests(raw)
    changed = sorted(m for m in found.keys() & recorded.keys() if found[m] != recorded[m])
    problems = []
    if changed:
        problems.append(
            f"{where}: member(s) {', '.join(map(repr, changed))} differ from the sha256 recorded at write time "
            "(changed or damaged after writing)"
        )
    if lost := sorted(recorded.keys() - found.keys()):
        problems.append(f"{where}: member(s) {', '.join(map(repr, lost))} written at ingest are missing")
    if added := sorted(found.keys() - recorded.keys()):
        problems.append(f"{where}: member(s) {', '.join(map(repr, added))} were not written at ingest")
    return problems


@dataclass
class Report:
    """What ``verify_run`` found: problems make the run fail; notes are said but do not."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    digests_checked: int = 0


def _read_ledgers(layout: RunLayout, report: Report) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    index_rows: list[dict[str, Any]] = []
    failure_rows: list[dict[str, Any]] = []
    has_digests = True
    for kind, path in (("index", layout.index_path), ("failures", layout.failures_path)):
        if not path.exists():
            report.problems.append(f"{path.name} missing (run not finalized? an `ingest run --resume` finishes it)")
            continue
        try:
            table, has = read_ledger(path, kind)  # type: ignore[arg-type]
        except (OSError, ValueError, pa.ArrowException) as exn:
            report.problems.append(f"{path.name} unreadable: {exn}")
            continue
        if kind == "index":
            index_rows, has_digests = table.to_pylist(maps_as_pydicts="strict"), has
        else:
            failure_rows = table.to_pylist()
    return index_rows, failure_rows, has_digests


def _read_shards(
    layout: RunLayout, index_rows: list[dict[str, Any]], digests: bool, report: Report
) -> dict[str, ShardRow]:
    """Read every shard; return key -> the index row each sample implies; add problems for what is wrong."""
    recorded = {row["key"]: row.get(DIGEST_COLUMN) for row in index_rows} if digests else {}
    found: dict[str, ShardRow] = {}
    paths = layout.shard_paths()
    report.shards = len(paths)
    with tqdm(total=len(index_rows) or None, unit="sample", desc="verify", leave=False) as bar:
        for path in paths:
            read = 0
            damage: list[BaseException] = []
            try:
                for raw in shard_samples(path, damage):
                    read += 1
                    bar.update()
                    key = raw["__key__"]
                    where = f"{path.name}: sample {key!r}"
                    if digests:
                        report.problems += _digest_problems(where, recorded.get(key), raw)
                        report.digests_checked += key in recorded
                    try:
                        sample = decode_sample(raw)
                    except ValueError as exn:
                        report.problems.append(f"{path.name}: {exn}")
                        continue
                    report.problems += [f"{where}: {p}" for p in validate_sample(sample)]
                    if key in found:
                        report.problems.append(f"duplicate key {key!r} in {found[key]['shard']} and {path.name}")
                        continue
                    found[key] = {
                        "shard": path.name,
                        "source": sample.meta.get("source"),
                        "duration_s": sample.meta.get("duration_s"),
                        "frames": sample.frames,
                        "audio_seconds": sample.audio_seconds,
                    }
            except (ValueError, OSError) as exn:  # a member name twice in one sample; a folder named like a shard
                damage.append(exn)
            report.problems += [_damage(path, exn, read) for exn in damage]
            report.samples += read
    return found


def _check_index(index_rows: list[dict[str, Any]], found: dict[str, ShardRow], layout: RunLayout) -> list[str]:
    """Every index row is a sample in its shard with the same fields, and every sample is indexed once."""
    problems: list[str] = []
    present = {p.name for p in layout.shard_paths()}
    lost_shards = Counter(row["shard"] for row in index_rows if row["shard"] not in present)
    problems += [f"{shard} is missing: the index lists {n} sample(s) in it" for shard, n in sorted(lost_shards.items())]
    indexed: set[str] = set()
    for row in index_rows:
        key = row["key"]
        if key in indexed:
            problems.append(f"index lists key {key!r} twice")
            continue
        indexed.add(key)
        if row["shard"] in lost_shards:
            continue
        if key not in found:
            problems.append(f"index row {key!r} (shard {row['shard']}) is in no shard")
            continue
        problems += [
            f"index row {key!r}: {col} is {row[col]!r} but the shard says {value!r}"
            for col, value in found[key].items()
            if row[col] != value
        ]
    problems += [f"sample {k!r} in {found[k]['shard']} is not in the index" for k in sorted(set(found) - indexed)]
    return problems


def _identical_samples(index_rows: list[dict[str, Any]]) -> list[str]:
    """Samples whose every member but the json (which names the source) is byte-identical: one video twice."""
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for row in index_rows:
        content = tuple(sorted((m, d) for m, d in (row.get(DIGEST_COLUMN) or {}).items() if m != META_MEMBER))
        if content:
            groups.setdefault(content, []).append(row)
    return [
        "samples "
        + ", ".join(f"{r['key']!r} ({r['source']})" for r in rows)
        + " hold identical audio and teacher outputs: the same video listed under different names?"
        for rows in groups.values()
        if len(rows) > 1
    ]


def _check_failures(index_rows: list[dict[str, Any]], failure_rows: list[dict[str, Any]]) -> list[str]:
    """No input is both a sample and a failure, except a second listing recorded as a ``duplicate`` failure."""
    sampled = {row["source"] for row in index_rows}
    failed = {row["source"] for row in failure_rows if row["reason"] != DUPLICATE_REASON}
    return [f"source {s!r} is both in the index and in failures" for s in sorted(sampled & failed)]


def verify_run(run_dir: str | os.PathLike, digests: bool = True) -> Report:
    """Check the run in ``run_dir``; with ``digests`` also recompute every member's sha256 (``--quick`` skips it)."""
    layout = RunLayout(run_dir)
    report = Report()
    if not_a_run := not_a_run_message(layout):
        report.problems.append(not_a_run)
        return report
    report.problems += [
        f"leftover temporary {p.name} (run killed? an `ingest run --resume` sweeps it)"
        for p in sorted(layout.out_dir.glob(".*.tmp")) + sorted(layout.parts_dir.glob(".*.tmp"))
    ]
    index_rows, failure_rows, has_digests = _read_ledgers(layout, report)
    if not has_digests:
        report.notes.append(
            "index.parquet has no sha256 column (run written before checksums): samples checked for structure "
            "and against the ledgers, not for changed bytes"
        )
    elif not digests:
        report.notes.append("--quick: member sha256 digests not recomputed")
    if not layout.shard_paths() and index_rows:
        report.problems.append("no shard-*.tar files in the run directory")
    found = _read_shards(layout, index_rows, digests and has_digests, report)
    report.notes += _identical_samples(index_rows)
    report.problems += _check_index(index_rows, found, layout)
    report.problems += _check_failures(index_rows, failure_rows)
    return report
