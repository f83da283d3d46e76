"""The shard format end to end: real tars, real parquet, real CLI, on small arrays built here."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from soundnet.shards.cli import main
from soundnet.shards.ledger import RunLayout, merge_parts, read_table, write_table
from soundnet.shards.reader import expand_shards, iter_samples, tar_samples
from soundnet.shards.schema import (
    SAMPLE_RATE,
    Sample,
    decode_sample,
    encode_sample,
    make_key,
    validate_sample,
)
from soundnet.shards.writer import ShardWriter

CLASSES = {"imagenet": 1000, "places": 365}


def log_softmax(rng: np.random.Generator, frames: int, classes: int) -> np.ndarray:
    logits = rng.normal(scale=3.0, size=(frames, classes))
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float16)


def make_sample(source: str, seed: int = 0, frames: int = 4, seconds: float = 1.0) -> Sample:
    rng = np.random.default_rng(seed)
    teachers = {
        name: {"arch": f"{name}-net", "weights": f"{name}.pt", "classes": c, "sha256": f"{seed:064x}"}
        for name, c in CLASSES.items()
    }
    return Sample(
        key=make_key(source),
        audio=(rng.normal(scale=3000, size=int(seconds * SAMPLE_RATE))).astype(np.int16),
        posteriors={name: log_softmax(rng, frames, c) for name, c in CLASSES.items()},
        meta={
            "source": source,
            "duration_s": 20.0,
            "frame_times_s": [2.5 + 5 * i for i in range(frames)],
            "teachers": teachers,
            "tool_version": "0.1.0",
            "original": {"rate": 44100, "channels": 2, "codec": "aac"},
        },
    )


def assert_same(a: Sample, b: Sample) -> None:
    assert a.key == b.key
    assert a.audio.dtype == b.audio.dtype and np.array_equal(a.audio, b.audio)
    assert sorted(a.posteriors) == sorted(b.posteriors)
    for name in a.posteriors:
        assert a.posteriors[name].dtype == b.posteriors[name].dtype
        assert a.posteriors[name].tobytes() == b.posteriors[name].tobytes()
    assert a.meta == b.meta


def failure_row(source: str, reason: str = "no_audio") -> dict[str, str]:
    return {
        "source": source,
        "stage": "audio",
        "reason": reason,
        "message": "no audio stream",
        "error_class": "NoAudio",
    }


def make_run(out: Path, tasks: int = 2, per_task: int = 3) -> tuple[RunLayout, list[Sample]]:
    """A finalized run directory as the ingest engine leaves it, with one failure per task."""
    layout = RunLayout(out)
    samples = []
    for task in range(tasks):
        with ShardWriter(layout.shard_path(task)) as writer:
            for i in range(per_task):
                sample = make_sample(f"/videos/t{task}/clip{i}.mp4", seed=10 * task + i)
                writer.write(sample)
                samples.append(sample)
        layout.write_parts(task, writer.index_rows, [failure_row(f"/videos/t{task}/broken.mkv")])
    layout.finalize()
    return layout, samples


# --- keys -------------------------------------------------------------------------------------------------


def test_make_key_is_stable_readable_and_unique() -> None:
    key = make_key("/data/My Videos/clip.final.mp4")
    assert key == make_key("/data/My Videos/clip.final.mp4")
    assert key.startswith("clip_final-") and len(key.split("-")[-1]) == 10
    assert make_key("/a/clip.mp4") != make_key("/b/clip.mp4")
    for source in [
        "/x/ünïcode vidéo (1).webm",
        "https://host/v?id=3&t=.mp4",
        "/x/.hidden",
        "...",
        "C:\\v\\a.avi",
    ]:
        key = make_key(source)
        assert validate_sample(make_sample(source)) == []
        assert "." not in key and 11 <= len(key) <= 64, key
    assert make_key("/x/...").startswith("clip-")
    assert make_key("/x/" + "v" * 300 + ".mp4").startswith("v" * 53 + "-")


def test_make_key_explicit_id() -> None:
    assert make_key("/a.mp4", " yt_dQw4w9WgXcQ ") == "yt_dQw4w9WgXcQ"
    for bad in ["a.b", "a/b", "", "x" * 65, "a b"]:
        with pytest.raises(ValueError, match="not a valid key"):
            make_key("/a.mp4", bad)


# --- validation -------------------------------------------------------------------------------------------


def _set(path: str, value: object) -> Callable[[Sample], None]:
    def mutate(sample: Sample) -> None:
        *parents, last = path.split("/")
        target: object = sample
        for part in parents:
            target = target[part] if isinstance(target, dict) else getattr(target, part)
        if isinstance(target, dict):
            target[last] = value
        else:
            setattr(target, last, value)

    return mutate


def _del(path: str) -> Callable[[Sample], None]:
    def mutate(sample: Sample) -> None:
        *parents, last = path.split("/")
        target: dict = sample.meta
        for part in parents[1:]:
            target = target[part]
        del target[last]

    return mutate


def _posterior(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Sample], None]:
    def mutate(sample: Sample) -> None:
        sample.posteriors[name] = fn(sample.posteriors[name])

    return mutate


INVALID = {
    "key with dot": (_set("key", "a.b"), "key 'a.b'"),
    "empty key": (_set("key", ""), "key ''"),
    "float audio": (lambda s: setattr(s, "audio", s.audio.astype(np.float32)), "audio dtype is float32"),
    "stereo audio": (lambda s: setattr(s, "audio", np.stack([s.audio, s.audio])), "audio shape"),
    "empty audio": (_set("audio", np.zeros(0, np.int16)), "audio shape"),
    "audio list": (_set("audio", [1, 2]), "audio is list"),
    "no teachers": (_set("posteriors", {}), "posteriors must be a non-empty dict"),
    "float32 posteriors": (_posterior("places", lambda a: a.astype(np.float32)), "dtype is float32"),
    "1-D posteriors": (_posterior("places", lambda a: a[0]), "shape is (365,)"),
    "zero frames": (_posterior("places", lambda a: a[:0]), "shape is (0, 365)"),
    "probabilities": (
        _posterior("places", lambda a: np.exp(a.astype(np.float32)).astype(np.float16)),
        "logsumexp",
    ),
    "logits": (_posterior("places", lambda a: (a + np.float16(3)).astype(np.float16)), "logsumexp"),
    "nan": (_posterior("places", lambda a: np.where(a == a.max(), np.float16(np.nan), a)), "non-finite"),
    "-inf": (_posterior("places", lambda a: np.where(a == a.min(), np.float16(-np.inf), a)), "non-finite"),
    "frames disagree": (_posterior("places", lambda a: a[:3]), "disagree on the number of frames"),
    "frame_times length": (_set("meta/frame_times_s", [2.5, 7.5]), "len(frame_times_s) is 2"),
    "frame_times not numbers": (_set("meta/frame_times_s", ["a"] * 4), "'frame_times_s' must be a list"),
    "classes mismatch": (_set("meta/teachers/places/classes", 401), "meta says 401 classes"),
    "classes not int": (_set("meta/teachers/places/classes", "365"), "['classes'] must be a class count"),
    "bad sha256": (_set("meta/teachers/places/sha256", "abc"), "64 lower-case hex"),
    "teacher meta missing": (_del("meta/teachers/places"), "do not match posterior members"),
    "teacher name upper case": (
        lambda s: s.posteriors.update(Places=s.posteriors.pop("places")),
        "teacher name 'Places'",
    ),
    "teacher named audio": (lambda s: s.posteriors.update(audio=s.posteriors["places"]), "not be 'audio'"),
    "no source": (_del("meta/source"), "meta lacks 'source'"),
    "no duration": (_del("meta/duration_s"), "meta lacks 'duration_s'"),
    "negative duration": (_set("meta/duration_s", -1.0), "'duration_s' must be a positive"),
    "no frame_times": (_del("meta/frame_times_s"), "meta lacks 'frame_times_s'"),
    "no teachers meta": (_del("meta/teachers"), "meta lacks 'teachers'"),
    "no tool_version": (_del("meta/tool_version"), "meta lacks 'tool_version'"),
    "teacher lacks arch": (_del("meta/teachers/imagenet/arch"), "lacks 'arch'"),
    "meta not dict": (_set("meta", []), "meta is list"),
}


def test_valid_sample_has_no_problems() -> None:
    assert validate_sample(make_sample("/v/a.mp4")) == []


@pytest.mark.parametrize("case", sorted(INVALID))
def test_validate_catches(case: str) -> None:
    mutate, expected = INVALID[case]
    sample = make_sample("/v/a.mp4")
    mutate(sample)
    problems = validate_sample(sample)
    assert any(expected in p for p in problems), problems


# --- encode / decode --------------------------------------------------------------------------------------


def test_encode_decode_round_trip_and_ignores_unknown_members() -> None:
    sample = make_sample("/v/a.mp4")
    raw = encode_sample(sample)
    assert sorted(raw) == ["__key__", "audio.npy", "imagenet.npy", "json", "places.npy"]
    raw.update({"__url__": "x.tar", "caption.txt": b"ignored by older readers"})
    assert_same(decode_sample(raw), sample)


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("audio.npy", b"\x93NUMPY garbage", "member 'audio.npy' is not a readable .npy"),
        ("places.npy", b"", "member 'places.npy' is not a readable .npy"),
        ("json", b"{not json", "member 'json' is not valid UTF-8 JSON"),
        ("json", b"\xff\xfe\xfa", "member 'json' is not valid"),
        ("json", b"[1, 2]", "expected an object"),
        ("audio.npy", None, "lacks member 'audio.npy'"),
        ("json", None, "lacks member 'json'"),
    ],
)
def test_decode_broken_member_is_clear_error(member: str, value: bytes | None, expected: str) -> None:
    raw = encode_sample(make_sample("/v/a.mp4"))
    if value is None:
        del raw[member]
    else:
        raw[member] = value
    with pytest.raises(ValueError, match=expected) as info:
        decode_sample(raw)
    assert raw["__key__"] in str(info.value)


def test_decode_refuses_pickled_arrays() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    raw = encode_sample(make_sample("/v/a.mp4"))
    raw["audio.npy"] = buf.getvalue()
    with pytest.raises(ValueError, match="audio.npy"):
        decode_sample(raw)


# --- writer and reader ------------------------------------------------------------------------------------


def test_shard_round_trip_is_bit_identical(tmp_path: Path) -> None:
    samples = [make_sample(f"/v/clip{i}.mp4", seed=i, frames=1 + i % 4, seconds=0.5 + i) for i in range(4)]
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        for sample in samples:
            writer.write(sample)
    assert writer.count == 4
    assert writer.audio_seconds == pytest.approx(sum(s.audio_seconds for s in samples))
    assert 0 < writer.bytes <= (tmp_path / "shard-000000.tar").stat().st_size
    assert [r["key"] for r in writer.index_rows] == [s.key for s in samples]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
        written = {  # the digest of each member's bytes as they lie in the tar, computed here independently
            name.split(".", 1)[1]: hashlib.sha256(tar.extractfile(name).read()).hexdigest()
            for name in names
            if name.startswith(samples[1].key + ".")
        }
    assert f"{samples[0].key}.audio.npy" in names and f"{samples[0].key}.places.npy" in names
    assert sorted(written) == ["audio.npy", "imagenet.npy", "json", "places.npy"]
    assert writer.index_rows[1] == {
        "key": samples[1].key,
        "shard": "shard-000000.tar",
        "source": "/v/clip1.mp4",
        "duration_s": 20.0,
        "frames": 2,
        "audio_seconds": 1.5,
        "sha256": written,
    }

    read = list(iter_samples(tmp_path / "shard-000000.tar"))
    assert len(read) == len(samples)
    for got, want in zip(read, samples, strict=True):
        assert_same(got, want)
        assert validate_sample(got) == []
    raw = next(iter(iter_samples(tmp_path / "shard-000000.tar", decode=False)))
    assert raw["__key__"] == samples[0].key and isinstance(raw["audio.npy"], bytes)


def test_reader_patterns(tmp_path: Path) -> None:
    for task in range(3):
        with ShardWriter(tmp_path / f"shard-{task:06d}.tar") as writer:
            writer.write(make_sample(f"/v/{task}.mp4", seed=task))
    (tmp_path / ".shard-000003.tar.abc.tmp").write_bytes(b"partial")
    every = [str(tmp_path / f"shard-{t:06d}.tar") for t in range(3)]
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == every
    assert expand_shards(str(tmp_path / "*.tar")) == every
    assert expand_shards(tmp_path) == every
    assert expand_shards([every[2], tmp_path / "shard-00000[01].tar", every[2]]) == [every[2], *every[:2]]
    keys = [s.key for s in iter_samples(str(tmp_path / "shard-{000001..000002}.tar"))]
    assert keys == [make_key("/v/1.mp4"), make_key("/v/2.mp4")]
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        iter_samples(str(tmp_path / "shard-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_writer_rejects_invalid_and_duplicate_samples(tmp_path: Path) -> None:
    sample = make_sample("/v/a.mp4")
    bad = make_sample("/v/b.mp4")
    bad.audio = bad.audio.astype(np.float32)
    with ShardWriter(tmp_path / "s.tar") as writer:
        writer.write(sample)
        with pytest.raises(ValueError, match="audio dtype is float32"):
            writer.write(bad)
        with pytest.raises(ValueError, match="already written"):
            writer.write(sample)
    assert [s.key for s in iter_samples(tmp_path / "s.tar")] == [sample.key]
    with pytest.raises(RuntimeError, match="not open"):
        writer.write(sample)


def test_killed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path / "shard-000000.tar") as writer:
        writer.write(make_sample("/v/a.mp4"))
        assert list(tmp_path.glob(".shard-000000.tar.*.tmp"))  # the partial shard is hidden, not at its name
        assert not (tmp_path / "shard-000000.tar").exists()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_empty_shard_reads_as_no_samples(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s.tar"):
        pass
    assert list(iter_samples(tmp_path / "s.tar")) == []


def test_corrupted_member_in_tar_is_clear_error(tmp_path: Path) -> None:
    samples = [make_sample(f"/v/{i}.mp4", seed=i) for i in range(2)]
    path = tmp_path / "shard-000000.tar"
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{samples[1].key}.audio.npy")
    data = bytearray(path.read_bytes())
    data[member.offset_data : member.offset_data + 6] = b"GARBAG"  # the .npy magic; tar checksums cover headers only
    path.write_bytes(bytes(data))
    reader = iter_samples(path)
    assert_same(next(reader), samples[0])
    with pytest.raises(ValueError, match=rf"shard-000000.tar: sample '{samples[1].key}': member 'audio.npy'"):
        next(reader)


def test_truncated_tar_is_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with ShardWriter(path) as writer:
        writer.write(make_sample("/v/a.mp4"))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="s.tar: damaged shard"):
        list(iter_samples(path))


# --- ledgers ----------------------------------------------------------------------------------------------


def test_ledger_round_trip_zero_and_many_rows(tmp_path: Path) -> None:
    for kind in ("index", "failures"):
        empty = read_table(write_table(tmp_path / f"empty-{kind}.parquet", [], kind), kind)
        assert empty.num_rows == 0
    index_rows = [
        {
            "key": f"k{i}",
            "shard": "shard-000000.tar",
            "source": f"/v/{i}.mp4",
            "duration_s": i / 3,
            "frames": i % 4 + 1,
            "audio_seconds": 20.0,
            "sha256": {"audio.npy": f"{i:064x}", "json": f"{i + 1:064x}"},
        }
        for i in range(500)
    ]
    table = read_table(write_table(tmp_path / "index.parquet", index_rows, "index"), "index")
    assert table.to_pylist(maps_as_pydicts="strict") == index_rows
    assert str(table.schema.field("frames").type) == "int32"
    failures = [failure_row(f"/v/{i}.mp4", reason) for i, reason in enumerate(["no_audio", "silent", "not_found"])]
    assert read_table(write_table(tmp_path / "f.parquet", failures, "failures"), "failures").to_pylist() == failures
    assert list(tmp_path.glob(".*")) == []


def test_ledger_rejects_bad_rows_and_wrong_kind(tmp_path: Path) -> None:
    row = failure_row("/v/a.mp4")
    with pytest.raises(ValueError, match=r"missing \['reason'\]"):
        write_table(tmp_path / "f.parquet", [{k: v for k, v in row.items() if k != "reason"}], "failures")
    with pytest.raises(ValueError, match=r"unexpected \['resaon'\]"):
        write_table(tmp_path / "f.parquet", [{**row, "resaon": "x"}], "failures")
    with pytest.raises(ValueError, match="null values"):
        write_table(tmp_path / "f.parquet", [{**row, "message": None}], "failures")
    with pytest.raises(ValueError, match="ledger kind"):
        write_table(tmp_path / "f.parquet", [row], "failure")  # type: ignore[arg-type]
    write_table(tmp_path / "f.parquet", [row], "failures")
    with pytest.raises(ValueError, match="not a index ledger"):
        read_table(tmp_path / "f.parquet", "index")


def test_merge_parts(tmp_path: Path) -> None:
    parts = [
        write_table(tmp_path / f"p{i}.parquet", [failure_row(f"/v/{i}-{j}") for j in range(i)], "failures")
        for i in range(4)
    ]
    merged = read_table(merge_parts(parts, tmp_path / "all.parquet", "failures"), "failures")
    assert merged["source"].to_pylist() == ["/v/1-0", "/v/2-0", "/v/2-1", "/v/3-0", "/v/3-1", "/v/3-2"]
    assert read_table(merge_parts([], tmp_path / "none.parquet", "index"), "index").num_rows == 0


# --- run directory ----------------------------------------------------------------------------------------


def test_run_layout_completeness_sweep_finalize(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run", tasks=2)
    assert layout.shard_path(12) == tmp_path / "run" / "shard-000012.tar"
    assert layout.part_paths(12) == (
        tmp_path / "run" / "parts" / "shard-000012.index.parquet",
        tmp_path / "run" / "parts" / "shard-000012.failures.parquet",
    )
    # A killed run: task 2's shard is in place but its parts never came; task 3 wrote one part only; task 4
    # died mid-shard; task 5 failed every input and wrote no shard, which is still a complete task.
    with ShardWriter(layout.shard_path(2)) as writer:
        writer.write(make_sample("/videos/t2/a.mp4"))
    write_table(layout.part_paths(3)[1], [], "failures")
    layout.shard_path(3).write_bytes(b"")
    tmp_shard = tmp_path / "run" / ".shard-000004.tar.x1.tmp"
    tmp_part = tmp_path / "run" / "parts" / ".shard-000004.index.parquet.x2.tmp"
    tmp_shard.write_bytes(b"partial")
    tmp_part.write_bytes(b"partial")
    layout.write_parts(5, [], [failure_row("/videos/t5/x.mp4", "not_found")])

    assert layout.is_complete(0) and layout.is_complete(5)
    assert not layout.is_complete(2) and not layout.is_complete(3) and not layout.is_complete(4)
    assert layout.completed_tasks() == [0, 1, 5]
    removed = layout.sweep_temporaries()
    assert removed == sorted([layout.shard_path(2), layout.shard_path(3), layout.part_paths(3)[1], tmp_shard, tmp_part])
    assert layout.sweep_temporaries() == []
    assert layout.shard_paths() == [layout.shard_path(0), layout.shard_path(1)]

    index_path, failures_path = layout.finalize()
    index = read_table(index_path, "index")
    assert index["key"].to_pylist() == [s.key for s in samples]
    assert index["shard"].to_pylist() == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3
    assert read_table(failures_path, "failures")["reason"].to_pylist() == [
        "no_audio",
        "no_audio",
        "not_found",
    ]


# --- command line -----------------------------------------------------------------------------------------


def test_cli_verify_and_info_on_good_run(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 0, result.output
    assert "OK: 2 shards" in result.output

    result = CliRunner().invoke(main, ["info", str(layout.out_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["samples", "6"] for line in lines)
    assert any(line.split()[:2] == ["failures", "2"] for line in lines)
    assert any(line.split()[:2] == ["shards", "2"] for line in lines)
    assert any(line.split() == ["4", "6"] for line in lines)  # frames histogram: 6 clips with 4 frames
    assert any(line.split()[:2] == ["places", "365"] for line in lines)
    assert any(line.split() == ["audio", "no_audio", "2"] for line in lines)


def test_cli_verify_fails_on_tampered_index(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run")
    table = pq.read_table(layout.index_path).to_pylist()
    table[0]["key"] = "not-in-any-shard"
    table[1]["frames"] = 3
    table.append(dict(table[2]))
    write_table(layout.index_path, table, "index")
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert "index row 'not-in-any-shard' (shard shard-000000.tar) is in no shard" in result.output
    assert f"sample '{samples[0].key}' in shard-000000.tar is not in the index" in result.output
    assert f"index row '{samples[1].key}': frames is 3 but the shard says 4" in result.output
    assert f"index lists key '{samples[2].key}' twice" in result.output


def test_cli_verify_fails_on_bad_shards_and_overlap(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run")
    with tarfile.open(layout.shard_path(1)) as tar:
        member = tar.getmember(f"{samples[4].key}.json")
    data = bytearray(layout.shard_path(1).read_bytes())
    data[member.offset_data] = ord("[")  # still readable bytes, no longer a JSON object
    layout.shard_path(1).write_bytes(bytes(data))
    write_table(layout.failures_path, [failure_row(samples[0].meta["source"])], "failures")
    (layout.out_dir / ".shard-000009.tar.zz.tmp").write_bytes(b"")
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert f"shard-000001.tar: sample '{samples[4].key}': member 'json'" in result.output
    assert f"source '{samples[0].meta['source']}' is both in the index and in failures" in result.output
    assert "leftover temporary .shard-000009.tar.zz.tmp" in result.output


def test_cli_verify_unfinalized_run(tmp_path: Path) -> None:
    layout, _ = make_run(tmp_path / "run")
    layout.index_path.unlink()
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1 and "index.parquet missing" in result.output
    result = CliRunner().invoke(main, ["info", str(layout.out_dir)])
    assert result.exit_code == 0 and "from 2 parts (run not finalized)" in result.output


def test_student_style_webdataset_pipeline(tmp_path: Path) -> None:
    """The student's loader builds its own wds pipeline from expand_shards, tar_samples and decode_sample."""
    import webdataset as wds

    samples = [make_sample(f"/v/{i}.mp4", seed=i) for i in range(5)]
    for task, chunk in enumerate([samples[:2], samples[2:]]):
        with ShardWriter(tmp_path / f"shard-{task:06d}.tar") as writer:
            for sample in chunk:
                writer.write(sample)
    urls = expand_shards(str(tmp_path / "shard-{000000..000001}.tar"))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        tar_samples,
        wds.shuffle(10, seed=0),
        wds.map(decode_sample),
    )
    decoded = sorted(pipeline, key=lambda s: s.key)
    for got, want in zip(decoded, sorted(samples, key=lambda s: s.key), strict=True):
        assert_same(got, want)
