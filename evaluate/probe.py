"""A downstream probe for a network in training: a labelled dataset decoded once and kept in memory, scored for
any model with the evaluator's protocol (the clip length, windows and SVM of ``evaluate svm``), so that scoring it
again costs only the network and the SVM fits.

``student train --probe esc10:DIR`` builds one per option at start and scores it at every validation step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from soundnet.audio import DecodedAudio
from soundnet.evaluate.datasets import LOADERS, Dataset, DatasetError, load_dataset
from soundnet.evaluate.features import decode_clips, fixed_length, input_samples, unreadable, window_features
from soundnet.evaluate.protocol import SVMConfig, check_folds, run_protocol
from soundnet.student.model import SoundNet


def parse_probe(spec: str) -> tuple[str, Path]:
    """``DATASET:DIR`` -> (dataset layout, folder); a ValueError names the option and what is wrong."""
    dataset, sep, folder = spec.partition(":")
    if not sep or dataset not in LOADERS or not folder:
        raise ValueError(f"--probe {spec}: expected DATASET:DIR with DATASET one of {', '.join(sorted(LOADERS))}")
    return dataset, Path(folder)


def probe_names(specs: list[str]) -> list[str]:
    """A metrics name per probe: the dataset (``esc10``), or ``dataset-<folder name>`` where two probes share a
    dataset layout, numbered from the second where even that repeats."""
    datasets = [parse_probe(spec)[0] for spec in specs]
    names = [
        dataset if datasets.count(dataset) == 1 else f"{dataset}-{parse_probe(spec)[1].resolve().name}"
        for spec, dataset in zip(specs, datasets)
    ]
    return [f"{name}-{names[:i].count(name) + 1}" if name in names[:i] else name for i, name in enumerate(names)]


@dataclass
class Probe:
    name: str
    data: Dataset
    clips: list[DecodedAudio]  # each clip's first clip_seconds as decoded (int16, untiled)
    layer: str
    svm: SVMConfig
    window_seconds: float = 1.0

    @classmethod
    def load(cls, spec: str, name: str, layer: str = "pool5", workers: int = 4) -> Probe:
        """Read the dataset of ``spec`` (``DATASET:DIR``) and decode every clip; refuses, naming the option, a
        dataset the protocol cannot score or files that cannot be read."""
        dataset, folder = parse_probe(spec)
        svm = SVMConfig()
        try:
            data = load_dataset(dataset, folder)
            check_folds(np.array([c.label for c in data.clips]), np.array([c.fold for c in data.clips]), svm)
        except (DatasetError, ValueError) as exc:
            raise ValueError(f"--probe {spec}: {exc}") from None
        paths = [clip.path for clip in data.clips]
        clips, errors = [], []
        with tqdm(total=len(paths), desc=f"decode probe {name}", unit="clip", disable=None) as progress:
            for result in decode_clips(paths, data.clip_seconds, workers, progress):
                if isinstance(result, str):
                    errors.append(result)
                else:
                    clips.append(result)
        if errors:
            raise ValueError(f"--probe {spec}: {unreadable(errors)}")
        return cls(name, data, clips, layer, svm)

    def features(
        self, model: SoundNet, device: str | torch.device = "cpu", batch_size: int = 16, chunk: int = 64
    ) -> np.ndarray:
        """Windowed features of every clip, as ``evaluate svm`` computes them (tiled to the dataset's length)."""
        num_samples = input_samples(model, self.layer, self.data.clip_seconds)
        quiet = tqdm(disable=True)
        parts = []
        for start in range(0, len(self.clips), chunk):
            waveforms = np.stack([fixed_length(c.as_float(), num_samples) for c in self.clips[start : start + chunk]])
            parts.append(window_features(model, waveforms, self.layer, self.window_seconds, batch_size, device, quiet))
        return np.concatenate(parts)

    def score(self, model: SoundNet, device: str | torch.device = "cpu", batch_size: int = 16) -> float:
        """Mean accuracy over the folds; ``model`` is left in the mode it was in."""
        training = model.training
        try:
            features = self.features(model, device, batch_size)
        finally:
            model.train(training)
        labels = np.array([c.label for c in self.data.clips])
        folds = np.array([c.fold for c in self.data.clips])
        return run_protocol(features, labels, folds, self.svm, verbose=False).accuracy
