"""A cache of windowed clip features, so that a second evaluation (another ``--C``, ``--cv-c``, a plot) skips
decoding and the network.

An entry is one ``.npy`` file named by a digest of everything the features depend on (the checkpoint's bytes
(sha256), the layer, the dataset name, every clip's path, size and modification time, the clip and window
lengths and :data:`FEATURE_VERSION`) and by the sha256 of its own bytes: ``<dataset>-<layer>-<key>.<sha256>.npy``.
An entry whose bytes no longer match its name (a flipped bit, a partial copy, an edit) is removed and recomputed,
with a warning. Entries are written atomically, so two runs that race both write a complete file and either
rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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

    def stem(self) -> str:
        """The entry's name without its content digest."""
        return f"{self.dataset}-{self.layer}-{self.digest()}"


class FeatureCache:
    """Features by :class:`FeatureKey` in one folder; ``None`` as the folder turns the cache off."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None

    def entries(self, key: FeatureKey) -> list[Path]:
        """The files stored for ``key`` (normally one), newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"{key.stem()}.*.npy"), key=_mtime, reverse=True)

    def load(self, key: FeatureKey) -> np.ndarray | None:
        """The features of the first intact entry for ``key``; entries whose bytes changed are removed."""
        for path in self.entries(key):
            try:
                data = path.read_bytes()
            except OSError:  # removed meanwhile by a racing run, or unreadable: compute instead
                continue
            recorded = path.name[len(key.stem()) + 1 : -len(".npy")]
            if hashlib.sha256(data).hexdigest() != recorded:
                log.warning("feature cache entry %s changed since it was written (sha256 differs); recomputing", path)
                with contextlib.suppress(OSError):  # a read-only cache keeps it; the digest check skips it again
                    path.unlink(missing_ok=True)
                continue
            try:
                features = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as exc:
                log.warning("ignoring an unreadable feature cache entry %s (%s); recomputing", path, exc)
                continue
            if features.ndim != 3 or features.shape[0] != len(key.clips):
                log.warning("ignoring feature cache entry %s of shape %s; recomputing", path, features.shape)
                continue
            return features
        return None

    def save(self, key: FeatureKey, features: np.ndarray) -> None:
        """Write ``features`` as the entry for ``key`` (named by their digest); older entries for ``key`` go."""
        if self.folder is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, features, allow_pickle=False)
        path = self.folder / f"{key.stem()}.{hashlib.sha256(buffer.getbuffer()).hexdigest()}.npy"
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getbuffer())
            written = _mtime(path)
            for older in self.entries(key):  # a racing run's newer entry is kept: it removes this one
                if _mtime(older) < written:
                    older.unlink(missing_ok=True)
        except OSError as exc:  # a full or read-only cache must not fail the evaluation it only speeds up
            log.warning("could not write the feature cache %s: %s", path, exc)


def _mtime(path: Path) -> int:
    """Modification time in ns; -1 for a file a racing run removed."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1
