"""Labelling: every teacher on the frames of many decoded clips at once, clips made into shard samples."""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import numpy as np

from soundnet.ingest.decode import DecodedClip
from soundnet.ingest.worker import Decoded, failure_row
from soundnet.shards.schema import Sample

TOOL_VERSION = f"soundnet-distill {version('soundnet-distill')}"

Result = Sample | dict[str, str]
"""What one input becomes: a sample, or its failure row."""


class Labeller:
    """Runs every teacher on the frames of many clips at once and turns clips into shard samples."""

    def __init__(self, teachers: Sequence[Any], batch_size: int = 64) -> None:
        self.teachers = list(teachers)
        self.batch_size = batch_size
        self.teacher_meta = {t.name: t.metadata() for t in self.teachers}

    @property
    def short_side(self) -> int:
        """The size frames are decoded to: the largest resize any teacher wants, so no teacher upsamples."""
        return max(t.preprocessing.resize for t in self.teachers)

    def _outputs(self, frames: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Each teacher's rows for ``frames``: log-probabilities, or unit embeddings (float16 keeps them unit)."""
        return {t.name: t.outputs(frames, batch_size=self.batch_size).numpy() for t in self.teachers}

    def label(self, decoded: Sequence[Decoded]) -> tuple[list[Result], float]:
        """One sample or failure row per input, in order, and the seconds it took. Frames of all clips go through
        the teachers together; if that fails, clips are retried one by one so that only the offending clip fails."""
        start = time.perf_counter()
        clips = [d.clip for d in decoded if d.clip is not None]
        try:
            frames = [f for clip in clips for f in clip.frames]
            scores = self._outputs(frames) if frames else {}
            per_clip: list[dict[str, np.ndarray] | Exception] = _split(scores, [len(c.frames) for c in clips])
        except Exception:
            per_clip = [self._one(clip) for clip in clips]
        out: list[Result] = []
        it = iter(per_clip)
        for d in decoded:
            if d.clip is None:
                out.append(d.failure)
            elif isinstance(result := next(it), Exception):
                out.append(failure_row(d.item.source, "teacher", "teacher_failed", str(result), type(result).__name__))
            else:
                out.append(self._sample(d, result))
        return out, time.perf_counter() - start

    def _one(self, clip: DecodedClip) -> dict[str, np.ndarray] | Exception:
        try:
            return self._outputs(clip.frames)
        except Exception as exc:
            return exc

    def _sample(self, d: Decoded, scores: dict[str, np.ndarray]) -> Sample:
        meta = {**d.clip.meta(), "key": d.item.key, "teachers": self.teacher_meta, "tool_version": TOOL_VERSION}
        posteriors = {name: s.astype(np.float16) for name, s in scores.items()}
        return Sample(key=d.item.key, audio=d.clip.audio.samples, posteriors=posteriors, meta=meta)


def _split(scores: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum([0, *counts])
    return [{name: s[a:b] for name, s in scores.items()} for a, b in zip(bounds[:-1], bounds[1:])]
