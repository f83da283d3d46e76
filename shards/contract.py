"""The clip contract: what stage one writes and stage two reads about a clip's time layout, defined once.

``ingest run`` records the :class:`ClipLayout` it used in ``run.json`` and in every sample's json (``layout``);
``student train`` reads it back and pairs output steps with teacher frames by it (or refuses, naming the
mismatch). Nothing else in the project spells out the sample rate, the slot length, the frames per clip or the
int16 scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SAMPLE_RATE = 22050
"""Audio rate of every stored waveform and of the network input, in Hz (the paper's rate)."""

SLOT_SECONDS = 5.0
"""Seconds of audio one teacher frame describes; the frame is taken at the slot's centre."""

FRAMES_PER_CLIP = 4
"""Teacher frames (slots) per clip: 4 x 5 s = the paper's 20 s training clip."""

AUDIO_DTYPE = "int16"
AUDIO_SCALE = 32768.0
"""Stored waveform: float value = int16 / AUDIO_SCALE, in [-1, 1)."""


@dataclass(frozen=True)
class ClipLayout:
    """How a clip's audio and teacher frames line up: slots of ``slot_seconds``, one frame at each slot centre."""

    sample_rate: int = SAMPLE_RATE
    slot_seconds: float = SLOT_SECONDS
    frames_per_clip: int = FRAMES_PER_CLIP
    audio_dtype: str = AUDIO_DTYPE
    audio_scale: float = AUDIO_SCALE

    def __post_init__(self) -> None:
        if self.sample_rate < 1 or not (self.slot_seconds > 0 and math.isfinite(self.slot_seconds)):
            raise ValueError(f"clip layout needs a positive sample rate and slot length, got {self}")
        if self.frames_per_clip < 1:
            raise ValueError(f"clip layout needs at least one frame per clip, got {self.frames_per_clip}")

    @property
    def clip_seconds(self) -> float:
        return self.slot_seconds * self.frames_per_clip

    @property
    def slot_samples(self) -> int:
        return round(self.slot_seconds * self.sample_rate)

    @property
    def clip_samples(self) -> int:
        return self.frames_per_clip * self.slot_samples

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ClipLayout:
        """The layout a run or sample recorded; shards written before the layout was recorded used the defaults."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"clip layout must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"clip layout has unknown fields {unknown}")
        return cls(**data)

    def describe(self) -> str:
        return (
            f"{self.frames_per_clip} frames x {self.slot_seconds:g} s slots at {self.sample_rate} Hz "
            f"(ingest run --frame-interval {self.slot_seconds:g} --max-frames {self.frames_per_clip})"
        )


DEFAULT_LAYOUT = ClipLayout()
