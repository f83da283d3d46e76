"""`student embed` on real audio with the released weights: 40 ESC-10 files give 40 rows equal to the API's
output; folders, list files, broken and missing files (rows with an error, exit 0); --scene; a ten-minute stereo
44.1 kHz file in bounded memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import soundnet
from soundnet.audio import read_audio
from soundnet.student.cli import main
from tests.conftest import shared_path

RATE = 22050
BIN = Path(sys.executable).parent


def run_embed(*args: str) -> str:
    result = CliRunner().invoke(main, ["embed", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def model(soundnet8_npz):
    return soundnet.load_model(soundnet8_npz)


def test_forty_esc10_files_give_forty_rows_equal_to_the_api(esc50_dir, soundnet8_checkpoint, model, tmp_path):
    files = sorted((esc50_dir / "audio").glob("*.flac"))[:40]
    listing = tmp_path / "clips.txt"
    listing.write_text("# forty ESC-10 clips\n" + "\n".join(map(str, files)) + "\n")
    out = tmp_path / "esc10.parquet"
    output = run_embed(str(listing), "--checkpoint", str(soundnet8_checkpoint), "--out", str(out))
    assert f"embedded 40 of 40 files with pool5 (256-d) -> {out}" in output
    table = pq.read_table(out)
    assert table.num_rows == 40 and table.column("path").to_pylist() == list(map(str, files))
    assert table.column("error").null_count == 40 and table.column("seconds").to_pylist() == [5.0] * 40
    for i in (0, 17, 39):
        row = table.slice(i, 1).to_pylist()[0]
        expected, times = soundnet.embed(model, read_audio(files[i]).as_float(), RATE)
        np.testing.assert_allclose(np.array(row["embeddings"], np.float32), expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(row["timestamps"], times)


def test_folders_lists_broken_and_missing_files_are_rows_never_fatal(esc50_dir, soundnet8_npz, model, tmp_path):
    clip = esc50_dir / "audio" / "1-100032-A-0.flac"
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    shutil.copy(clip, folder / "dog.flac")
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    (folder / "notes.md").write_text("not media: ignored by the folder search")
    (tmp_path / "empty.mp3").write_bytes(b"")
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{clip}\n{tmp_path / 'empty.mp3'}\n")
    out = tmp_path / "rows.parquet"
    missing = str(tmp_path / "missing.ogg")
    output = run_embed(str(tmp_path / "data"), str(listing), missing, "--checkpoint", str(soundnet8_npz), "--out",
                       str(out), "--layer", "conv7")  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    assert [Path(r["path"]).name for r in rows] == ["broken.wav", "dog.flac", clip.name, "empty.mp3", "missing.ogg"]
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.wav", "empty.mp3", "missing.ogg"}
    assert errors["empty.mp3"].startswith("empty:") and errors["missing.ogg"].startswith("not_found:")
    assert "3 could not be read" in output and all(name in output for name in errors)
    assert rows[1]["embeddings"] == rows[2]["embeddings"]  # the same audio found by the folder and by the list
    assert np.array(rows[1]["embeddings"]).shape == (4, 1024)  # conv7 of 5 s: 4 steps
    assert rows[0]["embeddings"] is None and rows[0]["timestamps"] is None

    scene = tmp_path / "scene.parquet"
    run_embed(str(clip), str(folder / "broken.wav"), "--checkpoint", str(soundnet8_npz), "--out", str(scene),
              "--scene")  # fmt: skip
    table = pq.read_table(scene)
    assert "timestamps" not in table.column_names and table.column("embedding").to_pylist()[1] is None
    expected = soundnet.embed(model, read_audio(clip).as_float(), RATE)[0].mean(axis=0)
    np.testing.assert_allclose(table.column("embedding").to_pylist()[0], expected, atol=1e-5)


def test_bad_checkpoint_and_layer_are_clear_errors(esc50_dir, soundnet8_npz, tmp_path):
    clip = str(esc50_dir / "audio" / "1-100032-A-0.flac")
    fake = tmp_path / "fake.pt"
    fake.write_text("not a checkpoint")
    runner = CliRunner()
    result = runner.invoke(main, ["embed", clip, "--checkpoint", str(fake), "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 1 and "is not a SoundNet model file" in result.output
    result = runner.invoke(
        main, ["embed", clip, "--checkpoint", str(soundnet8_npz), "--layer", "pool9", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "unknown layer 'pool9'" in result.output
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ten_minute_stereo_file_embeds_in_bounded_memory(soundnet8_npz, ffmpeg_exe, tmp_path):
    """Peak resident memory of the whole `student embed` process, measured by the kernel (wait4)."""
    long = tmp_path / "ten-minutes.flac"
    noise = "aevalsrc=0.3*sin(2*PI*440*t)+0.1*random(0)|0.2*sin(2*PI*660*t)+0.1*random(1):s=44100:d=600"
    subprocess.run([ffmpeg_exe, "-v", "error", "-f", "lavfi", "-i", noise, "-c:a", "flac", str(long)], check=True)
    out = tmp_path / "long.parquet"
    cmd = [str(BIN / "student"), "embed", str(long), "--checkpoint", str(soundnet8_npz), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0, stdout
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    print(f"ten-minute stereo 44.1 kHz file: peak RSS {peak_gb:.2f} GB")
    assert peak_gb < 2.5
    row = pq.read_table(out).to_pylist()[0]
    assert row["error"] is None and abs(row["seconds"] - 600) < 0.01
    assert np.array(row["embeddings"]).shape == (1615, 256)  # pool5 steps of 600 s at 22050 Hz


def test_a_folder_of_real_videos_embeds_their_sound(soundnet8_npz, tmp_path):
    """The 16 shared videos (containers and codecs of every kind): 13 with sound give rows, 3 without are errors."""
    videos = shared_path("videos")
    out = tmp_path / "videos.parquet"
    output = run_embed(str(videos), "--checkpoint", str(soundnet8_npz), "--out", str(out))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 16 and "embedded 13 of 16 files" in output
    failed = sorted(Path(r["path"]).name for r in rows if r["error"])
    assert len(failed) == 3 and all(name.split(".")[0].endswith("_noaudio") for name in failed)
    assert all(r["error"].startswith("no_audio:") for r in rows if r["error"])
    for row in (r for r in rows if not r["error"]):
        assert len(row["embeddings"]) == len(row["timestamps"]) >= 1 and len(row["embeddings"][0]) == 256
