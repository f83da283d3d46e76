"""The student's view of the shards: 20 s clips with one teacher row per output step, read with WebDataset.

Training reads an endless stream, so every rank takes exactly the steps it is told whatever the shard counts (no
rank runs dry and leaves the others waiting in a collective). Each (rank, DataLoader worker) slot reads its own
slice of the shards when there are at least as many shards as slots, otherwise all of them; it goes through them
pass after pass, each pass in a fresh seeded order, through a shuffle buffer. A sample whose fields are broken
(or the unreadable rest of a damaged shard) is skipped, logged once and counted; the count travels to the
trainer with the next clip of the stream.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from soundnet.shards.contract import AUDIO_SCALE, SAMPLE_RATE
from soundnet.shards.reader import tar_samples
from soundnet.shards.schema import Sample, decode_sample

log = logging.getLogger(__name__)

SLOT_SECONDS = 5.0
SLOTS = 4
"""A training clip is SLOTS slots of SLOT_SECONDS (20 s): the network's output steps, one teacher frame each."""
SLOT_SAMPLES = int(SLOT_SECONDS * SAMPLE_RATE)
CLIP_SAMPLES = SLOTS * SLOT_SAMPLES
SHUFFLE_INITIAL = 100
"""Examples buffered before the first is yielded: a quick start; the buffer fills to its size as training runs."""


def tile_clip(
    audio: np.ndarray, posteriors: dict[str, np.ndarray], slots: int = SLOTS, slot_samples: int = SLOT_SAMPLES
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The paper's rule for clips with k < slots frames: cut the audio to k slots and tile it to the full length.

    Teacher rows are tiled the same way (k = 3: rows a, b, c, a), so output step t still hears the audio that row t
    describes. A clip shorter than one slot (one frame for the whole clip) is tiled whole. Clips with more frames
    than slots keep the first ``slots``.
    """
    k = min(next(iter(posteriors.values())).shape[0], slots)
    tiled = np.resize(audio[: k * slot_samples], slots * slot_samples)
    rows = {name: np.resize(r[:k], (slots, r.shape[1])) for name, r in posteriors.items()}
    return tiled, rows


def make_example(sample: Sample, heads: dict[str, int]) -> dict[str, Any]:
    """A training example ``{"key", "audio": int16 [CLIP_SAMPLES], "targets": {head: float16 [SLOTS, C]}}``.

    Raises ValueError saying what is wrong when the sample cannot train ``heads`` (teachers the heads do not name
    are ignored).
    """
    audio = sample.audio
    if audio.dtype != np.int16 or audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio is {audio.dtype} {audio.shape}, expected non-empty int16 [T]")
    missing = sorted(set(heads) - set(sample.posteriors))
    if missing:
        raise ValueError(f"no posteriors for teacher(s) {missing}")
    rows = {name: sample.posteriors[name] for name in heads}
    for name, r in rows.items():
        if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] != heads[name]:
            raise ValueError(f"posteriors[{name!r}] has shape {r.shape}, expected [F>=1, {heads[name]}]")
        if not np.isfinite(r).all():
            raise ValueError(f"posteriors[{name!r}] has non-finite values")
    if len({r.shape[0] for r in rows.values()}) > 1:
        raise ValueError(f"teachers disagree on the number of frames: { {n: r.shape[0] for n, r in rows.items()} }")
    audio, targets = tile_clip(audio, rows)
    targets = {name: r.astype(np.float16, copy=False) for name, r in targets.items()}
    return {"key": sample.key, "audio": audio, "targets": targets}


@dataclass(frozen=True)
class Skipped:
    """Stands in a stream for a sample that could not be used."""

    where: str
    reason: str


def shard_examples(url: str, heads: dict[str, int]) -> Iterator[dict[str, Any] | Skipped]:
    """The examples of one shard in order, with a Skipped marker for each broken sample.

    A damaged tar ends the shard with one marker: the sample being read and whatever follows it are lost.
    """
    try:
        for raw in tar_samples([url]):
            where = f"{url}:{raw.get('__key__')}"
            try:
                yield make_example(decode_sample(raw), heads)
            except ValueError as exn:
                yield Skipped(where, str(exn))
    except ValueError as exn:
        yield Skipped(url, str(exn))


def discover_heads(urls: Sequence[str]) -> dict[str, int]:
    """The teachers of the first readable sample and their class counts: the heads the student is built with."""
    for url in urls:
        try:
            for raw in tar_samples([url]):
                try:
                    sample = decode_sample(raw)
                except ValueError:
                    continue
                shapes = {name: r.shape for name, r in sample.posteriors.items()}
                if shapes and all(len(s) == 2 and s[1] >= 1 for s in shapes.values()):
                    return {name: int(s[1]) for name, s in shapes.items()}
        except ValueError:
            continue
    raise ValueError(f"none of the {len(urls)} shard(s) holds a readable sample with teacher posteriors")


class _SkipLog:
    """Logs each broken sample once per process, however many passes the stream makes over it."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def note(self, item: Skipped) -> None:
        if item.where not in self.seen:
            self.seen.add(item.where)
            log.warning("skipped %s: %s", item.where, item.reason)


class ClipStream(IterableDataset):
    """Endless shuffled training examples for one rank; with DataLoader workers, each worker reads its own part.

    ``seed`` and ``stream`` (the step the stream starts at, so a resumed run reads a fresh stream rather than
    replaying the first one) fix the order. Each example carries ``skipped``: the broken samples met since the
    previous example of the same worker.
    """

    def __init__(
        self,
        urls: Sequence[str],
        heads: dict[str, int],
        *,
        shuffle: int = 500,
        seed: int = 0,
        stream: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.heads = dict(heads)
        self.shuffle = shuffle
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        mine = self.urls[slot::slots] if len(self.urls) >= slots else self.urls
        rng = random.Random(f"{self.seed}/{self.stream}/{slot}")
        examples = self._endless(mine, rng)
        if self.shuffle > 1:
            examples = wds.shuffle(self.shuffle, initial=min(self.shuffle, SHUFFLE_INITIAL), rng=rng)(examples)
        return examples

    def _endless(self, urls: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        skips, skipped = _SkipLog(), 0
        while True:
            produced = 0
            for url in rng.sample(urls, len(urls)):
                for item in shard_examples(url, self.heads):
                    if isinstance(item, Skipped):
                        skips.note(item)
                        skipped += 1
                        continue
                    produced += 1
                    yield {**item, "skipped": skipped}
                    skipped = 0
            if not produced:
                raise ValueError(f"no usable sample in {len(urls)} shard(s) {urls[:3]}...: every one was skipped")


def make_loader(
    urls: Sequence[str],
    heads: dict[str, int],
    batch_size: int,
    *,
    workers: int = 2,
    shuffle: int = 500,
    seed: int = 0,
    stream: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Endless batches ``{"key": [B], "audio": int16 [B, CLIP_SAMPLES], "targets": {head: float16 [B, SLOTS, C]},
    "skipped": [B]}``."""
    dataset = ClipStream(urls, heads, shuffle=shuffle, seed=seed, stream=stream, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )


class HeldOut:
    """One in-order pass over held-out shards, every ``world_size``-th sample for this rank, in batches.

    ``skipped`` counts the broken samples this rank met in the last pass.
    """

    def __init__(
        self, urls: Sequence[str], heads: dict[str, int], batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.urls = list(urls)
        self.heads = dict(heads)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self._skips = _SkipLog()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        items = chain.from_iterable(shard_examples(url, self.heads) for url in self.urls)
        batch: list[dict[str, Any]] = []
        for item in islice(items, self.rank, None, self.world_size):
            if isinstance(item, Skipped):
                self._skips.note(item)
                self.skipped += 1
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []
        if batch:
            yield default_collate(batch)


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Network input ``[B, 1, T]`` (waveform in [-1, 1]; the model applies its own input scale) and teacher
    log-probs ``[B, C, steps]`` on ``device``.

    Audio travels as int16 and is converted on the device: half the bytes of float32 over the bus.
    """
    x = batch["audio"].to(device, non_blocking=True).unsqueeze(1).float() / AUDIO_SCALE
    targets = {name: t.to(device, non_blocking=True).float().transpose(1, 2) for name, t in batch["targets"].items()}
    return x, targets
