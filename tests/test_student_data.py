"""The student's data on written shards: the clip layout, one teacher set, damaged shards, the step-exact order."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from soundnet.shards.contract import DEFAULT_LAYOUT, SAMPLE_RATE, ClipLayout
from soundnet.shards.reader import DamagedShard, iter_samples, scan_shard
from soundnet.shards.schema import Sample, encode_sample
from soundnet.shards.writer import ShardWriter
from soundnet.student.data import (
    CLIP_SAMPLES,
    Alignment,
    Clips,
    HeldOut,
    StepBatches,
    align,
    make_example,
    make_loader,
    scan_shards,
    tile_clip,
)
from tests.conftest import shared_path
from tests.test_shards import log_softmax, unit_rows

HEADS = {"imagenet": 10, "places": 6}
STEPS = 4
STEP_SAMPLES = CLIP_SAMPLES // STEPS
PAPER = Alignment(DEFAULT_LAYOUT, STEPS, STEP_SAMPLES)


@functools.cache
def real_audio() -> np.ndarray:
    """30 s of a real video's sound track, decoded as ingest decodes it (int16, mono, 22050 Hz)."""
    from soundnet.audio import read_audio

    return read_audio(shared_path("videos", "moviepy_big_buck_bunny_0_30.webm")).samples


def make_sample(
    key: str,
    frames: int = 4,
    seconds: float = 20.0,
    seed: int = 0,
    heads: dict[str, int] = HEADS,
    layout: ClipLayout | None = None,
    embeddings: tuple[str, ...] = (),
) -> Sample:
    """A sample of real audio (from ``seed`` s on) with random teacher rows (unit rows for the heads named in
    ``embeddings``); ``layout`` recorded when given."""
    rng = np.random.default_rng(seed)
    teachers = {n: {"arch": "net", "weights": "w.pt", "classes": c, "sha256": "0" * 64} for n, c in heads.items()}
    for name in embeddings:
        teachers[name] |= {"kind": "embedding", "dim": teachers[name].pop("classes")}
    slot = (layout or DEFAULT_LAYOUT).slot_seconds
    meta = {
        "source": f"{key}.mp4",
        "duration_s": seconds,
        "frame_times_s": [slot / 2 + slot * i for i in range(frames)],
        "teachers": teachers,
        "tool_version": "tests",
    }
    if layout is not None:
        meta["layout"] = layout.to_json()
    audio = np.resize(np.roll(real_audio(), -seed * SAMPLE_RATE), int(seconds * SAMPLE_RATE))
    rows = {name: (unit_rows if name in embeddings else log_softmax)(rng, frames, c) for name, c in heads.items()}
    return Sample(key, audio, rows, meta)


def write_shards(folder: Path, keys_per_shard: list[list[str]], seconds: float = 6.0, **options) -> list[str]:
    """Valid shards of short clips (6 s: one frame each in the paper's layout, so reading them is cheap), with
    the frames ingest takes from a clip of ``seconds`` under the ``layout`` option."""
    layout = options.get("layout") or DEFAULT_LAYOUT
    frames = max(1, min(layout.frames_per_clip, int(seconds // layout.slot_seconds)))
    paths = []
    for i, keys in enumerate(keys_per_shard):
        path = folder / f"shard-{i:06d}.tar"
        with ShardWriter(path) as writer:
            for j, key in enumerate(keys):
                writer.write(make_sample(key, frames=frames, seconds=seconds, seed=i * 3 + j, **options))
        paths.append(str(path))
    return paths


def clips_of(urls: list[str], **options) -> Clips:
    return Clips(scan_shards(urls, **options), PAPER)


# ---- the short-clip rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, seconds", [(1, 7.0), (2, 12.0), (3, 16.0), (4, 20.0), (4, 25.0)])
def test_short_clip_is_cut_to_k_slots_and_tiled(frames: int, seconds: float) -> None:
    audio = np.arange(int(seconds * SAMPLE_RATE)).astype(np.int16)  # wraps, but every sample stays traceable
    rows = {"imagenet": np.arange(frames * 3, dtype=np.float16).reshape(frames, 3)}
    tiled, tiled_rows = tile_clip(audio, rows, STEPS, STEP_SAMPLES)
    assert tiled.shape == (CLIP_SAMPLES,) and tiled.dtype == np.int16
    for slot in range(STEPS):
        source = slot % frames  # slot t hears the audio of slot t mod k, and is trained on row t mod k
        got = tiled[slot * STEP_SAMPLES : (slot + 1) * STEP_SAMPLES]
        assert np.array_equal(got, audio[source * STEP_SAMPLES : (source + 1) * STEP_SAMPLES])
        assert np.array_equal(tiled_rows["imagenet"][slot], rows["imagenet"][source])


def test_three_frames_tile_as_a_b_c_a() -> None:
    rows = {"places": np.array([[1.0], [2.0], [3.0]], dtype=np.float16)}
    _, tiled = tile_clip(np.zeros(16 * SAMPLE_RATE, dtype=np.int16), rows, STEPS, STEP_SAMPLES)
    assert tiled["places"][:, 0].tolist() == [1.0, 2.0, 3.0, 1.0]


def test_clip_shorter_than_a_slot_is_tiled_whole() -> None:
    audio = np.arange(int(2.3 * SAMPLE_RATE)).astype(np.int16)
    tiled, rows = tile_clip(audio, {"imagenet": np.ones((1, 4), dtype=np.float16)}, STEPS, STEP_SAMPLES)
    assert np.array_equal(tiled, np.resize(audio, CLIP_SAMPLES))
    assert rows["imagenet"].shape == (STEPS, 4)


def test_example_holds_int16_audio_and_a_row_per_step() -> None:
    sample = make_sample("a", frames=3, seconds=17.0)
    example = make_example(sample, HEADS, PAPER)
    assert example["key"] == "a"
    assert example["audio"].shape == (CLIP_SAMPLES,) and example["audio"].dtype == np.int16
    assert {n: t.shape for n, t in example["targets"].items()} == {n: (STEPS, c) for n, c in HEADS.items()}
    assert np.array_equal(example["targets"]["places"][3], sample.posteriors["places"][0])  # a, b, c, a


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: s.posteriors.pop("places"), "no posteriors"),
        (lambda s: s.posteriors.update(places=s.posteriors["places"][:, :3]), "shape"),
        (lambda s: s.posteriors["imagenet"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda s: s.posteriors.update(places=s.posteriors["places"][:2]), "disagree"),
        (lambda s: setattr(s, "audio", s.audio.astype(np.float32)), "int16"),
        (lambda s: s.meta.update(layout=ClipLayout(slot_seconds=2.5, frames_per_clip=8).to_json()), "layout"),
    ],
)
def test_example_names_what_is_wrong(breakage, message: str) -> None:
    sample = make_sample("bad")
    breakage(sample)
    with pytest.raises(ValueError, match=message):
        make_example(sample, HEADS, PAPER)


# ---- the clip layout -----------------------------------------------------------------------------------------
def test_half_step_slots_pool_two_frames_per_step_as_mean_probabilities() -> None:
    layout = ClipLayout(slot_seconds=2.5, frames_per_clip=8)
    alignment = align(layout, STEPS, STEP_SAMPLES, SAMPLE_RATE, "x.tar")
    assert (alignment.pool, alignment.repeat) == (2, 1)
    sample = make_sample("a", frames=8, seconds=20.0, layout=layout)
    example = make_example(sample, HEADS, alignment)
    assert np.array_equal(example["audio"], sample.audio)  # 20 s: all of it, untiled
    for name in HEADS:
        p = np.exp(sample.posteriors[name].astype(np.float64))
        mean = (p[0::2] + p[1::2]) / 2  # step t hears slots 2t and 2t+1: the mean of their distributions
        got = example["targets"][name].astype(np.float64)
        assert got.shape == (STEPS, HEADS[name])
        assert np.allclose(got, np.log(mean), atol=2e-3)
        assert np.allclose(np.exp(got).sum(axis=1), 1, atol=5e-3)


def test_half_step_slots_of_a_short_clip_pool_whole_steps_then_tile() -> None:
    layout = ClipLayout(slot_seconds=2.5, frames_per_clip=8)
    alignment = align(layout, STEPS, STEP_SAMPLES, SAMPLE_RATE, "x.tar")
    sample = make_sample("a", frames=5, seconds=13.0, layout=layout)  # two whole steps and a half
    example = make_example(sample, HEADS, alignment)
    rows = example["targets"]["imagenet"]
    assert np.array_equal(rows[2], rows[0]) and np.array_equal(rows[3], rows[1])
    assert np.array_equal(example["audio"], np.resize(sample.audio[: 2 * STEP_SAMPLES], CLIP_SAMPLES))


def test_slots_of_two_steps_repeat_each_frame_for_the_steps_it_covers() -> None:
    layout = ClipLayout(slot_seconds=10.0, frames_per_clip=4)
    alignment = align(layout, STEPS, STEP_SAMPLES, SAMPLE_RATE, "x.tar")
    assert (alignment.pool, alignment.repeat) == (1, 2)
    sample = make_sample("a", frames=3, seconds=30.0, layout=layout)
    example = make_example(sample, HEADS, alignment)
    rows, frames = example["targets"]["places"], sample.posteriors["places"]
    assert [np.array_equal(rows[t], frames[t // 2]) for t in range(STEPS)] == [True] * STEPS
    assert np.array_equal(example["audio"], sample.audio[:CLIP_SAMPLES])


def test_embedding_rows_pool_as_the_renormalised_mean_direction_and_repeat_as_they_are() -> None:
    kinds = {"imagenet": "posterior", "places": "embedding"}
    half = align(ClipLayout(slot_seconds=2.5, frames_per_clip=8), STEPS, STEP_SAMPLES, SAMPLE_RATE, "x.tar")
    sample = make_sample("a", frames=8, seconds=20.0, layout=half.layout, embeddings=("places",))
    rows, frames = make_example(sample, HEADS, half, kinds)["targets"]["places"], sample.posteriors["places"]
    mean = frames[0::2].astype(np.float64) + frames[1::2]  # step t: the mean direction of slots 2t and 2t+1
    assert np.allclose(rows, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=2e-3)
    assert rows.dtype == np.float16 and np.allclose(np.linalg.norm(rows.astype(np.float64), axis=1), 1, atol=2e-3)

    double = align(ClipLayout(slot_seconds=10.0, frames_per_clip=4), STEPS, STEP_SAMPLES, SAMPLE_RATE, "x.tar")
    sample = make_sample("b", frames=3, seconds=30.0, layout=double.layout, embeddings=("places",))
    rows, frames = make_example(sample, HEADS, double, kinds)["targets"]["places"], sample.posteriors["places"]
    assert [np.array_equal(rows[t], frames[t // 2]) for t in range(STEPS)] == [True] * STEPS


def test_an_embedding_teacher_is_a_head_of_its_kind_and_the_kind_is_part_of_the_teacher_set(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    good = write_shards(tmp_path / "a", [["a", "b"]], embeddings=("places",))
    found = scan_shards(good)
    assert found.heads == HEADS and found.kinds == {"imagenet": "posterior", "places": "embedding"}
    batch = next(iter(make_loader(Clips(found, PAPER), 2, seed=0, start=0, steps=1, workers=0)))
    rows = batch["targets"]["places"]
    assert rows.dtype == torch.float16 and torch.allclose(rows.float().norm(dim=2), torch.ones(2, STEPS), atol=2e-3)
    as_posteriors = write_shards(tmp_path / "b", [["c"]])  # the same names and widths, other kinds
    with pytest.raises(ValueError, match=r"do not share one teacher set: \{imagenet 10, places 6-d embedding\}"):
        scan_shards(good + as_posteriors)
    with pytest.raises(ValueError, match="do not share one teacher set"):
        scan_shards(as_posteriors, heads=found.heads, kinds=found.kinds)  # held-out shards: the same kinds too


@pytest.mark.parametrize(
    "layout",
    [ClipLayout(slot_seconds=3.0), ClipLayout(sample_rate=16000), ClipLayout(audio_scale=1.0)],
)
def test_layouts_that_do_not_fit_the_steps_are_refused_with_the_fix(layout: ClipLayout) -> None:
    with pytest.raises(ValueError) as refused:
        align(layout, STEPS, STEP_SAMPLES, SAMPLE_RATE, "runs/x/shard-000003.tar")
    message = str(refused.value)
    assert "runs/x/shard-000003.tar" in message  # the shard
    assert f"{layout.slot_seconds:g} s slots at {layout.sample_rate} Hz" in message  # what was found
    assert "5 s slots at 22050 Hz" in message  # what is expected
    assert "ingest run --frame-interval 5 --max-frames 4" in message  # the fix


def test_shards_made_with_another_layout_than_they_record_are_refused(tmp_path: Path) -> None:
    """Shards from before layouts were recorded read as the paper's; 8 frames for 20 s cannot be that."""
    path = tmp_path / "shard-000000.tar"
    with ShardWriter(path) as writer:
        writer.write(make_sample("a", frames=8, seconds=20.0))  # --frame-interval 2.5, no layout recorded
    with pytest.raises(ValueError, match="8 frame.*20 s.*4 frames x 5 s slots") as refused:
        scan_shards([str(path)])
    assert str(path) in str(refused.value) and "ingest run --frame-interval 5 --max-frames 4" in str(refused.value)
    with pytest.raises(ValueError, match="2 frame.*20 s"):  # --frame-interval 10, no layout recorded
        make_example(make_sample("b", frames=2, seconds=20.0), HEADS, PAPER)


def test_shards_made_with_different_layouts_are_refused_naming_them(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    paper = write_shards(tmp_path / "a", [["a"]])
    halves = write_shards(tmp_path / "b", [["b"]], layout=ClipLayout(slot_seconds=2.5, frames_per_clip=8))
    assert scan_shards(halves).layout.slot_seconds == 2.5
    with pytest.raises(ValueError, match="different clip layouts") as refused:
        scan_shards(paper + halves)
    assert paper[0] in str(refused.value) and halves[0] in str(refused.value)


# ---- one teacher set ---------------------------------------------------------------------------------------
def test_heads_come_from_every_shard_and_disagreement_is_refused_naming_the_shards(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    good = write_shards(tmp_path / "a", [["a"], ["b"]])
    other = write_shards(tmp_path / "b", [["c"]], heads={"imagenet": 10, "places": 1000})
    assert scan_shards(good).heads == HEADS
    for urls in (other + good, good + other):  # not whichever sorts first
        with pytest.raises(ValueError, match="do not share one teacher set") as refused:
            scan_shards(urls)
        message = str(refused.value)
        assert other[0] in message and good[0] in message and "--exclude-mismatched" in message
        kept = scan_shards(urls, exclude_mismatched=True)
        assert kept.heads == HEADS and sorted(kept.urls) == good and list(kept.excluded) == other
        assert len(kept) == 2
    with pytest.raises(ValueError, match="do not share one teacher set"):
        scan_shards(other, heads=HEADS)  # held-out shards must match the training heads


# ---- damage ------------------------------------------------------------------------------------------------
def write_shard_with_corrupt_sample(path: Path) -> None:
    """good1, corrupt (its audio member is not an .npy array), good2."""
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as tar:
        for key in ("good1", "corrupt", "good2"):
            raw = encode_sample(make_sample(key, frames=1, seconds=6.0))
            if key == "corrupt":
                raw["audio.npy"] = b"not an npy array"
            tar.write(raw)


def cut_mid_member(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) * 3 // 4])  # inside the last sample's audio


def test_a_cut_shard_keeps_the_samples_before_the_cut_for_tools_and_the_student(tmp_path: Path) -> None:
    (path,) = write_shards(tmp_path, [["a", "b", "c"]])
    cut_mid_member(path)
    index = scan_shard(path)
    assert [s.key for s in index.samples] == ["a", "b"] and "cut inside member c." in index.damage
    reader = iter_samples(path)
    assert [next(reader).key, next(reader).key] == ["a", "b"]
    with pytest.raises(DamagedShard, match="shard-000000.tar: damaged shard"):
        next(reader)
    shards = scan_shards([path])
    assert len(shards) == 2 and list(shards.damaged) == [path]


def test_a_file_that_is_not_a_tar_is_noted_and_left_out(tmp_path: Path) -> None:
    good = write_shards(tmp_path, [["a"]])
    junk = tmp_path / "shard-000009.tar"
    junk.write_bytes(b"<html>not a shard</html>" * 100)
    shards = scan_shards([*good, str(junk)])
    assert shards.urls == good and "not a readable tar" in shards.damaged[str(junk)]
    with pytest.raises(ValueError, match="none of the 1 shard"):
        scan_shards([str(junk)])


def test_a_broken_sample_is_replaced_by_the_next_and_reported_with_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    write_shard_with_corrupt_sample(path)
    clips = clips_of([str(path)])
    assert len(clips) == 3
    item = clips[1]
    assert item["key"] == "good2" and len(item["broken"]) == 1
    assert "corrupt" in item["broken"][0] and "not a readable .npy" in item["broken"][0]
    assert clips[0]["broken"] == []


def test_damaged_shards_read_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a", "b"], ["c", "d", "e"]])
    cut_mid_member(urls[1])
    (tmp_path / "shard-000002.tar").write_bytes(b"\0\1junk" * 1000)
    write_shard_with_corrupt_sample(tmp_path / "shard-000003.tar")
    clips = clips_of([*urls, str(tmp_path / "shard-000002.tar"), str(tmp_path / "shard-000003.tar")])
    assert len(clips) == 2 + 2 + 3

    def keys(workers: int) -> list[list[str]]:
        loader = make_loader(clips, 3, seed=1, start=0, steps=5, workers=workers)
        return [list(batch["key"]) for batch in loader]

    alone = keys(0)
    assert len(alone) == 5 and all(len(k) == 3 for k in alone)
    assert keys(2) == alone


# ---- the order: a function of (seed, step) -------------------------------------------------------------------
def test_each_step_s_batch_is_a_function_of_seed_and_step() -> None:
    whole = list(StepBatches([10], 3, seed=7, start=0, steps=8))
    assert list(StepBatches([10], 3, seed=7, start=5, steps=8)) == whole[5:]  # a resumed run reads the same
    assert list(StepBatches([10], 3, seed=8, start=0, steps=8)) != whole
    flat = [i for batch in whole for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # passes
    assert flat[:10] != list(range(10))  # shuffled


def test_ranks_take_disjoint_parts_of_each_step_s_global_batch() -> None:
    ranks = [list(StepBatches([12], 2, seed=0, start=0, steps=3, rank=r, world_size=3)) for r in range(3)]
    for step in range(3):
        assert sorted(i for r in ranks for i in r[step]) == sorted(
            list(StepBatches([12], 6, seed=0, start=0, steps=3))[step]
        )
    assert sorted(i for r in ranks for b in r[:2] for i in b) == list(range(12))


def test_held_out_pass_splits_samples_over_ranks(tmp_path: Path) -> None:
    clips = clips_of(write_shards(tmp_path, [["a", "b", "c"], ["d", "e"]]))
    seen = []
    for rank in range(2):
        held_out = HeldOut(clips, batch_size=2, rank=rank, world_size=2)
        seen += [key for batch in held_out for key in batch["key"]]
    assert sorted(seen) == ["a", "b", "c", "d", "e"]


def test_loader_batches_carry_int16_audio_and_float16_rows(tmp_path: Path) -> None:
    clips = clips_of(write_shards(tmp_path, [["a", "b"]], seconds=3.0))
    batch = next(iter(make_loader(clips, 3, seed=0, start=0, steps=1, workers=0)))
    assert batch["audio"].dtype == torch.int16 and tuple(batch["audio"].shape) == (3, CLIP_SAMPLES)
    assert {n: (t.dtype, tuple(t.shape)) for n, t in batch["targets"].items()} == {
        n: (torch.float16, (3, STEPS, c)) for n, c in HEADS.items()
    }
    assert batch["broken"] == [] and len(list(itertools.chain(batch["key"]))) == 3
