"""The options of one run that change what a sample holds, and the shard tasks the input list is cut into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from soundnet.ingest.frames import MAX_FRAMES, MIN_SECONDS, SHORT_SIDE, SLOT_INTERVAL_S
from soundnet.ingest.inputs import VideoInput
from soundnet.media import UrlPolicy
from soundnet.shards.contract import SAMPLE_RATE, ClipLayout


@dataclass(frozen=True)
class IngestConfig:
    """Options of one run that change what a sample holds (recorded in the run manifest).

    The clip layout defaults come from :mod:`soundnet.shards.contract`; ``clip_seconds`` (audio kept) defaults to
    the layout's clip, ``frame_interval * max_frames``, so no audio is dropped that a frame describes.
    """

    clip_seconds: float | None = None
    frame_interval: float = SLOT_INTERVAL_S
    max_frames: int = MAX_FRAMES
    frame_seek: str = "accurate"
    min_seconds: float = MIN_SECONDS
    keep_silent: bool = False
    short_side: int = SHORT_SIDE  # frames are decoded straight to the teachers' resize size
    samples_per_shard: int = 500
    url: UrlPolicy = field(default_factory=UrlPolicy)  # how inputs are fetched: not part of the run manifest

    def __post_init__(self) -> None:
        if self.clip_seconds is None:
            object.__setattr__(self, "clip_seconds", self.layout.clip_seconds)

    @property
    def layout(self) -> ClipLayout:
        """The clip contract this run writes: recorded in ``run.json`` and in every sample's json."""
        return ClipLayout(sample_rate=SAMPLE_RATE, slot_seconds=self.frame_interval, frames_per_clip=self.max_frames)


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
