"""Shards where users keep them: any filesystem fsspec knows (``http(s)://``, ``s3://``, ``gs://`` with gcsfs, ...),
read by byte range with retries and exponential backoff.

No filesystem object is ever stored or pickled here: each call asks fsspec for the filesystem of its URL, and
fsspec keeps one instance per process (a forked child drops its parent's instances and event loop), so every
DataLoader worker opens its own connections. Credentials and endpoints come only from where each filesystem's
library looks (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws``), never from options, and never appear in messages.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import fsspec
from fsspec.spec import AbstractFileSystem

from soundnet.retry import UrlFailure, UrlPolicy, with_retries

POLICY = UrlPolicy(retries=5, backoff_s=0.5)
"""Reads that fail in transit (connection lost, timeout, HTTP 408, 429 or 5xx) are tried 5 more times, after waits
of about 0.5, 1, 2, 4 and 8 s (jittered): the retry loop of the project's other http(s) fetches, with more tries,
since a training run that stops on one busy moment of its store loses more than a video input does."""

IN_FLIGHT = 4
"""Ranged requests one process keeps in flight (:func:`read_ranges`): a loader worker's batch is read 4 at a time
(on this project's loopback measurements more made every request slower; object storage with more latency per
request gains from more loader workers)."""

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSPORT_LIBRARIES = frozenset({"aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "gcsfs", "google"})
T = TypeVar("T")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file through fsspec (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and _URL_RE.match(path) is not None


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """This process's fsspec filesystem for ``url`` and the path on it; ValueError says which package is missing."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exn:
        scheme = url.split("://", 1)[0]
        extras = {"s3": "s3", "s3a": "s3", "http": "http", "https": "http"}
        extra = f" (pip install 'soundnet-distill[{extras[scheme]}]')" if scheme in extras else ""
        raise ValueError(f"cannot read {scheme}:// URLs here: {exn}{extra}") from None


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local path or a URL."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else os.path.join(folder, name)


def parent(path: str) -> str:
    """The folder holding ``path`` (a local path or a URL)."""
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path) or "."


def name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def retrying(url: str, what: str, call: Callable[[AbstractFileSystem, str], T]) -> T:
    """``call(fs, path)`` for ``url``, retried with exponential backoff while it fails in transit.

    A missing file or a refused permission is not retried. What still fails is an OSError naming the URL, what was
    being read and the number of tries (FileNotFoundError and PermissionError keep their type).
    """

    def attempt() -> T:
        try:
            fs, path = filesystem(url)
            return call(fs, path)
        except Exception as exn:
            cause = exn.__cause__ if isinstance(exn, _NOT_TRANSIENT) else exn  # fsspec's HTTP info: 503 -> not found
            if not _transient(cause):
                if isinstance(exn, _NOT_TRANSIENT):
                    reason = "not found" if isinstance(exn, FileNotFoundError) else _reason(exn)
                    raise type(exn)(f"{url}: {what}: {reason}") from None
                raise
            raise UrlFailure("transient", _reason(cause), transient=True) from None

    try:
        return with_retries(POLICY, attempt)
    except UrlFailure as failed:
        raise OSError(f"{url}: {what} failed after {failed.tried()} ({failed.what})") from None


def _transient(exn: BaseException | None) -> bool:
    """Errors of the transport (connections, timeouts, the network libraries' own) and HTTP 408, 429, 5xx."""
    if exn is None or isinstance(exn, _NOT_TRANSIENT):
        return False
    status = getattr(exn, "status", None)
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    return isinstance(exn, (OSError, TimeoutError)) or type(exn).__module__.split(".")[0] in _TRANSPORT_LIBRARIES


def _reason(exn: BaseException) -> str:
    text = str(exn).strip() or type(exn).__name__
    return text if len(text) < 300 else text[:300] + "..."


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a local file or a URL (one ranged request, retried while it fails in transit).

    Fewer bytes than asked means the file is shorter than its index says; more means a server that ignored the
    range and sent the whole file, which is refused by name.
    """
    if not is_url(url):
        with open(url, "rb") as stream:
            stream.seek(start)
            return stream.read(end - start)
    data = retrying(url, f"bytes {start}-{end}", lambda fs, path: fs.cat_file(path, start=start, end=end))
    if len(data) > end - start:
        raise OSError(
            f"{url}: the server answered a request for bytes {start}-{end} with {len(data)} bytes: it ignores "
            "byte ranges. Serve the shards from a server that answers Range requests (any static web server, "
            "S3, a CDN)"
        )
    return data


def read_ranges(ranges: Sequence[tuple[str, int, int]]) -> list[bytes | OSError]:
    """Many ``(url, start, end)`` ranges: those at URLs are requested ``IN_FLIGHT`` at a time (fsspec's
    ``cat_ranges``, concurrent on HTTP and S3), and one that fails is tried again on its own as :func:`read_range`
    does. A range that still fails is its OSError, in its place."""
    results: list[bytes | OSError | None] = [None] * len(ranges)
    by_fs: dict[int, tuple[AbstractFileSystem, list[int], list[str]]] = {}
    for i, (url, _, _) in enumerate(ranges):
        if is_url(url):
            fs, path = filesystem(url)
            _, members, paths = by_fs.setdefault(id(fs), (fs, [], []))
            members.append(i)
            paths.append(path)
    for fs, members, paths in by_fs.values():
        try:
            starts, ends = [ranges[i][1] for i in members], [ranges[i][2] for i in members]
            found = fs.cat_ranges(paths, starts, ends, batch_size=IN_FLIGHT)
        except Exception:  # noqa: BLE001 (each range is tried again on its own below)
            found = [None] * len(members)
        for i, data in zip(members, found):
            url, start, end = ranges[i]
            results[i] = data if isinstance(data, bytes) and len(data) == end - start else None
    for i, (url, start, end) in enumerate(ranges):
        if results[i] is None:
            try:
                results[i] = read_range(url, start, end)
            except OSError as exn:
                results[i] = exn
    return results  # type: ignore[return-value]


def size(url: str) -> int:
    """The size of a local file or a URL in bytes."""
    if not is_url(url):
        return os.path.getsize(url)
    return int(retrying(url, "size", lambda fs, path: fs.size(path)))


def exists(url: str) -> bool:
    """Whether a local path or URL exists (for a URL: one HEAD request, or its storage's equivalent)."""
    if not is_url(url):
        return os.path.exists(url)
    try:
        retrying(url, "info", lambda fs, path: fs.info(path))
    except FileNotFoundError:
        return False
    return True


def listing(folder: str, pattern: str) -> list[str] | None:
    """URLs of the files matching ``pattern`` in a remote ``folder``, sorted; None where the storage cannot list
    (plain HTTP servers)."""
    fs, _ = filesystem(folder)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"http", "https"}:
        return None
    return glob(join(folder, pattern))


def glob(pattern: str) -> list[str]:
    """URLs matching a remote glob ``pattern`` (storage that lists: S3, GCS, ...), sorted."""
    fs, path = filesystem(pattern)
    found = retrying(pattern, "glob", lambda fs, path: fs.glob(path))
    return sorted(fs.unstrip_protocol(p) for p in found)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over :func:`read_range`: every read is one ranged request, with retries.

    Wrap it in ``io.BufferedReader(RangeFile(url), buffer_size)`` to read in blocks: small ones to walk tar
    headers, large ones to stream a whole shard.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.size = size(url)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        data = read_range(self.url, self.position, end)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_binary(url: str, buffer_size: int = 1 << 16) -> io.BufferedReader:
    """A local file or a URL opened for reading; a URL reads ``buffer_size`` bytes per ranged request."""
    if not is_url(url):
        return open(url, "rb")  # noqa: SIM115 (the caller closes it)
    return io.BufferedReader(RangeFile(url), buffer_size=buffer_size)
