"""``shards`` command: inspect and check a run directory written by ``ingest run``."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from soundnet.shards.ledger import RunLayout, read_table, to_table
from soundnet.shards.reader import iter_raw
from soundnet.shards.schema import decode_sample, validate_sample


def _ledger(layout: RunLayout, kind: str) -> tuple[pa.Table, str]:
    """The run-level ledger, or the merged parts of a run that has not been finalized yet."""
    path = layout.index_path if kind == "index" else layout.failures_path
    if path.exists():
        return read_table(path, kind), path.name
    parts = [layout.part_paths(t)[0 if kind == "index" else 1] for t in layout.completed_tasks()]
    tables = [read_table(p, kind) for p in parts]
    table = pa.concat_tables(tables) if tables else to_table([], kind)
    return table, f"{len(parts)} parts (run not finalized)"


def _rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@click.group()
def main() -> None:
    """Inspect and verify SoundNet shard directories."""


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info(run_dir: Path) -> None:
    """Summarise a run: samples, shards, hours of audio, frames per clip, teachers, failures by reason."""
    layout = RunLayout(run_dir)
    index, index_from = _ledger(layout, "index")
    failures, failures_from = _ledger(layout, "failures")
    shard_paths = layout.shard_paths()
    audio_s = pc.sum(index["audio_seconds"]).as_py() or 0.0
    source_s = pc.sum(index["duration_s"]).as_py() or 0.0
    click.echo(f"run {run_dir}")
    click.echo(
        _rows(
            [
                ("samples", str(index.num_rows), f"from {index_from}"),
                ("failures", str(failures.num_rows), f"from {failures_from}"),
                (
                    "shards",
                    str(len(shard_paths)),
                    f"{sum(p.stat().st_size for p in shard_paths) / 1e6:.1f} MB",
                ),
                (
                    "audio",
                    f"{audio_s / 3600:.2f} h ({audio_s:.0f} s)",
                    f"source duration {source_s / 3600:.2f} h",
                ),
            ]
        )
    )
    frames = Counter(index["frames"].to_pylist())
    if frames:
        click.echo("frames per clip:")
        click.echo(_rows([("frames", "samples")] + [(str(f), str(n)) for f, n in sorted(frames.items())]))
    first = None
    if shard_paths and index.num_rows:
        with contextlib.closing(iter_raw(shard_paths)) as samples:
            first = next(samples, None)
    if first is not None:
        teachers = decode_sample(first).meta.get("teachers", {})
        click.echo("teachers:")
        click.echo(
            _rows(
                [("name", "classes", "arch", "weights")]
                + [
                    (name, str(t.get("classes")), str(t.get("arch")), str(t.get("weights")))
                    for name, t in sorted(teachers.items())
                ]
            )
        )
    if failures.num_rows:
        by = Counter(zip(failures["stage"].to_pylist(), failures["reason"].to_pylist(), strict=True))
        click.echo("failures by reason:")
        click.echo(_rows([("stage", "reason", "count")] + [(s, r, str(n)) for (s, r), n in by.most_common()]))


def _verify(layout: RunLayout) -> list[str]:
    problems: list[str] = []
    problems += [
        f"leftover temporary {p.name} (run killed? sweep before resuming)"
        for p in sorted(layout.out_dir.glob(".*.tmp")) + sorted(layout.parts_dir.glob(".*.tmp"))
    ]
    ledgers: dict[str, pa.Table] = {}
    for kind, path in (("index", layout.index_path), ("failures", layout.failures_path)):
        if not path.exists():
            problems.append(f"{path.name} missing (run not finalized?)")
            continue
        try:
            ledgers[kind] = read_table(path, kind)
        except (OSError, ValueError, pa.ArrowException) as exn:
            problems.append(f"{path.name} unreadable: {exn}")
    index_rows = ledgers["index"].to_pylist() if "index" in ledgers else []
    shard_paths = layout.shard_paths()
    if not shard_paths and index_rows:
        problems.append("no shard-*.tar files in the run directory")

    found: dict[str, dict[str, object]] = {}  # key -> the index row the shard implies
    bar = tqdm(total=len(index_rows) or None, unit="sample", desc="verify")
    for path in shard_paths:
        try:
            for raw in iter_raw([path]):
                bar.update()
                key = raw["__key__"]
                try:
                    sample = decode_sample(raw)
                except ValueError as exn:
                    problems.append(f"{path.name}: {exn}")
                    continue
                problems += [f"{path.name}:{key}: {p}" for p in validate_sample(sample)]
                if key in found:
                    problems.append(f"duplicate key {key!r} in {found[key]['shard']} and {path.name}")
                    continue
                found[key] = {
                    "shard": path.name,
                    "source": sample.meta.get("source"),
                    "duration_s": sample.meta.get("duration_s"),
                    "frames": sample.frames,
                    "audio_seconds": sample.audio_seconds,
                }
        except ValueError as exn:
            problems.append(str(exn))
    bar.close()

    indexed: set[str] = set()
    for row in index_rows:
        key = row["key"]
        if key in indexed:
            problems.append(f"index lists key {key!r} twice")
            continue
        indexed.add(key)
        if key not in found:
            problems.append(f"index row {key!r} (shard {row['shard']}) is in no shard")
            continue
        problems += [
            f"index row {key!r}: {col} is {row[col]!r} but the shard says {value!r}"
            for col, value in found[key].items()
            if row[col] != value
        ]
    problems += [f"sample {k!r} in {found[k]['shard']} is not in the index" for k in sorted(set(found) - indexed)]
    if "failures" in ledgers:
        both = {r["source"] for r in index_rows} & set(ledgers["failures"]["source"].to_pylist())
        problems += [f"source {s!r} is both in the index and in failures" for s in sorted(both)]
    return problems


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(run_dir: Path) -> None:
    """Read every sample of every shard and cross-check the ledgers; exit 1 listing problems, else 0."""
    layout = RunLayout(run_dir)
    problems = _verify(layout)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {run_dir}:", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"OK: {len(layout.shard_paths())} shards in {run_dir} verified")
