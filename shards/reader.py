"""Read shards back: shard-list expansion, a per-shard index of complete samples, and sample iteration.

Every reader goes through :func:`scan_shard`: it walks a shard's tar headers (seeking past the data, so it is
cheap) and lists the byte range of each complete sample, plus what is wrong with the shard, if anything. A shard
cut mid-member keeps every sample before the cut; a file that is not a tar at all has no samples and a damage
note. Shards at URLs (:mod:`shards.remote`) are indexed from their run's ``index.parquet`` where it records the
byte ranges (:func:`index_from_spans`), else from their tar headers read by range. The student reads samples by
range in any order (:func:`read_raw`, :func:`read_many` for back-to-back runs of them); tools iterate them in
order (:func:`iter_samples`), which yields the complete samples and then raises :class:`DamagedShard`.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
import pyarrow.parquet as pq
from webdataset import tariterators

from soundnet.shards import remote
from soundnet.shards.schema import META_MEMBER, Sample, decode_sample

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

_GLOB_CHARS = frozenset("*?[")
_BLOCK = tarfile.BLOCKSIZE
INDEX_NAME = "index.parquet"
MAX_READ = 64 << 20
"""The most bytes one read of back-to-back samples fetches (it bounds a loader worker's memory)."""


class DamagedShard(ValueError):
    """A shard is not a readable tar, or is cut short: raised after its complete samples were yielded."""


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample's tar members lie in its shard: bytes ``[start, end)``, headers included."""

    key: str
    start: int
    end: int


@dataclass
class ShardIndex:
    """The complete samples of one shard, in order, and what is wrong with the shard (None when it is whole).

    ``first_meta`` holds the first sample's json member (the shard's header: teachers, clip layout), unparsed.
    """

    url: str
    samples: list[SampleSpan] = field(default_factory=list)
    damage: str | None = None
    first_meta: bytes | None = None


def expand_shards(spec: ShardSpec) -> list[str]:
    """Turn a brace pattern, glob, directory, path, URL or list of those into shard paths and URLs.

    ``out/shard-{000000..000003}.tar``, ``out/*.tar`` and ``out`` (all ``*.tar`` in it) all work, locally and as
    URLs (``https://host/run``, ``s3://bucket/run/shard-{000000..000003}.tar``): a folder URL is a run folder whose
    ``index.parquet`` names its shards (or, on storage that lists, its ``*.tar``); globs need storage that lists
    (S3, GCS; not plain HTTP). Duplicates are dropped (keeping first position) so no shard is read twice. Raises
    FileNotFoundError naming whatever matched nothing, so a typo fails loudly instead of training on fewer shards.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    missing: list[str] = []
    for item in items:
        for pattern in braceexpand.braceexpand(os.fspath(item)):
            if remote.is_url(pattern):
                found = _remote_shards(pattern)
            elif _GLOB_CHARS & set(pattern):
                found = sorted(glob.glob(pattern))
            elif os.path.isdir(pattern):
                found = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
            else:
                found = [pattern] if os.path.isfile(pattern) else []
            if not found:
                missing.append(pattern)
            paths += found
    if missing or not paths:
        raise FileNotFoundError(f"no shard files match {missing or items}")
    return list(dict.fromkeys(paths))


def _remote_shards(url: str) -> list[str]:
    """Shard URLs for one URL pattern: a shard, a glob (storage that lists) or a run folder."""
    if url.endswith(".tar"):
        return [url]
    if not url.startswith(("http://", "https://")) and _GLOB_CHARS & set(url.split("://", 1)[1]):
        return [u for u in remote.glob(url) if u.endswith(".tar")]
    index = remote.join(url, INDEX_NAME)
    if remote.exists(index):
        with remote.open_binary(index, 1 << 22) as stream:
            names = pq.read_table(stream, columns=["shard"]).column("shard").unique().to_pylist()
        return [remote.join(url, name) for name in sorted(names)]
    listed = remote.listing(url, "*.tar")
    if listed is None:
        raise FileNotFoundError(
            f"{index} does not exist and plain HTTP cannot list {url}: give the shard URLs, e.g. "
            f"'{remote.join(url, 'shard-{000000..000009}.tar')}'"
        )
    return listed


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Index the complete samples of one shard (a path or URL) from its tar headers; never raises for a damaged
    file, only for a missing URL.

    A member whose data runs past the end of the file loses its sample (and ends the scan); a file that ends
    without the tar end-of-archive blocks is noted as cut (its last sample may lack members, which decoding
    reports). A URL is read with one small ranged request per tar header (use :func:`index_from_spans` where
    the run's index records the byte ranges).
    """
    url = os.fspath(path)
    index = ShardIndex(url)
    key: str | None = None
    start = end = 0
    try:
        size = remote.size(url)
        with remote.open_binary(url) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name_key, suffix = tariterators.base_plus_ext(info.name)
                if name_key != key:
                    if key is not None:
                        index.samples.append(SampleSpan(key, start, end))
                    key, start = name_key, info.offset
                if info.offset_data + info.size > size:
                    index.damage = f"cut inside member {info.name}"
                    key = None  # the sample being read is incomplete
                    break
                end = info.offset_data + _padded(info.size)
                if suffix == META_MEMBER and index.first_meta is None:
                    index.first_meta = tar.extractfile(info).read()
            if index.damage is None and key is not None:
                if not _ends_archive(stream, end):
                    index.damage = f"no end-of-archive blocks after byte {end}: the shard is cut or damaged there"
                elif data_follows(stream, end):
                    index.damage = f"a bad or zeroed tar header ends the archive near byte {end}, yet data follows"
    except FileNotFoundError:
        if remote.is_url(url):
            raise
        index.damage = f"not a readable tar (no such file: {url})"
        key = None
    except (tarfile.TarError, OSError) as exn:
        index.damage = f"not a readable tar ({exn})"
        key = None
    if key is not None:
        index.samples.append(SampleSpan(key, start, end))
    return index


def index_from_spans(url: str, spans: list[SampleSpan]) -> ShardIndex:
    """The index of a shard whose sample byte ranges a run's index records: only its first sample is read (for the
    shard's header). A shard that cannot be read is noted as damaged; a missing URL raises FileNotFoundError."""
    index = ShardIndex(url, list(spans))
    try:
        index.first_meta = read_raw(url, spans[0]).get(META_MEMBER)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exn:
        index.damage, index.samples = f"its first sample cannot be read ({exn})", []
    return index


def read_raw(url: str, span: SampleSpan) -> dict[str, Any]:
    """One sample as WebDataset's raw dict (``__key__``, ``__url__``, member suffix -> bytes), read by its span."""
    return _parse(url, span, remote.read_range(url, span.start, span.end))


def read_many(samples: Sequence[tuple[str, SampleSpan]]) -> list[dict[str, Any] | Exception]:
    """Samples (shard, span), in the order given: those lying back to back in a shard are fetched together, one
    ranged read per run of them (at most ``MAX_READ`` bytes), and the reads at URLs are made at once. A sample that
    cannot be read or parsed is its exception."""
    order = sorted(range(len(samples)), key=lambda i: (samples[i][0], samples[i][1].start))
    runs: list[list[int]] = []
    for i in order:
        url, span = samples[i]
        if runs:
            last_url, last = samples[runs[-1][-1]]
            first = samples[runs[-1][0]][1]
            if last_url == url and last.end == span.start and span.end - first.start <= MAX_READ:
                runs[-1].append(i)
                continue
        runs.append([i])
    ranges = [(samples[run[0]][0], samples[run[0]][1].start, samples[run[-1]][1].end) for run in runs]
    results: list[dict[str, Any] | Exception] = [ValueError("not read")] * len(samples)
    for run, (url, start, _), data in zip(runs, ranges, remote.read_ranges(ranges)):
        for i in run:
            span = samples[i][1]
            try:
                if isinstance(data, Exception):
                    raise data
                results[i] = _parse(url, span, data[span.start - start : span.end - start])
            except (ValueError, OSError) as exn:
                results[i] = exn
    return results


def _parse(url: str, span: SampleSpan, data: bytes) -> dict[str, Any]:
    files = tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    try:
        samples = list(tariterators.group_by_keys(files))
    except tarfile.TarError as exn:
        raise ValueError(f"{url}: bytes {span.start}-{span.end} are not tar members ({exn}): file changed?") from None
    if len(samples) != 1 or samples[0].get("__key__") != span.key:
        raise ValueError(f"{url}: bytes {span.start}-{span.end} do not hold sample {span.key!r} (file changed?)")
    return samples[0]


def iter_raw(spec: ShardSpec) -> Generator[dict[str, Any], None, None]:
    """Yield raw WebDataset dicts (``__key__``, ``__url__``, member suffix -> bytes), shard by shard.

    The shard list is expanded at call time, so a bad spec fails here rather than at the first ``next``.
    """
    return tar_samples(expand_shards(spec))


def iter_samples(spec: ShardSpec, decode: bool = True) -> Iterator[Sample] | Iterator[dict[str, Any]]:
    """Yield every sample of the shards in order, as Samples (or raw dicts with ``decode=False``).

    A damaged shard yields its complete samples, then raises :class:`DamagedShard` (a ValueError) naming it; a
    broken member raises ValueError naming the shard, the key and the member.
    """
    raw = iter_raw(spec)
    return _decoded(raw) if decode else raw


def tar_samples(src: Iterable[str | os.PathLike | dict[str, Any]]) -> Generator[dict[str, Any], None, None]:
    """WebDataset pipeline stage: shard paths (or shard-list dicts with ``url``) to raw sample dicts.

    Use it in place of ``wds.tarfile_to_samples()``: the complete samples of a damaged shard are kept, and the
    damage is raised as :class:`DamagedShard` after them.
    """
    for item in src:
        url = item["url"] if isinstance(item, dict) else os.fspath(item)
        index = scan_shard(url)
        for span in index.samples:
            yield read_raw(url, span)
        if index.damage is not None:
            raise DamagedShard(
                f"{url}: damaged shard ({index.damage}); its {len(index.samples)} complete "
                "sample(s) before the damage were read"
            )


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _ends_archive(stream: io.BufferedReader, offset: int) -> bool:
    """Whether a zero block (tar's end-of-archive marker) follows the last member."""
    stream.seek(offset)
    block = stream.read(_BLOCK)
    return len(block) == _BLOCK and block.count(0) == _BLOCK


def data_follows(stream: BinaryIO, offset: int) -> bool:
    """Whether anything but zero padding follows ``offset``.

    Python's tarfile ends an archive silently at an invalid or all-zero header after the first one, as if the
    archive ended there: without this check a damaged header would hide the rest of the shard.
    """
    stream.seek(offset)
    return any(chunk.strip(b"\0") for chunk in iter(lambda: stream.read(1 << 20), b""))


def _decoded(raw: Iterator[dict[str, Any]]) -> Iterator[Sample]:
    for item in raw:
        try:
            yield decode_sample(item)
        except ValueError as exn:
            raise ValueError(f"{Path(item['__url__']).name}: {exn}") from exn
