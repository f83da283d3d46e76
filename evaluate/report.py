"""What an evaluation run leaves behind: a JSON summary and a confusion-matrix figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from soundnet.evaluate.datasets import Dataset
from soundnet.evaluate.protocol import ProtocolResult
from soundnet.shards.atomic import atomic_path


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` clip counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def summary(dataset: Dataset, labels: np.ndarray, result: ProtocolResult, **extra: Any) -> dict[str, Any]:
    """The ``--json`` document: accuracy, folds, per-class accuracy, confusion matrix and run settings.

    The confusion matrix and the per-class figures count the testable clips; a class none of whose clips could
    be tested (it was never in the training folds when tested) has ``null`` as its figure, not 0.
    """
    scored = result.testable
    matrix = confusion(labels[scored], result.predictions[scored], len(dataset.classes))
    tested = matrix.sum(axis=1)
    per_class = [round(float(hits / n), 4) if n else None for hits, n in zip(matrix.diagonal(), tested)]
    return {
        "accuracy": result.accuracy,
        "folds": [result.fold_accuracies[k] for k in sorted(result.fold_accuracies)],
        "fold_ids": sorted(result.fold_accuracies),
        "dataset": dataset.name,
        "clips": len(dataset.clips),
        "classes": dataset.classes,
        "per_class_accuracy": dict(zip(dataset.classes, per_class)),
        "untestable_clips": [str(clip.path) for clip, ok in zip(dataset.clips, scored) if not ok],
        "confusion": matrix.tolist(),
        "chosen_C": {str(k): c for k, c in sorted(result.chosen_c.items())},
        **extra,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")


def plot_confusion(path: Path, document: dict[str, Any]) -> None:
    """Row-normalised confusion matrix with counts, titled with the accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(document["confusion"])
    classes = document["classes"]
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    folds = ", ".join(f"{a:.3f}" for a in document["folds"])
    ax.set_title(
        f"{document['dataset']} {document['layer']}: accuracy {document['accuracy']:.3f}\nfolds {folds}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
