"""The SVM protocol: leave-one-fold-out, a linear one-vs-rest SVM on windows, clip score = mean window decision."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from joblib import Parallel, delayed
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

DEFAULT_C = 0.01
C_GRID = (0.001, 0.01, 0.1)


@dataclass
class SVMConfig:
    C: float = DEFAULT_C
    cv_c: bool = False  # choose C per outer fold by leave-one-fold-out on the training folds only
    c_grid: tuple[float, ...] = C_GRID
    standardize: bool = True
    max_iter: int = 5000


@dataclass
class ProtocolResult:
    fold_accuracies: dict[int, float]
    predictions: np.ndarray  # per clip, predicted class
    chosen_c: dict[int, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(np.mean(list(self.fold_accuracies.values())))


def _fit(features: np.ndarray, labels: np.ndarray, C: float, config: SVMConfig):
    """Train on every window of the given clips; each window carries its clip's label.

    liblinear's primal solver: with many more windows than feature dimensions it converges in far fewer
    iterations than the dual one (measured on ESC-10 pool5: 216 vs 1373).
    """
    x = features.reshape(-1, features.shape[-1])
    y = np.repeat(labels, features.shape[1])
    steps = [StandardScaler()] if config.standardize else []
    svm = make_pipeline(*steps, LinearSVC(C=C, dual=False, max_iter=config.max_iter))
    return svm.fit(x, y)


def clip_scores(svm, features: np.ndarray) -> np.ndarray:
    """Mean decision value over each clip's windows: ``[clips, classes]``."""
    clips, windows, dim = features.shape
    scores = svm.decision_function(features.reshape(-1, dim))
    if scores.ndim == 1:  # binary problem: sklearn returns one column
        scores = np.stack([-scores, scores], axis=1)
    return scores.reshape(clips, windows, -1).mean(axis=1)


def _predict(svm, features: np.ndarray) -> np.ndarray:
    return svm.classes_[clip_scores(svm, features).argmax(axis=1)]


def _select_c(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, config: SVMConfig) -> float:
    """Leave-one-fold-out over the training folds; ties go to the smaller C (stronger regularisation)."""
    best_c, best_acc = config.c_grid[0], -1.0
    for C in config.c_grid:
        accs = []
        for k in np.unique(folds):
            svm = _fit(features[folds != k], labels[folds != k], C, config)
            accs.append(np.mean(_predict(svm, features[folds == k]) == labels[folds == k]))
        if np.mean(accs) > best_acc + 1e-12:
            best_c, best_acc = C, float(np.mean(accs))
    return best_c


def run_protocol(
    features: np.ndarray, labels: np.ndarray, folds: np.ndarray, config: SVMConfig, n_jobs: int = -1
) -> ProtocolResult:
    """Train on all folds but one, test on that one, for every fold."""

    def one_fold(k: int) -> tuple[float, np.ndarray]:
        train, test = folds != k, folds == k
        C = _select_c(features[train], labels[train], folds[train], config) if config.cv_c else config.C
        return C, _predict(_fit(features[train], labels[train], C, config), features[test])

    fold_ids = [int(k) for k in np.unique(folds)]
    # liblinear releases the GIL: folds train in parallel threads without copying the features
    outcomes = Parallel(n_jobs=n_jobs, prefer="processes")(delayed(one_fold)(k) for k in fold_ids)
    predictions = np.empty_like(labels)
    fold_accuracies, chosen = {}, {}
    for k, (C, predicted) in zip(fold_ids, outcomes):
        predictions[folds == k] = predicted
        fold_accuracies[k] = float(np.mean(predicted == labels[folds == k]))
        chosen[k] = C
    return ProtocolResult(fold_accuracies, predictions, chosen)
