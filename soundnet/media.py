"""Opening media with PyAV, and the one error type every decoding failure becomes.

A :class:`DecodeError` carries a short machine-readable ``reason`` (it lands in the failure ledger) and a
message a person can act on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av

URL_TIMEOUT_S = 30.0


class DecodeError(Exception):
    """An input that cannot become a sample; ``reason`` is one of the ledger's failure reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# leading bytes of common containers: a file that starts like one of these but does not open is damaged
# (typically an MP4 cut short before its index), not something other than media
_SIGNATURES = (
    (4, b"ftyp", "MP4/MOV"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"RIFF", "RIFF (AVI/WAV)"),
    (0, b"OggS", "Ogg"),
    (0, b"FLV", "FLV"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x30\x26\xb2\x75", "ASF/WMV"),
    (0, b"fLaC", "FLAC"),
    (0, b"ID3", "MP3"),
)


def container_signature(path: str | os.PathLike) -> str | None:
    """The container a local file's first bytes announce, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    return next((name for offset, magic, name in _SIGNATURES if head[offset : offset + len(magic)] == magic), None)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def open_media(source: str | os.PathLike) -> av.container.InputContainer:
    """Open a local file or an http(s) URL for reading, tolerant of broken metadata encodings."""
    source = str(source)
    if not is_url(source):
        path = Path(source)
        try:
            if not path.exists():
                raise DecodeError("not_found", f"no such file: {source}")
            if path.is_dir():
                raise DecodeError("not_found", f"is a directory, not a media file: {source}")
            if path.stat().st_size == 0:
                raise DecodeError("empty", f"file is empty (0 bytes): {source}")
        except OSError as exc:
            raise DecodeError("io_error", f"{source}: cannot read ({type(exc).__name__}: {exc})") from exc
    try:
        return av.open(source, metadata_errors="replace", timeout=URL_TIMEOUT_S if is_url(source) else None)
    except (av.error.HTTPError, av.error.HTTPClientError, av.error.HTTPServerError) as exc:
        raise DecodeError("http_error", f"{source}: {exc}") from exc
    except av.error.InvalidDataError as exc:
        kind = None if is_url(source) else container_signature(source)
        if kind is not None:
            raise DecodeError("damaged", f"{source}: starts as {kind} but cannot be read (truncated?): {exc}") from exc
        raise DecodeError("not_media", f"{source}: not a readable media file ({exc})") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError("open_failed", f"{source}: could not open ({type(exc).__name__}: {exc})") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("bad_metadata", f"{source}: undecodable metadata ({exc})") from exc


@contextmanager
def decode_errors(source: str | os.PathLike) -> Iterator[None]:
    """Turn whatever escapes while reading ``source`` into a :class:`DecodeError`, so a worker can ledger it.

    The decoding code raises precise reasons itself; this names what is left by its kind: ``bad_data`` (FFmpeg
    found the bytes invalid), ``ffmpeg_error``, ``io_error``, ``bad_metadata`` (text that is not UTF-8),
    ``out_of_memory`` and, for anything else, ``unexpected_error`` with the exception type in the message.
    """
    try:
        yield
    except DecodeError:
        raise
    except av.error.InvalidDataError as exc:
        raise DecodeError("bad_data", f"{source}: invalid data ({exc})") from exc
    except av.error.FFmpegError as exc:
        raise DecodeError("ffmpeg_error", f"{source}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise DecodeError("io_error", f"{source}: {type(exc).__name__}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("bad_metadata", f"{source}: undecodable text ({exc})") from exc
    except MemoryError as exc:
        raise DecodeError("out_of_memory", f"{source}: out of memory while decoding") from exc
    except Exception as exc:
        raise DecodeError("unexpected_error", f"{source}: {type(exc).__name__}: {exc}") from exc


@contextmanager
def decoding_only(container: av.container.InputContainer, stream: av.stream.Stream, threads: int) -> Iterator[None]:
    """Decode ``stream`` alone: its decoder gets ``threads`` (0: FFmpeg chooses, 1: one worker per core) and the
    demuxer discards every other stream meanwhile, which saves reading packets that would be dropped."""
    codec = stream.codec_context
    if not codec.is_open:
        codec.thread_type = "AUTO"
        codec.thread_count = threads
    others = [s for s in container.streams if s is not stream]
    saved = [s.discard for s in others]
    for s in others:
        s.discard = av.stream.Discard.all
    try:
        yield
    finally:
        for s, discard in zip(others, saved, strict=True):
            s.discard = discard
