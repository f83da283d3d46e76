"""The body of one shard task, written once for every engine: decoded inputs -> batches of frames -> teachers ->
shard, stats and ledger parts. An engine supplies only how decoding and labelling run."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

from soundnet.ingest.claims import Claim, ClaimLost
from soundnet.ingest.config import ShardTask
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

    def add(self, results: Sequence[Result]) -> None:
        start = time.perf_counter()
        for result in results:
            if isinstance(result, Sample):
                try:
                    self._writer.write(result)
                except ValueError as exc:
                    src = result.meta.get("source", result.key)
                    self.failures.append(failure_row(src, "write", "invalid_sample", str(exc), "ValueError"))
            else:
                self.failures.append(result)
        self.stats.write_s += time.perf_counter() - start

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
) -> TaskStats | None:
    """Write ``task``'s shard from its ``decoded`` inputs (in input order), labelling batches of about
    ``batch_frames`` frames with ``label``; up to ``in_flight`` labelling calls may run while the next batch is
    decoded. Returns the task's stats, or None when another run took the task over."""
    try:
        with TaskWriter(layout, task, claim) as writer:
            pending: deque[Pending] = deque()

            def collect(keep: int) -> None:
                while len(pending) > keep:
                    results, seconds = pending.popleft()()
                    writer.stats.label_s += seconds
                    writer.add(results)

            batch: list[Decoded] = []
            for d in decoded:
                writer.stats.decode_s += d.seconds
                batch.append(d)
                if frame_count(batch) >= batch_frames:
                    pending.append(label(batch))
                    batch = []
                    collect(in_flight)
            if batch:
                pending.append(label(batch))
            collect(0)
    except ClaimLost as exc:
        log.warning("%s; its inputs are left to that run", exc)
        return None
    return writer.stats
