"""``shards`` command: inspect and check a run directory written by ``ingest run``."""

from __future__ import annotations

import contextlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import pyarrow as pa
import pyarrow.compute as pc

from soundnet.shards import remote
from soundnet.shards.schema import decode_sample, teacher_kind
from soundnet.shards.verify import RunFiles, run_ledger, shard_samples, verify_run


class RunFolder(click.ParamType):
    """A run folder: a local directory (which must exist) or a URL (``https://``, ``s3://``, ... via fsspec)."""

    name = "run_dir"
    local = click.Path(exists=True, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value) if remote.is_url(str(value)) else str(self.local.convert(value, param, ctx))


def _first_teachers(paths: list[str]) -> dict[str, Any] | None:
    """The teachers named by the first readable sample (a damaged shard is passed over: ``verify`` names it)."""
    for path in paths:
        try:
            with contextlib.closing(shard_samples(path, [])) as samples:
                raw = next(samples, None)
            if raw is not None:
                return decode_sample(raw).meta.get("teachers", {})
        except (ValueError, OSError):
            continue
    return None


def _rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@click.group()
def main() -> None:
    """Inspect and verify SoundNet shard directories."""


@main.command()
@click.argument("run_dir", type=RunFolder())
def info(run_dir: str) -> None:
    """Summarise a run (a folder or URL): samples, shards, hours of audio, frames per clip, teachers, failures."""
    files = RunFiles(run_dir)
    try:
        if not_a_run := files.not_a_run_message():
            raise click.ClickException(not_a_run)
        index, has_digests, index_from = run_ledger(files, "index")
        failures, _, failures_from = run_ledger(files, "failures")
        shard_paths, _ = files.shards(index.select(["shard"]).to_pylist())
        with ThreadPoolExecutor(16) as pool:
            shard_bytes = sum(pool.map(remote.size, shard_paths))
    except (OSError, ValueError, pa.ArrowException) as exn:
        message = f"cannot read the ledgers of {run_dir}: {exn} (shards verify lists every problem)"
        raise click.ClickException(message) from None
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
                    f"{shard_bytes / 1e6:.1f} MB",
                ),
                (
                    "audio",
                    f"{audio_s / 3600:.2f} h ({audio_s:.0f} s)",
                    f"source duration {source_s / 3600:.2f} h",
                ),
                (
                    "digests",
                    "present" if has_digests else "absent",
                    "sha256 of every member, checked by shards verify"
                    if has_digests
                    else "run written before checksums: shards verify checks structure only",
                ),
            ]
        )
    )
    frames = Counter(index["frames"].to_pylist())
    if frames:
        click.echo("frames per clip:")
        click.echo(_rows([("frames", "samples")] + [(str(f), str(n)) for f, n in sorted(frames.items())]))
    teachers = _first_teachers(shard_paths) if index.num_rows else None
    if teachers is not None:
        click.echo("teachers:")
        click.echo(
            _rows(
                [("name", "classes/dim", "kind", "arch", "weights")]
                + [
                    (
                        name,
                        str(t.get("classes", t.get("dim"))),
                        str(teacher_kind(t)),
                        str(t.get("arch")),
                        str(t.get("weights")),
                    )
                    for name, t in sorted(teachers.items())
                ]
            )
        )
    if failures.num_rows:
        by = Counter(zip(failures["stage"].to_pylist(), failures["reason"].to_pylist(), strict=True))
        click.echo("failures by reason:")
        click.echo(_rows([("stage", "reason", "count")] + [(s, r, str(n)) for (s, r), n in by.most_common()]))


@main.command()
@click.argument("run_dir", type=RunFolder())
@click.option("--quick", is_flag=True, help="Skip recomputing member sha256 digests (schema and ledgers only).")
def verify(run_dir: str, quick: bool) -> None:
    """Read every sample of every shard (a folder or URL), recompute its digests and cross-check the ledgers and the
    byte ranges; exit 1 naming problems."""
    try:
        report = verify_run(run_dir, digests=not quick)
    except (OSError, ValueError) as exn:  # the storage itself fails: missing package, no access, retries spent
        raise click.ClickException(f"cannot verify {run_dir}: {exn}") from None
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s) in {run_dir}:", err=True)
        for problem in report.problems:
            click.echo(f"  - {problem}", err=True)
        raise SystemExit(1)
    checked = f", sha256 of {report.digests_checked} samples' members matched" if report.digests_checked else ""
    click.echo(f"OK: {report.shards} shards, {report.samples} samples in {run_dir} verified{checked}")
