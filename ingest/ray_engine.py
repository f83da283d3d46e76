"""The Ray engine: the local engine's shard tasks, scheduled on a Ray cluster.

One Ray task per shard task runs the shard-task body (:func:`soundnet.ingest.task.run_task`) into the run folder
(a shared filesystem on a cluster). It decodes its inputs as one-CPU Ray tasks, a bounded window ahead, and sends
the decoded clips in batches to a pool of teacher actors: one loaded teacher set per GPU (CPU actors on a cluster
without GPUs), each batching frames across videos, whichever shard task they come from. It is a Ray generator:
each input's progress event goes to the driver as it is yielded, with the labelled batch, and nothing waits on it.

Ray redoes what a dead process was running: a decode (an input that kills its worker on every try becomes a
``worker_crashed`` row), a labelling call (the actor is restarted and reloads its teachers) or a whole shard task
(its shard is written again from the start; every try yields as many events, and the driver gets only those
that earlier tries did not send). A shard task is complete only when its ledger parts exist, and they are written
after the shard is in place, so every input still ends exactly once in the ledgers.

Joining a cluster started with ``ray start --head`` (Ray 2.59+ turns on token authentication for it when a token
exists): the driver uses the token from Ray's standard places, :mod:`soundnet.ingest.ray_auth`.

Only ``--engine ray`` imports this module: Ray is an optional extra.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import ray
from ray.actor import ActorHandle
from ray.exceptions import OutOfMemoryError, RayError, WorkerCrashedError

from soundnet.ingest.claims import Claim
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.engine import Event, InputDone, Progress, TaskDropped, Work, report
from soundnet.ingest.errors import RunError
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.label import Labeller
from soundnet.ingest.ray_auth import AUTH_HELP, RAY_TIMEOUT_S
from soundnet.ingest.task import Labelled, Pending, run_task
from soundnet.ingest.worker import Decoded, decode_input, failure_row
from soundnet.shards.ledger import RunLayout

if TYPE_CHECKING:  # workers that only decode or write shards never import torchvision
    from soundnet.teachers import TeacherSpec

DECODE_RETRIES = 2  # an input whose decoder kills the worker three times is that input's fault
TASK_RETRIES = 3  # a shard task whose process died or that raised is redone whole
ACTOR_RESTARTS = 3  # a teacher actor that died is restarted and the calls it held are retried
LABEL_CALLS_IN_FLIGHT = 2  # per shard task: one batch on the teachers while the next one is decoded

decode_task = ray.remote(num_cpus=1, max_retries=DECODE_RETRIES)(decode_input)


class Teachers:
    """One loaded teacher set (per GPU, or per CPU slot) that labels batches of clips for any shard task."""

    def __init__(self, specs: list[str], device: str, batch_frames: int) -> None:
        from soundnet.teachers import load_teacher

        self.labeller = Labeller([load_teacher(spec, device) for spec in specs], batch_frames)

    def short_side(self) -> int:
        return self.labeller.short_side

    def label(self, decoded: list[Decoded]) -> Labelled:
        return self.labeller.label(decoded)


def _fetch(item: VideoInput, ref: ray.ObjectRef) -> Decoded:
    """The decoded input, or a ``worker_crashed`` row when its worker died on every try."""
    try:
        return ray.get(ref)
    except (WorkerCrashedError, OutOfMemoryError) as exc:
        message = (
            f"the decoding worker process died {DECODE_RETRIES + 1} times on this input (decoder crash or out of "
            f"memory): {str(exc).splitlines()[0]}"
        )
        return Decoded(item, failure=failure_row(item.source, "decode", "worker_crashed", message, type(exc).__name__))


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES, retry_exceptions=True)
def write_shard(
    task: ShardTask,
    claim: Claim | None,
    out_dir: str,
    config: IngestConfig,
    teachers: list[ActorHandle],
    window: int,
    batch_frames: int,
) -> Iterator[Event]:
    """Decode, label and write one shard, streaming its events (:func:`soundnet.ingest.task.run_task`).

    Takes no CPU of its own: it mostly waits on its decodes and labelling calls, and the driver bounds how many
    shard tasks run at once. Results are added in input order, so the shard equals the local engine's.
    """
    items = iter(task.inputs)
    decoding: deque[tuple[VideoInput, ray.ObjectRef]] = deque()
    turns = itertools.count(task.index)  # round robin over the actors, shard tasks starting at different ones

    def refill() -> None:
        while len(decoding) < window and (item := next(items, None)) is not None:
            decoding.append((item, decode_task.remote(item, config)))

    def decoded() -> Iterator[Decoded]:
        refill()
        while decoding:
            result = _fetch(*decoding.popleft())
            refill()
            yield result

    def label(batch: list[Decoded]) -> Pending:
        ref = teachers[next(turns) % len(teachers)].label.remote(batch)
        return lambda: ray.get(ref)

    yield from run_task(task, RunLayout(out_dir), decoded(), label, batch_frames, LABEL_CALLS_IN_FLIGHT, claim)


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` address; None for the forms Ray resolves itself (``auto``, ``ray://``)."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if host and "://" not in address and port.isdigit() else None


def _wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Whether something accepts TCP connections at ``host:port`` before ``deadline`` (a head still starting
    counts): Ray itself would retry for many minutes, printing a warning every few seconds."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(left, 0.1)):
                return True
        except OSError:
            if left <= 1:
                return False
            time.sleep(1)


class _QuietSigtermWarning(logging.Filter):
    """Ray joined from a helper thread warns that it leaves SIGTERM alone: wanted, the CLI's handler stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _init_within(address: str, deadline: float) -> bool:
    """``ray.init(address=...)``, given until ``deadline``; False when it has not returned by then. It runs in a
    daemon thread, so a Ray that keeps retrying stays behind when the process exits with the error."""
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(address=address)
        except BaseException as exc:
            failure.append(exc)

    quiet = _QuietSigtermWarning()
    ray_log = logging.getLogger("ray._private.worker")
    ray_log.addFilter(quiet)
    try:
        thread = threading.Thread(target=init, name="ray-join", daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0))
    finally:
        ray_log.removeFilter(quiet)
    if failure:
        raise failure[0]
    return not thread.is_alive()


def _join(address: str, timeout_s: float) -> None:
    """Join a running cluster (with its token: see :mod:`soundnet.ingest.ray_auth`) within ``timeout_s``; a
    refusal or no answer says what to check."""
    deadline = time.monotonic() + timeout_s
    where = _host_port(address)
    checks = (
        "Check that `ray start --head` runs there, that the host and port are right (the head's --port, "
        "default 6379) and reachable from this machine (firewall)"
    )
    if where is not None and not _wait_for_port(*where, deadline):
        raise RunError(
            f"--ray-address {address}: nothing answers there within {timeout_s:g} s (--ray-timeout). {checks}."
        )
    try:
        joined = _init_within(address, deadline)
    except (ConnectionError, RayError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(
            f"--ray-address {address}: cannot join the Ray cluster ({first}). {checks}. {AUTH_HELP}"
        ) from exc
    if not joined:
        raise RunError(
            f"--ray-address {address}: something answers there, but no Ray cluster within {timeout_s:g} s "
            "(--ray-timeout). Check that it is the port of `ray start --head` (its --port, default 6379; not the "
            "dashboard's or the Ray Client's) and that the head is not overloaded; a cluster with token "
            "authentication also needs its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)."
        )


def _connect(address: str | None, timeout_s: float, cpus: int, gpus: int) -> None:
    """Join the cluster at ``address`` (within ``timeout_s``), or start a Ray on this machine for this run
    (stopped by ray.shutdown)."""
    if address:
        _join(address, timeout_s)
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # started by us: no usage reports to the internet
    # "local": a Ray of our own even when this machine already runs one (`ray start`), which we must not join
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False)


def _teacher_pool(
    specs: Sequence[TeacherSpec], device: str, batch_frames: int, count: int | None
) -> tuple[list[ActorHandle], int]:
    """Teacher actors, loaded (one per GPU of the cluster unless ``count`` says otherwise), and the frame size
    their teachers want."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    on_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if on_gpu and gpus == 0:
        raise RunError("--device cuda: the Ray cluster has no GPU")
    count = count or (gpus if on_gpu else 1)
    if on_gpu and count > gpus:
        raise RunError(f"{count} teacher actors need a GPU each; the Ray cluster has {gpus}")
    if cpus - count < 1:  # each actor holds a CPU; decoding needs at least one more
        raise RunError(f"the Ray cluster has {cpus} CPUs: too few for {count} teacher actors and decoding")
    actor = ray.remote(Teachers).options(
        num_cpus=1,
        num_gpus=1 if on_gpu else 0,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
        max_concurrency=2 if on_gpu else 1,  # on a GPU, one call's host work overlaps the other's kernels
    )
    pool = [actor.remote([str(s) for s in specs], "cuda" if on_gpu else "cpu", batch_frames) for _ in range(count)]
    try:
        short_side = max(ray.get([a.short_side.remote() for a in pool]))
    except RayError as exc:
        raise RunError(
            f"the teachers could not be loaded on the Ray cluster: {str(exc).strip().splitlines()[-1]}"
        ) from exc
    return pool, short_side


class RayEngine:
    """``--engine ray``: shard tasks on the Ray cluster at ``address`` (default: a Ray started on this machine with
    ``workers`` decoding CPUs plus one per teacher actor, stopped at the end; a cluster at ``address`` must answer
    within ``join_timeout_s``), ``teacher_actors`` teacher actors (default: one per GPU). Raises RunError when
    shard tasks still fail after their retries; the finished ones stay, and ``--resume`` redoes the rest."""

    def __init__(
        self,
        specs: Sequence[TeacherSpec],
        device: str,
        batch_frames: int,
        workers: int,
        address: str | None = None,
        teacher_actors: int | None = None,
        join_timeout_s: float = RAY_TIMEOUT_S,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise RunError(f"--device {device}: on Ray each teacher actor is given its own GPU; use auto, cpu or cuda")
        self.specs, self.device, self.batch_frames, self.workers = specs, device, batch_frames, workers
        self.address, self.teacher_actors, self.join_timeout_s = address, teacher_actors, join_timeout_s
        self.pool: list[ActorHandle] = []

    def start(self) -> int:
        import torch

        gpus = 0 if self.device == "cpu" else torch.cuda.device_count()
        _connect(self.address, self.join_timeout_s, self.workers + (self.teacher_actors or max(gpus, 1)), gpus)
        self.pool, short_side = _teacher_pool(self.specs, self.device, self.batch_frames, self.teacher_actors)
        return short_side

    def run(self, work: Work, layout: RunLayout, config: IngestConfig, progress: Progress) -> None:
        window = max(8, 2 * math.ceil(self.batch_frames / config.max_frames))  # decodes ahead, per shard task
        decode_cpus = int(ray.cluster_resources().get("CPU", 0)) - len(self.pool)
        in_flight = max(2, len(self.pool) + 1, math.ceil(2 * decode_cpus / window))
        out, todo, running, failed = str(layout.out_dir), iter(work), {}, []
        while True:
            while len(running) < in_flight and (next_work := next(todo, None)) is not None:
                task, claim = next_work
                running[write_shard.remote(task, claim, out, config, self.pool, window, self.batch_frames)] = task
            if not running:
                break
            (events,), _ = ray.wait(list(running), num_returns=1)  # a shard task with an event to hand on
            task = running[events]
            try:
                event = ray.get(next(events))
            except RayError as exc:
                failed.append(f"shard task {task.index}: {str(exc).strip().splitlines()[-1]}")
                event = TaskDropped(task.index)
            if not isinstance(event, InputDone):  # the task's last event
                del running[events]
            report(event, progress)
        if failed:
            raise RunError(
                f"{len(failed)} shard tasks failed after {TASK_RETRIES} retries ({'; '.join(failed[:3])}); "
                "the others are complete: run again with --resume to redo these"
            )

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
