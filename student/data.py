"""The student's view of the shards: 20 s clips with one teacher row per output step.

**One checked shard set.** :func:`scan_shards` indexes every shard (``shards.reader.scan_shard``: the byte
range of each complete sample) and reads each shard's header, the json of its first sample: the teachers with
their class counts and the clip layout (``meta["layout"]``, a ``ClipLayout``; absent in shards made before it was
recorded, which used the defaults). The student is built from that one teacher set: shards that disagree are
refused, naming them, or left out with ``exclude_mismatched``; shards with different layouts are refused. Damaged
shards keep their complete samples; the damage is counted once.

**Frames to output steps.** SoundNet8 gives one output step per 5 s of a 20 s clip. A layout whose slots divide
the step (2.5 s: two frames per step) is trained on the mean of the step's teacher distributions, i.e.
``logsumexp(rows) - log m`` back in log-probs (for an embedding teacher: the mean of the step's unit rows,
renormalised); a layout whose slots are a whole multiple of it (10 s) repeats each frame's row for the steps it
covers. Anything else, or another sample rate or audio scale, is refused at
start (:func:`align`). A clip shorter than the training clip is cut to whole steps and tiled (the paper's rule).

**Exact, resumable order.** The batch of step ``s`` is a pure function of ``(seed, s)``: clip ``p`` of the run
(``p = s x batch x ranks + rank x batch + i``) is entry ``p mod N`` of the order of pass ``p div N`` over the N
indexed samples (:func:`pass_order`: a seeded permutation, or with ``read_order="shard"`` a few shards at a time in
runs of consecutive samples, so that object storage sees one request per run instead of one per clip). Resuming at
step k reads exactly what an uninterrupted run reads there, whatever the number of loader workers (they only read
in parallel). A sample that turns out broken when read (it does not decode, or its bytes differ from the sha256 its
run's index records) is replaced by the next sample in index order, so batches stay full; it is reported with the
batch, and the trainer counts each broken sample once.

**Where the shards are.** Paths or URLs (``shards.remote``); a sample is one ranged read of its byte span, and the
samples of a batch that lie back to back in a shard are fetched with one read.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from soundnet.shards import remote
from soundnet.shards.catalog import Digests, Ledger, read_ledgers
from soundnet.shards.contract import AUDIO_DTYPE, AUDIO_SCALE, DEFAULT_LAYOUT, ClipLayout
from soundnet.shards.reader import SampleSpan, ShardIndex, index_from_spans, read_many, read_raw, scan_shard
from soundnet.shards.schema import EMBEDDING, POSTERIOR, Sample, decode_sample, teacher_kind, teacher_width
from soundnet.shards.verify import digest_problems
from soundnet.student.model import SoundNet

log = logging.getLogger(__name__)

CLIP_SAMPLES = DEFAULT_LAYOUT.clip_samples
"""A training clip: the paper's 20 s, whatever the layout the shards were made with."""
FIX = "re-run ingest with `ingest run --frame-interval 5 --max-frames 4` (the paper's layout)"


def tile_clip(
    audio: np.ndarray, posteriors: dict[str, np.ndarray], slots: int, slot_samples: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The paper's rule for clips with k < slots rows: cut the audio to k slots and tile it to the full length.

    Teacher rows are tiled the same way (k = 3: rows a, b, c, a), so output step t still hears the audio that row t
    describes. A clip shorter than one slot (one row for the whole clip) is tiled whole. Clips with more rows
    than slots keep the first ``slots``.
    """
    k = min(next(iter(posteriors.values())).shape[0], slots)
    tiled = np.resize(audio[: k * slot_samples], slots * slot_samples)
    rows = {name: np.resize(r[:k], (slots, r.shape[1])) for name, r in posteriors.items()}
    return tiled, rows


@dataclass(frozen=True)
class Alignment:
    """How a layout's teacher frames map onto the network's output steps of a training clip.

    ``pool`` frames are averaged (as distributions) into one step's row, or each frame's row is repeated for
    ``repeat`` steps; both are 1 for the paper's layout.
    """

    layout: ClipLayout
    steps: int
    step_samples: int
    pool: int = 1
    repeat: int = 1

    def rows(self, r: np.ndarray, kind: str = POSTERIOR) -> np.ndarray:
        """One float32 row per covered step, at most ``steps``, from a teacher's ``[F, C]`` frames: pooled frames
        are the mean distribution (log-probs) or the mean direction (unit embeddings)."""
        r = r.astype(np.float32)
        if self.repeat > 1:
            return np.repeat(r, self.repeat, axis=0)[: self.steps]
        if self.pool == 1:
            return r[: self.steps]
        k = max(1, min(self.steps, r.shape[0] // self.pool))
        groups = [r[t * self.pool : (t + 1) * self.pool] for t in range(k)]
        if kind == EMBEDDING:
            return np.stack([_unit(g.mean(axis=0)) for g in groups])
        return np.stack([_logsumexp(g) - math.log(len(g)) for g in groups])


def align(layout: ClipLayout, steps: int, step_samples: int, sample_rate: int, where: str) -> Alignment:
    """The alignment of ``layout`` to output steps of ``step_samples`` at ``sample_rate``, or ValueError saying
    what was found in ``where``, what is expected and how to fix it."""
    step_seconds = step_samples / sample_rate
    ratio = step_seconds / layout.slot_seconds
    pool, repeat = round(ratio), round(1 / ratio)
    fits = (pool >= 1 and math.isclose(pool * layout.slot_seconds, step_seconds)) or (
        repeat >= 1 and math.isclose(repeat * step_seconds, layout.slot_seconds)
    )
    same_audio = (layout.sample_rate, layout.audio_dtype, layout.audio_scale) == (
        sample_rate,
        AUDIO_DTYPE,
        AUDIO_SCALE,
    )
    if not (fits and same_audio):
        raise ValueError(
            f"{where}: clip layout {_describe(layout)} does not fit the student, whose output steps are "
            f"{step_seconds:g} s of {AUDIO_DTYPE} audio / {AUDIO_SCALE:g} at {sample_rate} Hz: slots must divide "
            f"{step_seconds:g} s or be a whole multiple of it (expected e.g. {_describe(DEFAULT_LAYOUT)}); {FIX}"
        )
    if pool >= 1 and math.isclose(pool * layout.slot_seconds, step_seconds):
        return Alignment(layout, steps, step_samples, pool=pool)
    return Alignment(layout, steps, step_samples, repeat=repeat)


def model_alignment(model: SoundNet, layout: ClipLayout, where: str) -> Alignment:
    """:func:`align` for ``model``'s output steps on a training clip and the rate its input must have."""
    steps = model.output_length(model.head_names[0], CLIP_SAMPLES)
    if CLIP_SAMPLES % steps:
        raise ValueError(f"{model.config.arch} gives {steps} output steps for a {CLIP_SAMPLES}-sample clip")
    return align(layout, steps, CLIP_SAMPLES // steps, model.config.sample_rate, where)


def make_example(
    sample: Sample, heads: dict[str, int], alignment: Alignment, kinds: dict[str, str] | None = None
) -> dict[str, Any]:
    """A training example ``{"key", "audio": int16 [CLIP_SAMPLES], "targets": {head: float16 [steps, C]}}``.

    ``kinds`` names each head's kind (default: posterior). Raises ValueError saying what is wrong when the sample
    cannot train ``heads`` (teachers the heads do not name are ignored) or records another layout than its shard.
    """
    audio = sample.audio
    if audio.dtype != np.int16 or audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio is {audio.dtype} {audio.shape}, expected non-empty int16 [T]")
    if ClipLayout.from_json(sample.meta.get("layout")) != alignment.layout:
        raise ValueError(f"its clip layout {sample.meta.get('layout')} differs from its shard's")
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
    check_frames(next(iter(rows.values())).shape[0], sample.meta.get("duration_s"), alignment.layout)
    stepped = {name: alignment.rows(r, (kinds or {}).get(name, POSTERIOR)) for name, r in rows.items()}
    audio, targets = tile_clip(audio, stepped, alignment.steps, alignment.step_samples)
    targets = {name: r.astype(np.float16) for name, r in targets.items()}
    return {"key": sample.key, "audio": audio, "targets": targets}


def check_frames(frames: int, duration_s: Any, layout: ClipLayout) -> None:
    """Refuse a clip whose frame count is not what ingest gives a clip of its duration under ``layout``
    (``min(frames_per_clip, floor(D / slot))``, at least 1): it was made with another layout than it records,
    e.g. shards made with ``--frame-interval 2.5`` before layouts were recorded."""
    if not isinstance(duration_s, (int, float)) or not duration_s > 0:
        raise ValueError(f"meta 'duration_s' is {duration_s!r}, not a positive number of seconds")
    slots = duration_s / layout.slot_seconds
    most = max(1, min(layout.frames_per_clip, math.floor(slots + 1e-6)))
    least = max(1, min(layout.frames_per_clip, math.floor(slots - 1e-6)))
    if not least <= frames <= most:
        raise ValueError(
            f"{frames} frame(s) for {duration_s:g} s of video do not fit its clip layout {_describe(layout)} "
            f"(that gives {most}): it was made with another --frame-interval or --max-frames than it records"
        )


# ---- the shard set --------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """The usable samples of a run's shards, with the one teacher set and clip layout they share, and the member
    digests their run's index records for them (where it does)."""

    urls: list[str]
    spans: list[list[SampleSpan]]
    heads: dict[str, int]
    layout: ClipLayout
    damaged: dict[str, str] = field(default_factory=dict)  # url -> what is wrong; complete samples are kept
    excluded: dict[str, str] = field(default_factory=dict)  # url -> why it was left out
    kinds: dict[str, str] = field(default_factory=dict)  # head -> posterior | embedding, for every head
    duplicates: dict[str, str] = field(default_factory=dict)  # url -> which of its samples another shard holds
    notes: list[str] = field(default_factory=list)  # what cannot be checked (no index, no digests)
    warnings: list[str] = field(default_factory=list)  # what was accepted though wrong (an unfinished run)
    digests: list[tuple[Digests | None, np.ndarray]] = field(default_factory=list)  # per shard: digests, rows

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(s) for s in self.spans])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.spans]

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def locate(self, index: int) -> tuple[str, SampleSpan]:
        shard = self.shard_of(index)
        return self.urls[shard], self.spans[shard][index - int(self.offsets[shard])]

    def recorded(self, index: int) -> dict[str, str] | None:
        """Member -> sha256 the run's index records for sample ``index``; None where it records none."""
        if not self.digests:
            return None
        shard = self.shard_of(index)
        digests, rows = self.digests[shard]
        row = int(rows[index - int(self.offsets[shard])])
        return digests.of(row) if digests is not None and row >= 0 else None


def scan_shards(
    urls: Sequence[str],
    *,
    heads: dict[str, int] | None = None,
    layout: ClipLayout | None = None,
    exclude_mismatched: bool = False,
    kinds: dict[str, str] | None = None,
    allow_unfinished: bool = False,
) -> ShardSet:
    """Index ``urls`` (paths or URLs) and check they share one teacher set (``heads`` and ``kinds`` if given, else
    the one all shards name) and one clip layout; raises ValueError naming the shards that disagree and the way out,
    and ``UnfinishedRun`` for shards of a run that was never finished (unless ``allow_unfinished``). A sample whose
    key an earlier shard holds too (a copied shard) is kept once."""
    ledgers, notes = read_ledgers(urls, allow_unfinished)
    found: dict[str, tuple[list[SampleSpan], dict[str, int], ClipLayout, dict[str, str]]] = {}
    damaged: dict[str, str] = {}
    with ThreadPoolExecutor(min(16, len(urls)) or 1) as pool:  # remote shards: many small requests at once
        indexes = list(pool.map(lambda url: _shard_index(url, ledgers), urls))
    for url, index in zip(urls, indexes):
        if index.damage is not None:
            damaged[url] = index.damage
        if index.samples:
            try:
                heads_found, layout_found, frames, duration_s, kinds_found = _header(index.first_meta)
            except ValueError as exn:
                damaged[url] = f"{exn}; the shard is skipped"
                continue
            try:
                check_frames(frames, duration_s, layout_found)
            except ValueError as exn:
                raise ValueError(f"{url}: its first sample's {exn}; {FIX}") from exn
            found[url] = (index.samples, heads_found, layout_found, kinds_found)
    if not found:
        raise ValueError(f"none of the {len(urls)} shard(s) holds a readable sample: {_named(damaged)}")
    sets = _group(found, lambda v: _teacher_set(v[1], v[3]))
    wanted = _teacher_set(heads, kinds or {}) if heads is not None else max(sets, key=lambda s: len(sets[s]))
    excluded = {
        url: f"teachers {_teachers(found[url][1], found[url][3])}"
        for s, us in sets.items()
        if s != wanted
        for url in us
    }
    if excluded and not exclude_mismatched:
        listing = "; ".join(f"{_teachers(*json.loads(s))} in {_named(us)}" for s, us in sets.items())
        raise ValueError(
            f"the shards do not share one teacher set: {listing}. Train on one set: pass only matching shards, "
            f"or --exclude-mismatched to leave out all but {_teachers(*json.loads(wanted))}"
        )
    kept = {url: v for url, v in found.items() if url not in excluded}
    if not kept:
        raise ValueError(
            f"no shard has the student's teachers {_teachers(heads or {}, kinds or {})}: {_named(excluded)}"
        )
    _check_one_layout(_group(kept, lambda v: v[2]), layout)
    spans, duplicates = _once_each({url: v[0] for url, v in kept.items()})
    digests, unrecorded = _recorded(spans, ledgers)
    first = next(iter(kept.values()))
    return ShardSet(
        urls=list(spans),
        spans=list(spans.values()),
        heads=first[1],
        layout=first[2],
        damaged=damaged,
        excluded=excluded,
        kinds=first[3],
        duplicates=duplicates,
        notes=notes,
        warnings=[ledger.warning for ledger in ledgers.values() if ledger.warning] + unrecorded,
        digests=digests,
    )


def _shard_index(url: str, ledgers: dict[str, Ledger]) -> ShardIndex:
    """A shard's index: from its run's recorded byte ranges for a URL (one read per shard instead of one per tar
    header), else from its tar headers."""
    ledger = ledgers.get(remote.parent(url))
    spans = ledger.spans_of(remote.name(url)) if ledger is not None and remote.is_url(url) else None
    return index_from_spans(url, [SampleSpan(*span) for span in spans]) if spans else scan_shard(url)


def _once_each(spans: dict[str, list[SampleSpan]]) -> tuple[dict[str, list[SampleSpan]], dict[str, str]]:
    """Each key once, in the first shard that holds it; shards left empty are dropped. Also says, per shard, which
    of its samples were dropped and where they are kept."""
    first: dict[str, str] = {}
    unique: dict[str, list[SampleSpan]] = {}
    duplicates: dict[str, str] = {}
    for url, shard_spans in spans.items():
        again = Counter(first[s.key] for s in shard_spans if s.key in first)
        kept = [s for s in shard_spans if s.key not in first]
        for s in kept:
            first[s.key] = url
        if again:
            where = ", ".join(f"{n} in {other}" for other, n in again.items())
            duplicates[url] = (
                f"{sum(again.values())} of its {len(shard_spans)} sample(s) have keys already in another shard "
                f"({where}): a copied shard? Each is trained once"
            )
        if kept:
            unique[url] = kept
    return unique, duplicates


def _recorded(
    spans: dict[str, list[SampleSpan]], ledgers: dict[str, Ledger]
) -> tuple[list[tuple[Digests | None, np.ndarray]], list[str]]:
    """Per shard, its run's digests and the row of each of its samples (-1: not in the index), and a warning for
    each shard whose samples the index lacks though it records digests."""
    digests: list[tuple[Digests | None, np.ndarray]] = []
    unrecorded: list[str] = []
    for url, shard_spans in spans.items():
        ledger = ledgers.get(remote.parent(url))
        if ledger is None or ledger.digests is None:
            digests.append((None, np.full(len(shard_spans), -1)))
            continue
        rows = np.array([ledger.rows.get(s.key, -1) for s in shard_spans], dtype=np.int64)
        digests.append((ledger.digests, rows))
        if (missing := int((rows < 0).sum())) > 0:
            unrecorded.append(
                f"{url}: {missing} of its {len(rows)} sample(s) are not in {ledger.origin} of {ledger.folder}: "
                "their digests cannot be checked"
            )
    return digests, unrecorded


def _check_one_layout(layouts: dict[ClipLayout, list[str]], wanted: ClipLayout | None) -> None:
    """Refuse shards made with different clip layouts (or another than ``wanted``), naming them."""
    if wanted is not None and set(layouts) != {wanted}:
        raise ValueError(
            f"clip layouts differ from the training shards' {_describe(wanted)}: "
            + "; ".join(f"{_describe(lay)} in {_named(us)}" for lay, us in layouts.items() if lay != wanted)
            + f"; {FIX}"
        )
    if len(layouts) > 1:
        raise ValueError(
            "the shards were made with different clip layouts: "
            + "; ".join(f"{_describe(lay)} in {_named(us)}" for lay, us in layouts.items())
            + f". Train on one layout: pass only matching shards, or {FIX}"
        )


def _header(meta_bytes: bytes | None) -> tuple[dict[str, int], ClipLayout, int, Any, dict[str, str]]:
    """The teachers with their widths, the clip layout, the frame count, the duration and the teachers' kinds a
    shard's first sample records."""
    try:
        meta = json.loads(meta_bytes) if meta_bytes is not None else None
        teachers = meta["teachers"]
        heads = {str(name): teacher_width(info) for name, info in teachers.items()}
        kinds = {str(name): teacher_kind(info) for name, info in teachers.items()}
        layout = ClipLayout.from_json(meta.get("layout"))
        frames = len(meta["frame_times_s"])
    except (TypeError, KeyError, AttributeError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exn:
        raise ValueError(f"its first sample has no readable teachers and layout in its json ({exn!r})") from exn
    if not heads:
        raise ValueError("its first sample names no teachers")
    return heads, layout, frames, meta.get("duration_s"), kinds


def _group(found: dict[str, Any], signature) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for url, value in found.items():
        groups.setdefault(signature(value), []).append(url)
    return groups


def _named(urls: Any, most: int = 5) -> str:
    urls = list(urls)
    more = f" and {len(urls) - most} more" if len(urls) > most else ""
    return f"{len(urls)} shard(s) " + ", ".join(urls[:most]) + more


def _teacher_set(heads: dict[str, int], kinds: dict[str, str]) -> str:
    """What shards must share: each teacher's width and kind (posterior where none is recorded)."""
    return json.dumps([heads, {n: kinds.get(n, POSTERIOR) for n in heads}], sort_keys=True)


def _teachers(heads: dict[str, int], kinds: dict[str, str] | None = None) -> str:
    named = [f"{n} {c}-d embedding" if (kinds or {}).get(n) == EMBEDDING else f"{n} {c}" for n, c in heads.items()]
    return "{" + ", ".join(named) + "}"


def _describe(layout: ClipLayout) -> str:
    return (
        f"{layout.frames_per_clip} frames x {layout.slot_seconds:g} s slots at {layout.sample_rate} Hz, "
        f"{layout.audio_dtype} / {layout.audio_scale:g}"
    )


def _logsumexp(rows: np.ndarray) -> np.ndarray:
    top = rows.max(axis=0)
    return top + np.log(np.exp(rows - top).sum(axis=0))


def _unit(row: np.ndarray) -> np.ndarray:
    return row / max(float(np.linalg.norm(row)), 1e-12)


# ---- reading clips ---------------------------------------------------------------------------------------------
class Clips(Dataset):
    """Training examples by index into a :class:`ShardSet`; item ``i`` also lists the broken samples met.

    With ``verify_digests`` each sample's members are checked against the sha256 its run's index records before
    it is used: a sample whose bytes changed after writing is broken like one that does not decode.
    """

    def __init__(self, shards: ShardSet, alignment: Alignment, verify_digests: bool = True) -> None:
        self.shards = shards
        self.alignment = alignment
        self.verify_digests = verify_digests

    def __len__(self) -> int:
        return len(self.shards)

    def example(self, index: int, raw: dict[str, Any] | Exception | None = None) -> dict[str, Any]:
        """Sample ``index`` (read now unless ``raw`` holds it or how reading it failed) as a training example;
        ValueError names the shard, the key and what is wrong when it is broken."""
        url, span = self.shards.locate(index)
        try:
            raw = read_raw(url, span) if raw is None else raw
            if isinstance(raw, Exception):
                raise raw
            recorded = self.shards.recorded(index) if self.verify_digests else None
            if recorded is not None and (problems := digest_problems(recorded, raw)):
                raise ValueError("; ".join(problems))
            return make_example(decode_sample(raw), self.shards.heads, self.alignment, self.shards.kinds)
        except (ValueError, OSError) as exn:
            raise ValueError(f"{url}:{span.key}: {exn}") from exn

    def __getitem__(self, index: int) -> dict[str, Any]:
        broken = []
        for offset in range(len(self)):
            try:
                return {**self.example((index + offset) % len(self)), "broken": broken}
            except ValueError as exn:
                broken.append(str(exn))
        raise ValueError(f"no usable sample in {_named(self.shards.urls)}: {broken[:3]}...")

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch, the same as item by item: samples lying back to back in a shard are fetched together, one
        ranged read per run of them, and reads at URLs are made at once; a broken one is replaced as
        :meth:`__getitem__` does."""
        raws = read_many([self.shards.locate(index) for index in indices])
        batch = []
        for index, raw in zip(indices, raws):
            try:
                batch.append({**self.example(index, raw), "broken": []})
            except ValueError:
                batch.append(self[index])
        return batch


READ_ORDERS = ("sample", "shard")


def pass_order(
    seed: int, pass_: int, sizes: Sequence[int], read_order: str = "sample", open_shards: int = 8, chunk: int = 1
) -> list[int]:
    """The order in which pass ``pass_`` visits the samples of shards holding ``sizes`` samples (indices into
    their concatenation): a function of its arguments alone.

    ``sample``: a seeded permutation of all samples (each sample is one ranged read). ``shard``: the shards in a
    seeded order, taken ``open_shards`` at a time; each group's samples in runs of ``chunk`` consecutive samples
    of one shard, the runs of the group in a seeded order (each run is one ranged read).
    """
    if read_order == "sample":
        return np.random.default_rng([seed, pass_]).permutation(sum(sizes)).tolist()
    if read_order != "shard":
        raise ValueError(f"read order must be one of {READ_ORDERS}, got {read_order!r}")
    rng = np.random.default_rng([seed, pass_, 1])
    starts = np.cumsum([0, *sizes]).tolist()
    shards = rng.permutation(len(sizes)).tolist()
    order: list[int] = []
    for first in range(0, len(shards), open_shards):
        runs = [
            (starts[s] + i, starts[s] + min(i + chunk, sizes[s]))
            for s in shards[first : first + open_shards]
            for i in range(0, sizes[s], chunk)
        ]
        for run in rng.permutation(len(runs)).tolist():
            order.extend(range(*runs[run]))
    return order


class StepBatches(Sampler[list[int]]):
    """The sample indices of this rank's batch for each step from ``start`` to ``steps``: a function of (seed, step).

    With ``read_order="shard"`` each pass takes the shards ``open_shards`` at a time and a rank's batch is read in
    about ``open_shards`` ranged reads of ``ceil(batch_size / open_shards)`` consecutive samples (:func:`pass_order`).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        start: int,
        steps: int,
        rank: int = 0,
        world_size: int = 1,
        read_order: str = "sample",
        open_shards: int = 8,
    ) -> None:
        self.sizes, self.size, self.batch_size, self.seed = list(sizes), sum(sizes), batch_size, seed
        self.start, self.steps, self.rank, self.world_size = start, steps, rank, world_size
        self.read_order, self.open_shards = read_order, open_shards
        self.chunk = -(-batch_size // open_shards)
        self._pass: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return (self.batch(step) for step in range(self.start, self.steps))

    def batch(self, step: int) -> list[int]:
        """Indices for 0-based ``step``: positions ``step x batch x ranks + rank x batch + i`` of the endless order."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return [self._order(p // self.size)[p % self.size] for p in range(first, first + self.batch_size)]

    def _order(self, pass_: int) -> list[int]:
        if self._pass is None or self._pass[0] != pass_:
            order = pass_order(self.seed, pass_, self.sizes, self.read_order, self.open_shards, self.chunk)
            self._pass = pass_, order
        return self._pass[1]


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation, with ``broken``: every broken sample met while reading the batch (a flat list)."""
    broken = [what for e in examples for what in e["broken"]]
    batch = default_collate([{k: v for k, v in e.items() if k != "broken"} for e in examples])
    return {**batch, "broken": broken}


def make_loader(
    clips: Clips,
    batch_size: int,
    *,
    seed: int,
    start: int,
    steps: int,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    read_order: str = "sample",
    open_shards: int = 8,
) -> DataLoader:
    """Batches for steps ``start + 1 .. steps``: ``{"key": [B], "audio": int16 [B, CLIP_SAMPLES],
    "targets": {head: float16 [B, steps, C]}, "broken": [str]}``, in ``read_order`` (:func:`pass_order`)."""
    sampler = StepBatches(
        clips.shards.sizes, batch_size, seed=seed, start=start, steps=steps, rank=rank, world_size=world_size,
        read_order=read_order, open_shards=open_shards,
    )  # fmt: skip
    return DataLoader(
        clips,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),  # worker seeds drawn here, not from the global RNG
    )


class HeldOut:
    """One in-order pass over held-out clips, every ``world_size``-th sample for this rank, in batches.

    ``skipped`` counts the broken samples this rank met in the last pass.
    """

    def __init__(self, clips: Clips, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.clips = clips
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self._logged: set[str] = set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        batch: list[dict[str, Any]] = []
        for index in range(self.rank, len(self.clips), self.world_size):
            try:
                batch.append(self.clips.example(index))
            except ValueError as exn:
                self.skipped += 1
                if str(exn) not in self._logged:
                    self._logged.add(str(exn))
                    log.warning("held-out sample skipped: %s", exn)
                continue
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
