"""The whole SVM evaluation of a checkpoint: dataset -> waveforms -> layer features -> protocol -> summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soundnet.evaluate.cache import FeatureCache
from soundnet.evaluate.datasets import Dataset, DatasetError, load_dataset
from soundnet.evaluate.features import dataset_features
from soundnet.evaluate.protocol import SVMConfig, run_protocol, testable_clips
from soundnet.evaluate.report import summary
from soundnet.student.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def evaluate_svm(
    checkpoint: str | Path,
    dataset: str,
    data_dir: str | Path,
    layer: str = "pool5",
    svm: SVMConfig | None = None,
    clip_seconds: float | None = None,
    window_seconds: float = 1.0,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 4,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Run the protocol and return the summary document (see :func:`evaluate.report.summary`).

    ``cache`` (off when ``None``) keeps the features, so a rerun with other SVM settings skips the network."""
    svm = svm or SVMConfig()
    timings = {}
    start = time.perf_counter()
    data = load_dataset(dataset, data_dir)  # metadata errors before the checkpoint loads
    if len(data.folds) < 2 or len(data.classes) < 2:
        raise DatasetError(
            f"{data_dir}: the SVM protocol needs at least 2 folds and 2 classes, "
            f"found folds {data.folds} and classes {data.classes}"
        )
    model = load_checkpoint(checkpoint)
    seconds = clip_seconds or data.clip_seconds
    model.output_length(layer, 0)  # an unknown layer fails here, before any decoding
    log.info("%s: %d clips, %d classes, folds %s", data.name, len(data.clips), len(data.classes), data.folds)

    features = dataset_features(
        model, checkpoint, data, layer, seconds, window_seconds, batch_size, device, workers, cache, timings
    )
    log.info("features %s: %d windows x %d dims per clip", layer, features.shape[1], features.shape[2])

    chosen = f"C from {list(svm.c_grid)} per fold" if svm.cv_c else f"C={svm.C:g}"
    log.info("SVM: %d folds, %s, %s features", len(data.folds), chosen, "standardised" if svm.standardize else "raw")
    t = time.perf_counter()
    labels = np.array([c.label for c in data.clips])
    folds = np.array([c.fold for c in data.clips])
    warn_sparse_classes(data, labels, folds)
    result = run_protocol(features, labels, folds, svm)
    timings["svm_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    return summary(
        data,
        labels,
        result,
        layer=layer,
        checkpoint=str(checkpoint),
        arch=model.config.arch,
        clip_seconds=seconds,
        window_seconds=window_seconds,
        windows_per_clip=int(features.shape[1]),
        feature_dim=int(features.shape[2]),
        svm={"C": svm.C, "cv_c": svm.cv_c, "c_grid": list(svm.c_grid), "standardize": svm.standardize},
        timings_s={k: round(v, 2) for k, v in timings.items()},
        torch_threads=torch.get_num_threads(),
    )


def warn_sparse_classes(data: Dataset, labels: np.ndarray, folds: np.ndarray) -> None:
    """Name each class with fewer clips than folds: some folds test none of it, and where all its clips share one
    fold they are never in the training folds when tested, so they are left out of the accuracy (figure n/a)."""
    testable = testable_clips(labels, folds)
    for label, name in enumerate(data.classes):
        mine = labels == label
        if mine.sum() >= len(data.folds):
            continue
        if testable[mine].all():
            log.warning(
                "class %r has %d clip(s) for %d folds: some folds test none of it; its figure rests on %d clip(s)",
                name, mine.sum(), len(data.folds), mine.sum(),
            )  # fmt: skip
        else:
            log.warning(
                "class %r has %d clip(s) for %d folds, all in fold %s: it is never in the training folds when "
                "tested, so its clips are left out of the accuracy and its per-class figure is n/a; "
                "add clips of it to other folds",
                name, mine.sum(), len(data.folds), ", ".join(map(str, sorted(set(folds[mine].tolist())))),
            )  # fmt: skip
