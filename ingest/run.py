"""One `ingest run`: read the list, check the output folder, resume or start, run an engine, merge the ledgers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from soundnet.ingest.inputs import read_video_list
from soundnet.ingest.pipeline import Decoded, IngestConfig, Labeller, make_tasks
from soundnet.shards.atomic import atomic_path
from soundnet.shards.ledger import RunLayout

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


def _ray_engine() -> Callable[..., None]:
    """``run_ray``, imported only for ``--engine ray``: Ray is an optional extra."""
    try:
        from soundnet.ingest.ray_engine import run_ray
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise RunError(f"--engine ray needs Ray ({exc}): pip install 'soundnet-distill[ray]'") from exc
    return run_ray


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
    ray_address: str | None = None,
    ray_teachers: int | None = None,
) -> RunSummary:
    """Run stage one; returns counts. Failures of single inputs are data (the ledger), not exceptions.

    ``engine`` "ray" runs on the Ray cluster at ``ray_address`` (default: a Ray started on this machine), with
    ``ray_teachers`` teacher actors (default: one per GPU). Weights files are checked here unless they are only
    needed on the machines of a cluster joined by address.
    """
    from soundnet.teachers import load_teacher, parse_specs

    start = time.perf_counter()
    if engine == "ray":  # before anything is written
        run_ray = _ray_engine()
    inputs = read_video_list(videos)
    specs = parse_specs(teacher_specs, check_weights=engine == "local" or ray_address is None)
    layout = RunLayout(out)
    _check_writable(layout.out_dir)
    _start_or_resume(layout, _manifest(inputs, config, [str(s) for s in specs]), resume)

    tasks = make_tasks(inputs, config.samples_per_shard)
    todo = [t for t in tasks if not layout.is_complete(t.index)]
    log.info("%d inputs in %d shard tasks; %d to run", len(inputs), len(tasks), len(todo))

    counts: Counter[str] = Counter()
    with tqdm(total=sum(len(t.inputs) for t in todo), unit="video", desc="ingest", dynamic_ncols=True) as bar:

        def on_progress(ok: int, failed: int) -> None:
            counts.update(ok=ok, failed=failed)
            bar.update(ok + failed)
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

        def on_result(d: Decoded) -> None:
            on_progress(int(d.clip is not None), int(d.clip is None))

        if engine == "local":
            from soundnet.ingest.local import run_local

            labeller = Labeller([load_teacher(spec, device) for spec in specs], batch_size=batch_frames)
            config = dataclasses.replace(config, short_side=labeller.short_side)
            run_local(todo, layout, config, labeller, workers, on_result)
        elif engine == "ray":
            run_ray(todo, layout, config, specs, device, batch_frames, workers, ray_address, ray_teachers, on_progress)
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
