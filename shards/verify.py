"""Check a finished run: every shard read strictly, every sample against the schema and its recorded digests, and
the ledgers against the shards, so that nothing lost or silently changed passes as OK.

Unlike the training reader (which skips damage and goes on), this reads each shard with no tolerance: the first
damaged byte is a problem to name, with the shard and how many samples were readable before it. A run folder may be
a URL (:mod:`shards.remote`): each shard is then streamed in large ranged reads; where the storage cannot list
(plain HTTP) the shards are those the index names.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tqdm import tqdm
from webdataset import tariterators

from soundnet.shards import remote
from soundnet.shards.catalog import DIGEST_COLUMN, FAILURES_NAME, INDEX_NAME, MANIFEST_NAME, PARTS_NAME, read_index
from soundnet.shards.ledger import Kind, RunLayout, read_table, to_table
from soundnet.shards.reader import data_follows, scan_shard
from soundnet.shards.schema import META_MEMBER, decode_sample, member_digests, validate_sample

STREAM_BUFFER = 16 << 20
"""Bytes per ranged request when a shard at a URL is streamed whole."""
_SHARD_NAME = re.compile(r"shard-\d{6,}\.tar")

DUPLICATE_REASON = "duplicate"
"""A failure row that records a second listing of an input; its first listing may well be a sample."""

ShardRow = dict[str, Any]


def read_ledger(path: str, kind: Kind) -> tuple[pa.Table, bool]:
    """Read either ledger (a path or URL); the flag says whether per-member digests are present (always True for
    failures)."""
    if kind == "index":
        return read_index(path)
    with remote.open_binary(path, 1 << 22) as source:
        return read_table(source, kind), True


@dataclass
class RunFiles:
    """The files of a run folder at a local path or a URL, by name."""

    where: str

    def __post_init__(self) -> None:
        self.where = self.where.rstrip("/") if remote.is_url(self.where) else self.where
        self.layout = None if remote.is_url(self.where) else RunLayout(self.where)

    def url(self, *names: str) -> str:
        path = self.where
        for name in names:
            path = remote.join(path, name)
        return path

    def ledger(self, kind: Kind) -> str:
        return self.url(INDEX_NAME if kind == "index" else FAILURES_NAME)

    def shards(self, index_rows: list[dict[str, Any]]) -> tuple[list[str], str | None]:
        """The run's shard files in task order, and a note when they could not be listed (those the index names and
        that exist are taken)."""
        if self.layout is not None:
            return [str(p) for p in self.layout.shard_paths()], None
        listed = remote.listing(self.where, "shard-*.tar")
        if listed is not None:
            return [u for u in listed if _SHARD_NAME.fullmatch(remote.name(u))], None
        named = sorted({row["shard"] for row in index_rows})
        found = [self.url(name) for name in named if remote.exists(self.url(name))]
        return found, f"{self.where} cannot be listed (plain HTTP): the shards checked are those {INDEX_NAME} names"

    def temporaries(self) -> list[str]:
        """Leftover ``.*.tmp`` files of a killed run (local folders only: a URL holds a published copy)."""
        if self.layout is None:
            return []
        found = sorted(self.layout.out_dir.glob(".*.tmp")) + sorted(self.layout.parts_dir.glob(".*.tmp"))
        return [p.name for p in found]

    def ledger_parts(self, kind: Kind) -> list[str] | None:
        """The ledger parts of the finished tasks of a run not finalized yet; None where they cannot be listed."""
        if self.layout is not None:
            return [str(self.layout.part_paths(t)[0 if kind == "index" else 1]) for t in self.layout.completed_tasks()]
        return remote.listing(self.url(PARTS_NAME), f"shard-*.{kind}.parquet")

    def not_a_run_message(self) -> str | None:
        """Why the folder is not a run folder at all (a typo, the wrong folder), or None."""
        if self.layout is not None:
            layout = self.layout
            if layout.shard_paths() or layout.index_path.exists() or layout.parts_dir.is_dir():
                return None
            return (
                f"{layout.out_dir} holds no run: no shard-*.tar, index.parquet or parts/ "
                "(give the --out of `ingest run`)"
            )
        if remote.exists(self.url(INDEX_NAME)) or remote.exists(self.url(MANIFEST_NAME)):
            return None
        return f"{self.where} holds no run: no {INDEX_NAME} or {MANIFEST_NAME} there (give the URL of a run folder)"


def run_ledger(files: RunFiles, kind: Kind) -> tuple[pa.Table, bool, str]:
    """The run-level ledger, or the merged parts of a run that is not finalized yet; says where it came from."""
    path = files.ledger(kind)
    if remote.exists(path):
        return *read_ledger(path, kind), remote.name(path)
    parts = files.ledger_parts(kind)
    if parts is None:
        raise ValueError(f"{path} does not exist (run not finalized?) and the parts of {files.where} cannot be listed")
    tables = [read_ledger(p, kind) for p in parts]
    table = pa.concat_tables([t for t, _ in tables], promote_options="default") if tables else to_table([], kind)
    return table, all(has for _, has in tables), f"{len(parts)} parts (run not finalized)"


def shard_samples(path: str, damage: list[BaseException]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, grouped as the training reader groups them, up to the first damaged byte.

    Reading stops at the first damage, which is appended to ``damage``; every sample before it is still
    yielded (the last one may lack members cut off by the damage: the schema and digest checks name that).
    """

    def files() -> Iterator[dict[str, Any]]:
        try:
            yield from tariterators.tar_file_expander([{"url": path, "stream": stream}])
        except (tarfile.TarError, OSError, EOFError) as exn:
            damage.append(exn)

    with remote.open_binary(path, STREAM_BUFFER) as stream:
        yield from tariterators.group_by_keys(files())
        stopped = stream.tell()
        if not damage and data_follows(stream, stopped):
            reason = f"a bad or zeroed tar header ends the archive near byte {stopped}, yet data follows"
            damage.append(tarfile.ReadError(reason))


def _damage(name: str, exn: BaseException, read: int) -> str:
    reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__  # wds appends " @ <stream>"
    if isinstance(exn, OSError):
        return f"{name}: cannot be read ({exn})"
    if read == 0:
        return f"{name}: not a readable tar file ({reason}); no sample could be read from it"
    return f"{name}: damaged after {read} sample(s) ({reason}); the rest of the shard cannot be read"


def digest_problems(recorded: dict[str, str], raw: dict[str, Any]) -> list[str]:
    """Name every member whose bytes differ from its digest at write time, and members added or lost."""
    found = member_digests(raw)
    changed = sorted(m for m in found.keys() & recorded.keys() if found[m] != recorded[m])
    problems = []
    if changed:
        problems.append(
            f"member(s) {', '.join(map(repr, changed))} differ from the sha256 recorded at write time "
            "(changed or damaged after writing)"
        )
    if lost := sorted(recorded.keys() - found.keys()):
        problems.append(f"member(s) {', '.join(map(repr, lost))} written at ingest are missing")
    if added := sorted(found.keys() - recorded.keys()):
        problems.append(f"member(s) {', '.join(map(repr, added))} were not written at ingest")
    return problems


@dataclass
class Report:
    """What ``verify_run`` found: problems make the run fail; notes are said but do not."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    digests_checked: int = 0


def _read_ledgers(files: RunFiles, report: Report) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    index_rows: list[dict[str, Any]] = []
    failure_rows: list[dict[str, Any]] = []
    has_digests = True
    for kind in ("index", "failures"):
        path = files.ledger(kind)  # type: ignore[arg-type]
        if not remote.exists(path):
            report.problems.append(
                f"{remote.name(path)} missing (run not finalized? an `ingest run --resume` finishes it)"
            )
            continue
        try:
            table, has = read_ledger(path, kind)  # type: ignore[arg-type]
        except (OSError, ValueError, pa.ArrowException) as exn:
            report.problems.append(f"{remote.name(path)} unreadable: {exn}")
            continue
        if kind == "index":
            index_rows, has_digests = table.to_pylist(maps_as_pydicts="strict"), has
        else:
            failure_rows = table.to_pylist()
    return index_rows, failure_rows, has_digests


def _read_shards(
    paths: list[str], index_rows: list[dict[str, Any]], digests: bool, report: Report
) -> dict[str, ShardRow]:
    """Read every shard; return key -> the index row each sample implies; add problems for what is wrong."""
    recorded = {row["key"]: row.get(DIGEST_COLUMN) for row in index_rows} if digests else {}
    found: dict[str, ShardRow] = {}
    report.shards = len(paths)
    with tqdm(total=len(index_rows) or None, unit="sample", desc="verify", leave=False) as bar:
        for path in paths:
            name = remote.name(path)
            read = 0
            damage: list[BaseException] = []
            try:
                for raw in shard_samples(path, damage):
                    read += 1
                    bar.update()
                    key = raw["__key__"]
                    where = f"{name}: sample {key!r}"
                    if digests and key in recorded:  # a sample not in the index is reported by the ledger check
                        report.problems += [f"{where}: {p}" for p in digest_problems(recorded[key], raw)]
                        report.digests_checked += 1
                    try:
                        sample = decode_sample(raw)
                    except ValueError as exn:
                        report.problems.append(f"{name}: {exn}")
                        continue
                    report.problems += [f"{where}: {p}" for p in validate_sample(sample)]
                    if key in found:
                        report.problems.append(f"duplicate key {key!r} in {found[key]['shard']} and {name}")
                        continue
                    found[key] = {
                        "shard": name,
                        "source": sample.meta.get("source"),
                        "duration_s": sample.meta.get("duration_s"),
                        "frames": sample.frames,
                        "audio_seconds": sample.audio_seconds,
                    }
            except (ValueError, OSError) as exn:  # a member name twice in one sample; a folder named like a shard
                damage.append(exn)
            report.problems += [_damage(name, exn, read) for exn in damage]
            report.samples += read
    return found


def _check_index(index_rows: list[dict[str, Any]], found: dict[str, ShardRow], shards: list[str]) -> list[str]:
    """Every index row is a sample in its shard with the same fields, and every sample is indexed once."""
    problems: list[str] = []
    present = {remote.name(p) for p in shards}
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


def _check_ranges(shards: list[str], index_rows: list[dict[str, Any]]) -> list[str]:
    """Every byte range the index records (remote readers fetch a sample by it) is where the shard holds it."""
    recorded: dict[str, dict[str, tuple[int, int]]] = {}
    for row in index_rows:
        if row.get("offset") is not None and row.get("size") is not None:
            recorded.setdefault(row["shard"], {})[row["key"]] = (row["offset"], row["offset"] + row["size"])
    problems: list[str] = []
    for path in shards:
        wanted = recorded.get(remote.name(path))
        if not wanted:
            continue
        try:
            spans = {span.key: (span.start, span.end) for span in scan_shard(path).samples}
        except FileNotFoundError:
            continue  # reported as missing
        problems += [
            f"index row {key!r}: bytes {start}-{end} of {remote.name(path)} recorded, but the sample lies at "
            f"{spans[key][0]}-{spans[key][1]}"
            for key, (start, end) in wanted.items()
            if key in spans and spans[key] != (start, end)
        ]
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
    """Check the run in ``run_dir`` (a path or URL); with ``digests`` also recompute every member's sha256
    (``--quick`` skips it)."""
    files = RunFiles(os.fspath(run_dir))
    report = Report()
    if not_a_run := files.not_a_run_message():
        report.problems.append(not_a_run)
        return report
    report.problems += [
        f"leftover temporary {name} (run killed? an `ingest run --resume` sweeps it)" for name in files.temporaries()
    ]
    index_rows, failure_rows, has_digests = _read_ledgers(files, report)
    if not has_digests:
        report.notes.append(
            "index.parquet has no sha256 column (run written before checksums): samples checked for structure "
            "and against the ledgers, not for changed bytes"
        )
    elif not digests:
        report.notes.append("--quick: member sha256 digests not recomputed")
    shards, unlisted = files.shards(index_rows)
    if unlisted:
        report.notes.append(unlisted)
    if not shards and index_rows:
        report.problems.append("no shard-*.tar files in the run directory")
    found = _read_shards(shards, index_rows, digests and has_digests, report)
    report.notes += _identical_samples(index_rows)
    report.problems += _check_index(index_rows, found, shards)
    report.problems += _check_ranges(shards, index_rows)
    report.problems += _check_failures(index_rows, failure_rows)
    return report
