"""How the student reads a run: digests checked where the data is used, unfinished runs and copied shards named, the
shard read order, and reads of back-to-back samples fetched together."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from soundnet.audio import read_audio
from soundnet.shards import reader
from soundnet.shards.cli import main as shards_cli
from soundnet.shards.ledger import read_table
from soundnet.student.cli import main as student_cli
from soundnet.student.data import Clips, StepBatches, pass_order, scan_shards
from soundnet.student.train import TrainConfig, train
from tests.conftest import shared_path
from tests.test_shards import REAL_VIDEOS, make_real_run, member_data, overwrite, swap_posterior_columns
from tests.test_student_data import PAPER, write_shards
from tests.test_train import BIN, REPO, read_metrics, state_dicts_equal

SMALL = ("--steps", "2", "--batch-size", "2", "--arch", "soundnet5", "--log-every", "1")


@pytest.fixture(scope="module")
def real_clips() -> list[tuple[str, np.ndarray]]:
    """(source, int16 audio) of four real videos, decoded once (``make_real_run`` makes a run of them)."""
    return [(str(p), read_audio(p, max_seconds=20.0).samples) for p in (shared_path("videos", n) for n in REAL_VIDEOS)]


def flip_audio_byte(shard: Path, key: str) -> str:
    """One bit of one audio sample changed in place: the tar and the .npy stay perfectly readable."""
    offset, _ = member_data(shard, f"{key}.audio.npy")
    with open(shard, "rb") as f:
        f.seek(offset + 4001)
        byte = f.read(1)[0]
    overwrite(shard, offset + 4001, bytes([byte ^ 0x01]))
    return "audio.npy"


def train_cli(shards: str | Path, out: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "student"), "train", "--shards", str(shards), "--out", str(out), *options]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


# ---- digests checked when a sample is read --------------------------------------------------------------------
def test_student_train_names_and_skips_samples_changed_after_writing(tmp_path: Path, real_clips) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    flipped, swapped = samples[1], samples[2]  # one in each shard
    members = [
        flip_audio_byte(layout.shard_path(0), flipped.key),
        swap_posterior_columns(layout.shard_path(1), swapped.key),
    ]

    done = train_cli(layout.out_dir, tmp_path / "out", *SMALL, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    for shard, sample, member in [("shard-000000.tar", flipped, members[0]), ("shard-000001.tar", swapped, members[1])]:
        assert (
            f"skipped {layout.out_dir / shard}:{sample.key}: member(s) '{member}' differ from the sha256" in done.stderr
        )
    assert read_metrics(tmp_path / "out")[-1]["skipped"] == 2  # each counted once, whichever step met it
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"] == 2

    trusted = ["train", "--shards", str(layout.out_dir), "--out", str(tmp_path / "trusted"), *SMALL, "--workers", "0"]
    result = CliRunner().invoke(student_cli, [*trusted, "--no-verify-digests"])  # in this process: no start-up
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "trusted" / "summary.json").read_text())["skipped"] == 0  # trained on the changes


def test_shards_without_digests_are_read_as_before_with_a_note(tmp_path: Path, real_clips) -> None:
    urls = write_shards(tmp_path / "bare", [["a", "b"]])  # shards alone, no index beside them
    shards = scan_shards(urls)
    assert shards.notes == [
        f"no index.parquet beside the shards in {tmp_path / 'bare'}: their samples' digests cannot be checked"
    ]
    assert [shards.recorded(i) for i in range(2)] == [None, None] and Clips(shards, PAPER)[0]["broken"] == []

    layout, samples = make_real_run(tmp_path / "run", real_clips)  # a run written before checksums
    pq.write_table(pq.read_table(layout.index_path).drop_columns(["sha256", "offset", "size"]), layout.index_path)
    flip_audio_byte(layout.shard_path(0), samples[0].key)
    shards = scan_shards(reader.expand_shards(layout.out_dir))
    assert shards.notes == [
        f"{layout.index_path} records no sha256 digests (a run written before checksums): its samples are read "
        "without digest checks"
    ]
    assert len(shards) == 4 and Clips(shards, PAPER)[0]["broken"] == []  # trained as before


def test_an_index_written_before_byte_ranges_still_verifies_and_checks_digests(tmp_path: Path, real_clips) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    older = pq.read_table(layout.index_path).drop_columns(["offset", "size"])
    pq.write_table(older, layout.index_path)
    (index_part, _) = layout.part_paths(0)
    pq.write_table(pq.read_table(index_part).drop_columns(["offset", "size"]), index_part)
    layout.finalize()  # a run resumed by this version: parts with and without byte ranges merge
    merged = read_table(layout.index_path, "index")
    assert merged.column("offset").null_count == 2 and merged.num_rows == 4
    assert CliRunner().invoke(shards_cli, ["verify", str(layout.out_dir)]).exit_code == 0
    flip_audio_byte(layout.shard_path(0), samples[0].key)
    clips = Clips(scan_shards([str(layout.shard_path(0))]), PAPER)
    assert clips.shards.recorded(0)["audio.npy"] and "differ from the sha256" in clips[0]["broken"][0]


def test_a_changed_byte_range_in_the_index_is_named_by_verify(tmp_path: Path, real_clips) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    index = pq.read_table(layout.index_path).to_pylist()
    index[1]["offset"] += 512
    pq.write_table(pa.Table.from_pylist(index, schema=pq.read_schema(layout.index_path)), layout.index_path)
    result = CliRunner().invoke(shards_cli, ["verify", str(layout.out_dir)])
    assert result.exit_code == 1
    assert (
        f"index row '{samples[1].key}': bytes {index[1]['offset']}-" in result.output
        and "1 problem(s)" in result.output
    )


# ---- unfinished runs, copied shards ---------------------------------------------------------------------------
def test_an_unfinished_run_is_named_with_the_fix_unless_accepted(tmp_path: Path, real_clips, caplog) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    layout.index_path.unlink()  # killed before its ledgers were merged: parts/, no index.parquet
    layout.failures_path.unlink()
    refused = train_cli(layout.out_dir, tmp_path / "refused", *SMALL, "--workers", "0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{layout.out_dir} holds a run that was never finished" in refused.stderr
    assert "`ingest run --resume`" in refused.stderr and "--allow-unfinished" in refused.stderr

    flip_audio_byte(layout.shard_path(1), samples[3].key)  # digests still come from the run's ledger parts
    config = TrainConfig(shards=[str(layout.out_dir)], out=str(tmp_path / "accepted"), steps=2, batch_size=2,
                         arch="soundnet5", workers=0, log_every=1, allow_unfinished=True)  # fmt: skip
    with caplog.at_level("INFO"):
        summary = train(config)
    assert "holds an unfinished run, read as it is (--allow-unfinished)" in caplog.text
    assert (
        summary["clips"] == 4 and summary["skipped"] == 1 and f"{samples[3].key}: member(s) 'audio.npy'" in caplog.text
    )


def test_a_copied_shard_is_trained_once_with_a_warning_naming_both(tmp_path: Path, real_clips, caplog) -> None:
    layout, samples = make_real_run(tmp_path / "run", real_clips)
    copy = layout.out_dir / "shard-000002.tar"
    shutil.copy(layout.shard_path(1), copy)
    shards = scan_shards(reader.expand_shards(layout.out_dir))
    assert len(shards) == 4 and shards.urls == [str(layout.shard_path(0)), str(layout.shard_path(1))]
    assert shards.duplicates == {
        str(copy): f"2 of its 2 sample(s) have keys already in another shard (2 in {layout.shard_path(1)}): "
        "a copied shard? Each is trained once"
    }
    config = TrainConfig(shards=[str(layout.out_dir)], out=str(tmp_path / "out"), steps=1, batch_size=2,
                         arch="soundnet5", workers=0)  # fmt: skip
    with caplog.at_level("WARNING"):
        assert train(config)["clips"] == 4
    assert f"shard {copy}: 2 of its 2 sample(s) have keys already in another shard" in caplog.text
    assert str(layout.shard_path(1)) in caplog.text


# ---- the shard read order ---------------------------------------------------------------------------------------
def test_the_shard_order_visits_every_sample_once_a_few_shards_at_a_time_in_runs() -> None:
    sizes = [5, 3, 6, 4, 2]
    starts = np.cumsum([0, *sizes])
    shard_of = {i: s for s in range(len(sizes)) for i in range(starts[s], starts[s + 1])}
    order = pass_order(7, 0, sizes, "shard", open_shards=2, chunk=2)
    assert sorted(order) == list(range(sum(sizes)))
    windows, seen = [], set()
    for i in order:  # the shards come two at a time: each is done before a third one starts
        if shard_of[i] not in seen:
            seen.add(shard_of[i])
            windows.append(shard_of[i])
    group = {s: n // 2 for n, s in enumerate(windows)}
    assert [group[shard_of[i]] for i in order] == sorted(group[shard_of[i]] for i in order)
    chunks = [(shard_of[i], (i - starts[shard_of[i]]) // 2) for i in order]  # runs of 2 consecutive samples
    segments = [c for k, c in enumerate(chunks) if k == 0 or c != chunks[k - 1]]
    assert len(segments) == len(set(segments))  # each run is read in one piece...
    assert all(order[k + 1] == order[k] + 1 for k in range(len(order) - 1) if chunks[k + 1] == chunks[k])  # in order
    assert pass_order(7, 0, sizes, "shard", 2, 2) == order  # a function of its arguments
    assert pass_order(7, 1, sizes, "shard", 2, 2) != order and pass_order(8, 0, sizes, "shard", 2, 2) != order
    whole = list(StepBatches(sizes, 4, seed=7, start=0, steps=9, read_order="shard", open_shards=2))
    assert list(StepBatches(sizes, 4, seed=7, start=4, steps=9, read_order="shard", open_shards=2)) == whole[4:]


def test_a_batch_fetches_back_to_back_samples_with_one_read(tmp_path: Path, monkeypatch) -> None:
    urls = write_shards(tmp_path, [["a", "b", "c", "d"], ["e", "f", "g"]])
    clips = Clips(scan_shards(urls), PAPER)
    reads: list[tuple[str, int, int]] = []
    real_read = reader.remote.read_range
    monkeypatch.setattr(reader.remote, "read_range", lambda *a: reads.append(a) or real_read(*a))
    batch = clips.__getitems__([1, 2, 3, 5, 0, 6])  # runs: 0-3 in the first shard, 5-6 in the second
    assert len(reads) == 2
    assert [e["key"] for e in batch] == ["b", "c", "d", "f", "a", "g"]
    one_by_one = [clips[i] for i in [1, 2, 3, 5, 0, 6]]
    for got, want in zip(batch, one_by_one, strict=True):
        assert np.array_equal(got["audio"], want["audio"]) and got["broken"] == want["broken"] == []
        assert all(np.array_equal(got["targets"][n], want["targets"][n]) for n in want["targets"])


@pytest.mark.slow
def test_three_steps_then_resume_to_six_equals_six_steps_bit_for_bit_in_shard_order(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [["a", "b", "c"], ["d", "e"], ["f", "g", "h"]], seconds=20.0)

    def run(out: str, steps: int, workers: int, **options) -> dict:
        config = TrainConfig(shards=[str(tmp_path / "shards")], out=str(tmp_path / out), steps=steps, batch_size=2,
                             workers=workers, log_every=1, checkpoint_every=2, seed=3, arch="soundnet5",
                             read_order="shard", open_shards=2, **options)  # fmt: skip
        return train(config)

    whole = run("whole", 6, workers=0)
    run("parts", 3, workers=2)
    resumed = run("parts", 6, workers=2, resume=True)
    assert resumed["start_step"] == 3 and resumed["weights_sha256"] == whole["weights_sha256"]
    state_dicts_equal(tmp_path / "whole" / "checkpoints" / "last.pt", tmp_path / "parts" / "checkpoints" / "last.pt")
