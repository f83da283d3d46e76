"""One `ingest run`: read the list, load the teachers, start or join the run in the output folder, let an engine
write the tasks this run claims, and (when no task is left) merge the ledgers and write ``summary.json``.

Several runs may work on one ``--out`` at once (``--resume`` on every one of them, e.g. one per node of a
cluster over a shared filesystem): the first creates ``run.json`` (with its ``--claim-timeout``, which every run
on the folder then uses), the others join it when their manifest is the same (and are refused, naming the options
that differ, when not); each task is counted from exactly one of them (:mod:`soundnet.ingest.claims`). A run ends
when no task is left to claim; the last to finish merges the ledgers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from soundnet.ingest.claims import CLAIM_TIMEOUT_S, Claims
from soundnet.ingest.config import IngestConfig, ShardTask, make_tasks
from soundnet.ingest.engine import Engine, Progress, Work
from soundnet.ingest.errors import RunError
from soundnet.ingest.inputs import read_video_list
from soundnet.ingest.ray_auth import RAY_TIMEOUT_S
from soundnet.ingest.stats import TaskStats, run_summary
from soundnet.shards.atomic import create_exclusive, unwritable_out
from soundnet.shards.contract import ClipLayout
from soundnet.shards.ledger import RunLayout

REDO_ROUNDS = 3  # passes over the tasks left that take nothing new but find tasks taken over (or rounds of merging)

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    inputs: int
    samples: int
    failures: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tasks_run: int = 0
    tasks_skipped: int = 0
    tasks_elsewhere: int = 0  # still being written by other runs on the same --out: the run is not merged yet

    @property
    def videos_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


class ProgressBar:
    """The run's tqdm bar over the inputs of the tasks it runs, with the samples and failures so far: it moves as
    each input is recorded, and each finished task's stats then replace what its inputs reported (a dropped task's
    are taken back), so it ends with the counts of the shard stats and ``summary.json``."""

    def __init__(self, total: int, **tqdm_options) -> None:
        self.bar = tqdm(total=total, unit="video", desc="ingest", dynamic_ncols=True, **tqdm_options)
        self.samples = self.failures = 0
        self._reported: dict[int, list[int]] = {}  # per task not settled yet: [samples, failures] reported

    def _add(self, samples: int, failures: int) -> None:
        self.samples, self.failures = self.samples + samples, self.failures + failures
        self.bar.set_postfix({"samples": self.samples, "failed": self.failures}, refresh=False)
        self.bar.update(samples + failures)

    def on_input(self, task: int, ok: bool) -> None:
        self._reported.setdefault(task, [0, 0])[0 if ok else 1] += 1
        self._add(int(ok), int(not ok))

    def on_task(self, stats: TaskStats) -> None:
        samples, failures = self._reported.pop(stats.task, (0, 0))
        self._add(stats.samples - samples, stats.inputs - stats.samples - failures)

    def on_dropped(self, task: int) -> None:
        samples, failures = self._reported.pop(task, (0, 0))
        self._add(-samples, -failures)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class _Bookkeeping:
    """The run's own :class:`Progress`: tells the claims that the engine makes progress, releases the claim of
    each task finished or given up, keeps the stats, then tells ``view`` (the bar, or the caller's)."""

    def __init__(self, claims: Claims, view: Progress) -> None:
        self.claims, self.view = claims, view
        self.done: list[TaskStats] = []
        self.dropped = 0

    def on_input(self, task: int, ok: bool) -> None:
        self.claims.progress()
        self.view.on_input(task, ok)

    def on_task(self, stats: TaskStats) -> None:
        self.claims.progress()
        self.claims.release(self.claims.held(stats.task))
        self.done.append(stats)
        self.view.on_task(stats)

    def on_dropped(self, task: int) -> None:
        self.claims.progress()
        self.claims.release(self.claims.held(task))  # still ours when another run only swept our files
        self.dropped += 1
        self.view.on_dropped(task)


@contextlib.contextmanager
def _disk_errors(out: Path) -> Iterator[None]:
    """A full or read-only disk is the user's to fix: one clear message, no traceback; finished work is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC or "No space left on device" in str(exc):  # pyarrow's have no errno
            raise RunError(
                f"no space left on device while writing to --out {out}: finished shards are complete and kept; "
                "free space (or move the run folder) and run again with --resume"
            ) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise RunError(f"cannot write to --out {out} ({exc.strerror}): {exc.filename}") from None
        raise


def _manifest(inputs, config: IngestConfig, teacher_specs: list[str]) -> dict:
    """What must stay the same for a resumed or joining run to continue the same shards."""
    listing = "\n".join(f"{i.source}\t{i.key}" for i in inputs)
    return {
        "inputs": len(inputs),
        "inputs_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "teachers": teacher_specs,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "url"},  # fetching changes no sample
        "layout": config.layout.to_json(),
    }


def _refuse_existing(layout: RunLayout, resume: bool) -> None:
    if layout.manifest_path.exists() and not resume:
        raise RunError(f"{layout.out_dir} already holds a run: pass --resume to continue it, or choose a new --out")


def _option(key: str, value, previous) -> str:
    """One option of the run's config that differs, as the user would write it."""
    if key == "short_side":
        return f"the teachers' frame size {value} (run has {previous})"
    option = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return option if value else f"no {option} (run has it)"
    return f"{option} {value} (run has {previous})"


def _differences(previous: dict, manifest: dict) -> list[str]:
    """What a joining run would change of the run in the folder, named by option."""
    found = []
    if previous.get("inputs") != manifest["inputs"]:
        found.append(f"--videos with {manifest['inputs']} inputs (run has {previous.get('inputs')})")
    elif previous.get("inputs_sha256") != manifest["inputs_sha256"]:
        found.append("--videos with other inputs or another order (same count)")
    if previous.get("teachers") != manifest["teachers"]:
        run_teachers = " ".join(previous.get("teachers") or [])
        found.append(f"--teacher {' '.join(manifest['teachers'])} (run has {run_teachers})")
    config = previous.get("config") or {}
    found += [_option(k, v, config.get(k)) for k, v in manifest["config"].items() if config.get(k) != v]
    if not found and previous.get("layout") != manifest["layout"]:
        found.append(f"the clip layout {manifest['layout']} (run has {previous.get('layout')})")
    return found


def _start_or_join(layout: RunLayout, manifest: dict, resume: bool, claim_timeout_s: float) -> tuple[bool, float]:
    """Create the run's ``run.json``, or check the one there; (whether continuing or joining a run, the claim
    timeout of the run: every run on one folder must judge claims alike)."""
    if not layout.manifest_path.exists():
        if layout.shard_paths() or layout.completed_tasks():
            raise RunError(f"{layout.out_dir} holds shards but no run.json; refusing to mix runs")
        recorded = {**manifest, "claim_timeout_s": claim_timeout_s}
        if create_exclusive(layout.manifest_path, json.dumps(recorded, indent=2) + "\n"):
            return False, claim_timeout_s
    _refuse_existing(layout, resume)
    previous = json.loads(layout.manifest_path.read_text())
    previous["layout"] = ClipLayout.from_json(previous.get("layout")).to_json()  # runs before it was recorded
    changed = _differences(previous, manifest)
    if changed:
        raise RunError(
            f"--resume with options that differ from the run in {layout.out_dir}: {'; '.join(changed)}. "
            "Use the run's options (see its run.json), or choose a new --out"
        )
    timeout = float(previous.get("claim_timeout_s", CLAIM_TIMEOUT_S))  # runs before it was recorded: the default
    if timeout != claim_timeout_s:
        log.warning(
            "--claim-timeout %g: using the run's %g s from run.json instead (all runs on one --out judge claims alike)",
            claim_timeout_s,
            timeout,
        )
    return True, timeout


def _done(layout: RunLayout, task: int) -> bool:
    """Complete, with its stats (which a complete task of a run from before attempts were recorded lacks only when
    another run removed them: then it is redone)."""
    return layout.is_complete(task) and layout.stats_path(task).exists()


def _claimed(tasks: Sequence[ShardTask], layout: RunLayout, claims: Claims) -> Work:
    """The tasks this run gets to write, claimed one by one as the engine draws them; what earlier attempts left
    of a task is removed once it is claimed."""
    for task in tasks:
        if _done(layout, task.index) or (claim := claims.claim(task.index)) is None:
            continue
        if _done(layout, task.index):  # finished by another run just before we claimed it
            claims.release(claim)
            continue
        removed = layout.discard_task(task.index, still_ours=claim.held)
        if removed:
            log.info("task %d: removed %d files of an earlier attempt that did not finish", task.index, len(removed))
        yield task, claim


def _engine(
    name: str,
    specs: list,
    device: str,
    batch_frames: int,
    workers: int,
    ray_address: str | None,
    ray_teachers: int | None,
    ray_timeout_s: float,
) -> Engine:
    if name == "local":
        from soundnet.ingest.local import LocalEngine

        return LocalEngine(specs, device, batch_frames, workers)
    if name != "ray":
        raise RunError(f"unknown engine {name!r}")
    if ray_address:
        from soundnet.ingest.ray_auth import use_token_if_present

        use_token_if_present()  # before Ray is imported: it reads RAY_AUTH_MODE once
    try:  # imported only for --engine ray: Ray is an optional extra
        from soundnet.ingest.ray_engine import RayEngine
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise RunError(f"--engine ray needs Ray ({exc}): pip install 'soundnet-distill[ray]'") from exc
    return RayEngine(specs, device, batch_frames, workers, ray_address, ray_teachers, ray_timeout_s)


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
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
    progress: Progress | None = None,
    ray_timeout_s: float = RAY_TIMEOUT_S,
) -> RunSummary:
    """Run stage one; returns counts. Failures of single inputs are data (the ledger), not exceptions.

    ``engine`` "ray" runs on the Ray cluster at ``ray_address`` (default: a Ray started on this machine), with
    ``ray_teachers`` teacher actors (default: one per GPU); a cluster that does not answer within ``ray_timeout_s``
    is a RunError. Weights files are checked here unless they are only
    needed on the machines of a cluster joined by address. The teachers are loaded before ``run.json`` is
    written, so weights that fail to load leave nothing that blocks the corrected rerun. ``progress`` is told
    about every input and task as it is recorded (default: a :class:`ProgressBar` on stderr).
    """
    from soundnet.teachers import parse_specs

    start = time.perf_counter()
    inputs = read_video_list(videos, config.url)
    specs = parse_specs(teacher_specs, check_weights=engine == "local" or ray_address is None)
    layout = RunLayout(out)
    if problem := unwritable_out(layout.out_dir):
        raise RunError(problem)
    _refuse_existing(layout, resume)
    runner = _engine(engine, specs, device, batch_frames, workers, ray_address, ray_teachers, ray_timeout_s)
    try:
        try:
            config = dataclasses.replace(config, short_side=runner.start())  # the size the teachers want
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            downloads = [str(s) for s in specs if not (s.weights and Path(s.weights).expanduser().is_file())]
            if not downloads:
                raise
            raise RunError(
                f"the weights of teacher {' '.join(downloads)} could not be downloaded "
                f"({getattr(exc, 'reason', None) or exc}): without internet, pass local weights with "
                "--teacher NAME=ARCH:FILE (e.g. --teacher imagenet=resnet50:resnet50.pth)"
            ) from None
        with _disk_errors(layout.out_dir):
            manifest = _manifest(inputs, config, [str(s) for s in specs])
            joined, claim_timeout_s = _start_or_join(layout, manifest, resume, claim_timeout_s)
            with Claims(layout, claim_timeout_s) as claims:
                return _run(runner, layout, inputs, config, claims, joined, start, engine, workers, progress)
    finally:
        runner.close()


def _write_tasks(
    runner: Engine,
    tasks: Sequence[ShardTask],
    layout: RunLayout,
    config: IngestConfig,
    claims: Claims,
    books: _Bookkeeping,
) -> list[ShardTask]:
    """Write the tasks not done yet that this run can claim, again while that finishes tasks (tasks of runs that
    stopped meanwhile are taken over) or finds tasks taken over (tried again, a few times); returns the tasks
    still not done: held by other live runs."""
    todo = [t for t in tasks if not _done(layout, t.index)]
    rounds = 0
    while todo:
        done, dropped = len(books.done), books.dropped
        runner.run(_claimed(todo, layout, claims), layout, config, books)
        todo = [t for t in todo if not _done(layout, t.index)]
        if len(books.done) == done and (books.dropped == dropped or (rounds := rounds + 1) >= REDO_ROUNDS):
            break
    return todo


def _run(
    runner: Engine,
    layout: RunLayout,
    inputs: list,
    config: IngestConfig,
    claims: Claims,
    joined: bool,
    start: float,
    engine: str,
    workers: int,
    progress: Progress | None,
) -> RunSummary:
    if joined:
        removed = layout.sweep_temporaries(busy=claims.live_others(), min_age_s=claims.timeout_s)
        if removed:
            log.info("resume: removed %d leftovers of unfinished tasks", len(removed))
    tasks = make_tasks(inputs, config.samples_per_shard)
    todo = [t for t in tasks if not _done(layout, t.index)]
    others = claims.live_others()
    if joined and others:
        log.info("joining the run in %s: %d shard tasks are being written by other runs", layout.out_dir, len(others))
    log.info("%d inputs in %d shard tasks; %d to run", len(inputs), len(tasks), len(todo))

    total = sum(len(t.inputs) for t in todo)
    with contextlib.nullcontext(progress) if progress is not None else ProgressBar(total) as view:
        books = _Bookkeeping(claims, view)
        for _ in range(REDO_ROUNDS):
            todo = _write_tasks(runner, tasks, layout, config, claims, books)
            layout.sweep_temporaries(busy=claims.live_others(), min_age_s=claims.timeout_s)  # of tries that died
            if todo:
                break
            layout.finalize()
            if all(_done(layout, t.index) for t in tasks):
                break
            log.warning("a task was undone by another run while the ledgers were merged: doing it again")

    done = books.done
    ran = sum(s.inputs for s in done)
    summary = RunSummary(
        inputs=len(inputs),
        samples=sum(s.samples for s in done),
        failures=ran - sum(s.samples for s in done),
        seconds=time.perf_counter() - start,
        tasks_run=len(done),
        tasks_skipped=len(tasks) - len(todo) - len({s.task for s in done}),
        tasks_elsewhere=len(todo),
    )
    if todo:
        return summary  # the last run to finish merges
    totals = run_summary(
        layout,
        {
            "engine": engine,
            "workers": workers,
            "wall_s": round(summary.seconds, 3),
            "tasks_run": len(done),
            "inputs_run": ran,
        },
    )
    summary.samples, summary.failures = totals["samples"], totals["failures"]
    summary.reasons = totals["failures_by_reason"]
    _check_ledgers(layout, totals, len(inputs))
    return summary


def _check_ledgers(layout: RunLayout, totals: dict, inputs: int) -> None:
    import pyarrow.parquet as pq

    rows = (pq.read_metadata(layout.index_path).num_rows, pq.read_metadata(layout.failures_path).num_rows)
    if rows != (totals["samples"], totals["failures"]) or sum(rows) != inputs:
        raise RunError(
            f"ledgers hold {rows[0]} samples + {rows[1]} failures, the shard stats {totals['samples']} + "
            f"{totals['failures']}, for {inputs} inputs"
        )
