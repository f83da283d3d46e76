"""A cache of windowed clip features, so that a second evaluation (another ``--C``, ``--cv-c``, a plot) skips
decoding and the network.

An entry is one ``.npy`` file named by a digest of everything the features depend on: the checkpoint's bytes
(sha256), the layer, the dataset name, every clip's path, size and modification time, the clip and window
lengths and :data:`FEATURE_VERSION`. Entries are written atomically, so two runs that race both write the same
complete file and either rename wins; a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soundnet.digest import sha256_file
from soundnet.shards.atomic import atomic_path

log = logging.getLogger(__name__)

FEATURE_VERSION = 2
"""Bump when the feature computation changes (decoding, tiling, windowing) so old entries are not reused."""


def default_cache_dir() -> Path:
    """``$SOUNDNET_CACHE/features``, else ``$XDG_CACHE_HOME/soundnet/features``, else ``~/.cache/soundnet/features``."""
    if os.environ.get("SOUNDNET_CACHE"):
        return Path(os.environ["SOUNDNET_CACHE"]) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "soundnet" / "features"


@dataclass(frozen=True)
class FeatureKey:
    checkpoint_sha256: str
    layer: str
    dataset: str
    clip_samples: int
    window_seconds: float
    clips: tuple[tuple[str, int, int], ...]  # (absolute path, size, mtime_ns) per clip, in dataset order

    @classmethod
    def of(
        cls,
        checkpoint: str | os.PathLike,
        layer: str,
        dataset: str,
        paths: list[Path],
        clip_samples: int,
        window_seconds: float,
    ) -> FeatureKey:
        clips = []
        for path in paths:
            stat = Path(path).stat()
            clips.append((str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
        return cls(sha256_file(checkpoint), layer, dataset, clip_samples, float(window_seconds), tuple(clips))

    def digest(self) -> str:
        text = json.dumps({"version": FEATURE_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def filename(self) -> str:
        return f"{self.dataset}-{self.layer}-{self.digest()}.npy"


class FeatureCache:
    """Features by :class:`FeatureKey` in one folder; ``None`` as the folder turns the cache off."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None

    def path(self, key: FeatureKey) -> Path | None:
        return self.folder / key.filename() if self.folder is not None else None

    def load(self, key: FeatureKey) -> np.ndarray | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("ignoring a damaged feature cache entry %s (%s); recomputing", path, exc)
            return None
        if features.ndim != 3 or features.shape[0] != len(key.clips):
            log.warning("ignoring feature cache entry %s of shape %s; recomputing", path, features.shape)
            return None
        return features

    def save(self, key: FeatureKey, features: np.ndarray) -> None:
        path = self.path(key)
        if path is None:
            return
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, features, allow_pickle=False)
        except OSError as exc:  # a full or read-only cache must not fail the evaluation it only speeds up
            log.warning("could not write the feature cache %s: %s", path, exc)
