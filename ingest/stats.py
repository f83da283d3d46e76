"""What a run did, on disk: ``shard-NNNNNN_stats.json`` beside each finished shard, ``summary.json`` for the run.

Both are written atomically. A shard's stats are written after the shard and before the ledger parts, and name the
attempt that wrote them and the shard's size: a task is complete only when they agree with its parts and shard
(:meth:`~soundnet.shards.ledger.RunLayout.is_complete`), so every complete task has them. The summary adds up the
stats of all complete tasks (those of earlier, resumed or concurrent runs included), so it is consistent with
``index.parquet`` and ``failures.parquet``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from soundnet.shards.atomic import atomic_path
from soundnet.shards.ledger import RunLayout


@dataclass
class TaskStats:
    """One shard task: what it produced and where its time went (seconds summed over its inputs and batches)."""

    task: int
    shard: str
    inputs: int
    samples: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by reason
    audio_seconds: float = 0.0
    bytes: int = 0
    decode_s: float = 0.0  # in the decoding workers
    label_s: float = 0.0  # in the teachers
    write_s: float = 0.0  # encoding, writing and committing the shard
    attempt: str = ""  # the claim's attempt id that wrote the task (runs before it was recorded: "")

    def write(self, layout: RunLayout) -> None:
        data = {k: round(v, 3) if k.endswith("_s") else v for k, v in asdict(self).items()}
        with atomic_path(layout.stats_path(self.task)) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, layout: RunLayout, task: int) -> TaskStats:
        return cls(**json.loads(layout.stats_path(task).read_text()))


def run_summary(layout: RunLayout, run: dict[str, Any]) -> dict[str, Any]:
    """Totals over every complete task of the run folder, plus ``run`` (this process's engine, workers, wall
    time and tasks); written atomically to ``summary.json`` and returned."""
    tasks = [TaskStats.read(layout, t) for t in layout.completed_tasks()]
    reasons: Counter[str] = Counter()
    for t in tasks:
        reasons.update(t.failures)
    wall = run["wall_s"]
    summary = {
        "tasks": len(tasks),
        "inputs": sum(t.inputs for t in tasks),
        "samples": sum(t.samples for t in tasks),
        "failures": sum(reasons.values()),
        "failures_by_reason": dict(reasons.most_common()),
        "audio_hours": round(sum(t.audio_seconds for t in tasks) / 3600, 6),
        "bytes": sum(t.bytes for t in tasks),
        "decode_s": round(sum(t.decode_s for t in tasks), 3),
        "label_s": round(sum(t.label_s for t in tasks), 3),
        "write_s": round(sum(t.write_s for t in tasks), 3),
        "last_run": {
            **run,
            "videos_per_s": round(run["inputs_run"] / wall, 3) if wall else 0.0,
        },
    }
    with atomic_path(layout.summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
