"""Opening media with PyAV, and the one error type every decoding failure becomes.

A :class:`DecodeError` carries a short machine-readable ``reason`` (it lands in the failure ledger) and a message
a person can act on.
"""

from __future__ import annotations

import os
from pathlib import Path

import av

URL_TIMEOUT_S = 30.0


class DecodeError(Exception):
    """An input that cannot become a sample; ``reason`` is one of the ledger's failure reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def open_media(source: str | os.PathLike) -> av.container.InputContainer:
    """Open a local file or an http(s) URL for reading, tolerant of broken metadata encodings."""
    source = str(source)
    if not is_url(source):
        path = Path(source)
        if not path.exists():
            raise DecodeError("not_found", f"no such file: {source}")
        if path.is_dir():
            raise DecodeError("not_found", f"is a directory, not a media file: {source}")
        if path.stat().st_size == 0:
            raise DecodeError("empty", f"file is empty (0 bytes): {source}")
    try:
        return av.open(source, metadata_errors="replace", timeout=URL_TIMEOUT_S if is_url(source) else None)
    except av.error.HTTPError as exc:
        raise DecodeError("http_error", f"{source}: {exc}") from exc
    except av.error.InvalidDataError as exc:
        raise DecodeError("not_media", f"{source}: not a readable media file ({exc})") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError("open_failed", f"{source}: could not open ({type(exc).__name__}: {exc})") from exc
