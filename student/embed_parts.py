"""Where `student embed` writes its rows: one parquet file, or a folder of parts that a killed run resumes.

A folder holds ``_manifest.json`` (what the rows are: the inputs' digest, the layer, the weights' digest and the
options that change a row) and ``part-NNNNNN.parquet``: part ``k`` holds the rows of inputs ``k * part_rows`` to
``(k + 1) * part_rows - 1`` in input order, and is written under a temporary name and renamed once complete. So:

* the folder reads as one table in input order (``pyarrow.dataset``, pandas, duckdb): part names sort in order,
  and names starting with ``_`` or ``.`` are not data to those readers;
* a resumed run writes only the parts that are missing; a part is the same rows whoever writes it;
* ``--part I/N`` jobs take the parts ``k`` with ``k mod N = I - 1``: N jobs share one folder without writing the same
  file, and the one manifest is created by whichever comes first (an exclusive hard link) and checked by the others.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from soundnet.shards.atomic import atomic_path

MANIFEST = "_manifest.json"
FORMAT = "soundnet-embeddings"
PART_ROWS = 1000
ROWS_PER_GROUP = 64
BYTES_PER_GROUP = 256 << 20  # a row group is written when either bound is reached (deep layers of long files)
IDENTITY = ("inputs", "inputs_sha256", "part_rows", "layer", "scene", "bf16", "weights_sha256")
"""Manifest entries that must match for a run to add parts to a folder: together they fix every row."""


@dataclass
class Result:
    """One row: a file's embeddings, or the error that replaced them."""

    path: str
    seconds: float | None = None
    embeddings: np.ndarray | None = None  # [T, D], or [D] with --scene
    timestamps: np.ndarray | None = None  # [T] seconds
    error: str | None = None


@dataclass(frozen=True)
class Slice:
    """``--part I/N``: the parts ``k`` with ``k mod N = I - 1`` (I counts from 1, like ``SLURM_ARRAY_TASK_ID=1..N``)."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Slice:
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not I/N (e.g. 3/8: the third of 8 slices)") from None
        if not 1 <= index <= count:
            raise click.BadParameter(f"{text!r}: I must be between 1 and N")
        return cls(index, count)

    def owns(self, part: int) -> bool:
        return part % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def is_folder_output(out: Path) -> bool:
    """``--out`` names a folder of parts unless it names a parquet file."""
    return out.suffix.lower() not in (".parquet", ".pq")


def part_path(out: Path, part: int) -> Path:
    return out / f"part-{part:06d}.parquet"


def manifest(paths: list[str], part_rows: int, options: dict) -> dict:
    """The manifest of a folder of parts for ``paths`` (``options``: layer, scene, bf16, weights_sha256, ...)."""
    listing = "\n".join(paths).encode()
    return {
        "format": FORMAT,
        "version": 1,
        "inputs": len(paths),
        "inputs_sha256": hashlib.sha256(listing).hexdigest(),
        "part_rows": part_rows,
        "parts": math.ceil(len(paths) / part_rows),
        **options,
    }


def open_folder(out: Path, wanted: dict, part: Slice, resume: bool) -> tuple[list[int], list[int]]:
    """Create or join the folder ``out`` for the run ``wanted`` describes: the parts of slice ``part``, and those
    of them still to write.

    Refused, naming what differs, when the folder holds another run; refused without ``resume`` when some of this
    slice's parts are already there. Temporary files left by a killed writer of this slice are removed.
    """
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is a file: give a folder for parts, or a .parquet file")
    with disk_errors(out, resumable=False):
        out.mkdir(parents=True, exist_ok=True)
    with disk_errors(out / MANIFEST, resumable=False):
        found = _create_or_read(out / MANIFEST, wanted)
    differ = [key for key in IDENTITY if found.get(key) != wanted[key]]
    if differ:
        what = "; ".join(f"{key}: {found.get(key)!r} there, {wanted[key]!r} now" for key in differ)
        raise click.ClickException(
            f"{out} holds embeddings of other inputs or options ({what}): give the same inputs and options, "
            "or choose a new --out"
        )
    mine = [k for k in range(wanted["parts"]) if part.owns(k)]
    present = {p.name for p in out.iterdir()}
    done = [k for k in mine if part_path(out, k).name in present]
    if done and not resume:
        raise click.ClickException(
            f"{out} already holds {len(done)} of the {len(mine)} parts of this run"
            f"{'' if part.count == 1 else f' (slice {part})'}: pass --resume to finish it, or choose a new --out"
        )
    for name in present:  # .part-NNNNNN.parquet.XXXXXXXX.tmp (atomic_path's temporary name)
        if name.startswith(".part-") and name.endswith(".tmp") and name[6:12].isdigit() and part.owns(int(name[6:12])):
            (out / name).unlink(missing_ok=True)
    return mine, sorted(set(mine) - set(done))


def _create_or_read(path: Path, wanted: dict) -> dict:
    """Write ``wanted`` to ``path`` unless a manifest is there already (os.link never replaces a name, so of
    jobs starting together exactly one creates it); the manifest that is there afterwards."""
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(wanted, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the jobs of a cluster may run as other users
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path} is not a manifest of student embed ({exc}): choose a new --out") from None


@contextlib.contextmanager
def disk_errors(writing: Path, resumable: bool) -> Iterator[None]:
    """A full disk, a read-only or unwritable --out are the user's to fix: one line naming the file, no traceback."""
    try:
        yield
    except OSError as exc:  # pyarrow's own I/O errors are OSErrors without an errno
        if exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
            then = "finished parts kept; free space and run again with --resume" if resumable else "free space"
            raise click.ClickException(f"no space left on device writing {writing}: {then}") from None
        raise click.ClickException(f"cannot write {writing}: {exc.strerror or exc}: choose another --out") from None


def schema(width: int, scene: bool, metadata: dict) -> pa.Schema:
    vector = pa.list_(pa.float32(), width)
    fields = [pa.field("path", pa.string()), pa.field("seconds", pa.float64())]
    if scene:
        fields.append(pa.field("embedding", vector))
    else:
        fields += [pa.field("timestamps", pa.list_(pa.float64())), pa.field("embeddings", pa.list_(vector))]
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={"soundnet": json.dumps(metadata)})


def write_rows(path: Path, results: Iterable[Result], row_schema: pa.Schema, resumable: bool) -> None:
    """Write ``results`` to the parquet file ``path`` atomically, a bounded row group at a time."""
    scene = "embedding" in row_schema.names
    width = (row_schema.field("embedding").type if scene else row_schema.field("embeddings").type.value_type).list_size
    with disk_errors(path, resumable), atomic_path(path) as tmp, pq.ParquetWriter(tmp, row_schema) as writer:
        pending: list[Result] = []
        held = 0
        for result in results:
            pending.append(result)
            held += 0 if result.embeddings is None else result.embeddings.nbytes
            if len(pending) == ROWS_PER_GROUP or held >= BYTES_PER_GROUP:
                writer.write_table(_table(pending, row_schema, width, scene))
                pending, held = [], 0
        if pending:
            writer.write_table(_table(pending, row_schema, width, scene))


def _table(results: list[Result], row_schema: pa.Schema, width: int, scene: bool) -> pa.Table:
    """Arrow columns built from whole numpy arrays (a ten-minute conv1 output is 100 M floats: no Python lists)."""
    ok = [r for r in results if r.error is None]
    missing = pa.array([r.error is not None for r in results], pa.bool_())
    columns = {
        "path": pa.array([r.path for r in results], pa.string()),
        "seconds": pa.array([r.seconds for r in results], pa.float64()),
        "error": pa.array([r.error for r in results], pa.string()),
    }
    flat = np.concatenate([r.embeddings.reshape(-1) for r in ok]) if ok else np.zeros(0, np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    if scene:
        columns["embedding"] = _with_nulls(vectors, missing)
    else:
        counts = [0 if r.error else len(r.timestamps) for r in results]
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        times = np.concatenate([r.timestamps for r in ok]) if ok else np.zeros(0)
        columns["timestamps"] = pa.ListArray.from_arrays(offsets, pa.array(times, pa.float64()), mask=missing)
        columns["embeddings"] = pa.ListArray.from_arrays(offsets, vectors, mask=missing)
    return pa.table([columns[name] for name in row_schema.names], schema=row_schema)


def _with_nulls(vectors: pa.FixedSizeListArray, missing: pa.Array) -> pa.Array:
    """One vector per row, null where the row failed (``vectors`` holds the successful rows in order)."""
    is_missing = missing.to_numpy(zero_copy_only=False)
    index = np.cumsum(~is_missing) - 1
    return vectors.take(pa.array(np.where(is_missing, None, index), pa.int64(), from_pandas=True))


def failures(files: Iterable[Path]) -> tuple[int, list[tuple[str, str]]]:
    """Rows in ``files`` and the (path, error) of those that failed, read back from the ``error`` column."""
    rows = 0
    failed: list[tuple[str, str]] = []
    for file in files:
        table = pq.read_table(file, columns=["path", "error"])
        rows += table.num_rows
        bad = table.filter(table.column("error").is_valid())
        failed += zip(bad.column("path").to_pylist(), bad.column("error").to_pylist())
    return rows, failed
