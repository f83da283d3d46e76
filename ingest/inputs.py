"""The video list: one video file, a folder, a text file of paths, or a CSV/Parquet table with a ``path`` column
(optional ``id``), on this machine, at an http(s) URL (fetched with the retries of URL inputs, at most
:data:`MAX_LIST_MB`) or at a URL fsspec opens (``s3://bucket/list.parquet``, a folder ``s3://bucket/videos/``); the
videos listed are paths, http(s) URLs or such URLs.

Every listed input keeps its ``source`` string exactly as written (that is what the ledgers record), gets a stable
shard key derived from that string (or its ``id``), and a list position that fixes which shard task it belongs to.
A file listed again under another spelling (``/a/../a/x.mp4``, a symlink) is found by its resolved path and becomes
a ``duplicate`` failure under the spelling it came as, so the same video never becomes two samples.
"""

from __future__ import annotations

import codecs
import csv
import http.client
import io
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from soundnet.media import is_remote, is_url, signature_of, url_protocol
from soundnet.retry import USER_AGENT, UrlFailure, UrlPolicy, url_failure, with_retries
from soundnet.shards.schema import make_key

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".3gp", ".ogv", ".vob", ".mxf",
)  # fmt: skip
_HELP = "give a video file, a folder of videos, a UTF-8 text list (one path or URL per line), or a CSV/Parquet list"
_INSTALL = "pip install 'soundnet-distill[s3]' for s3:// (gcsfs for gs://, adlfs for az://)"
MAX_LIST_MB = 1024
"""The largest list read from an http(s) URL (it is held in memory): two million URLs are about 200 MB."""


@dataclass(frozen=True)
class VideoInput:
    source: str  # as listed: a path (relative paths resolve from the working directory) or a URL
    key: str | None  # None: a second listing of a video already listed (recorded as a 'duplicate' failure)


class InputListError(Exception):
    """A --videos argument that cannot be read as a list of videos."""


def _from_folder(folder: Path) -> list[tuple[str, str | None]]:
    """Video files under ``folder``; a name that is not UTF-8 cannot be recorded in a ledger: named and left out."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    entries = []
    for path in files:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            log.warning("%s: file name is not UTF-8, left out (rename it to UTF-8 to ingest it)", shown)
            continue
        entries.append((str(path), None))
    return entries


def _from_table(rows: list[dict], where: str) -> list[tuple[str, str | None]]:
    if rows and "path" not in rows[0]:
        raise InputListError(f"{where}: needs a 'path' column (has {sorted(rows[0])})")
    out = []
    for i, row in enumerate(rows):
        path = row.get("path")
        if path is None or not str(path).strip():
            raise InputListError(f"{where}: row {i + 1} has an empty path")
        video_id = row.get("id")
        out.append((str(path), None if video_id in (None, "") else str(video_id)))
    return out


def _read_utf8(data: bytes, spec: str) -> str:
    """The text of a list file (a UTF-8 byte order mark dropped), or an error naming the file and the line that is
    not UTF-8 text."""
    data = data.removeprefix(codecs.BOM_UTF8)
    if b"\0" in data:
        kind = signature_of(data[:16])
        if kind:
            raise InputListError(
                f"--videos {spec}: is a {kind} file without a video extension; rename it (e.g. to .mp4) "
                "to ingest it alone, or list it in a text file"
            )
        raise InputListError(f"--videos {spec}: is binary data, not a list of videos; {_HELP}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputListError(
            f"--videos {spec}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x}); save the list as UTF-8"
        ) from exc


def _read_parquet(data: bytes, spec: str) -> list[dict]:
    try:
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InputListError(f"--videos {spec}: not a readable Parquet file ({exc})") from exc


def _listed_path(line: str) -> str:
    """The source a text line names: stripped of surrounding blanks, unless only the unstripped name exists."""
    stripped = line.strip()
    if stripped != line and not is_remote(stripped) and not os.path.lexists(stripped) and os.path.lexists(line):
        return line
    return stripped


def _from_text(text: str) -> list[tuple[str, str | None]]:
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [(_listed_path(line), None) for line in lines if line.strip() and not line.strip().startswith("#")]


def _suffix(spec: str) -> str:
    """The extension of a path, or of a URL's path (``.mp4`` of ``https://host/a.mp4?sig=...``), lower case."""
    return Path(urlsplit(spec).path if is_remote(spec) else spec).suffix.lower()


def _from_list_file(data: bytes, spec: str) -> list[tuple[str, str | None]]:
    """The entries of a list file's bytes; its name's extension says the format (CSV, Parquet, else text)."""
    suffix = _suffix(spec)
    if suffix == ".csv":
        return _from_table(list(csv.DictReader(io.StringIO(_read_utf8(data, spec), newline=""))), spec)
    if suffix in (".parquet", ".pq"):
        return _from_table(_read_parquet(data, spec), spec)
    return _from_text(_read_utf8(data, spec))


def _local_entries(path: Path) -> list[tuple[str, str | None]]:
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise InputListError(f"--videos {path}: no such file or folder")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return [(str(path), None)]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputListError(f"--videos {path}: cannot read it ({exc.strerror or exc})") from exc
    return _from_list_file(data, str(path))


def _require(protocol: str, what: str) -> None:
    """Refuse ``protocol`` URLs that fsspec cannot read here (unknown, or its package not installed); ``what``
    begins the message."""
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:  # "Install s3fs to access S3", "Protocol not known: ..."
        raise InputListError(f"--videos {what} {protocol}:// URLs cannot be read here ({exc}); {_INSTALL}") from None


def _http_list(url: str, policy: UrlPolicy) -> bytes:
    """The bytes of a list file at an http(s) URL, tried again after transient failures as URL inputs are, and
    refused beyond :data:`MAX_LIST_MB`."""
    limit = MAX_LIST_MB * 2**20
    too_large = UrlFailure(
        "too_large", f"the list is over {MAX_LIST_MB:g} MB, the most read from a URL: copy it here, or split it", False
    )

    def one_try() -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        chunks, size = [], 0
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > limit:
                    raise too_large
                while chunk := response.read(1 << 20):
                    size += len(chunk)
                    if size > limit:  # no Content-Length, or one that lied
                        raise too_large
                    chunks.append(chunk)
        except (http.client.HTTPException, OSError) as exc:
            raise url_failure(exc, policy) from exc
        if length.isdigit() and size < int(length):
            raise UrlFailure("connection_failed", f"the answer broke off after {size} of {length} bytes", True)
        return b"".join(chunks)

    try:
        return with_retries(policy, one_try)
    except UrlFailure as failed:
        tries = f" after {failed.tried()}" if failed.tries > 1 else ""
        raise InputListError(f"--videos {url}: {failed.what}{tries}") from None


def _remote_entries(url: str, policy: UrlPolicy) -> list[tuple[str, str | None]]:
    """The entries of a list file, a folder (every video under the prefix) or one video at ``url``: fetched per
    ``policy`` from an http(s) server, else read with fsspec, whose credentials come from the filesystem's standard
    places (for S3: the AWS variables and profiles)."""
    if _suffix(url) in VIDEO_EXTENSIONS:
        return [(url, None)]  # one video: read when it is decoded
    if is_url(url):
        return _from_list_file(_http_list(url, policy), url)
    _require(url_protocol(url), f"{url}:")
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            found = (p for p in fs.find(path) if Path(p).suffix.lower() in VIDEO_EXTENSIONS)
            return [(fs.unstrip_protocol(p), None) for p in sorted(found)]
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise InputListError(f"--videos {url}: no such file or folder") from None
    except PermissionError as exc:
        raise InputListError(f"--videos {url}: access denied ({exc}); check the credentials") from None
    except OSError as exc:
        raise InputListError(f"--videos {url}: cannot read it ({exc})") from exc
    return _from_list_file(data, url)


def _check_protocols(entries: list[tuple[str, str | None]], spec: str) -> None:
    """Videos listed as URLs of a filesystem that cannot be read here are refused before the run starts."""
    for protocol in sorted({url_protocol(source) for source, _ in entries} - {None, "http", "https"}):
        _require(protocol, f"{spec}: lists {protocol}:// videos, but")


def _identity(source: str) -> str:
    """What makes two listings the same video: the resolved path of a file, the URL as written."""
    return source if is_remote(source) else os.path.realpath(source)


def read_video_list(spec: str | Path, url: UrlPolicy | None = None) -> list[VideoInput]:
    """All inputs named by ``spec``, in a deterministic order, each with its key (duplicates marked); a list at an
    http(s) URL is fetched per ``url`` (default: :class:`UrlPolicy`'s defaults)."""
    spec = str(spec)
    entries = _remote_entries(spec, url or UrlPolicy()) if is_remote(spec) else _local_entries(Path(spec))
    _check_protocols(entries, spec)
    if not entries:
        raise InputListError(f"--videos {spec}: lists no videos")
    seen_keys: set[str] = set()
    seen_videos: set[str] = set()
    inputs = []
    for source, video_id in entries:
        try:
            key = make_key(source, video_id)
        except ValueError as exc:
            raise InputListError(f"--videos {spec}: {exc}") from exc
        identity = _identity(source)
        inputs.append(VideoInput(source, None if key in seen_keys or identity in seen_videos else key))
        seen_keys.add(key)
        seen_videos.add(identity)
    return inputs
