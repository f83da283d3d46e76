"""The local engine: decoding in worker processes, teachers in this process, one shard task after another.

Decoding runs ahead of labelling in a bounded window, so the workers keep busy while the teachers run and memory
stays flat however long the input list is. A worker that dies (a decoder crash) costs only its input: the pool is
rebuilt, the inputs in flight are retried one at a time, and one that kills a worker again is recorded as
``worker_crashed``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.pipeline import (
    Decoded,
    IngestConfig,
    Labeller,
    ShardTask,
    TaskWriter,
    decode_input,
    failure_row,
    frame_count,
)
from soundnet.shards.ledger import RunLayout


def _single_threaded() -> None:
    """Decoding workers use one core each: the engine's parallelism is the number of workers."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


class DecodePool:
    """Ordered, bounded, crash-tolerant map of ``decode_input`` over inputs in worker processes."""

    def __init__(self, workers: int, config: IngestConfig) -> None:
        self.workers = workers
        self.fn = partial(decode_input, config=config)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: workers must not inherit the parent's torch/OpenMP state (fork after OpenMP can deadlock)
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_single_threaded)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

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

    def map(self, items: Sequence[VideoInput], window: int) -> Iterator[Decoded]:
        pending: deque[tuple[VideoInput, Future]] = deque()
        it = iter(items)

        def refill() -> None:
            while len(pending) < window and (item := next(it, None)) is not None:
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


def run_local(
    tasks: Sequence[ShardTask],
    layout: RunLayout,
    config: IngestConfig,
    labeller: Labeller,
    workers: int,
    on_result: Callable[[Decoded], None] = lambda _: None,
) -> None:
    """Turn every task into its shard and ledger parts; ``on_result`` sees each decoded input (for progress)."""
    pool = DecodePool(workers, config)
    try:
        items = [item for task in tasks for item in task.inputs]
        decoded = pool.map(items, window=max(8, 4 * workers))
        for task in tasks:
            with TaskWriter(layout, task) as writer:
                batch: list[Decoded] = []
                for _ in task.inputs:
                    d = next(decoded)
                    on_result(d)
                    batch.append(d)
                    if frame_count(batch) >= labeller.batch_size:
                        writer.add(labeller.label(batch))
                        batch = []
                writer.add(labeller.label(batch))
    finally:
        pool.close()
