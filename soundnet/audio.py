"""Audio decoding with PyAV, for every stage that reads sound (ingest's videos, the evaluator's and the feature
API's audio files): downmix to mono, resample to 22050 Hz (``av.AudioResampler``, libswresample).

libswresample with its default settings is what the ``ffmpeg`` command line uses for ``-ac 1 -ar 22050``, so
the samples equal that command's output (bit for bit on the shared test videos).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from soundnet.media import DecodeError, decode_errors, decoding_only, open_media
from soundnet.shards.contract import AUDIO_SCALE, SAMPLE_RATE


@dataclass
class DecodedAudio:
    samples: np.ndarray  # int16 [T], mono, SAMPLE_RATE
    source_rate: int
    source_channels: int
    codec: str
    start_s: float  # time of the first decoded sample on the container's clock

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def as_float(self) -> np.ndarray:
        """Samples in [-1, 1) as float32 (int16 / AUDIO_SCALE, the shard convention)."""
        return self.samples.astype(np.float32) / AUDIO_SCALE


class AudioStream:
    """The first audio stream of ``container``, decoded to mono int16 at ``rate`` and handed out block by block as
    it decodes: :func:`decode_audio` joins the blocks, ``student embed`` embeds a long file without holding it.

    Iterating raises :class:`DecodeError` for a stream that holds no samples, and for stored float samples (WAV/CAF
    ``pcm_f*``) that are NaN or infinite (libswresample would turn them into full-scale DC that looks like sound). A
    damaged tail ends the blocks early: a truncated download still has a usable start. ``start_s`` (time of the first
    decoded sample on the container's clock) and ``channels`` are known once the first block is out.
    """

    def __init__(self, container: av.container.InputContainer, rate: int = SAMPLE_RATE, threads: int = 0) -> None:
        if not container.streams.audio:
            raise DecodeError("no_audio", "no audio stream")
        self.container, self.rate, self.threads = container, rate, threads
        self.stream = container.streams.audio[0]
        codec = self.stream.codec_context
        self.codec = codec.name
        self.source_rate = codec.sample_rate or self.stream.rate or 0
        self.channels = codec.channels or 0
        self.start_s: float | None = None
        self.samples = 0  # handed out so far
        self._float_pcm = codec.name.startswith("pcm_f")  # stored floats can be NaN or infinite; decoded ones are not

    def __iter__(self) -> Iterator[np.ndarray]:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=self.rate)
        with decoding_only(self.container, self.stream, self.threads):
            try:
                for frame in self.container.decode(self.stream):
                    if self.start_s is None:
                        self.start_s = float(frame.time) if frame.time is not None else 0.0
                        self.channels = len(frame.layout.channels)
                    if self._float_pcm and not np.isfinite(frame.to_ndarray()).all():
                        at = f" at {float(frame.time):.2f} s" if frame.time is not None else ""
                        raise DecodeError("audio_decode_failed", f"float samples are NaN or infinite{at}")
                    yield from self._blocks(resampler.resample(frame))
                yield from self._blocks(resampler.resample(None))
            except av.error.FFmpegError as exc:
                if not self.samples:
                    raise DecodeError("audio_decode_failed", f"audio stream could not be decoded: {exc}") from exc
        if not self.samples:
            raise DecodeError("no_audio_samples", "audio stream holds no decodable samples")

    def _blocks(self, frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
        for frame in frames:
            block = frame.to_ndarray().reshape(-1)
            self.samples += len(block)
            yield block


def decode_audio(
    container: av.container.InputContainer,
    max_seconds: float | None = None,
    origin_s: float | None = None,
    rate: int = SAMPLE_RATE,
    threads: int = 0,
) -> DecodedAudio:
    """Decode the first audio stream of ``container`` to mono int16 at ``rate`` (:class:`AudioStream`, joined).

    ``max_seconds`` keeps only the start of the stream (decoding stops soon after it). ``origin_s`` puts the
    audio on a given clock (the video's start): audio that starts later than that is preceded by silence, and
    audio that starts earlier loses its lead, so that sample ``i`` is heard at time ``origin_s + i / rate``
    like the frames it is paired with. ``threads`` is the decoder's thread count (0: FFmpeg chooses; 1 for one
    worker process per core). Other streams are discarded by the demuxer meanwhile, which saves reading video
    packets that would be dropped.
    """
    audio = AudioStream(container, rate, threads)
    limit = None if max_seconds is None else int(round(max_seconds * rate))
    chunks: list[np.ndarray] = []
    shift = 0  # samples of silence to put before the audio (> 0) or samples to drop from its start (< 0)
    with contextlib.closing(iter(audio)) as blocks:  # closed at once: the caller may go on to read the video
        for chunk in blocks:
            if not chunks and origin_s is not None:
                shift = int(round((audio.start_s - origin_s) * rate))
            chunks.append(chunk)
            if limit is not None and audio.samples + shift >= limit:
                break
    samples = np.concatenate(chunks).astype(np.int16, copy=False)
    if shift > 0:
        samples = np.concatenate([np.zeros(shift, np.int16), samples])
    elif shift < 0:
        samples = samples[-shift:]
    if limit is not None:
        samples = samples[:limit]
    return DecodedAudio(
        samples=samples,
        source_rate=audio.source_rate,
        source_channels=audio.channels,
        codec=audio.codec,
        start_s=audio.start_s or 0.0,
    )


def read_audio(path: str | os.PathLike, max_seconds: float | None = None) -> DecodedAudio:
    """Open ``path`` and decode its audio (any container, codec, rate and channel count).

    Every failure is a :class:`DecodeError`.
    """
    with decode_errors(path), open_media(path) as container:
        return decode_audio(container, max_seconds=max_seconds)


def resample(waveform: np.ndarray, rate: int, to_rate: int = SAMPLE_RATE, block: int = 1 << 16) -> np.ndarray:
    """Resample mono float32 ``waveform`` from ``rate`` to ``to_rate`` with libswresample, as files are decoded.

    The input is fed in blocks of ``block`` samples, so memory beyond the input and output stays small.
    """
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    chunks: list[np.ndarray] = []
    for start in range(0, len(waveform), block):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(waveform[None, start : start + block], dtype=np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = rate
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
