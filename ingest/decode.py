"""One video clip from one source: the first 20 s of audio and the slot frames, read with a single open.

The audio is decoded first (it is cheap, and a clip without usable sound fails before any video is decoded),
then the frames are sampled by seeking. Both are on the video stream's clock: audio sample 0 and frame time 0
are the video's first timestamp.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from soundnet.audio import SAMPLE_RATE, DecodedAudio, decode_audio
from soundnet.ingest.frames import (
    MAX_FRAMES,
    MIN_SECONDS,
    SEEK_MODES,
    SHORT_SIDE,
    SLOT_INTERVAL_S,
    sample_frames,
    slot_times,
    video_duration_s,
    video_start_s,
)
from soundnet.media import DecodeError, UrlPolicy, decode_errors, open_media
from soundnet.shards.contract import DEFAULT_LAYOUT, ClipLayout

CLIP_SECONDS = DEFAULT_LAYOUT.clip_seconds
# int16 peak at or below which audio counts as digital silence: zeros, or at most dither in the last bit
SILENCE_PEAK = 1


@dataclass
class DecodedClip:
    source: str
    audio: DecodedAudio  # mono int16 at SAMPLE_RATE, cut to duration_s, sample 0 at the video's start
    frames: list[np.ndarray]  # RGB uint8 [H, W, 3], shorter side = short_side
    frame_times_s: list[float]  # actual presentation times of the frames, from the video's start
    slot_times_s: list[float]  # the times asked for
    duration_s: float  # usable duration: min(clip_seconds, audio, video)
    container_duration_s: float | None
    video_codec: str
    width: int
    height: int
    fps: float | None
    seek: str
    layout: ClipLayout  # the slots the frames were sampled on, recorded in every sample

    def meta(self) -> dict[str, Any]:
        """JSON-able description of the clip for the shard's ``<key>.json``."""
        return {
            "source": self.source,
            "duration_s": round(self.duration_s, 6),
            "container_duration_s": None if self.container_duration_s is None else round(self.container_duration_s, 6),
            "video_codec": self.video_codec,
            "width": self.width,
            "height": self.height,
            "fps": None if self.fps is None else round(self.fps, 6),
            "audio_codec": self.audio.codec,
            "source_sample_rate": self.audio.source_rate,
            "source_channels": self.audio.source_channels,
            "frame_times_s": [round(max(0.0, t), 6) for t in self.frame_times_s],
            "slot_times_s": [round(t, 6) for t in self.slot_times_s],
            "seek": self.seek,
            "layout": self.layout.to_json(),
        }


def decode_clip(
    source: str | os.PathLike,
    clip_seconds: float = CLIP_SECONDS,
    interval: float = SLOT_INTERVAL_S,
    max_frames: int = MAX_FRAMES,
    seek: str = "accurate",
    short_side: int = SHORT_SIDE,
    keep_silent: bool = False,
    min_seconds: float = MIN_SECONDS,
    threads: int = 1,
    url: UrlPolicy | None = None,
) -> DecodedClip:
    """Decode audio and slot frames of ``source`` (a path or an http(s) URL).

    The usable duration ``D = min(clip_seconds, audio, video)`` sets the slots
    (:func:`ingest.frames.slot_times`, including its rule for clips shorter than one slot); the audio is cut
    to ``D``. Digital silence (no int16 sample beyond +-1) fails as ``silent`` unless ``keep_silent``.
    ``threads`` is per decoder: 1 suits one worker process per core; ``url`` says how a URL is fetched (retries,
    timeout). Every failure is a
    :class:`DecodeError`; its ``reason`` says which.
    """
    if seek not in SEEK_MODES:
        raise ValueError(f"seek must be one of {SEEK_MODES}, not {seek!r}")
    with decode_errors(source), open_media(source, url) as container:
        if not container.streams.video:
            raise DecodeError("no_video", "no video stream")
        if not container.streams.audio:
            raise DecodeError("no_audio", "no audio stream")
        video = container.streams.video[0]
        audio = decode_audio(
            container, max_seconds=clip_seconds, origin_s=video_start_s(container, video), threads=threads
        )
        video_s = video_duration_s(container, limit_s=clip_seconds)
        duration = min(clip_seconds, audio.seconds, math.inf if video_s is None else video_s)
        audio.samples = audio.samples[: int(round(duration * SAMPLE_RATE))]
        slots = slot_times(duration, interval, max_frames, min_seconds)
        if not keep_silent and int(np.abs(audio.samples, dtype=np.int32).max()) <= SILENCE_PEAK:
            raise DecodeError("silent", f"the first {duration:.2f} s of audio are digital silence")
        frames, times = sample_frames(container, slots, seek=seek, short_side=short_side, threads=threads)
        rate = video.guessed_rate or video.average_rate
        return DecodedClip(
            source=str(source),
            audio=audio,
            frames=frames,
            frame_times_s=times,
            slot_times_s=slots,
            duration_s=duration,
            container_duration_s=None if container.duration is None else container.duration / av.time_base,
            video_codec=video.codec_context.name,
            width=video.codec_context.width,
            height=video.codec_context.height,
            fps=float(rate) if rate else None,
            seek=seek,
            layout=ClipLayout(sample_rate=SAMPLE_RATE, slot_seconds=interval, frames_per_clip=max_frames),
        )
