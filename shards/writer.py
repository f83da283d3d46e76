"""Write one shard: validated samples into a WebDataset tar that appears under its name only when complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from webdataset import TarWriter

from soundnet.shards.atomic import Place, atomic_path
from soundnet.shards.schema import Sample, encode_sample, member_digests, validate_sample


class ShardWriter:
    """Context manager for one shard file.

    Samples go to a hidden temporary file beside ``path``; it is renamed to ``path`` on a clean exit and
    deleted if the block raises, so a shard that exists is always complete. Every sample is validated before
    it is written, so a shard never holds a sample the student would choke on. ``index_rows`` holds the ledger
    rows for the samples written, ready for ``RunLayout.write_parts``, each with the sha256 of every member as
    written (``shards verify`` recomputes them from the tar) and the sample's byte range in the shard (a reader
    of remote shards fetches it with one ranged request). ``place`` puts the complete file under its name
    (see :func:`~soundnet.shards.atomic.atomic_path`).
    """

    def __init__(self, path: str | os.PathLike, place: Place = os.replace) -> None:
        self.path = Path(path)
        self.place = place
        self.count = 0
        self.bytes = 0
        self.audio_seconds = 0.0
        self.index_rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._tar: TarWriter | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> ShardWriter:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path, self.place))
            # Unbuffered: tarfile buffers whole records itself, and after a failed write (a full disk) closing the
            # file must not try to flush more bytes and raise a second error on top of the first.
            stream = stack.enter_context(open(tmp, "wb", buffering=0))
            self._tar = TarWriter(stream, encoder=False)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, tar, self._stack, self._tar = self._stack, self._tar, None, None
        assert stack is not None and tar is not None
        if exc_type is not None:  # the partial shard is deleted; close tarfile quietly (on a full disk it fails again)
            with contextlib.suppress(OSError):
                tar.close()
            return stack.__exit__(exc_type, exc, tb)
        with stack:
            tar.close()  # the end-of-archive blocks; if this fails the shard is deleted too
        return False

    def write(self, sample: Sample) -> int:
        """Validate and append ``sample``; return the payload bytes written. ValueError lists any problems."""
        if self._tar is None:
            raise RuntimeError(f"ShardWriter({self.path}) is not open: use it as a context manager")
        problems = validate_sample(sample)
        if sample.key in self._keys:
            problems.append(f"key {sample.key!r} already written to this shard")
        if problems:
            raise ValueError(f"sample {sample.key!r} not written to {self.path.name}: " + "; ".join(problems))
        raw = encode_sample(sample)
        offset = self._tar.tarstream.offset
        size = self._tar.write(raw)
        self._keys.add(sample.key)
        self.count += 1
        self.bytes += size
        self.audio_seconds += sample.audio_seconds
        self.index_rows.append(
            {
                "key": sample.key,
                "shard": self.path.name,
                "source": sample.meta["source"],
                "duration_s": float(sample.meta["duration_s"]),
                "frames": sample.frames,
                "audio_seconds": sample.audio_seconds,
                "sha256": member_digests(raw),
                "offset": offset,
                "size": self._tar.tarstream.offset - offset,
            }
        )
        return size
