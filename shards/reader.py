"""Read shards back: shard-list expansion and sample iteration on top of WebDataset's tar iterators.

The student builds its own shuffled, worker-split WebDataset pipeline from ``expand_shards``, ``tar_samples``
and ``decode_sample``; ``iter_samples`` is the plain sequential reader for tools and tests.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
from webdataset import tariterators

from soundnet.shards.schema import Sample, decode_sample

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

_GLOB_CHARS = frozenset("*?[")


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


def iter_raw(spec: ShardSpec) -> Generator[dict[str, Any], None, None]:
    """Yield raw WebDataset dicts (``__key__``, ``__url__``, member suffix -> bytes), shard by shard.

    The shard list is expanded at call time, so a bad spec fails here rather than at the first ``next``;
    closing the generator early closes the open shard.
    """
    return tar_samples(expand_shards(spec))


def iter_samples(spec: ShardSpec, decode: bool = True) -> Iterator[Sample] | Iterator[dict[str, Any]]:
    """Yield every sample of the shards in order, as Samples (or raw dicts with ``decode=False``).

    A damaged tar or a broken member raises ValueError naming the shard (and the key and member).
    """
    raw = iter_raw(spec)
    return _decoded(raw) if decode else raw


def tar_samples(src: Iterable[str | os.PathLike | dict[str, Any]]) -> Generator[dict[str, Any], None, None]:
    """WebDataset pipeline stage: shard paths (or shard-list dicts with ``url``) to raw sample dicts.

    Use it in place of ``wds.tarfile_to_samples()``: WebDataset's own opener leaves each shard's file handle
    for the garbage collector, this one closes it when the shard is done. A damaged tar raises ValueError.
    """
    for item in src:
        path = item["url"] if isinstance(item, dict) else os.fspath(item)
        with open(path, "rb") as stream:
            try:
                files = tariterators.tar_file_expander([{"url": path, "stream": stream}])
                yield from tariterators.group_by_keys(files)
            except tarfile.TarError as exn:
                reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__  # wds appends " @ stream"
                raise ValueError(f"{path}: damaged shard ({reason})") from exn


def _decoded(raw: Iterator[dict[str, Any]]) -> Iterator[Sample]:
    for item in raw:
        try:
            yield decode_sample(item)
        except ValueError as exn:
            raise ValueError(f"{Path(item['__url__']).name}: {exn}") from exn
