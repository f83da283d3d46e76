"""The loss curves of a training run as a PNG (matplotlib, Agg, no pyplot state), from its ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from soundnet.shards.atomic import atomic_path


def write_loss_curves(metrics: str | os.PathLike, png: str | os.PathLike) -> None:
    """Plot the total loss and the term per teacher (KL, or 1 - cos for an embedding) over steps (and the held-out
    KL where reported), and in a third panel the accuracy of each ``--probe`` where there is one, atomically.

    Lines of ``metrics`` that are not complete records (a crash mid-write) are left out.
    """
    from matplotlib.figure import Figure  # imported here: a second of start-up that only plotting needs

    records = []
    for line in Path(metrics).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    probes = sorted({k for r in records for k in r if k.startswith("probe/")})
    fig = Figure(figsize=(15 if probes else 10, 4), layout="constrained")
    loss_ax, kl_ax, *probe_ax = fig.subplots(1, 3 if probes else 2)
    _plot(loss_ax, records, "loss", "training loss")
    for name in sorted({k for r in records for k in r if k.startswith(("kl_", "val_kl_", "cos_dist_"))}):
        label = name.replace("val_kl_", "held-out KL ").replace("kl_", "KL ").replace("cos_dist_", "1 - cos ")
        _plot(kl_ax, records, name, label)
    loss_ax.set(xlabel="step", ylabel="loss (lambda x mean KL)", title="total loss")
    kl_ax.set(xlabel="step", ylabel="KL or 1 - cos (as in the loss)", title="term per teacher")
    kl_ax.legend()
    for name in probes:
        _plot(probe_ax[0], records, name, name[6:], marker=True)
    if probes:
        probe_ax[0].set(xlabel="step", ylabel="mean accuracy over folds", title="probe (evaluate svm protocol)")
        probe_ax[0].legend()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot(ax, records: list[dict], key: str, label: str, marker: bool = False) -> None:
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if marker or len(points) < 50 else None, label=label)
