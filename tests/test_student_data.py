"""The student's data stream on small synthetic shards: the short-clip rule, skipping broken samples, splitting."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from soundnet.shards.schema import SAMPLE_RATE, Sample, encode_sample
from soundnet.shards.writer import ShardWriter
from soundnet.student.data import (
    CLIP_SAMPLES,
    SLOT_SAMPLES,
    SLOTS,
    ClipStream,
    HeldOut,
    discover_heads,
    make_example,
    make_loader,
    tile_clip,
)
from tests.test_shards import log_softmax

HEADS = {"imagenet": 10, "places": 6}


def make_sample(key: str, frames: int = 4, seconds: float = 20.0, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    teachers = {n: {"arch": "net", "weights": "w.pt", "classes": c, "sha256": "0" * 64} for n, c in HEADS.items()}
    return Sample(
        key=key,
        audio=rng.integers(-3000, 3000, size=int(seconds * SAMPLE_RATE), dtype=np.int16),
        posteriors={name: log_softmax(rng, frames, c) for name, c in HEADS.items()},
        meta={
            "source": f"{key}.mp4",
            "duration_s": seconds,
            "frame_times_s": [2.5 + 5 * i for i in range(frames)],
            "teachers": teachers,
            "tool_version": "tests",
        },
    )


def write_shards(folder: Path, keys_per_shard: list[list[str]], seconds: float = 6.0) -> list[str]:
    """Valid shards of short clips (one frame each, so reading them is cheap)."""
    paths = []
    for i, keys in enumerate(keys_per_shard):
        path = folder / f"shard-{i:06d}.tar"
        with ShardWriter(path) as writer:
            for j, key in enumerate(keys):
                writer.write(make_sample(key, frames=1, seconds=seconds, seed=i * 100 + j))
        paths.append(str(path))
    return paths


# ---- the short-clip rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, seconds", [(1, 7.0), (2, 12.0), (3, 16.0), (4, 20.0), (4, 25.0)])
def test_short_clip_is_cut_to_k_slots_and_tiled(frames: int, seconds: float) -> None:
    audio = np.arange(int(seconds * SAMPLE_RATE)).astype(np.int16)  # wraps, but every sample stays traceable
    rows = {"imagenet": np.arange(frames * 3, dtype=np.float16).reshape(frames, 3)}
    tiled, tiled_rows = tile_clip(audio, rows)
    assert tiled.shape == (CLIP_SAMPLES,) and tiled.dtype == np.int16
    for slot in range(SLOTS):
        source = slot % frames  # slot t hears the audio of slot t mod k, and is trained on row t mod k
        got = tiled[slot * SLOT_SAMPLES : (slot + 1) * SLOT_SAMPLES]
        assert np.array_equal(got, audio[source * SLOT_SAMPLES : (source + 1) * SLOT_SAMPLES])
        assert np.array_equal(tiled_rows["imagenet"][slot], rows["imagenet"][source])


def test_three_frames_tile_as_a_b_c_a() -> None:
    rows = {"places": np.array([[1.0], [2.0], [3.0]], dtype=np.float16)}
    _, tiled = tile_clip(np.zeros(16 * SAMPLE_RATE, dtype=np.int16), rows)
    assert tiled["places"][:, 0].tolist() == [1.0, 2.0, 3.0, 1.0]


def test_clip_shorter_than_a_slot_is_tiled_whole() -> None:
    audio = np.arange(int(2.3 * SAMPLE_RATE)).astype(np.int16)
    tiled, rows = tile_clip(audio, {"imagenet": np.ones((1, 4), dtype=np.float16)})
    assert np.array_equal(tiled, np.resize(audio, CLIP_SAMPLES))
    assert rows["imagenet"].shape == (SLOTS, 4)


def test_example_holds_int16_audio_and_a_row_per_step() -> None:
    example = make_example(make_sample("a", frames=3, seconds=17.0), HEADS)
    assert example["key"] == "a"
    assert example["audio"].shape == (CLIP_SAMPLES,) and example["audio"].dtype == np.int16
    assert {n: t.shape for n, t in example["targets"].items()} == {n: (SLOTS, c) for n, c in HEADS.items()}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: s.posteriors.pop("places"), "no posteriors"),
        (lambda s: s.posteriors.update(places=s.posteriors["places"][:, :3]), "shape"),
        (lambda s: s.posteriors["imagenet"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda s: s.posteriors.update(places=s.posteriors["places"][:2]), "disagree"),
        (lambda s: setattr(s, "audio", s.audio.astype(np.float32)), "int16"),
    ],
)
def test_example_names_what_is_wrong(breakage, message: str) -> None:
    sample = make_sample("bad")
    breakage(sample)
    with pytest.raises(ValueError, match=message):
        make_example(sample, HEADS)


# ---- heads, skipping, splitting ------------------------------------------------------------------------------
def test_heads_come_from_the_data(tmp_path: Path) -> None:
    assert discover_heads(write_shards(tmp_path, [["a"]])) == HEADS


def write_shard_with_corrupt_sample(path: Path) -> None:
    """good, corrupt (its audio member is not an .npy array), good."""
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as tar:
        for key in ("good1", "corrupt", "good2"):
            raw = encode_sample(make_sample(key, frames=1, seconds=6.0))
            if key == "corrupt":
                raw["audio.npy"] = b"not an npy array"
            tar.write(raw)


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    path = tmp_path / "shard-000000.tar"
    write_shard_with_corrupt_sample(path)
    stream = iter(ClipStream([str(path)], HEADS, shuffle=0))
    first_pass = list(itertools.islice(stream, 2))
    assert [e["key"] for e in first_pass] == ["good1", "good2"]
    assert [e["skipped"] for e in first_pass] == [0, 1]  # counted with the next clip of the stream
    second_pass = list(itertools.islice(stream, 2))
    assert sum(e["skipped"] for e in second_pass) == 1  # counted again each pass
    assert sum("corrupt" in r.message and "not a readable .npy" in r.message for r in caplog.records) == 1


def test_skipped_count_reaches_the_batches(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    write_shard_with_corrupt_sample(path)
    loader = make_loader([str(path)], HEADS, batch_size=4, workers=1, shuffle=0)
    batch = next(iter(loader))  # good1 good2 | good1 good2: one skip per pass
    assert batch["audio"].shape == (4, CLIP_SAMPLES)
    assert {n: tuple(t.shape) for n, t in batch["targets"].items()} == {n: (4, SLOTS, c) for n, c in HEADS.items()}
    assert int(batch["skipped"].sum()) == 2


def test_damaged_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    good, whole = write_shards(tmp_path, [["a"], ["b", "c"]])
    data = Path(whole).read_bytes()
    Path(whole).write_bytes(data[: len(data) * 3 // 4])  # cut inside the last sample
    examples = list(itertools.islice(iter(ClipStream([good, whole], HEADS, shuffle=0)), 6))
    assert {e["key"] for e in examples} <= {"a", "b"} and "a" in {e["key"] for e in examples}
    assert sum(e["skipped"] for e in examples) >= 2  # one per pass over the damaged shard


def test_stream_of_only_broken_samples_fails_instead_of_spinning(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as tar:
        raw = encode_sample(make_sample("x", frames=1, seconds=6.0))
        tar.write({**raw, "audio.npy": b"junk"})
    with pytest.raises(ValueError, match="no usable sample"):
        next(iter(ClipStream([str(path)], HEADS, shuffle=0)))


def keys_of(stream: ClipStream, n: int) -> set[str]:
    return {e["key"] for e in itertools.islice(iter(stream), n)}


def test_ranks_read_disjoint_shards_when_there_are_enough(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a0", "a1"], ["b0", "b1"], ["c0", "c1"], ["d0", "d1"]])
    rank0 = keys_of(ClipStream(urls, HEADS, shuffle=0, rank=0, world_size=2), 12)
    rank1 = keys_of(ClipStream(urls, HEADS, shuffle=0, rank=1, world_size=2), 12)
    assert rank0 == {"a0", "a1", "c0", "c1"} and rank1 == {"b0", "b1", "d0", "d1"}


def test_workers_split_a_rank_s_shards(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a"], ["b"], ["c"], ["d"]])
    loader = make_loader(urls, HEADS, batch_size=4, workers=2, shuffle=0, rank=1, world_size=2)
    batches = list(itertools.islice(iter(loader), 2))  # one batch from each worker: slots 2 and 3 of 4
    assert sorted(set(batches[0]["key"]) | set(batches[1]["key"])) == ["c", "d"]
    assert all(len(set(b["key"])) == 1 for b in batches)


def test_every_rank_keeps_streaming_with_fewer_shards_than_ranks(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a", "b", "c"]])
    for rank in range(3):
        assert keys_of(ClipStream(urls, HEADS, shuffle=0, rank=rank, world_size=3), 10) == {"a", "b", "c"}


def test_shuffle_buffer_mixes_and_is_seeded(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [[f"k{i}" for i in range(8)]])

    def order(seed: int) -> list[str]:
        return [e["key"] for e in itertools.islice(iter(ClipStream(urls, HEADS, shuffle=8, seed=seed)), 16)]

    assert order(1) == order(1)
    assert order(1) != [f"k{i % 8}" for i in range(16)]
    assert order(1) != order(2)


def test_held_out_pass_splits_samples_over_ranks(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a", "b", "c"], ["d", "e"]])
    seen = []
    for rank in range(2):
        held_out = HeldOut(urls, HEADS, batch_size=2, rank=rank, world_size=2)
        seen += [key for batch in held_out for key in batch["key"]]
    assert sorted(seen) == ["a", "b", "c", "d", "e"]


def test_loader_batches_carry_int16_audio(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [["a", "b"]], seconds=3.0)
    batch = next(iter(make_loader(urls, HEADS, batch_size=3, workers=0, shuffle=4)))
    assert batch["audio"].dtype == torch.int16 and tuple(batch["audio"].shape) == (3, CLIP_SAMPLES)
