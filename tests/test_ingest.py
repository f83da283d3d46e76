"""`ingest run` end to end on the real videos with the real teachers: accounting, posteriors, broken inputs,
kill-and-resume, input lists, exit codes (URL inputs: tests/test_remote_inputs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from soundnet.ingest.decode import decode_clip
from soundnet.ingest.inputs import read_video_list
from soundnet.shards.reader import iter_samples
from tests.conftest import shared_path

NO_AUDIO = {
    "fluentffmpeg_testvideo-43_noaudio.avi",
    "intel_bottle-detection_noaudio.mp4",
    "pims_bulk-water_noaudio.mov",
}


def teacher_args() -> list[str]:
    teachers = shared_path("teachers")
    return [
        "--teacher", f"imagenet=efficientnet_lite0:{teachers / 'efficientnet_lite0_imagenet.pth'}",
        "--teacher", f"places=squeezenet_bn_places365:{teachers / 'squeezenet_v11bn_places365.pth'}",
    ]  # fmt: skip


def ingest(*args: str) -> subprocess.CompletedProcess:
    """`ingest run` in a fresh process, as a user runs it."""
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", *args, *teacher_args()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def video_list(tmp: Path, paths: list[str]) -> Path:
    listing = tmp / "videos.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return listing


def ledgers(out: Path) -> tuple[list[dict], list[dict]]:
    return pq.read_table(out / "index.parquet").to_pylist(), pq.read_table(out / "failures.parquet").to_pylist()


def assert_exactly_once(out: Path, sources: list[str]) -> None:
    """Every input is one sample or one failure; keys unique; shards readable; nothing temporary left."""
    index, failures = ledgers(out)
    assert sorted([r["source"] for r in index] + [r["source"] for r in failures]) == sorted(sources)
    samples = list(iter_samples(sorted(str(p) for p in out.glob("shard-*.tar"))))
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)) == len(index)
    assert sorted(keys) == sorted(r["key"] for r in index)
    assert not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The issue's acceptance run: the 16 real videos, both real teachers, --keep-silent."""
    tmp = tmp_path_factory.mktemp("ingest")
    sources = sorted(str(p) for p in shared_path("videos").iterdir() if p.suffix != ".md" and p.suffix != ".csv")
    out = tmp / "out"
    result = ingest("--videos", str(video_list(tmp, sources)), "--out", str(out), "--keep-silent",
                    "--workers", "2", "--samples-per-shard", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 inputs: 13 samples, 3 failures (no_audio 3)" in result.stdout
    return out, sources


def test_every_input_accounted_for(real_run) -> None:
    out, sources = real_run
    assert_exactly_once(out, sources)
    index, failures = ledgers(out)
    assert {Path(r["source"]).name for r in failures} == NO_AUDIO
    assert {(r["stage"], r["reason"]) for r in failures} == {("audio", "no_audio")}
    assert len(list(out.glob("shard-*.tar"))) == 3  # 16 inputs / 6 per shard
    result = CliRunner().invoke(__import__("soundnet.shards.cli", fromlist=["main"]).main, ["verify", str(out)])
    assert result.exit_code == 0, result.output


def test_samples_hold_what_the_teachers_say(real_run) -> None:
    """Stored posteriors equal the teacher run directly on the decoded frame (within float16 rounding)."""
    from soundnet.teachers import load_teacher

    out, _ = real_run
    spec = dict(a.split("=", 1) for a in teacher_args()[1::2])
    teachers = {name: load_teacher(f"{name}={s}") for name, s in spec.items()}
    samples = {Path(s.meta["source"]).name: s for s in iter_samples(str(out / "shard-*.tar"))}
    for name in ("moviepy_big_buck_bunny_0_30.webm", "imageio_realshort.mp4", "moviepy_chaplin.mp4"):
        sample = samples[name]
        clip = decode_clip(sample.meta["source"], keep_silent=True, short_side=256)
        assert sample.meta["frame_times_s"] == pytest.approx(clip.frame_times_s, abs=1e-5)
        np.testing.assert_array_equal(sample.audio, clip.audio.samples)
        for teacher_name, teacher in teachers.items():
            direct = teacher.outputs(clip.frames).numpy()
            np.testing.assert_allclose(sample.posteriors[teacher_name].astype(np.float32), direct, atol=2e-2, rtol=2e-3)
    bunny = samples["moviepy_big_buck_bunny_0_30.webm"]
    assert bunny.audio.shape == (20 * 22050,) and bunny.audio.dtype == np.int16
    assert bunny.meta["frame_times_s"] == pytest.approx([2.5, 7.5, 12.5, 17.5], abs=1 / 24)
    assert bunny.posteriors["imagenet"].shape == (4, 1000) and bunny.posteriors["places"].shape == (4, 365)
    short = samples["imageio_realshort.mp4"]  # 1.2 s: shorter than a slot, one frame at its middle
    assert short.meta["slot_times_s"] == pytest.approx([short.meta["duration_s"] / 2])
    assert 1.1 < short.meta["duration_s"] < 1.2
    assert short.meta["slot_times_s"][0] - 1 / 30 <= short.meta["frame_times_s"][0] <= short.meta["slot_times_s"][0]
    assert len(samples["moviepy_chaplin.mp4"].meta["frame_times_s"]) == 1  # 9.64 s: one full slot
    cockatoo = samples["imageio_cockatoo.mp4"]  # silent, kept by --keep-silent; the bird at 2.5 s
    names = (shared_path("teachers") / "imagenet_classes.txt").read_text().splitlines()
    top5 = {names[i] for i in np.argsort(-cockatoo.posteriors["imagenet"][0])[:5]}
    assert "sulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita" in top5
    meta = bunny.meta["teachers"]["places"]
    assert meta["arch"] == "squeezenet_bn_places365" and meta["classes"] == 365 and len(meta["sha256"]) == 64


def test_broken_inputs_are_failures_with_reasons(tmp_path, ffmpeg_exe) -> None:
    videos = shared_path("videos")
    good = videos / "moviepy_chaplin.mp4"
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:20_000])
    random_bytes = tmp_path / "random.mp4"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(50_000))
    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    audio_only = tmp_path / "audio_only.m4a"
    subprocess.run([ffmpeg_exe, "-v", "error", "-i", str(good), "-vn", "-c:a", "aac", str(audio_only)], check=True)
    missing = tmp_path / "missing.mp4"
    silent = videos / "intel_car-detection.mp4"  # silent audio, no --keep-silent
    sources = [str(p) for p in (good, truncated, random_bytes, empty, text, audio_only, missing, silent)]
    out = tmp_path / "out"
    result = ingest("--videos", str(video_list(tmp_path, sources)), "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exactly_once(out, sources)
    index, failures = ledgers(out)
    assert [r["source"] for r in index] == [str(good)]
    reasons = {Path(r["source"]).name: (r["stage"], r["reason"]) for r in failures}
    assert reasons == {
        "truncated.mp4": ("open", "damaged"),
        "random.mp4": ("open", "not_media"),
        "empty.mp4": ("open", "empty"),
        "notes.mp4": ("open", "not_media"),
        "audio_only.m4a": ("video", "no_video"),
        "missing.mp4": ("open", "not_found"),
        "intel_car-detection.mp4": ("audio", "silent"),
    }
    assert all(r["message"] for r in failures)


def test_kill_and_resume(tmp_path) -> None:
    """SIGKILL the whole job midway; --resume then yields every input exactly once."""
    sources = sorted(str(p) for p in shared_path("videos").glob("*.mp4"))  # 10 files
    listing = video_list(tmp_path, sources)
    out = tmp_path / "out"
    args = ["--videos", str(listing), "--out", str(out), "--keep-silent", "--workers", "1", "--samples-per-shard", "2"]
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", *args, *teacher_args()]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((out / "parts").glob("*.index.parquet"))) < 2 and job.poll() is None:
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    done_before = sorted(p.name for p in (out / "parts").glob("*.index.parquet"))
    assert 2 <= len(done_before) < 5, "the run should have been killed midway"
    assert not (out / "index.parquet").exists()
    assert list((out / "claims").glob("*.claim")), "the killed run held claims: the resume must take them over"
    first_shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    result = ingest(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already done" in result.stdout
    assert_exactly_once(out, sources)
    summary = json.loads((out / "summary.json").read_text())  # over both runs' shards
    index, failures = ledgers(out)
    assert (summary["samples"], summary["failures"], summary["inputs"]) == (len(index), len(failures), len(sources))
    assert summary["tasks"] == 5 and summary["last_run"]["tasks_run"] == 5 - len(done_before)
    assert sorted(p.name for p in out.glob("shard-*_stats.json")) == [f"shard-{i:06d}_stats.json" for i in range(5)]
    assert not list((out / "claims").iterdir())
    for name in done_before:  # finished shards are kept, not redone
        shard = name.replace(".index.parquet", ".tar")
        assert (out / shard).stat().st_mtime_ns == first_shards[shard]

    again = ingest(*args)  # without --resume an existing run is never overwritten
    assert again.returncode != 0 and "--resume" in again.stderr


def test_video_list_forms(tmp_path) -> None:
    videos = shared_path("videos")
    assert len(read_video_list(videos)) == 16  # folder: recursive, video extensions only
    names = ["moviepy_chaplin.mp4", "imageio_cockatoo.mp4"]
    (tmp_path / "list.csv").write_text("path,id\n" + "".join(f"{videos / n},clip{i}\n" for i, n in enumerate(names)))
    assert [i.key for i in read_video_list(tmp_path / "list.csv")] == ["clip0", "clip1"]
    import pyarrow as pa

    pq.write_table(pa.table({"path": [str(videos / n) for n in names]}), tmp_path / "list.parquet")
    assert [i.source for i in read_video_list(tmp_path / "list.parquet")] == [str(videos / n) for n in names]
    dup = video_list(tmp_path, [str(videos / names[0])] * 2)
    keys = [i.key for i in read_video_list(dup)]
    assert keys[0] and keys[1] is None  # the second listing becomes a 'duplicate' failure, not a second sample


def test_exit_codes(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    listing = video_list(tmp_path, [str(shared_path("videos") / "moviepy_chaplin.mp4")])
    unwritable = ingest("--videos", str(listing), "--out", str(blocker / "out"))
    assert unwritable.returncode != 0 and "not writable" in unwritable.stderr
    nothing = ingest("--videos", str(video_list(tmp_path, [str(tmp_path / "gone.mp4")])), "--out", str(tmp_path / "o"))
    assert nothing.returncode != 0 and "no input could be made into a sample" in nothing.stderr
    assert ledgers(tmp_path / "o")[1][0]["reason"] == "not_found"  # still recorded
    bad_option = ingest("--videos", str(listing), "--out", str(tmp_path / "p"), "--frame-seek", "sometimes")
    assert bad_option.returncode == 2
    assert ingest("--videos", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "q")).returncode == 1
