"""Opening media with PyAV, and the one error type every decoding failure becomes.

A :class:`DecodeError` carries a short machine-readable ``reason`` (it lands in the failure ledger) and a
message a person can act on.

http(s) sources are streamed by FFmpeg when the server answers byte ranges (only the first seconds of a video are
read, and FFmpeg seeks, e.g. to an MP4's trailing index). Before FFmpeg opens a URL, one ranged GET for its first
byte learns what FFmpeg's errors hide: the exact HTTP status, a ``Retry-After``, and whether ranges are served. A
server that sends the whole file instead (a plain ``http.server``, many dynamic endpoints) cannot be streamed with
seeks: that answer is saved to an anonymous temporary file (no name, so nothing is left even when the process is
killed), at most :attr:`UrlPolicy.max_download_mb`, and decoded from there.

Other URLs that fsspec knows (``s3://``, ``gs://`` with its package installed, ...) are read through fsspec's file
objects, which seek with ranged reads; credentials and endpoint come from the filesystem's standard places (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles).

Transient failures (connection errors, timeouts, 429, 5xx, an answer cut short) are retried with exponential
backoff per :class:`~soundnet.retry.UrlPolicy` (the rules of :mod:`soundnet.retry`); what still fails becomes a
ledger row: ``http_error`` with the status, ``timeout`` naming the seconds, ``connection_failed``, ``too_large``,
``not_found`` for a missing object, or ``io_error`` when this machine cannot keep a download (not retried).
"""

from __future__ import annotations

import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TypeVar

import av

from soundnet.retry import (  # noqa: F401 (MAX_DOWNLOAD_MB, URL_RETRIES, URL_TIMEOUT_S: ingest's option defaults)
    MAX_DOWNLOAD_MB,
    URL_RETRIES,
    URL_TIMEOUT_S,
    USER_AGENT,
    UrlFailure,
    UrlPolicy,
    url_failure,
    with_retries,
)

REMOTE_BLOCK_BYTES = 4 * 2**20  # one ranged read of an fsspec file: a video's first seconds in one or two
DOWNLOAD_CHUNK_BYTES = 2**20

URL_POLICY = UrlPolicy()
"""What :func:`open_media` uses unless told otherwise."""


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


def signature_of(head: bytes) -> str | None:
    """The container that a file starting with ``head`` (its first 16 bytes suffice) announces, or None."""
    return next((name for offset, magic, name in _SIGNATURES if head[offset : offset + len(magic)] == magic), None)


def container_signature(path: str | os.PathLike) -> str | None:
    """The container a local file's first bytes announce, or None."""
    try:
        with open(path, "rb") as f:
            return signature_of(f.read(16))
    except OSError:
        return None


_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_protocol(source: str) -> str | None:
    """The protocol of a URL (``http``, ``s3``, ...), or None for a path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def is_url(source: str) -> bool:
    """An http(s) URL: fetched by this module (streamed or downloaded), not by fsspec."""
    return url_protocol(source) in ("http", "https")


def is_remote(source: str) -> bool:
    """Any URL: http(s), or one that fsspec opens (``s3://``, ``gs://``, ...)."""
    return url_protocol(source) is not None


def _probe(url: str, policy: UrlPolicy, files: ExitStack) -> IO[bytes] | None:
    """GET the first byte of ``url`` (redirects followed). None when the server answers the range, so FFmpeg can
    stream the file and seek in it; from a server that answers with the whole file instead, that file, downloaded
    to an anonymous temporary file (closed with ``files``)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            return None if response.status == 206 else _download(response, policy, files)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # no byte 0 to give
            exc.close()
            raise UrlFailure("empty", f"the server has no bytes (HTTP 416 {exc.reason})", False) from exc
        raise url_failure(exc, policy) from exc
    except (http.client.HTTPException, OSError) as exc:  # no connection, a reset, a malformed answer, a stall
        raise url_failure(exc, policy) from exc


def _download(response: http.client.HTTPResponse, policy: UrlPolicy, files: ExitStack) -> IO[bytes]:
    """The body of ``response`` in a temporary file without a name (removed when ``files`` closes it or when the
    process ends, however it ends), refused beyond ``policy.max_download_mb``."""
    limit = policy.max_download_mb * 2**20
    too_large = UrlFailure(
        "too_large",
        "the server does not support range requests and the file is larger than "
        f"--max-download-mb {policy.max_download_mb:g}",
        False,
    )
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() else None
    if expected is not None and expected > limit:
        raise too_large
    try:
        file = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (files closes it)
    except OSError as exc:
        raise _not_kept(exc) from exc
    while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
        if file.tell() + len(chunk) > limit:  # no Content-Length, or one that lied: counted as it comes
            raise too_large
        try:
            file.write(chunk)
        except OSError as exc:
            raise _not_kept(exc) from exc
    if expected is not None and file.tell() < expected:
        raise UrlFailure("connection_failed", f"the answer broke off after {file.tell()} of {expected} bytes", True)
    file.seek(0)
    return file


def _not_kept(exc: OSError) -> UrlFailure:
    """A download this machine cannot keep (no space, no temporary folder): its own failure, not the server's, and
    not worth fetching again."""
    where = tempfile.gettempdir()
    return UrlFailure(
        "io_error", f"cannot keep the download in {where} ({exc.strerror or exc}): free space or set TMPDIR", False
    )


def _ffmpeg_open(url: str, policy: UrlPolicy) -> av.container.InputContainer:
    """Open ``url`` with FFmpeg; it reconnects by itself when a stream breaks off before its end."""
    options = {"reconnect": "1", "reconnect_max_retries": str(policy.retries)}
    try:
        return av.open(url, metadata_errors="replace", timeout=policy.timeout_s, options=options)
    except av.error.HTTPServerError as exc:
        raise UrlFailure("http_error", f"{exc} (FFmpeg)", True) from exc
    except (av.error.HTTPError, av.error.HTTPClientError) as exc:
        raise UrlFailure("http_error", f"{exc} (FFmpeg)", False) from exc
    except av.error.ExitError as exc:  # PyAV's timeout interrupts FFmpeg, which calls it an exit request
        raise UrlFailure("timeout", f"no data within {policy.timeout_s:g} s", True) from exc
    except (ConnectionError, TimeoutError) as exc:
        raise UrlFailure("connection_failed", f"connection failed ({exc})", True) from exc


def _open_http(url: str, policy: UrlPolicy, files: ExitStack) -> av.container.InputContainer:
    """One try at an http(s) URL: streamed by FFmpeg, or decoded from its download (closed with ``files``)."""
    download = _probe(url, policy, files)
    if download is None:
        return _ffmpeg_open(url, policy)
    return av.open(download, metadata_errors="replace")


def _open_fsspec(url: str, files: ExitStack) -> av.container.InputContainer:
    """One try at a URL fsspec opens: PyAV reads its file object, which serves each read as a ranged request."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        file = fs.open(path, "rb", block_size=REMOTE_BLOCK_BYTES)
    except (ImportError, ValueError) as exc:  # fsspec: "Install s3fs to access S3", "Protocol not known"
        raise UrlFailure("open_failed", f"{exc} (pip install 'soundnet-distill[s3]' for s3://)", False) from exc
    except FileNotFoundError as exc:
        raise UrlFailure("not_found", f"no such object ({exc})", False) from exc
    except PermissionError as exc:
        raise UrlFailure("access_denied", f"access denied ({exc}): check the credentials", False) from exc
    except TimeoutError as exc:
        raise UrlFailure("timeout", f"no answer ({exc})", True) from exc
    except OSError as exc:
        raise UrlFailure("connection_failed", f"cannot read ({type(exc).__name__}: {exc})", True) from exc
    files.enter_context(file)
    if file.size == 0:
        raise UrlFailure("empty", "the object is empty (0 bytes)", False)
    return av.open(file, metadata_errors="replace")


T = TypeVar("T")


def _with_retries(url: str, policy: UrlPolicy, attempt: Callable[[ExitStack], T], files: ExitStack) -> T:
    """``attempt(its_files)``, tried again after each transient failure while ``policy`` allows, then a
    DecodeError. What a failed try opened is closed at once; a successful one's files join ``files``."""

    def one_try() -> T:
        with ExitStack() as its_files:
            result = attempt(its_files)
            files.push(its_files.pop_all())
            return result

    try:
        return with_retries(policy, one_try)
    except UrlFailure as failed:
        raise DecodeError(failed.reason, f"{url}: {failed.what} after {failed.tried()}") from failed.__cause__


def _check_file(source: str) -> None:
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


def _open(source: str, policy: UrlPolicy, files: ExitStack) -> av.container.InputContainer:
    try:
        if is_url(source):
            return _with_retries(source, policy, lambda its_files: _open_http(source, policy, its_files), files)
        if is_remote(source):
            return _with_retries(source, policy, lambda its_files: _open_fsspec(source, its_files), files)
        _check_file(source)
        return av.open(source, metadata_errors="replace")
    except av.error.InvalidDataError as exc:
        kind = None if is_remote(source) else container_signature(source)
        if kind is not None:
            raise DecodeError("damaged", f"{source}: starts as {kind} but cannot be read (truncated?): {exc}") from exc
        raise DecodeError("not_media", f"{source}: not a readable media file ({exc})") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError("open_failed", f"{source}: could not open ({type(exc).__name__}: {exc})") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("bad_metadata", f"{source}: undecodable metadata ({exc})") from exc


@contextmanager
def open_media(source: str | os.PathLike, url: UrlPolicy | None = None) -> Iterator[av.container.InputContainer]:
    """A local file or a URL (http(s), fetched per ``url``, default :data:`URL_POLICY`; or any URL fsspec opens),
    open for reading and tolerant of broken metadata encodings; what it was read from (a download, a remote file)
    is closed with it."""
    with ExitStack() as files, _open(str(source), url or URL_POLICY, files) as container:
        yield container


@contextmanager
def decode_errors(source: str | os.PathLike) -> Iterator[None]:
    """Turn whatever escapes while reading ``source`` into a :class:`DecodeError`, so a worker can ledger it.

    The decoding code raises precise reasons itself; this names what is left by its kind: ``bad_data`` (FFmpeg
    found the bytes invalid), ``ffmpeg_error``, ``io_error``, ``bad_metadata`` (text that is not UTF-8),
    ``timeout`` (a URL that stopped sending), ``out_of_memory`` and, for anything else, ``unexpected_error`` with
    the exception type in the message.
    """
    try:
        yield
    except DecodeError:
        raise
    except av.error.InvalidDataError as exc:
        raise DecodeError("bad_data", f"{source}: invalid data ({exc})") from exc
    except av.error.ExitError as exc:  # only URLs have a timeout: the server stopped sending mid-stream
        raise DecodeError("timeout", f"{source}: the server stopped sending data (read timed out: {exc})") from exc
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
