"""The shard format end to end: real tars, real parquet, real CLI, on small arrays built here."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from soundnet.audio import read_audio
from soundnet.shards.cli import main
from soundnet.shards.ledger import RunLayout, merge_parts, read_table, write_table
from soundnet.shards.reader import SampleSpan, expand_shards, iter_samples, read_raw, scan_shard, tar_samples
from soundnet.shards.schema import (
    SAMPLE_RATE,
    Sample,
    decode_sample,
    encode_sample,
    make_key,
    validate_sample,
)
from soundnet.shards.writer import ShardWriter
from tests.conftest import shared_path

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


def unit_rows(rng: np.random.Generator, frames: int, dim: int) -> np.ndarray:
    """Rows as an embedding teacher gives them: L2-normalised, stored as float16."""
    rows = rng.normal(size=(frames, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def with_embedding(sample: Sample, dim: int = 8) -> Sample:
    """``sample`` with an embedding teacher ``clip`` of ``dim`` dimensions beside its posteriors."""
    sample.posteriors["clip"] = unit_rows(np.random.default_rng(1), sample.frames, dim)
    sample.meta["teachers"]["clip"] = {
        "arch": "timm-embed:net", "weights": "clip.safetensors", "sha256": "0" * 64, "kind": "embedding", "dim": dim,
    }  # fmt: skip
    return sample


def test_an_embedding_teacher_holds_unit_rows_and_its_dimension_and_round_trips() -> None:
    sample = with_embedding(make_sample("/v/a.mp4"))
    sample.meta["teachers"]["places"]["kind"] = "posterior"  # written explicitly today; absent in older shards
    assert validate_sample(sample) == []
    assert_same(decode_sample(encode_sample(sample)), sample)


EMBEDDING_INVALID = {
    "not unit": (_posterior("clip", lambda a: (a * 2).astype(np.float16)), "norm 2, expected 1"),
    "log-probs as embedding": (
        _posterior("clip", lambda a: log_softmax(np.random.default_rng(0), *a.shape)),
        "must be L2-normalised",
    ),
    "no dim": (_del("meta/teachers/clip/dim"), "teachers['clip'] lacks 'dim'"),
    "dim mismatch": (_set("meta/teachers/clip/dim", 9), "has C=8 but meta says 9 dimensions"),
    "dim not int": (_set("meta/teachers/clip/dim", 8.0), "['dim'] must be a dimension"),
    "unknown kind": (_set("meta/teachers/clip/kind", "regression"), "['kind'] must be one of"),
    "no kind: read as a posterior": (_del("meta/teachers/clip/kind"), "rows must be log-softmax"),
    "nan": (_posterior("clip", lambda a: np.where(a == a.max(), np.float16(np.nan), a)), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDING_INVALID))
def test_validate_catches_embedding(case: str) -> None:
    mutate, expected = EMBEDDING_INVALID[case]
    sample = with_embedding(make_sample("/v/a.mp4"))
    mutate(sample)
    problems = validate_sample(sample)
    assert any(expected in p for p in problems), problems


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


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("audio.npy", b"\x93NUMPY garbage", "member 'audio.npy' is not a readable .npy"),
        ("places.npy", b"", "member 'places.npy' is not a readable .npy"),
        (
            "audio.npy",
            np.random.default_rng(0).bytes(4096),
            r"'audio.npy' is not a readable .npy array \(its 4096 bytes",
        ),
        ("places.npy", _npy(np.zeros((4, 365), np.float16))[:-10], "header says float16 \\(4, 365\\): 2920 bytes"),
        ("audio.npy", _npy(np.zeros(7, np.int16)) + b"tail", "found 18"),
        ("audio.npy", _npy(np.zeros(7, np.int16)).replace(b"(7,)", b"(7,("), "bad header"),
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
    assert "allow_pickle" not in str(info.value)  # numpy's advice: never the fix for a broken shard


def test_decode_refuses_pickled_arrays() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    raw = encode_sample(make_sample("/v/a.mp4"))
    raw["audio.npy"] = buf.getvalue()
    with pytest.raises(ValueError, match="'audio.npy' is not a readable .npy array .it holds pickled") as info:
        decode_sample(raw)
    assert "allow_pickle" not in str(info.value)


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
        members = [info for info in tar.getmembers() if info.name.startswith(samples[1].key + ".")]
        written = {  # the digest of each member's bytes as they lie in the tar, computed here independently
            info.name.split(".", 1)[1]: hashlib.sha256(tar.extractfile(info).read()).hexdigest() for info in members
        }
    assert f"{samples[0].key}.audio.npy" in names and f"{samples[0].key}.places.npy" in names
    assert sorted(written) == ["audio.npy", "imagenet.npy", "json", "places.npy"]
    start, last = members[0].offset, members[-1]
    assert writer.index_rows[1] == {
        "key": samples[1].key,
        "shard": "shard-000000.tar",
        "source": "/v/clip1.mp4",
        "duration_s": 20.0,
        "frames": 2,
        "audio_seconds": 1.5,
        "sha256": written,
        "offset": start,  # the sample's byte range, headers and padding included: one ranged read fetches it
        "size": last.offset_data + -(-last.size // 512) * 512 - start,
    }
    span = SampleSpan(samples[1].key, start, start + writer.index_rows[1]["size"])
    assert_same(decode_sample(read_raw(str(tmp_path / "shard-000000.tar"), span)), samples[1])

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


FULL_DISK_SCRIPT = """
import errno, resource, signal, sys
from pathlib import Path
from tests.test_shards import make_sample
from soundnet.shards.writer import ShardWriter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
try:
    with ShardWriter(Path(sys.argv[1]) / "shard-000000.tar") as writer:
        for i in range(10):
            writer.write(make_sample(f"/v/{i}.mp4", seed=i, seconds=5.0))
except OSError as exn:
    chained = exn.__context__ or exn.__cause__
    print(errno.errorcode[exn.errno], "chained" if chained else "alone", writer.count)
"""


def test_failed_write_raises_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    """A full disk mid-shard: the write's own OSError, no second error from closing the tar, no partial file."""
    out = tmp_path / "out"
    out.mkdir()
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(out)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    code, chained, written = result.stdout.split()
    assert (code, chained) == ("EFBIG", "alone") and 0 < int(written) < 10
    assert "Exception ignored" not in result.stderr
    assert list(out.iterdir()) == []


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
            "offset": 2048 * i,
            "size": 2048,
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


# --- integrity: digests recorded at write time, recomputed by verify --------------------------------------------

REAL_VIDEOS = (
    "imageio_cockatoo.mp4",
    "moviepy_chaplin.mp4",
    "pydub_creative_common.mp4",
    "decord_flipping_a_pancake.mkv",
)


@pytest.fixture(scope="module")
def real_clips() -> list[tuple[str, np.ndarray]]:
    """(source, int16 audio) of real videos, decoded once: damage is planted in real sound, not in noise."""
    paths = [shared_path("videos", name) for name in REAL_VIDEOS]
    return [(str(path), read_audio(path, max_seconds=20.0).samples) for path in paths]


def make_real_run(out: Path, clips: list[tuple[str, np.ndarray]]) -> tuple[RunLayout, list[Sample]]:
    """Two shards of samples holding real decoded audio, finalized, with one failure row.

    The stand-in teacher outputs are a function of the video (its normalized path), as real ones would be.
    """
    layout = RunLayout(out)
    samples = []
    for task, chunk in enumerate([clips[:2], clips[2:]]):
        with ShardWriter(layout.shard_path(task)) as writer:
            for source, audio in chunk:
                video = os.path.normpath(source).encode()
                sample = make_sample(source, seed=int(hashlib.sha1(video).hexdigest()[:8], 16))
                sample.audio = audio
                writer.write(sample)
                samples.append(sample)
        layout.write_parts(task, writer.index_rows, [failure_row(f"/videos/t{task}/broken.mkv")] if task else [])
    layout.finalize()
    return layout, samples


def member_data(shard: Path, name: str) -> tuple[int, np.ndarray]:
    """(file offset of the array data, the array) of a .npy member, to overwrite it in place."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(name)
        data = tar.extractfile(info).read()
    stream = io.BytesIO(data)
    assert np.lib.format.read_magic(stream) == (1, 0)  # what np.save writes for these arrays
    np.lib.format.read_array_header_1_0(stream)
    return info.offset_data + stream.tell(), np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def negate_audio(shard: Path, key: str) -> str:
    offset, audio = member_data(shard, f"{key}.audio.npy")
    overwrite(shard, offset, (-audio).astype(np.int16).tobytes())
    return "audio.npy"


def swap_posterior_columns(shard: Path, key: str) -> str:
    offset, rows = member_data(shard, f"{key}.places.npy")
    assert not np.array_equal(rows[:, 0], rows[:, 1])
    overwrite(shard, offset, rows[:, [1, 0, *range(2, rows.shape[1])]].tobytes())
    return "places.npy"


def zero_block(shard: Path, key: str) -> str:
    offset, audio = member_data(shard, f"{key}.audio.npy")
    assert np.count_nonzero(audio[1000:3048]) > 1000  # real sound there, so zeros change it
    overwrite(shard, offset + 2000, bytes(4096))
    return "audio.npy"


@pytest.mark.parametrize("tamper", [negate_audio, swap_posterior_columns, zero_block])
def test_verify_names_samples_changed_after_writing(tmp_path: Path, real_clips, tamper) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 0, result.output
    assert "OK: 2 shards, 4 samples" in result.output and "sha256 of 4 samples' members matched" in result.output

    victims = [samples[1], samples[3]]  # one in each shard
    members = [tamper(layout.shard_path(task), s.key) for task, s in enumerate(victims)]
    # Still a readable tar of valid samples: the schema and ledgers alone cannot see the change...
    assert CliRunner().invoke(main, ["verify", "--quick", str(layout.out_dir)]).exit_code == 0
    assert list(iter_samples(layout.shard_path(0)))[1].audio.shape == samples[1].audio.shape
    # ...the digests do, naming the shard, the sample and the member, and only those.
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    for task, (sample, member) in enumerate(zip(victims, members, strict=True)):
        assert (
            f"shard-{task:06d}.tar: sample '{sample.key}': member(s) '{member}' differ from the sha256" in result.output
        )
    assert "2 problem(s)" in result.output
    assert samples[0].key not in result.output and samples[2].key not in result.output


def test_verify_names_lost_and_added_members(tmp_path: Path, real_clips) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    shard = layout.shard_path(1)
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # rewritten: samples[2] loses a teacher, samples[3] gains a caption
        for info, data in members:
            if info.name != f"{samples[2].key}.imagenet.npy":
                tar.addfile(info, io.BytesIO(data))
            if info.name == f"{samples[3].key}.audio.npy":
                extra = tarfile.TarInfo(f"{samples[3].key}.caption.txt")
                extra.size = 5
                tar.addfile(extra, io.BytesIO(b"hello"))
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert f"sample '{samples[2].key}': member(s) 'imagenet.npy' written at ingest are missing" in result.output
    assert f"sample '{samples[3].key}': member(s) 'caption.txt' were not written at ingest" in result.output


def test_verify_notes_the_same_video_under_two_names(tmp_path: Path, real_clips) -> None:
    source, audio = real_clips[0]
    twice = [(source, audio), (source.replace("/videos/", "/videos/./"), audio), *real_clips[1:]]
    layout, samples = make_real_run(tmp_path / "run", twice)
    result = CliRunner().invoke(main, ["verify", "--quick", str(layout.out_dir)])
    assert result.exit_code == 0, result.output  # a note, not a failure: the run is what ingest was asked for
    assert f"note: samples '{samples[0].key}' ({source}), '{samples[1].key}'" in result.stderr
    assert "hold identical audio and teacher outputs" in result.stderr and samples[2].key not in result.stderr


def test_verify_and_info_on_a_run_written_before_checksums(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run")
    legacy = pq.read_table(layout.index_path).drop_columns(["sha256", "offset", "size"])  # as written back then
    pq.write_table(legacy, layout.index_path)
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "index.parquet has no sha256 column (run written before checksums)" in result.stderr
    assert "OK: 2 shards, 6 samples" in result.stdout and "sha256" not in result.stdout
    result = CliRunner().invoke(main, ["info", str(layout.out_dir)])
    assert result.exit_code == 0, result.output
    assert any(line.split()[:2] == ["digests", "absent"] for line in result.output.splitlines())
    # structure is still checked without digests
    legacy_rows = legacy.to_pylist()
    legacy_rows[0]["frames"] = 2
    pq.write_table(pa.Table.from_pylist(legacy_rows, schema=legacy.schema), layout.index_path)
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1 and f"index row '{samples[0].key}': frames is 2" in result.output


def test_verify_accepts_recorded_duplicates_only(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run")
    listed_twice = samples[1].meta["source"]
    failures = read_table(layout.failures_path, "failures").to_pylist()
    duplicate = {**failure_row(listed_twice, "duplicate"), "stage": "input", "message": "listed more than once"}
    write_table(
        layout.failures_path, [*failures, duplicate, {**duplicate, "source": "/videos/t0/../t0/clip1.mp4"}], "failures"
    )
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 0, result.output
    # any other reason beside a sample is still double accounting
    write_table(layout.failures_path, [*failures, duplicate, failure_row(listed_twice, "too_short")], "failures")
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert f"source '{listed_twice}' is both in the index and in failures" in result.output


def test_verify_names_damaged_missing_and_non_tar_shards(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run", tasks=6, per_task=3)
    with tarfile.open(layout.shard_path(0)) as tar:
        cut = tar.getmember(f"{samples[2].key}.audio.npy")  # the first member of the third sample
    data = layout.shard_path(0).read_bytes()
    layout.shard_path(0).write_bytes(data[: cut.offset_data + 100])
    with tarfile.open(layout.shard_path(4)) as tar:
        header = tar.getmember(f"{samples[13].key}.audio.npy").offset
    overwrite(layout.shard_path(4), header, bytes(512))  # tarfile alone would take this for the end of the archive
    layout.shard_path(5).write_bytes(b"")
    layout.shard_path(1).write_bytes(np.random.default_rng(0).bytes(30000))  # not a tar at all
    layout.shard_path(2).unlink()
    layout.shard_path(3).unlink()
    layout.shard_path(3).mkdir()  # a folder where a shard should be
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    out = result.output
    assert "shard-000000.tar: damaged after 2 sample(s) (unexpected end of data)" in out
    assert f"index row '{samples[2].key}' (shard shard-000000.tar) is in no shard" in out
    assert samples[0].key not in out and samples[1].key not in out  # read before the cut, and intact
    assert "shard-000001.tar: not a readable tar file (invalid header); no sample could be read" in out
    assert "shard-000002.tar is missing: the index lists 3 sample(s) in it" in out
    assert "shard-000003.tar: cannot be read" in out and "Is a directory" in out
    assert "shard-000004.tar: damaged after 1 sample(s) (a bad or zeroed tar header ends the archive near byte" in out
    assert f"index row '{samples[13].key}' (shard shard-000004.tar) is in no shard" in out
    assert "shard-000005.tar: not a readable tar file (empty file)" in out
    assert isinstance(result.exception, SystemExit)  # reported, not raised


def test_verify_names_a_sample_cut_between_its_members(tmp_path: Path) -> None:
    layout, samples = make_run(tmp_path / "run", tasks=1, per_task=3)
    with tarfile.open(layout.shard_path(0)) as tar:
        cut = tar.getmember(f"{samples[1].key}.places.npy")  # the last member of the second sample
    layout.shard_path(0).write_bytes(layout.shard_path(0).read_bytes()[: cut.offset_data + 700])
    result = CliRunner().invoke(main, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert "shard-000000.tar: damaged after 2 sample(s) (unexpected end of data)" in result.output
    assert f"sample '{samples[1].key}': member(s) 'places.npy' written at ingest are missing" in result.output
    assert f"index row '{samples[2].key}' (shard shard-000000.tar) is in no shard" in result.output
    assert samples[0].key not in result.output


@pytest.mark.parametrize("kind", ["empty folder", "no such folder", "a file", "garbage index"])
def test_verify_and_info_on_what_is_not_a_run(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "run"
    if kind == "empty folder":
        target.mkdir()
    elif kind == "a file":
        target.write_text("x")
    elif kind == "garbage index":
        layout, _ = make_run(target)
        layout.index_path.write_bytes(b"not parquet")
    expected = {
        "empty folder": [f"{target} holds no run: no shard-*.tar, index.parquet or parts/"] * 2,
        "no such folder": ["does not exist"] * 2,
        "a file": ["is a file"] * 2,
        "garbage index": ["index.parquet unreadable", "cannot read the ledgers of"],
    }[kind]
    for command, message in zip(["verify", "info"], expected, strict=True):
        result = CliRunner().invoke(main, [command, str(target)])
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output  # no traceback
        assert message in result.output


def test_the_readers_index_names_a_zeroed_header_that_would_end_the_archive(tmp_path: Path) -> None:
    """tarfile stops silently at an all-zero header; the readers' shard index keeps the samples before it and
    notes the damage, so training counts the shard as damaged instead of losing its rest unnoticed."""
    layout, samples = make_run(tmp_path / "run", tasks=1, per_task=3)
    path = layout.shard_path(0)
    assert scan_shard(path).damage is None and len(scan_shard(path).samples) == 3
    with tarfile.open(path) as tar:
        header = tar.getmember(f"{samples[1].key}.audio.npy").offset
    overwrite(path, header, bytes(512))
    index = scan_shard(path)
    assert [span.key for span in index.samples] == [samples[0].key]
    assert index.damage is not None and "zeroed tar header" in index.damage
