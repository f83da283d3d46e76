"""What a decoding worker runs: one input becomes a decoded clip or the failure row that replaces it.

This is the only module of the project a decoding worker process imports (with PyAV and numpy): it must not pull
in the shard writer, webdataset or torch, which would cost each worker seconds and hundreds of MB to start.
A worker also exits on its own once the process that started it is gone, so a killed ``ingest`` leaves nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from soundnet.ingest.config import IngestConfig
from soundnet.ingest.decode import DecodedClip, decode_clip
from soundnet.ingest.inputs import VideoInput
from soundnet.media import DecodeError

# which part of the work a decoding failure belongs to (the ledger's `stage` column)
_OPEN_REASONS = {
    "not_found", "empty", "io_error", "http_error", "timeout", "connection_failed", "too_large", "access_denied",
    "not_media", "damaged", "open_failed", "bad_metadata",
}  # fmt: skip
_AUDIO_REASONS = {"no_audio", "silent", "audio_decode_failed", "no_audio_samples"}
_VIDEO_REASONS = {"no_video", "too_short", "video_decode_failed", "video_truncated", "seek_failed"}
PARENT_POLL_S = 0.5


def decode_stage(reason: str) -> str:
    if reason in _OPEN_REASONS:
        return "open"
    if reason in _AUDIO_REASONS:
        return "audio"
    if reason in _VIDEO_REASONS:
        return "video"
    return "decode"


def failure_row(source: str, stage: str, reason: str, message: str, error_class: str) -> dict[str, str]:
    return {"source": source, "stage": stage, "reason": reason, "message": message, "error_class": error_class}


@dataclass
class Decoded:
    """What the CPU stage returns for one input: a clip, or the failure row that replaces it (picklable)."""

    item: VideoInput
    clip: DecodedClip | None = None
    failure: dict[str, str] | None = None
    seconds: float = 0.0  # spent decoding it, in the worker


def frame_count(batch: Sequence[Decoded]) -> int:
    """Frames a batch of decoded inputs brings to the teachers: engines label once it reaches ``--batch-frames``."""
    return sum(len(d.clip.frames) for d in batch if d.clip is not None)


def decode_input(item: VideoInput, config: IngestConfig) -> Decoded:
    """Decode one input; any failure, expected or not, becomes a ledger row instead of an exception."""
    start = time.perf_counter()
    decoded = _decode(item, config)
    decoded.seconds = time.perf_counter() - start
    return decoded


def _decode(item: VideoInput, config: IngestConfig) -> Decoded:
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
            url=config.url,
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


def serve(conn: Connection, parent: int) -> None:
    """A decoding worker process: call each ``(fn, arg)`` it is sent and send the result back, until it is sent
    None or its pipe closes. Each worker has a pipe of its own, so the engine knows which input a worker that dies
    was decoding, and sees the pipe close even when the worker dies halfway through sending a result. Ctrl-C is the
    engine's to handle (it stops its workers), not each worker's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(parent)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, arg = job
        conn.send(fn(arg))


def init_worker(parent: int) -> None:
    """Initializer of a decoding worker: one core each (the engine's parallelism is the number of workers), and
    exit as soon as ``parent`` (the pid of the process that made the pool) is gone, SIGKILL of ``ingest``
    included, which no handler in the parent sees. The pid is passed in: a worker started just as its parent died
    would already see its new parent in ``os.getppid()``."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
