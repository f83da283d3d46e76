"""One `ingest run`: read the list, check the output folder, resume or start, run an engine, merge the ledgers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from ingest.inputs import read_video_list
from ingest.pipeline import Decoded, IngestConfig, Labeller, make_tasks
from shards.atomic import atomic_path
from shards.ledger import RunLayout

log = logging.getLogger(__name__)


class RunError(Exception):
    """The run cannot start or cannot continue (bad output folder, mismatched resume)."""


@dataclass
class RunSummary:
    inputs: int
    samples: int
    failures: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tasks_run: int = 0
    tasks_skipped: int = 0

    @property
    def videos_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise RunError(f"--out {out} is not writable: {exc}") from exc


def _manifest(inputs, config: IngestConfig, teacher_specs: list[str]) -> dict:
    """What must stay the same for a resumed run to continue the same shards."""
    listing = "\n".join(f"{i.source}\t{i.key}" for i in inputs)
    return {
        "inputs": len(inputs),
        "inputs_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "teachers": teacher_specs,
        "config": dataclasses.asdict(config),
    }


def _start_or_resume(layout: RunLayout, manifest: dict, resume: bool) -> None:
    path = layout.out_dir / "run.json"
    if path.exists():
        if not resume:
            raise RunError(f"{layout.out_dir} already holds a run: pass --resume to continue it, or choose a new --out")
        previous = json.loads(path.read_text())
        changed = [k for k in manifest if previous.get(k) != manifest[k]]
        if changed:
            raise RunError(f"--resume with different {', '.join(changed)} than the run in {layout.out_dir}")
        removed = layout.sweep_temporaries()
        if removed:
            log.info("resume: removed %d leftovers of unfinished tasks", len(removed))
        return
    if layout.shard_paths() or layout.completed_tasks():
        raise RunError(f"{layout.out_dir} holds shards but no run.json; refusing to mix runs")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def run_ingest(
    videos: str | Path,
    out: str | Path,
    teacher_specs: list[str],
    config: IngestConfig,
    workers: int,
    engine: str = "local",
    resume: bool = False,
    device: str = "cpu",
    batch_frames: int = 64,
) -> RunSummary:
    """Run stage one; returns counts. Failures of single inputs are data (the ledger), not exceptions."""
    from teachers import load_teacher, parse_specs

    start = time.perf_counter()
    inputs = read_video_list(videos)
    specs = parse_specs(teacher_specs)
    layout = RunLayout(out)
    _check_writable(layout.out_dir)
    _start_or_resume(layout, _manifest(inputs, config, [str(s) for s in specs]), resume)

    tasks = make_tasks(inputs, config.samples_per_shard)
    todo = [t for t in tasks if not layout.is_complete(t.index)]
    log.info("%d inputs in %d shard tasks; %d to run", len(inputs), len(tasks), len(todo))

    teachers = [load_teacher(spec, device) for spec in specs]
    short_side = max(t.preprocessing.resize for t in teachers)
    config = dataclasses.replace(config, short_side=short_side)
    labeller = Labeller(teachers, batch_size=batch_frames)

    counts: Counter[str] = Counter()
    with tqdm(total=sum(len(t.inputs) for t in todo), unit="video", desc="ingest", dynamic_ncols=True) as bar:

        def on_result(d: Decoded) -> None:
            counts["ok" if d.clip else "failed"] += 1
            bar.update()
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

        if engine == "local":
            from ingest.local import run_local

            run_local(todo, layout, config, labeller, workers, on_result)
        else:
            raise RunError(f"unknown engine {engine!r}")

    index_path, failures_path = layout.finalize()
    index, failures = pq.read_table(index_path), pq.read_table(failures_path)
    reasons = Counter(failures.column("reason").to_pylist())
    summary = RunSummary(
        inputs=len(inputs),
        samples=index.num_rows,
        failures=failures.num_rows,
        reasons=dict(reasons.most_common()),
        seconds=time.perf_counter() - start,
        tasks_run=len(todo),
        tasks_skipped=len(tasks) - len(todo),
    )
    if summary.samples + summary.failures != summary.inputs:
        raise RunError(f"ledgers hold {summary.samples} samples + {summary.failures} failures for {len(inputs)} inputs")
    return summary
