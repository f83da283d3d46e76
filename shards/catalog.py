"""What a run's index records about its samples, for readers that trust nothing else: each sample's member digests
and byte range, and whether the run finished.

``ingest run`` merges the ledger parts of its tasks into ``index.parquet`` when its last task is done, so a folder
with ``run.json`` or ``parts/`` but no ``index.parquet`` holds a run that was stopped before that (``ingest run
--resume`` finishes it) and may lack any of its shards. Shards in a folder with neither (written by other tools,
copied without their index) have no records: they are read as they are, without digest checks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from soundnet.shards import remote
from soundnet.shards.ledger import BYTE_RANGE_COLUMNS, INDEX_SCHEMA, read_table

DIGEST_COLUMN = "sha256"
LEGACY_INDEX_SCHEMA = pa.schema([f for f in INDEX_SCHEMA if f.name not in (DIGEST_COLUMN, *BYTE_RANGE_COLUMNS)])
"""The index as written before checksums: still readable, verified for structure only."""
INDEX_NAME, FAILURES_NAME, MANIFEST_NAME, PARTS_NAME = "index.parquet", "failures.parquet", "run.json", "parts"
FINISH = "`ingest run --resume` with the run's options finishes it"


class UnfinishedRun(ValueError):
    """Shards of a run whose ledgers were never merged (stopped or killed before its end)."""


def read_index(path: str | os.PathLike) -> tuple[pa.Table, bool]:
    """Read an index ledger (a path or URL), also one written before checksums or byte ranges. Returns (table,
    whether it holds digests)."""
    where = os.fspath(path)
    with remote.open_binary(where, 1 << 22) as source:
        try:
            return read_table(source, "index"), True
        except ValueError:
            source.seek(0)
            table = read_table(source)
    if not table.schema.equals(LEGACY_INDEX_SCHEMA, check_metadata=False):
        raise ValueError(f"{where}: not an index ledger; schema is\n{table.schema}")
    return table, False


@dataclass
class Digests:
    """The member sha256 digests of many samples, packed (2 million samples of 4 members take 264 MB):
    ``values[i, j]`` is the digest of member ``members[j]`` of sample ``i`` where ``present[i, j]``."""

    members: tuple[str, ...]
    values: np.ndarray  # uint8 [N, M, 32]
    present: np.ndarray  # bool [N, M]

    @classmethod
    def from_column(cls, column: pa.ChunkedArray) -> Digests:
        """Unpack an index's ``sha256`` column (member -> hex digest per row) without a Python object per row."""
        entries = pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())]))
        lists = column.combine_chunks().cast(entries)
        keys, digests = lists.flatten().flatten()
        members = tuple(sorted(pc.unique(keys).to_pylist()))
        member = pc.index_in(keys, value_set=pa.array(members, pa.string())).to_numpy()
        row = np.repeat(np.arange(len(lists)), lists.value_lengths().fill_null(0).to_numpy())
        try:
            fixed = digests.cast(pa.binary(64))
        except pa.ArrowInvalid:
            raise ValueError("the index holds a sha256 digest that is not 64 hex digits") from None
        text = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)[fixed.offset * 64 : (fixed.offset + len(fixed)) * 64]
        nibbles = _HEX[text.reshape(-1, 64)]
        if (nibbles > 15).any():
            raise ValueError("the index holds a sha256 digest that is not 64 hex digits")
        values = np.zeros((len(lists), len(members), 32), dtype=np.uint8)
        present = np.zeros((len(lists), len(members)), dtype=bool)
        values[row, member] = nibbles[:, 0::2] << 4 | nibbles[:, 1::2]
        present[row, member] = True
        return cls(members, values, present)

    def take(self, rows: np.ndarray) -> Digests:
        """The digests of ``rows`` in that order; row -1 is a sample with none recorded."""
        known = rows >= 0
        values = self.values[np.where(known, rows, 0)]
        present = self.present[np.where(known, rows, 0)] & known[:, None]
        return Digests(self.members, values, present)

    def of(self, i: int) -> dict[str, str] | None:
        """Member -> hex digest recorded for sample ``i``, or None when nothing is recorded for it."""
        if not self.present[i].any():
            return None
        return {m: self.values[i, j].tobytes().hex() for j, m in enumerate(self.members) if self.present[i, j]}


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


@dataclass
class Ledger:
    """One run folder's index rows: where each sample lies in which shard, and its digests (None: not recorded)."""

    folder: str
    origin: str  # where the rows come from: "index.parquet", or the parts of an unfinished run
    keys: list[str]  # per row
    shards: list[str]
    offsets: np.ndarray  # int64 per row; -1 where not recorded
    sizes: np.ndarray
    digests: Digests | None
    warning: str | None = None  # what a reader should be told about these rows (an unfinished run accepted)

    @classmethod
    def from_table(cls, folder: str, origin: str, table: pa.Table, has_digests: bool) -> Ledger:
        n = table.num_rows
        ranges = [
            table.column(c).fill_null(-1).to_numpy() if c in table.column_names else np.full(n, -1, dtype=np.int64)
            for c in BYTE_RANGE_COLUMNS
        ]
        return cls(
            folder=folder,
            origin=origin,
            keys=table.column("key").to_pylist(),
            shards=table.column("shard").to_pylist(),
            offsets=ranges[0],
            sizes=ranges[1],
            digests=Digests.from_column(table.column(DIGEST_COLUMN)) if has_digests and n else None,
        )

    def __post_init__(self) -> None:
        self.rows: dict[str, int] = {}  # key -> its first row
        self.by_shard: dict[str, list[int]] = {}
        for i, (key, shard) in enumerate(zip(self.keys, self.shards)):
            self.rows.setdefault(key, i)
            self.by_shard.setdefault(shard, []).append(i)

    def spans_of(self, shard: str) -> list[tuple[str, int, int]] | None:
        """(key, start, end) of every sample the index puts in ``shard``, in file order; None unless every one of
        them has its byte range recorded."""
        rows = self.by_shard.get(shard, [])
        if not rows or (self.offsets[rows] < 0).any():
            return None
        spans = [(self.keys[i], int(self.offsets[i]), int(self.offsets[i] + self.sizes[i])) for i in rows]
        return sorted(spans, key=lambda span: span[1])


def read_ledgers(shards: Sequence[str], allow_unfinished: bool = False) -> tuple[dict[str, Ledger], list[str]]:
    """The ledger of every run folder that holds some of ``shards`` (paths or URLs), by folder, and notes on what
    cannot be checked. Raises :class:`UnfinishedRun` naming a run that was not finished, unless
    ``allow_unfinished`` (then the rows come from the ledger parts of its finished tasks)."""
    by_folder: dict[str, list[str]] = {}
    for shard in shards:
        by_folder.setdefault(remote.parent(shard), []).append(shard)
    ledgers: dict[str, Ledger] = {}
    notes: list[str] = []
    for folder, members in by_folder.items():
        index = remote.join(folder, INDEX_NAME)
        if remote.exists(index):
            table, has_digests = read_index(index)
            ledgers[folder] = Ledger.from_table(folder, INDEX_NAME, table, has_digests)
            if not has_digests:
                notes.append(f"{index} records no sha256 digests (a run written before checksums): its samples are "
                             "read without digest checks")  # fmt: skip
        elif _is_run(folder):
            if not allow_unfinished:
                raise UnfinishedRun(
                    f"{folder} holds a run that was never finished: its ledgers were not merged into {INDEX_NAME} "
                    f"(stopped or killed before its end), so shards may be missing. {FINISH}; or pass "
                    "--allow-unfinished to train on the shards it has"
                )
            ledgers[folder] = _unfinished_ledger(folder, members)
        else:
            notes.append(f"no {INDEX_NAME} beside the shards in {folder}: their samples' digests cannot be checked")
    return ledgers, notes


def _is_run(folder: str) -> bool:
    """Whether ``folder`` holds (the start of) an ``ingest run``."""
    if remote.exists(remote.join(folder, MANIFEST_NAME)):
        return True
    return not remote.is_url(folder) and os.path.isdir(os.path.join(folder, PARTS_NAME))


def _unfinished_ledger(folder: str, shards: list[str]) -> Ledger:
    """The rows of an unfinished run's finished tasks, from the index part beside each of ``shards``."""
    parts = [remote.join(remote.join(folder, PARTS_NAME), f"{_stem(s)}.index.parquet") for s in shards]
    tables = [read_index(p) for p in parts if remote.exists(p)]
    table = pa.concat_tables([t for t, _ in tables], promote_options="default") if tables else None
    has_digests = all(has for _, has in tables)
    origin = f"{len(tables)} ledger part(s) of an unfinished run"
    ledger = Ledger.from_table(folder, origin, table or INDEX_SCHEMA.empty_table(), has_digests)
    ledger.warning = (
        f"{folder} holds an unfinished run, read as it is (--allow-unfinished): digests from the ledger parts of "
        f"{len(tables)} of its {len(shards)} shard(s); {FINISH}"
    )
    return ledger


def _stem(shard: str) -> str:
    name = remote.name(shard)
    return name[: -len(".tar")] if name.endswith(".tar") else name
