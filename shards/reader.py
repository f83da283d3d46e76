"""Read shards back: shard-list expansion, a per-shard index of complete samples, and sample iteration.

Every reader goes through :func:`scan_shard`: it walks a shard's tar headers (seeking past the data, so it is
cheap) and lists the byte range of each complete sample, plus what is wrong with the shard, if anything. A shard
cut mid-member keeps every sample before the cut; a file that is not a tar at all has no samples and a damage
note. The student reads samples by range in any order (:func:`read_raw`); tools iterate them in order
(:func:`iter_samples`), which yields the complete samples and then raises :class:`DamagedShard`.
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
from webdataset import tariterators

from soundnet.shards.schema import META_MEMBER, Sample, decode_sample

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

_GLOB_CHARS = frozenset("*?[")
_BLOCK = tarfile.BLOCKSIZE


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
    """Turn a brace pattern, glob, directory, path or list of those into existing shard paths.

    ``out/shard-{000000..000003}.tar``, ``out/*.tar`` and ``out`` (all ``*.tar`` in it) all work. Duplicates
    are dropped (keeping first position) so no shard is read twice. Raises FileNotFoundError naming whatever
    matched nothing, so a typo fails loudly instead of training on fewer shards.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    missing: list[str] = []
    for item in items:
        for pattern in braceexpand.braceexpand(os.fspath(item)):
            if _GLOB_CHARS & set(pattern):
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


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Index the complete samples of one shard from its tar headers; never raises for a damaged file.

    A member whose data runs past the end of the file loses its sample (and ends the scan); a file that ends
    without the tar end-of-archive blocks is noted as cut (its last sample may lack members, which decoding
    reports).
    """
    url = os.fspath(path)
    index = ShardIndex(url)
    key: str | None = None
    start = end = 0
    try:
        size = os.path.getsize(url)
        with open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
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
    except (tarfile.TarError, OSError) as exn:
        index.damage = f"not a readable tar ({exn})"
        key = None
    if key is not None:
        index.samples.append(SampleSpan(key, start, end))
    return index


def read_raw(url: str, span: SampleSpan) -> dict[str, Any]:
    """One sample as WebDataset's raw dict (``__key__``, ``__url__``, member suffix -> bytes), read by its span."""
    with open(url, "rb") as stream:
        stream.seek(span.start)
        data = stream.read(span.end - span.start)
    files = tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    samples = list(tariterators.group_by_keys(files))
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
