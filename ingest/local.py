"""The local engine: decoding in worker processes, teachers in this process, one shard task after another.

Decoding runs ahead of labelling in a bounded window, so the workers keep busy while the teachers run and memory
stays flat however long the input list is. A worker that dies (a decoder crash, the OOM killer), even halfway
through sending its result, or that gives no result within ``DECODE_TIMEOUT_S`` (a hung decoder: it is killed),
costs only its input: that input is retried alone in a fresh worker, and recorded as ``worker_crashed`` when that
fails too. Each worker has a pipe of its own (:func:`soundnet.ingest.worker.serve`), so the engine always knows
which input was lost and never waits for a result that cannot come. Workers import only
:mod:`soundnet.ingest.worker` (no torch, no webdataset) and exit when this process dies.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import wait

from soundnet.ingest.claims import Claim
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.engine import Progress, Work, report
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.label import Labeller
from soundnet.ingest.task import Pending, run_task
from soundnet.ingest.worker import Decoded, decode_input, failure_row, serve
from soundnet.shards.ledger import RunLayout

DECODE_TIMEOUT_S = 900.0
"""Seconds one input may take in a worker before the worker is taken for hung: generous, since a URL input may be
retried (``--url-retries``) with ``--url-timeout`` per request, and a long file is seeked several times."""
DIED = "the decoding worker process died on this input twice (decoder crash or out of memory)"
STOP_WAIT_S = 5.0  # for idle workers to exit when the pool closes, before they are killed


@dataclass
class _Job:
    item: VideoInput
    result: Decoded | None = None
    lost: int = 0  # workers lost on this input so far


class _Worker:
    """One decoding process and its own pipe; ``job`` is the input it is decoding, since ``started``."""

    def __init__(self, context: mp.context.SpawnContext) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, os.getpid()), daemon=True, name="decode")
        self.process.start()
        child.close()  # the worker holds the only other end: its death closes the pipe
        self.job: _Job | None = None
        self.started = 0.0

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.process.join(None if kill else STOP_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class DecodePool:
    """Ordered, bounded, crash-tolerant map of ``decode_input`` over inputs in worker processes."""

    def __init__(self, workers: int, config: IngestConfig, timeout_s: float = DECODE_TIMEOUT_S) -> None:
        # spawn: workers must not inherit the parent's torch/OpenMP state (fork after OpenMP can deadlock)
        self._context = mp.get_context("spawn")
        self.fn = partial(decode_input, config=config)
        self.timeout_s = timeout_s
        self._workers = [_Worker(self._context) for _ in range(workers)]

    def close(self, wait: bool = True) -> None:
        for worker in self._workers:
            worker.stop(kill=not wait or worker.job is not None)
        self._workers = []

    def map(self, items: Iterator[VideoInput], window: int) -> Iterator[Decoded]:
        """``decode_input`` of each item, in order, at most ``window`` items ahead of the one yielded."""
        jobs: deque[_Job] = deque()  # in input order
        queue: deque[_Job] = deque()  # waiting for a worker; an input being retried first
        while True:
            while len(jobs) < window and (item := next(items, None)) is not None:
                jobs.append(job := _Job(item))
                queue.append(job)
            if not jobs:
                return
            if jobs[0].result is not None:
                yield jobs.popleft().result
                continue
            self._dispatch(queue)
            self._collect(queue)

    def _dispatch(self, queue: deque[_Job]) -> None:
        """Start queued inputs on idle workers; an input being retried runs alone, so that a second loss is its own."""
        busy = [w for w in self._workers if w.job is not None]
        if any(w.job.lost for w in busy):
            return
        for worker in self._workers:
            if not queue or (queue[0].lost and busy):
                return
            if worker.job is not None:
                continue
            job = queue.popleft()
            worker.job, worker.started = job, time.monotonic()
            try:
                worker.conn.send((self.fn, job.item))
            except OSError:  # the worker had died
                self._lost(worker, queue, DIED)
                return
            busy.append(worker)
            if job.lost:
                return

    def _collect(self, queue: deque[_Job]) -> None:
        """Wait for a result (or a lost worker, or the timeout of the oldest input) and record what came."""
        busy = [w for w in self._workers if w.job is not None]
        if not busy:
            return
        timeout = max(0.0, min(w.started for w in busy) + self.timeout_s - time.monotonic())
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
        for worker in busy:
            if worker.conn in ready or worker.process.sentinel in ready:
                try:
                    worker.job.result = worker.conn.recv()  # a result sent before the worker died still counts
                    worker.job = None
                    continue
                except (EOFError, OSError):  # died, maybe halfway through sending its result
                    self._lost(worker, queue, DIED)
            elif time.monotonic() - worker.started > self.timeout_s:
                self._lost(worker, queue, f"the decoding worker gave no result within {self.timeout_s:g} s, twice")

    def _lost(self, worker: _Worker, queue: deque[_Job], message: str) -> None:
        job = worker.job
        worker.job = None
        self._replace(worker)
        job.lost += 1
        if job.lost < 2:
            queue.appendleft(job)
            return
        row = failure_row(job.item.source, "decode", "worker_crashed", message, "WorkerLost")
        job.result = Decoded(job.item, failure=row)

    def _replace(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = _Worker(self._context)


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
