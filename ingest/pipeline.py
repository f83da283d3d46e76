"""The work of stage one, independent of where it runs: shard tasks, decoding one input, labelling frames with the
teachers, and writing one shard with its ledger rows.

An engine (local processes, Ray) decides only where these pieces run. Every input ends as exactly one sample or
exactly one failure row; nothing here raises for a bad input.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from soundnet.ingest.decode import CLIP_SECONDS, DecodedClip, decode_clip
from soundnet.ingest.frames import MAX_FRAMES, MIN_SECONDS, SHORT_SIDE, SLOT_INTERVAL_S
from soundnet.ingest.inputs import VideoInput
from soundnet.media import DecodeError
from soundnet.shards.ledger import RunLayout
from soundnet.shards.schema import Sample
from soundnet.shards.writer import ShardWriter

log = logging.getLogger(__name__)

TOOL_VERSION = f"soundnet-distill {version('soundnet-distill')}"

# which part of the work a decoding failure belongs to (the ledger's `stage` column)
_OPEN_REASONS = {"not_found", "empty", "io_error", "http_error", "not_media", "damaged", "open_failed", "bad_metadata"}
_AUDIO_REASONS = {"no_audio", "silent", "audio_decode_failed", "no_audio_samples"}
_VIDEO_REASONS = {"no_video", "too_short", "video_decode_failed", "video_truncated", "seek_failed"}


def decode_stage(reason: str) -> str:
    if reason in _OPEN_REASONS:
        return "open"
    if reason in _AUDIO_REASONS:
        return "audio"
    if reason in _VIDEO_REASONS:
        return "video"
    return "decode"


@dataclass(frozen=True)
class IngestConfig:
    """Options of one run that change what a sample holds (recorded in the run manifest)."""

    clip_seconds: float = CLIP_SECONDS
    frame_interval: float = SLOT_INTERVAL_S
    max_frames: int = MAX_FRAMES
    frame_seek: str = "accurate"
    min_seconds: float = MIN_SECONDS
    keep_silent: bool = False
    short_side: int = SHORT_SIDE  # frames are decoded straight to the teachers' resize size
    samples_per_shard: int = 500


@dataclass(frozen=True)
class ShardTask:
    """A deterministic slice of the input list that becomes one shard: the unit an engine schedules."""

    index: int
    inputs: tuple[VideoInput, ...]


def make_tasks(inputs: Sequence[VideoInput], samples_per_shard: int) -> list[ShardTask]:
    return [
        ShardTask(i // samples_per_shard, tuple(inputs[i : i + samples_per_shard]))
        for i in range(0, len(inputs), samples_per_shard)
    ]


def failure_row(source: str, stage: str, reason: str, message: str, error_class: str) -> dict[str, str]:
    return {"source": source, "stage": stage, "reason": reason, "message": message, "error_class": error_class}


@dataclass
class Decoded:
    """What the CPU stage returns for one input: a clip, or the failure row that replaces it (picklable)."""

    item: VideoInput
    clip: DecodedClip | None = None
    failure: dict[str, str] | None = None


def frame_count(batch: Sequence[Decoded]) -> int:
    """Frames a batch of decoded inputs brings to the teachers: engines label once it reaches ``--batch-frames``."""
    return sum(len(d.clip.frames) for d in batch if d.clip is not None)


def decode_input(item: VideoInput, config: IngestConfig) -> Decoded:
    """Decode one input; any failure, expected or not, becomes a ledger row instead of an exception."""
    if item.key is None:
        return Decoded(item, failure=failure_row(item.source, "input", "duplicate", "listed more than once", "-"))
    try:
        clip = decode_clip(
            item.source,
            clip_seconds=config.clip_seconds,
            interval=config.frame_interval,
            max_frames=config.max_frames,
            seek=config.frame_seek,
            short_side=config.short_side,
            keep_silent=config.keep_silent,
            min_seconds=config.min_seconds,
        )
    except DecodeError as exc:
        cause = type(exc.__cause__ or exc).__name__  # the library's own exception class says most
        row = failure_row(item.source, decode_stage(exc.reason), exc.reason, exc.message, cause)
        return Decoded(item, failure=row)
    except Exception as exc:  # a bug or a library failure we did not foresee: record it, keep the run going
        message = f"{exc}\n{traceback.format_exc(limit=3)}"
        return Decoded(
            item, failure=failure_row(item.source, "decode", "unexpected_error", message, type(exc).__name__)
        )
    return Decoded(item, clip=clip)


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

    def _log_probs(self, frames: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: t.log_probs(frames, batch_size=self.batch_size).numpy() for t in self.teachers}

    def label(self, decoded: Sequence[Decoded]) -> list[Sample | dict[str, str]]:
        """One sample or failure row per input, in order. Frames of all clips go through the teachers together;
        if that fails, clips are retried one by one so that only the offending clip fails."""
        clips = [d.clip for d in decoded if d.clip is not None]
        try:
            frames = [f for clip in clips for f in clip.frames]
            scores = self._log_probs(frames) if frames else {}
            per_clip: list[dict[str, np.ndarray] | Exception] = _split(scores, [len(c.frames) for c in clips])
        except Exception:
            per_clip = [self._one(clip) for clip in clips]
        out: list[Sample | dict[str, str]] = []
        it = iter(per_clip)
        for d in decoded:
            if d.clip is None:
                out.append(d.failure)
            elif isinstance(result := next(it), Exception):
                out.append(failure_row(d.item.source, "teacher", "teacher_failed", str(result), type(result).__name__))
            else:
                out.append(self._sample(d, result))
        return out

    def _one(self, clip: DecodedClip) -> dict[str, np.ndarray] | Exception:
        try:
            return self._log_probs(clip.frames)
        except Exception as exc:
            return exc

    def _sample(self, d: Decoded, scores: dict[str, np.ndarray]) -> Sample:
        meta = {**d.clip.meta(), "key": d.item.key, "teachers": self.teacher_meta, "tool_version": TOOL_VERSION}
        posteriors = {name: s.astype(np.float16) for name, s in scores.items()}
        return Sample(key=d.item.key, audio=d.clip.audio.samples, posteriors=posteriors, meta=meta)


def _split(scores: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum([0, *counts])
    return [{name: s[a:b] for name, s in scores.items()} for a, b in zip(bounds[:-1], bounds[1:])]


class TaskWriter:
    """Writes one task's shard incrementally and, once it is in place, the task's ledger parts.

    Use as a context manager: on an exception nothing of the task remains, so a resumed run redoes it.
    """

    def __init__(self, layout: RunLayout, task: ShardTask) -> None:
        self.layout = layout
        self.task = task
        self.failures: list[dict[str, str]] = []
        self._writer = ShardWriter(layout.shard_path(task.index))

    def __enter__(self) -> TaskWriter:
        self._writer.__enter__()
        return self

    def add(self, results: Sequence[Sample | dict[str, str]]) -> None:
        for result in results:
            if isinstance(result, Sample):
                try:
                    self._writer.write(result)
                except ValueError as exc:
                    src = result.meta.get("source", result.key)
                    self.failures.append(failure_row(src, "write", "invalid_sample", str(exc), "ValueError"))
            else:
                self.failures.append(result)

    @property
    def samples(self) -> int:
        return self._writer.count

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._writer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            accounted = self._writer.count + len(self.failures)
            if accounted != len(self.task.inputs):  # a broken invariant must never be recorded as done
                raise RuntimeError(f"task {self.task.index}: {accounted} results for {len(self.task.inputs)} inputs")
            self.layout.write_parts(self.task.index, self._writer.index_rows, self.failures)
        return False
