"""The interface every engine implements: where decoding and labelling run. What a shard task does is
:func:`soundnet.ingest.task.run_task`, the same for all engines."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from soundnet.ingest.claims import Claim
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.stats import TaskStats
from soundnet.shards.ledger import RunLayout

Work = Iterable[tuple[ShardTask, Claim | None]]
"""Tasks to write, each with this run's claim on it; claimed lazily, as the engine draws them."""
OnTask = Callable[[TaskStats], None]
"""Called with each finished task's stats, in the driver process (progress, releasing the claim)."""


class Engine(Protocol):
    def start(self) -> int:
        """Load the teachers (before anything is written to the run folder); return the frame size they want."""

    def run(self, work: Work, layout: RunLayout, config: IngestConfig, on_task: OnTask) -> None:
        """Write every task drawn from ``work``; raise RunError when some could not be written."""

    def close(self) -> None:
        """Stop what :meth:`start` started."""
