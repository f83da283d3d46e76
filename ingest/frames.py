"""Frame sampling with PyAV: one frame per 5 s slot, converted straight to the teachers' input scale.

Times handed in and out are seconds on the **video stream's own clock**: 0 is its first timestamp
(``stream.start_time``), so a stream whose first pts is not 0 samples the same scenes as one starting at 0.

Two seek modes:

* ``accurate``: the frame *displayed* at slot time ``t``, i.e. the last frame with pts <= t. The decoder seeks
  to the keyframe before ``t`` and runs forward. Between slots it goes on decoding forward, and seeks again
  only where the stream's index has a keyframe between the current position and the next slot: only then does
  a seek save work (seeking to a keyframe already passed would decode that stretch twice). Measured on the 16
  shared videos, this takes 0.95x the CPU time of seeking before every slot and 0.65x that of never seeking
  after the first slot. Frames well before a slot that no other frame refers to are not decoded at all.
* ``keyframe``: the keyframe at or before ``t`` (the frame a seek lands on); one packet is decoded per slot.

Frames are converted by libswscale directly from the decoder's pixel format to RGB at the target size, so no
full-size RGB array is ever made, and the container's display rotation is applied. Formats with alpha
(``yuva420p``, e.g. VP9 decoded by libvpx) lose the alpha plane in the conversion to ``rgb24``: the teachers
see the colour stored under transparent pixels, without compositing. (FFmpeg's native VP9 decoder, PyAV's
default, already returns such streams as plain ``yuv420p``.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from soundnet.media import DecodeError, decoding_only
from soundnet.shards.contract import FRAMES_PER_CLIP, SLOT_SECONDS

SLOT_INTERVAL_S = SLOT_SECONDS
MAX_FRAMES = FRAMES_PER_CLIP
MIN_SECONDS = 1.0
SHORT_SIDE = 256
SEEK_MODES = ("accurate", "keyframe")
# ffmpeg's own heuristic (fftools, -ss): where a format seeks by dts and the codec reorders frames, seek this
# much earlier so that the keyframe found by dts still precedes the target in presentation order
_BFRAME_SEEK_MARGIN_S = 3 / 23
# frame times are float seconds: a frame whose pts is exactly a slot time counts as shown at it
_TIME_EPS_S = 1e-6
# frames shown this long before a target are decoded only where other frames refer to them
_NONREF_WINDOW_S = 0.5
# a stream whose last frame ends this long before a slot it claims to cover is cut short
_TRUNCATION_TOLERANCE_S = 1.0


def slot_times(
    duration_s: float,
    interval: float = SLOT_INTERVAL_S,
    max_frames: int = MAX_FRAMES,
    min_seconds: float = MIN_SECONDS,
) -> list[float]:
    """Slot centres (seconds from the video's start) at which one frame each is sampled.

    ``k = min(max_frames, floor(D / interval))`` full slots, centred at ``interval * (i + 0.5)`` (2.5, 7.5,
    12.5, 17.5 s by default). Short-clip rule: a clip shorter than one slot (k = 0) still gives one sample if
    ``D >= min_seconds``; its single slot is the whole clip ``[0, D)`` and the frame is taken at ``D / 2``.
    Shorter clips raise ``DecodeError('too_short')``.
    """
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise DecodeError("too_short", f"no usable duration ({duration_s!r} s)")
    k = min(max_frames, math.floor(duration_s / interval))
    if k >= 1:
        return [interval * (i + 0.5) for i in range(k)]
    if duration_s >= min_seconds:
        return [duration_s / 2]
    raise DecodeError("too_short", f"clip is {duration_s:.3f} s, shorter than the minimum {min_seconds:g} s")


def video_start_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """The stream's first timestamp in seconds (the origin of frame times), else the container's."""
    if stream.start_time is not None:
        return float(stream.start_time * stream.time_base)
    if container.start_time is not None:
        return container.start_time / av.time_base
    return 0.0


def video_duration_s(container: av.container.InputContainer, limit_s: float | None = None) -> float | None:
    """Duration of the first video stream, counted from its start, in seconds.

    From the stream header, else the container header. Where both lack it (e.g. WebM written by a live muxer),
    it is recovered by demuxing packets from the start without decoding them: the end of the last packet, or
    the sum of packet durations for streams without timestamps. Demuxing stops once ``limit_s`` is reached (a
    20 s clip needs no more). None if nothing tells.
    """
    stream = container.streams.video[0]
    start = video_start_s(container, stream)
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return (container.duration + (container.start_time or 0)) / av.time_base - start
    with contextlib.suppress(av.error.FFmpegError):  # if it cannot seek, demux from where it stands
        container.seek(0)
    tb = stream.time_base
    end: float | None = None
    summed = 0.0
    try:
        for packet in container.demux(stream):
            summed += float(packet.duration * tb)
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            end = max(end or 0.0, float((ts + packet.duration) * tb) - start)
            if limit_s is not None and end >= limit_s:
                break
    except av.error.FFmpegError:
        pass  # a damaged tail: the packets read so far still bound the duration
    return end if end is not None else summed or None


def scaled_size(width: int, height: int, short_side: int, sample_aspect: Fraction | None = None) -> tuple[int, int]:
    """Output size whose shorter *displayed* side is ``short_side`` (non-square pixels are made square)."""
    display_width = width * float(sample_aspect) if sample_aspect else float(width)
    if display_width <= height:
        return short_side, max(1, round(height * short_side / display_width))
    return max(1, round(display_width * short_side / height)), short_side


def frame_to_rgb(
    frame: av.VideoFrame,
    short_side: int = SHORT_SIDE,
    sample_aspect: Fraction | None = None,
    interpolation: str = "BILINEAR",
    threads: int = 1,
    reformatter: VideoReformatter | None = None,
) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` with the shorter displayed side ``short_side``, in one libswscale pass.

    ``BILINEAR`` filters over the whole source footprint when shrinking, like an antialiased resize. The
    frame's display rotation (phone videos) is applied afterwards, on the small image. Pass one
    ``reformatter`` for a run of frames so that libswscale keeps its set-up.
    """
    width, height = scaled_size(frame.width, frame.height, short_side, sample_aspect)
    rgb = (reformatter or VideoReformatter()).reformat(
        frame, width, height, "rgb24", interpolation=interpolation, threads=threads
    )
    array = rgb.to_ndarray()
    if frame.rotation % 360:
        array = np.rot90(array, k=round(frame.rotation / 90))  # rotation is counter-clockwise, like rot90
    return np.ascontiguousarray(array)


class _VideoCursor:
    """A decoding position in one video stream: decodes forward, and seeks only where that saves decoding."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> None:
        self.container = container
        self.stream = stream
        self.tb = stream.time_base
        self.start = video_start_s(container, stream)
        rate = stream.guessed_rate or stream.average_rate
        self.frame_step = 1 / float(rate) if rate else 1 / 25
        flags = container.format.flags
        seeks_by_pts = bool(flags & av.format.Flags.seek_to_pts.value)
        reorders = bool(stream.codec_context.has_b_frames)
        self.seek_margin = _BFRAME_SEEK_MARGIN_S if reorders and not seeks_by_pts else 0.0
        self.timestamped = not flags & av.format.Flags.no_timestamps.value
        self.frames: Iterator[av.VideoFrame] | None = None  # None: not positioned by us yet
        self.demuxed_ts: int | None = None  # dts (else pts) of the last packet demuxed since the last seek
        self.previous: tuple[float, av.VideoFrame] | None = None  # last frame shown by the last target time
        self.pending: tuple[float, av.VideoFrame] | None = None  # decoded, shown after the last target time
        self.next_time: float | None = None  # running guess for frames without any timestamp
        self.eof = False
        self.skip_window = max(_NONREF_WINDOW_S, 4 * self.frame_step)
        self.skip_below: int | None = None  # packets shown before this pts may skip non-reference frames
        self.nonref_ts: int | None = None  # largest pts decoded that way since the last seek

    # positioning

    def _seek(self, t: float) -> None:
        """Seek to the keyframe at or before ``t`` (stream seconds) and restart decoding there."""
        target = math.floor((self.start + max(t, 0.0)) / self.tb)
        try:
            self.container.seek(target, stream=self.stream, backward=True)
        except av.error.FFmpegError as exc:
            raise DecodeError("seek_failed", f"cannot seek to {t:.3f} s: {exc}") from exc
        self._restart()

    def _restart(self) -> None:
        self.frames = self._decode()
        self.demuxed_ts = None
        self.nonref_ts = None
        self.previous = self.pending = None
        self.next_time = None
        self.eof = False

    def _keyframe_ahead(self, t: float) -> bool:
        """Whether the index has a keyframe past what was demuxed and at or before ``t``: seeking saves work.

        Matroska reads its index (cues) on the first seek, which every sampling run starts with. Streams
        without an index are decoded forward: never slower than seeking back to a keyframe already passed.
        """
        if self.demuxed_ts is None:
            return False
        entries = self.stream.index_entries
        i = entries.search_timestamp(math.floor((self.start + t - self.seek_margin) / self.tb), backward=True)
        return i >= 0 and entries[i].timestamp > self.demuxed_ts

    def _seek_before(self, t: float) -> None:
        """Seek so that decoding starts at or before ``t``, retrying further back where a seek overshoots."""
        back = self.seek_margin
        for _ in range(4):
            self._seek(t - back)
            first = self._next()
            if first is not None:
                self.pending = first
                if first[0] <= t + _TIME_EPS_S:
                    return
            if t - back <= 0:
                return
            back = 2 * back + 1.0

    # decoding

    def _decode(self) -> Iterator[av.VideoFrame]:
        codec = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            ts = packet.dts if packet.dts is not None else packet.pts
            if ts is not None:
                self.demuxed_ts = ts
            # frames shown well before the target are decoded only if later frames refer to them
            nonref = self.skip_below is not None and packet.pts is not None and packet.pts < self.skip_below
            codec.skip_frame = "NONREF" if nonref else "DEFAULT"
            if nonref:
                self.nonref_ts = packet.pts if self.nonref_ts is None else max(self.nonref_ts, packet.pts)
            yield from packet.decode()

    def _time(self, frame: av.VideoFrame) -> float:
        """Presentation time on the stream clock: pts, else dts, else the sum of frame durations."""
        ts = frame.pts if frame.pts is not None else frame.dts
        tb = frame.time_base or self.tb
        t = float(ts * tb) - self.start if ts is not None else self.next_time or 0.0
        self.next_time = t + (float(frame.duration * tb) if frame.duration else self.frame_step)
        return t

    def _next(self) -> tuple[float, av.VideoFrame] | None:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        if self.eof or self.frames is None:
            return None
        try:
            frame = next(self.frames)
        except StopIteration:
            self.eof = True
            return None
        except av.error.FFmpegError as exc:
            raise DecodeError("video_decode_failed", f"video stream could not be decoded: {exc}") from exc
        return self._time(frame), frame

    # the two modes

    def accurate(self, t: float) -> tuple[float, av.VideoFrame]:
        """The last frame with time <= ``t`` (the stream's first frame if ``t`` precedes it).

        Packets shown more than ``skip_window`` before ``t`` are decoded with ``skip_frame=NONREF``: frames
        that no other frame refers to (most B-frames) are not decoded at all. On the shared videos that saves
        11 % of the CPU time overall and 30 % on files with B-frames. Should a skipped frame have been the one
        shown at ``t`` (a gap between frames longer than the window), that stretch is decoded again in full.
        """
        if self.timestamped:
            self.skip_below = math.floor((self.start + t - self.skip_window) / self.tb)
        found = self._decode_to(t)
        if self.nonref_ts is not None and found[1].pts is not None and found[1].pts < self.nonref_ts:
            self.skip_below = None
            self.frames = None
            found = self._decode_to(t)
        return found

    def _decode_to(self, t: float) -> tuple[float, av.VideoFrame]:
        """Get to ``t`` (forward, or by a seek where that saves work) and return the frame shown then."""
        backwards = self.previous is not None and t + _TIME_EPS_S < self.previous[0]
        if not self.timestamped:
            # raw elementary streams cannot seek by time: decode forward from where the container stands
            if self.frames is None:
                self._restart()
            elif backwards:
                raise DecodeError("seek_failed", "an input without timestamps can only be read forward")
        elif self.frames is None or backwards or self._keyframe_ahead(t):
            self._seek_before(t)
        while (item := self._next()) is not None:
            if item[0] > t + _TIME_EPS_S:
                self.pending = item
                break
            self.previous = item
        found = self.previous if self.previous is not None else self.pending
        if found is None:
            raise DecodeError("video_truncated", f"no video frame could be decoded for t={t:.3f} s")
        if self.eof and found[0] + self.frame_step + _TRUNCATION_TOLERANCE_S < t:
            raise DecodeError("video_truncated", f"video stream ends at {found[0]:.3f} s, before t={t:.3f} s")
        return found

    def keyframe(self, t: float) -> tuple[float, av.VideoFrame]:
        """The keyframe a seek to ``t`` lands on; only that packet is decoded."""
        self._seek(t - self.seek_margin)
        try:
            for packet in self.container.demux(self.stream):
                if packet.size and not packet.is_keyframe:
                    continue
                # decode the keyframe alone and drain, so that the reordering delay costs no further packets
                frames = [*packet.decode(), *self.stream.codec_context.decode(None)]
                if frames:
                    return self._time(frames[0]), frames[0]
        except av.error.FFmpegError as exc:
            raise DecodeError("video_decode_failed", f"video stream could not be decoded: {exc}") from exc
        raise DecodeError("video_truncated", f"no keyframe could be decoded at or after t={t:.3f} s")


def sample_frames(
    container: av.container.InputContainer,
    times: list[float],
    seek: str = "accurate",
    short_side: int = SHORT_SIDE,
    interpolation: str = "BILINEAR",
    threads: int = 0,
) -> tuple[list[np.ndarray], list[float]]:
    """Decode the frames at ``times`` (seconds from the video stream's start) as RGB uint8 ``[H, W, 3]``.

    Returns the frames and their actual presentation times on the same clock. The shorter displayed side
    becomes ``short_side`` (aspect kept; small videos are scaled up). ``threads`` is the decoder's and
    scaler's thread count: 0 lets FFmpeg choose, 1 suits one worker process per core. Inputs without
    timestamps (raw elementary streams) cannot seek: they are read forward from where the container stands and
    sampled accurately. Other streams are discarded by the demuxer meanwhile.
    """
    if seek not in SEEK_MODES:
        raise ValueError(f"seek must be one of {SEEK_MODES}, not {seek!r}")
    if not container.streams.video:
        raise DecodeError("no_video", "no video stream")
    stream = container.streams.video[0]
    with decoding_only(container, stream, threads):
        cursor = _VideoCursor(container, stream)
        pick = cursor.accurate if seek == "accurate" or not cursor.timestamped else cursor.keyframe
        reformatter = VideoReformatter()
        frames: list[np.ndarray] = []
        actual: list[float] = []
        try:
            for t in times:
                time, frame = pick(t)
                frames.append(
                    frame_to_rgb(frame, short_side, stream.sample_aspect_ratio, interpolation, threads, reformatter)
                )
                actual.append(time)
        except av.error.FFmpegError as exc:
            raise DecodeError("video_decode_failed", f"video frame could not be converted: {exc}") from exc
        finally:
            stream.codec_context.skip_frame = "DEFAULT"
    return frames, actual
