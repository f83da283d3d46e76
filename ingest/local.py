"""The local engine: decoding in worker processes, teachers in this process, one shard task after another.

Decoding runs ahead of labelling in a bounded window, so the workers keep busy while the teachers run and memory
stays flat however long the input list is. A worker that dies (a decoder crash) costs only its input: the pool is
rebuilt, the inputs in flight are retried one at a time, and one that kills a worker again is recorded as
``worker_crashed``. Workers import only :mod:`soundnet.ingest.worker` (no torch, no webdataset) and exit when
this process dies.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from soundnet.ingest.claims import Claim
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.engine import Progress, Work, report
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.label import Labeller
from soundnet.ingest.task import Pending, run_task
from soundnet.ingest.worker import Decoded, decode_input, failure_row, init_worker
from soundnet.shards.ledger import RunLayout


class DecodePool:
    """Ordered, bounded, crash-tolerant map of ``decode_input`` over inputs in worker processes."""

    def __init__(self, workers: int, config: IngestConfig) -> None:
        self.workers = workers
        self.fn = partial(decode_input, config=config)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: workers must not inherit the parent's torch/OpenMP state (fork after OpenMP can deadlock)
        return ProcessPoolExecutor(
            self.workers, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(os.getpid(),)
        )

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _isolated(self, item: VideoInput) -> Decoded:
        """Retry one input alone in a fresh pool; a second crash is that input's fault."""
        try:
            return self._pool.submit(self.fn, item).result()
        except BrokenProcessPool:
            self._pool.shutdown(wait=True)
            self._pool = self._new_pool()
            message = "the decoding worker process died twice on this input (decoder crash or out of memory)"
            return Decoded(
                item, failure=failure_row(item.source, "decode", "worker_crashed", message, "BrokenProcessPool")
            )

    def map(self, items: Iterator[VideoInput], window: int) -> Iterator[Decoded]:
        pending: deque[tuple[VideoInput, Future]] = deque()

        def refill() -> None:
            while len(pending) < window and (item := next(items, None)) is not None:
                pending.append((item, self._pool.submit(self.fn, item)))

        refill()
        while pending:
            item, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                self._pool.shutdown(wait=True)
                self._pool = self._new_pool()
                retry = [item] + [i for i, _ in pending]
                pending.clear()
                for retried in retry:
                    yield self._isolated(retried)
                refill()
                continue
            refill()
            yield result


class LocalEngine:
    """``--engine local``: ``workers`` decoding processes on this machine, the teachers in this process."""

    def __init__(self, specs: Sequence[object], device: str, batch_frames: int, workers: int) -> None:
        self.specs, self.device, self.batch_frames, self.workers = specs, device, batch_frames, workers
        self.labeller: Labeller | None = None

    def start(self) -> int:
        from soundnet.teachers import load_teacher

        self.labeller = Labeller([load_teacher(spec, self.device) for spec in self.specs], self.batch_frames)
        return self.labeller.short_side

    def _label(self, batch: list[Decoded]) -> Pending:
        labelled = self.labeller.label(batch)  # here, at once: the workers decode ahead meanwhile
        return lambda: labelled

    def run(self, work: Work, layout: RunLayout, config: IngestConfig, progress: Progress) -> None:
        claimed: deque[tuple[ShardTask, Claim | None]] = deque()

        def items() -> Iterator[VideoInput]:  # a task is claimed when the decoding window reaches it
            for task, claim in work:
                claimed.append((task, claim))
                yield from task.inputs

        pool = DecodePool(self.workers, config)
        ok = False
        try:
            decoded = pool.map(items(), window=max(8, 4 * self.workers))
            while (first := next(decoded, None)) is not None:
                task, claim = claimed.popleft()
                stream = itertools.chain([first], itertools.islice(decoded, len(task.inputs) - 1))
                for event in run_task(task, layout, stream, self._label, self.batch_frames, claim=claim):
                    report(event, progress)
            ok = True
        finally:
            pool.close(wait=ok)  # interrupted: do not wait for decodes in flight (the workers exit with us)

    def close(self) -> None:
        self.labeller = None
