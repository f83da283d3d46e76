"""The body of one shard task, written once for every engine: decoded inputs -> batches of frames -> teachers ->
shard, stats and ledger parts, reporting each input as it is recorded. An engine supplies only how decoding and
labelling run, and hands the events on to the run's :class:`~soundnet.ingest.engine.Progress`."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence

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


class TaskWriter:
    """Writes one task's shard incrementally and, once it is in place, the task's stats and ledger parts.

    Use as a context manager: on an exception nothing of the task remains, so a resumed run redoes it. With a
    ``claim``, the shard is committed only while the claim is still held (else :class:`ClaimLost`).
    """

    def __init__(self, layout: RunLayout, task: ShardTask, claim: Claim | None = None) -> None:
        self.layout = layout
        self.task = task
        self.claim = claim
        self.failures: list[dict[str, str]] = []
        self.stats = TaskStats(task.index, layout.shard_path(task.index).name, len(task.inputs))
        self._writer = ShardWriter(layout.shard_path(task.index))

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

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.claim is not None and not self.claim.held():
            exc = ClaimLost(f"shard task {self.task.index} was taken over by another run")
            self._writer.__exit__(ClaimLost, exc, None)  # discards the temporary shard
            raise exc
        start = time.perf_counter()
        self._writer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            accounted = self._writer.count + len(self.failures)
            if accounted != len(self.task.inputs):  # a broken invariant must never be recorded as done
                raise RuntimeError(f"task {self.task.index}: {accounted} results for {len(self.task.inputs)} inputs")
            stats = self.stats
            stats.samples, stats.audio_seconds = self._writer.count, round(self._writer.audio_seconds, 6)
            stats.failures = dict(Counter(row["reason"] for row in self.failures).most_common())
            stats.bytes = self.layout.shard_path(self.task.index).stat().st_size
            stats.write_s += time.perf_counter() - start
            stats.write(self.layout)
            self.layout.write_parts(self.task.index, self._writer.index_rows, self.failures)
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
        log.warning("%s; its inputs are left to that run", exc)
        yield TaskDropped(task.index)
        return
    yield writer.stats
