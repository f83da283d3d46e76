"""The interface every engine implements: where decoding and labelling run. What a shard task does, and the
events it reports while it runs, is :func:`soundnet.ingest.task.run_task`, the same for all engines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from soundnet.ingest.claims import Claim
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.stats import TaskStats
from soundnet.shards.ledger import RunLayout

Work = Iterable[tuple[ShardTask, Claim | None]]
"""Tasks to write, each with this run's claim on it; claimed lazily, as the engine draws them."""


@dataclass(frozen=True)
class InputDone:
    """One input of a shard task is recorded: added to its shard (``ok``) or as a failure row. Provisional until
    the task's stats arrive: the shard is not committed yet, and a task that is given up never is."""

    task: int
    ok: bool


@dataclass(frozen=True)
class TaskDropped:
    """A shard task this run gave up (taken over by another run, or failed after its retries): nothing of it kept."""

    task: int


Event = InputDone | TaskStats | TaskDropped
"""What a shard task reports, in order: one InputDone per input, then its TaskStats (committed) or TaskDropped."""


class Progress(Protocol):
    """Told about the run as it goes, in the driver process, with the same calls whatever the engine."""

    def on_input(self, task: int, ok: bool) -> None:
        """One input of ``task`` is recorded (see :class:`InputDone`)."""

    def on_task(self, stats: TaskStats) -> None:
        """A task is complete: its shard, stats and ledger parts are in place. ``stats`` are what was recorded."""

    def on_dropped(self, task: int) -> None:
        """A task was given up: forget the inputs it reported."""


def report(event: Event, progress: Progress) -> None:
    """Hand one event of a shard task to ``progress``: what every engine does with the events it receives."""
    if isinstance(event, InputDone):
        progress.on_input(event.task, event.ok)
    elif isinstance(event, TaskStats):
        progress.on_task(event)
    else:
        progress.on_dropped(event.task)


class Engine(Protocol):
    def start(self) -> int:
        """Load the teachers (before anything is written to the run folder); return the frame size they want."""

    def run(self, work: Work, layout: RunLayout, config: IngestConfig, progress: Progress) -> None:
        """Write every task drawn from ``work``, reporting each task's events to ``progress`` as they happen;
        raise RunError when some could not be written."""

    def close(self) -> None:
        """Stop what :meth:`start` started."""
