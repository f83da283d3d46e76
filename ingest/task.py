"""The body of one shard task, written once for every engine: decoded inputs -> batches of frames -> teachers ->
shard, stats and ledger parts, reporting each input as it is recorded. An engine supplies only how decoding and
labelling run, and hands the events on to the run's :class:`~soundnet.ingest.engine.Progress`.

The commit of a task is four steps (shard, stats, failures part, index part), each preceded by a check that this
run still holds the task's claim and each stamped with the claim's attempt id (:mod:`soundnet.ingest.claims`).
The shard is linked into place, never over a shard that is already there, so a run that lost its claim while it
was stopped cannot replace the shard of the run that took the task over; what it still writes late does not agree
with the rest and is not counted.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from soundnet.ingest.claims import Claim, ClaimLost
from soundnet.ingest.config import ShardTask
from soundnet.ingest.engine import Event, InputDone, TaskDropped
from soundnet.ingest.label import Result
from soundnet.ingest.stats import TaskStats
from soundnet.ingest.worker import Decoded, failure_row, frame_count
from soundnet.shards.ledger import RunLayout
from soundnet.shards.schema import Sample
from soundnet.shards.writer import ShardWriter

log = logging.getLogger(__name__)

Labelled = tuple[list[Result], float]
"""A labelling call's results (one per input, in order) and the seconds the teachers took."""
Pending = Callable[[], Labelled]
"""A labelling call in flight: calling it waits for its results."""

STOP_AT_ENV = "SOUNDNET_INGEST_STOP_AT"
"""Test hook, inert unless set: ``TASK:STEP`` (e.g. ``2:failures``) makes this process stop itself (SIGSTOP), once,
right after its ownership check before commit step STEP (shard, stats, failures, index) of task TASK, as a
suspended job would; the fault-injection tests continue it with SIGCONT."""


class TaskWriter:
    """Writes one task's shard incrementally and, once it is in place, the task's stats and ledger parts.

    Use as a context manager: on an exception nothing of the task remains, so a resumed run redoes it. With a
    ``claim``, each commit step is taken only while the claim is still held (else :class:`ClaimLost`).
    """

    def __init__(self, layout: RunLayout, task: ShardTask, claim: Claim | None = None) -> None:
        self.layout = layout
        self.task = task
        self.claim = claim
        self.failures: list[dict[str, str]] = []
        attempt = claim.attempt if claim is not None else uuid.uuid4().hex[:16]
        self.stats = TaskStats(task.index, layout.shard_path(task.index).name, len(task.inputs), attempt=attempt)
        self._writer = ShardWriter(layout.shard_path(task.index), place=self._place_shard)

    def __enter__(self) -> TaskWriter:
        self._writer.__enter__()
        return self

    def add(self, results: Sequence[Result]) -> list[bool]:
        """Write the samples, keep the failure rows; per result, whether it went into the shard."""
        start = time.perf_counter()
        written = []
        for result in results:
            failures = len(self.failures)
            if isinstance(result, Sample):
                try:
                    self._writer.write(result)
                except ValueError as exc:
                    src = result.meta.get("source", result.key)
                    self.failures.append(failure_row(src, "write", "invalid_sample", str(exc), "ValueError"))
            else:
                self.failures.append(result)
            written.append(len(self.failures) == failures)
        self.stats.write_s += time.perf_counter() - start
        return written

    def _step(self, name: str) -> None:
        """Before commit step ``name``: stop unless this run still holds the task (and the test hook)."""
        if self.claim is not None and not self.claim.held():
            raise ClaimLost(self.task.index)
        if os.environ.get(STOP_AT_ENV) == f"{self.task.index}:{name}":
            del os.environ[STOP_AT_ENV]  # once: a redo of the task goes through
            os.kill(os.getpid(), signal.SIGSTOP)

    def _place_shard(self, tmp: Path, path: Path) -> None:
        """Link the complete shard into place. A shard already there is what an attempt that lost the task left
        after this run claimed it: removed with its files (stats first), once."""
        self.stats.bytes = tmp.stat().st_size
        for _ in range(2):
            self._step("shard")
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                self.layout.discard_task(self.task.index, still_ours=self._held, temporaries=False)
        raise ClaimLost(self.task.index)

    def _held(self) -> bool:
        return self.claim is None or self.claim.held()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and (accounted := self._writer.count + len(self.failures)) != len(self.task.inputs):
            # a broken invariant must never be recorded as done
            exc = RuntimeError(f"task {self.task.index}: {accounted} results for {len(self.task.inputs)} inputs")
            self._writer.__exit__(RuntimeError, exc, None)
            raise exc
        if exc_type is not None:
            self._writer.__exit__(exc_type, exc, tb)  # discards the temporary shard
            return False
        start = time.perf_counter()
        index = self.task.index
        try:
            self._writer.__exit__(None, None, None)  # the shard, put in place by _place_shard
            stats = self.stats
            stats.samples, stats.audio_seconds = self._writer.count, round(self._writer.audio_seconds, 6)
            stats.failures = dict(Counter(row["reason"] for row in self.failures).most_common())
            stats.write_s += time.perf_counter() - start
            self._step("stats")
            stats.write(self.layout)
            self._step("failures")
            self.layout.write_part(index, "failures", self.failures, stats.attempt)
            self._step("index")
            self.layout.write_part(index, "index", self._writer.index_rows, stats.attempt)
        except FileNotFoundError as exc:  # a temporary file of ours was swept by a run that judged us gone
            raise ClaimLost(index) from exc
        if not self.layout.is_complete(index):  # another run came between the last check and the last step
            raise ClaimLost(index)
        return False


def run_task(
    task: ShardTask,
    layout: RunLayout,
    decoded: Iterable[Decoded],
    label: Callable[[list[Decoded]], Pending],
    batch_frames: int,
    in_flight: int = 0,
    claim: Claim | None = None,
) -> Iterator[Event]:
    """Write ``task``'s shard from its ``decoded`` inputs (in input order), labelling batches of about
    ``batch_frames`` frames with ``label``; up to ``in_flight`` labelling calls may run while the next batch is
    decoded. Yields an :class:`InputDone` for each input as its result is recorded, then the task's stats once
    the shard is committed (:class:`TaskDropped` when another run took the task over): always ``len(task.inputs)
    + 1`` events when it does not raise, however the inputs were batched (a Ray task that is redone continues its
    stream where the earlier try left it)."""
    try:
        with TaskWriter(layout, task, claim) as writer:
            pending: deque[Pending] = deque()

            def collect(keep: int) -> Iterator[InputDone]:
                while len(pending) > keep:
                    results, seconds = pending.popleft()()
                    writer.stats.label_s += seconds
                    for ok in writer.add(results):
                        yield InputDone(task.index, ok)

            batch: list[Decoded] = []
            for d in decoded:
                writer.stats.decode_s += d.seconds
                batch.append(d)
                if frame_count(batch) >= batch_frames:
                    pending.append(label(batch))
                    batch = []
                    yield from collect(in_flight)
            if batch:
                pending.append(label(batch))
            yield from collect(0)
    except ClaimLost as exc:
        log.warning("%s", exc)
        yield TaskDropped(task.index)
        return
    yield writer.stats
