"""Stage two end to end on real shards (real videos, the two real teachers): training, resume, torchrun, isolation."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundnet.shards.reader import iter_samples
from soundnet.student.checkpoint import load_checkpoint, read_checkpoint
from soundnet.student.cli import main as student_cli
from soundnet.student.distributed import weights_digest
from soundnet.student.loss import distill_loss, top1_agreement
from soundnet.student.train import NonFiniteLoss, TrainConfig, train
from tests.conftest import shared_path
from tests.test_ingest import teacher_args

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of this environment: student, evaluate
SMALL = ("--batch-size", "2", "--workers", "1")
VISION_AND_INGEST = ("torchvision", "av", "soundnet.teachers", "soundnet.ingest")
NOT_IN_STAGE_TWO = tuple(f"{name}." for name in VISION_AND_INGEST)


def make_real_shards(out: Path) -> Path:
    """The shards `ingest run --keep-silent` makes from the 16 real videos with the two real teachers: 13 samples
    in 4 shards (the three videos without sound are failures)."""
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(shared_path("videos")), "--out", str(out),
           "--keep-silent", "--samples-per-shard", "4", "--workers", "2", *teacher_args()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory) -> Path:
    return make_real_shards(tmp_path_factory.mktemp("real") / "shards")


# ---- the loss ------------------------------------------------------------------------------------------------
def hand_kl(student_logits: np.ndarray, teacher_log_probs: np.ndarray) -> np.ndarray:
    """Element-wise p (log p - log q) over [B, C, steps], in float64 from the definitions."""
    z = student_logits - student_logits.max(axis=1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(teacher_log_probs) * (teacher_log_probs - log_q)


def small_heads(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    logits, targets = {}, {}
    for name, classes in {"imagenet": 5, "places": 3}.items():
        logits[name] = rng.normal(scale=2.0, size=(2, classes, 4))
        t = rng.normal(scale=2.0, size=(2, classes, 4))
        targets[name] = t - np.log(np.exp(t).sum(axis=1, keepdims=True))
    return logits, targets


def as_torch(arrays: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
def test_loss_is_250_times_mean_kl_over_batch_classes_steps_then_heads() -> None:
    logits, targets = small_heads()
    expected_terms = {name: hand_kl(logits[name], targets[name]).mean() for name in logits}
    loss, terms = distill_loss(as_torch(logits), as_torch(targets))
    for name, value in expected_terms.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5)
    assert loss.item() == pytest.approx(250 * np.mean(list(expected_terms.values())), rel=1e-5)
    # the reference formulation in DESIGN.md
    reference = torch.stack(
        [
            torch.nn.functional.kl_div(
                torch.log_softmax(as_torch(logits)[n], dim=1), as_torch(targets)[n], log_target=True, reduction="mean"
            )
            for n in logits
        ]
    ).mean()
    assert loss.item() == pytest.approx(250 * reference.item(), rel=1e-5)


def test_per_sample_norm_sums_classes_and_averages_clips_and_steps() -> None:
    logits, targets = small_heads(1)
    _, terms = distill_loss(as_torch(logits), as_torch(targets), norm="sample")
    for name in logits:
        expected = hand_kl(logits[name], targets[name]).sum(axis=1).mean()
        assert terms[name].item() == pytest.approx(expected, rel=1e-5)


def test_temperature_softens_both_sides_and_scales_by_t_squared() -> None:
    logits, targets = small_heads(2)
    t = 2.0
    _, terms = distill_loss(as_torch(logits), as_torch(targets), temperature=t)
    for name in logits:
        soft = targets[name] / t
        soft = soft - np.log(np.exp(soft).sum(axis=1, keepdims=True))
        expected = t * t * hand_kl(logits[name] / t, soft).mean()
        assert terms[name].item() == pytest.approx(expected, rel=1e-5)


def test_loss_vanishes_when_the_student_matches_and_agreement_counts_top_classes() -> None:
    _, targets = small_heads(3)
    loss, _ = distill_loss(as_torch(targets), as_torch(targets))  # logits equal to the log-probs: same softmax
    assert abs(loss.item()) < 1e-4
    t = as_torch(targets)["imagenet"]
    assert top1_agreement(t, t).item() == 2 * 4
    assert top1_agreement(-t, t).item() == 0


# ---- runs on the real shards -------------------------------------------------------------------------------
def run(*args: str | Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def student_train(shards: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "student"), "train", "--shards", str(shards), "--out", str(out), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def esc10_folder(root: Path, classes: tuple[str, ...] = ("dog", "rooster"), per_class: int = 5) -> Path:
    """A tiny `folder` dataset of real ESC-10 clips (links), for checking that `evaluate svm` takes a checkpoint."""
    esc = shared_path("esc50")
    with open(esc / "esc50.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["esc10"] == "True" and r["category"] in classes]
    for category in classes:
        (root / category).mkdir(parents=True)
        for row in [r for r in rows if r["category"] == category][:per_class]:
            stem = Path(row["filename"]).stem
            (root / category / f"{stem}.flac").symlink_to(esc / "audio" / f"{stem}.flac")
    return root


def esc10_tree(root: Path, classes: tuple[str, ...] = ("dog", "rooster", "rain")) -> Path:
    """A small ESC-10 in the ESC-50 layout (esc50.csv, audio/ of links): one real clip of each class per fold."""
    esc = shared_path("esc50")
    with open(esc / "esc50.csv") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["esc10"] == "True" and r["category"] in classes]
    picked = {(r["category"], r["fold"]): r for r in reversed(rows)}.values()  # the first of each class and fold
    (root / "audio").mkdir(parents=True)
    with open(root / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(picked)
    for row in picked:
        stem = Path(row["filename"]).stem
        (root / "audio" / f"{stem}.flac").symlink_to(esc / "audio" / f"{stem}.flac")
    return root


def test_run_writes_metrics_and_checkpoints_resumes_and_evaluates(real_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    held_out = real_shards / "shard-000003.tar"
    probe = esc10_tree(tmp_path / "esc10")
    first = student_train(
        real_shards, out, "--steps", "4", *SMALL, "--log-every", "1", "--checkpoint-every", "2",
        "--val-shards", str(held_out), "--val-every", "2", "--probe", f"esc10:{probe}",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "kl_imagenet", "kl_places", "steps_per_s", "clips_per_s", "skipped"} <= set(r)
        assert np.isfinite(r["loss"]) and r["clips_per_s"] > 0 and r["skipped"] == 0
    val = records[-1]
    held_out_clips = sum(1 for _ in iter_samples(held_out))
    assert val["val_clips"] == held_out_clips
    for name in ("imagenet", "places"):
        assert val[f"val_kl_{name}"] > 0 and 0 <= val[f"val_top1_{name}"] <= 1

    # the probe: 15 ESC-10 clips scored with the evaluator's protocol at every --val-every step and at the end
    assert [r["step"] for r in records if "probe/esc10" in r] == [2, 4]
    assert all(0 <= r["probe/esc10"] <= 1 and r["probe_s"] > 0 for r in records if "probe/esc10" in r)
    assert json.loads((out / "summary.json").read_text())["probe/esc10"] == records[-1]["probe/esc10"]
    assert "probe esc10: 15 clips, 3 classes, folds [1, 2, 3, 4, 5]" in first.stderr
    assert f"| probe esc10 {records[-1]['probe/esc10']:.3f}" in first.stderr
    picture = matplotlib.image.imread(out / "loss.png")  # the loss curves, beside metrics.jsonl; the probe's panel
    assert picture.shape[1] == 1500 and picture.std() > 0.05

    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step-0000002.pt", "step-0000004.pt"]
    state = read_checkpoint(checkpoints / "last.pt")
    assert state["step"] == 4 and state["config"]["heads"] == {"imagenet": 1000, "places": 365}
    assert {"optimizer", "rng", "train_config"} <= set(state)
    assert read_checkpoint(checkpoints / "step-0000002.pt")["step"] == 2

    refused = student_train(real_shards, out, "--steps", "6", *SMALL)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    with open(out / "metrics.jsonl", "a") as f:  # a report written after the last checkpoint, then a crash
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    resumed = student_train(real_shards, out, "--steps", "6", *SMALL, "--log-every", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert read_checkpoint(checkpoints / "last.pt")["step"] == 6
    assert json.loads((out / "summary.json").read_text())["start_step"] == 4

    report = tmp_path / "esc.json"
    run(
        BIN / "evaluate", "svm", "--layer", "pool5", "--checkpoint", checkpoints / "last.pt", "--dataset", "folder",
        "--data-dir", esc10_folder(tmp_path / "esc"), "--json", report, "--workers", "1",
    )  # fmt: skip
    assert 0 <= json.loads(report.read_text())["accuracy"] <= 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    real_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    from soundnet.student import train as train_module

    calls = 0

    def poisoned(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss, terms = distill_loss(*args, **kwargs)
        return (loss * float("nan") if calls >= 4 else loss), terms

    monkeypatch.setattr(train_module, "distill_loss", poisoned)
    out = tmp_path / "run"
    config = TrainConfig(
        shards=[str(real_shards)], out=str(out), steps=6, batch_size=2, workers=0, checkpoint_every=2,
        log_every=1,
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"nan at step 4.*last\.pt \(step 2\), is kept"):
        train(config)
    state = read_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_soundnet5_trains_from_the_same_shards(real_shards: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        shards=[str(real_shards)], out=str(tmp_path / "run"), arch="soundnet5", steps=2, batch_size=2, workers=0,
        kl_norm="sample", temperature=2.0,
    )  # fmt: skip
    summary = train(config)
    assert np.isfinite(summary["loss"])
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert model.config.arch == "soundnet5" and model.config.heads == {"imagenet": 1000, "places": 365}


def test_training_imports_no_vision_or_ingest_code(real_shards: Path, tmp_path: Path) -> None:
    args = ["train", "--shards", str(real_shards), "--out", str(tmp_path / "run"), "--steps", "2", *SMALL]
    code = (
        "import json, sys\n"
        "from soundnet.student.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if (m + '.').startswith({NOT_IN_STAGE_TWO!r}))))\n"
    )
    result = run(sys.executable, "-c", code)
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_torchrun_two_ranks_take_the_same_steps_and_end_with_identical_weights(
    real_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    held_out = real_shards / "shard-000003.tar"
    probe = esc10_folder(tmp_path / "probe")  # rank 0 scores it while rank 1 waits
    run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", BIN / "student",
        "train", "--shards", f"{real_shards}/shard-{{000000..000003}}.tar", "--out", out, "--steps", "6", *SMALL,
        "--log-every", "3", "--val-shards", held_out, "--val-every", "3", "--probe", f"folder:{probe}",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    digests = summary["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert weights_digest(load_checkpoint(out / "checkpoints" / "last.pt")) == digests[0]
    records = read_metrics(out)  # rank 0 alone writes: one record per report
    assert [r["step"] for r in records] == [3, 6]
    held_out_clips = sum(1 for _ in iter_samples(held_out))
    assert records[-1]["val_clips"] == held_out_clips  # each held-out clip once, over both ranks
    assert all(0 <= r["probe/folder"] <= 1 for r in records) and summary["probe/folder"] == records[-1]["probe/folder"]


@pytest.mark.acceptance
def test_the_readme_probe_run_scores_esc10_at_steps_2_and_4_and_draws_it(real_shards: Path, tmp_path: Path) -> None:
    """The README's probe command exactly as written, run where `runs/shards` are the real shards and
    `../shared/data` the real data: ESC-10 (400 clips) is scored at steps 2 and 4, and drawn (about 2 minutes:
    two probes of a random network; the default suite probes a 15-clip ESC-10 in the first run test)."""
    from tests.conftest import SHARED_DATA
    from tests.test_ray import readme_block

    work = tmp_path / "repo"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "shards").symlink_to(real_shards)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["sh", "-ec", readme_block("--probe esc10:")], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(work / "runs" / "probed")
    assert [r["step"] for r in records if "probe/esc10" in r] == [2, 4]
    assert all(0.3 < r["probe/esc10"] < 1 for r in records if "probe/esc10" in r)  # ten classes: chance is 0.1
    assert "probe esc10: 400 clips, 10 classes, folds [1, 2, 3, 4, 5]" in done.stderr
    assert matplotlib.image.imread(work / "runs" / "probed" / "loss.png").shape[1] == 1500  # the probe's panel


@pytest.mark.acceptance
def test_150_steps_at_batch_8_cut_the_loss_and_resume_to_160(real_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    options = ("--batch-size", "8", "--workers", "1", "--log-every", "1")
    first = student_train(real_shards, out, "--steps", "150", *options, "--checkpoint-every", "50")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 150
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-5:])

    resumed = student_train(real_shards, out, "--steps", "160", *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 161))
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 160


# ---- the clip contract, one teacher set, damage --------------------------------------------------------------
@pytest.mark.slow
def test_half_step_layout_trains_and_a_layout_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    from soundnet.shards.contract import ClipLayout
    from tests.test_student_data import write_shards

    (tmp_path / "halves").mkdir(), (tmp_path / "thirds").mkdir()
    halves = write_shards(
        tmp_path / "halves", [["a", "b"]], seconds=20.0, layout=ClipLayout(slot_seconds=2.5, frames_per_clip=8)
    )
    done = student_train(tmp_path / "halves", tmp_path / "run", "--steps", "1", "--arch", "soundnet5", *SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 frames averaged per output step" in done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clip_layout"]["slot_seconds"] == 2.5

    thirds = write_shards(tmp_path / "thirds", [["c"]], layout=ClipLayout(slot_seconds=3.0))
    refused = student_train(tmp_path / "thirds", tmp_path / "run3", "--steps", "1", *SMALL)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert thirds[0] in refused.stderr and "3 s slots" in refused.stderr and "5 s slots" in refused.stderr
    assert "ingest run --frame-interval 5 --max-frames 4" in refused.stderr
    (tmp_path / "paper").mkdir()
    write_shards(tmp_path / "paper", [["d"]])
    mixed = student_train(tmp_path / "paper", tmp_path / "run4", "--shards", halves[0], "--steps", "1", *SMALL)
    assert mixed.returncode == 1 and "different clip layouts" in mixed.stderr


@pytest.mark.slow
def test_a_good_run_plus_a_cut_shard_a_non_tar_and_another_teacher_set_trains_with_two_workers(
    real_shards: Path, tmp_path: Path
) -> None:
    import shutil
    import tarfile

    from tests.test_student_data import write_shards

    shards = tmp_path / "shards"
    shutil.copytree(real_shards, shards, ignore=shutil.ignore_patterns("*.parquet", "*.json", "parts"))
    whole = (shards / "shard-000003.tar").read_bytes()
    with tarfile.open(shards / "shard-000003.tar") as tar:
        last_audio = [m for m in tar.getmembers() if m.name.endswith(".audio.npy")][-1]
    (shards / "shard-000004.tar").write_bytes(whole[: last_audio.offset_data + last_audio.size // 2])  # mid-member
    (shards / "shard-000005.tar").write_text("this is not a tar file\n" * 50)
    (tmp_path / "other").mkdir()
    (other,) = write_shards(tmp_path / "other", [["x"]])  # teachers imagenet 10, places 6
    shutil.move(other, shards / "shard-000006.tar")

    refused = student_train(shards, tmp_path / "refused", "--steps", "1", *SMALL)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "do not share one teacher set" in refused.stderr and "shard-000006.tar" in refused.stderr

    out = tmp_path / "run"
    done = student_train(
        shards, out, "--steps", "3", "--batch-size", "3", "--workers", "2", "--exclude-mismatched", "--log-every", "1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["heads"] == {"imagenet": 1000, "places": 365}
    assert set(summary["damaged_shards"]) == {str(shards / "shard-000004.tar"), str(shards / "shard-000005.tar")}
    assert list(summary["excluded_shards"]) == [str(shards / "shard-000006.tar")]
    cut_kept = sum(1 for _ in iter_samples(real_shards / "shard-000003.tar")) - 1
    assert summary["clips"] == 13  # the cut shard is a cut copy of shard-000003: its samples are trained once
    assert f"shard-000004.tar: {cut_kept} of its {cut_kept} sample(s) have keys already in another shard" in done.stderr
    assert [r["skipped"] for r in read_metrics(out)] == [2, 2, 2]  # the two damaged shards, counted once


# ---- exact resumption, the newest intact checkpoint, clear write errors ----------------------------------------
def small_run(shards: Path, out: Path, steps: int, workers: int = 0, **options) -> TrainConfig:
    options = {"checkpoint_every": 2, "batch_size": 2, **options}
    return TrainConfig(shards=[str(shards)], out=str(out), steps=steps, workers=workers, log_every=1, seed=3, **options)


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> Path:
    from tests.test_student_data import write_shards

    folder = tmp_path_factory.mktemp("synthetic")
    write_shards(folder, [["a", "b", "c"], ["d", "e"], ["f", "g", "h"]], seconds=20.0)
    return folder


def state_dicts_equal(a: Path, b: Path) -> None:
    left, right = read_checkpoint(a), read_checkpoint(b)
    assert left["model"].keys() == right["model"].keys()
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name
    for (ka, va), (kb, vb) in zip(left["optimizer"]["state"].items(), right["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(va[k], vb[k]) for k in va)


@pytest.mark.slow
def test_three_steps_then_resume_to_six_equals_six_steps_bit_for_bit(synthetic_shards: Path, tmp_path: Path) -> None:
    """Six steps in this process against three with 2 loader workers, resumed to six with 1: the batches are a
    function of seed and step, whoever reads them."""
    whole = train(small_run(synthetic_shards, tmp_path / "whole", 6, workers=0))
    train(small_run(synthetic_shards, tmp_path / "parts", 3, workers=2))
    resumed = train(small_run(synthetic_shards, tmp_path / "parts", 6, workers=1, resume=True))
    assert resumed["start_step"] == 3 and resumed["weights_sha256"] == whole["weights_sha256"]
    state_dicts_equal(tmp_path / "whole" / "checkpoints" / "last.pt", tmp_path / "parts" / "checkpoints" / "last.pt")
    losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "whole")]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "parts")] == losses


def test_resume_takes_the_newest_intact_checkpoint_and_sweeps_temporary_files(
    synthetic_shards: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    train(small_run(synthetic_shards, out, 3, arch="soundnet5"))  # step-0000002.pt, last.pt at 3
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])  # a truncated last.pt
    (checkpoints / ".last.pt.k1ll3d.tmp").write_bytes(b"\0" * 1000)  # a kill during a write
    with caplog.at_level("INFO"):
        summary = train(small_run(synthetic_shards, out, 4, arch="soundnet5", resume=True))
    assert summary["start_step"] == 2 and f"resuming from {checkpoints / 'step-0000002.pt'} at step 2" in caplog.text
    assert not list(checkpoints.glob(".*.tmp")) and read_checkpoint(last)["step"] == 4

    last.unlink()  # only step-N.pt files: the newest is taken
    (checkpoints / "step-0000004.pt").unlink()
    summary = train(small_run(synthetic_shards, out, 5, arch="soundnet5", resume=True))
    assert summary["start_step"] == 2 and read_checkpoint(last)["step"] == 5
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_run(synthetic_shards, out, 6, arch="soundnet5"))


def test_resume_applies_a_new_lr_names_a_new_batch_size_and_refuses_another_loss(
    synthetic_shards: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    train(small_run(synthetic_shards, out, 2, arch="soundnet5"))
    with caplog.at_level("INFO"):
        train(small_run(synthetic_shards, out, 3, arch="soundnet5", resume=True, lr=0.1, batch_size=3))
    assert "lr changed 0.001 -> 0.1 at step 2" in caplog.text
    assert "--batch-size 3 differs from the checkpoint's 2: applied from step 2; resumption is not exact" in caplog.text
    state = read_checkpoint(out / "checkpoints" / "last.pt")
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [0.1]  # what the optimiser used
    assert state["train_config"]["lr"] == 0.1 and state["train_config"]["batch_size"] == 3
    assert [(r["step"], r["lr"]) for r in read_metrics(out)] == [(1, 0.001), (2, 0.001), (3, 0.1)]

    args = ["train", "--shards", str(synthetic_shards), "--out", str(out), "--steps", "4", "--arch", "soundnet5"]
    args += ["--batch-size", "3", "--lr", "0.1", "--seed", "3", "--workers", "0", "--resume"]
    refused = CliRunner().invoke(student_cli, [*args, "--kl-norm", "sample", "--temperature", "2"])
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)  # a ClickException, one message
    message = "--kl-norm sample differs from the checkpoint's mean; --temperature 2.0 differs from the checkpoint's 1.0"
    assert message in refused.output
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3  # nothing trained


def test_a_probe_leaves_training_unchanged_and_bad_probe_options_are_named(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    probe = esc10_folder(tmp_path / "probe")
    plain = train(small_run(synthetic_shards, tmp_path / "plain", 2, arch="soundnet5"))
    options = {"arch": "soundnet5", "probe": [f"folder:{probe}"], "probe_layer": "pool3", "val_every": 1}
    probed = train(small_run(synthetic_shards, tmp_path / "probed", 2, **options))
    assert probed["weights_sha256"] == plain["weights_sha256"]  # the probe runs the model in eval mode, then back
    assert [r["step"] for r in read_metrics(tmp_path / "probed") if "probe/folder" in r] == [1, 2]
    with pytest.raises(ValueError, match=r"--probe esc11:.*: expected DATASET:DIR with DATASET one of dcase, esc10"):
        train(small_run(synthetic_shards, tmp_path / "bad", 1, **{**options, "probe": [f"esc11:{probe}"]}))
    with pytest.raises(ValueError, match="unknown layer 'pool5'; soundnet5 has"):
        train(small_run(synthetic_shards, tmp_path / "bad", 1, **{**options, "probe_layer": "pool5"}))
    with pytest.raises(ValueError, match=rf"--probe esc10:{tmp_path}: .*no esc50\.csv"):
        train(small_run(synthetic_shards, tmp_path / "bad", 1, **{**options, "probe": [f"esc10:{tmp_path}"]}))


def test_probe_names_are_the_dataset_or_dataset_and_folder() -> None:
    from soundnet.evaluate.probe import probe_names

    assert probe_names(["esc10:/d/esc50", "folder:/d/birds"]) == ["esc10", "folder"]
    assert probe_names(["folder:/d/birds", "folder:/e/cars", "folder:/f/cars"]) == [
        "folder-birds", "folder-cars", "folder-cars-2"
    ]  # fmt: skip


def test_every_option_has_a_resume_rule() -> None:
    from soundnet.student.train import RESUME_RULES

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(RESUME_RULES) == sorted(fields)
    assert set(RESUME_RULES.values()) == {"refused", "optimiser", "not exact", "applied"}


def test_keep_checkpoints_keeps_the_newest_step_files(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    train(small_run(synthetic_shards, out, 5, arch="soundnet5", checkpoint_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step-0000004.pt", "step-0000005.pt"]
    (checkpoints / "step-0000009.pt").write_bytes(b"from a run that went on past last.pt")
    train(small_run(synthetic_shards, out, 7, arch="soundnet5", checkpoint_every=1, keep_checkpoints=1, resume=True))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step-0000007.pt", "step-0000009.pt"]
    train(small_run(synthetic_shards, out, 8, arch="soundnet5", checkpoint_every=1, keep_checkpoints=0, resume=True))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step-0000009.pt"]
    assert read_checkpoint(checkpoints / "last.pt")["step"] == 8


def in_namespace(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` as root of a new user and mount namespace (a small or read-only file system of our own)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user namespaces) is not available here")
    return subprocess.run(
        ["unshare", "-rm", "sh", "-ec", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_a_full_disk_and_a_read_only_out_are_one_clear_line(synthetic_shards: Path, tmp_path: Path) -> None:
    train_cmd = f"{BIN / 'student'} train --shards {synthetic_shards} --steps 2 --arch soundnet5 --workers 0"
    train_cmd += " --batch-size 2"  # enough to reach the first checkpoint; batch 64 took 25 s a step
    (tmp_path / "small").mkdir(), (tmp_path / "ro").mkdir()
    full = in_namespace(
        f"mount -t tmpfs -o size=256k none {tmp_path / 'small'}; {train_cmd} --out {tmp_path}/small/run"
    )
    assert full.returncode == 1 and "Traceback" not in full.stderr and "basic_ios" not in full.stderr
    assert f"cannot write {tmp_path}/small/run/checkpoints/last.pt: no space left on device" in full.stderr

    read_only = in_namespace(f"mount -t tmpfs -o ro none {tmp_path / 'ro'}; {train_cmd} --out {tmp_path}/ro/run")
    assert read_only.returncode == 1 and "Traceback" not in read_only.stderr
    errors = [line for line in read_only.stderr.splitlines() if "Error" in line]
    assert errors == [f"Error: cannot write {tmp_path}/ro/run: read-only file system: choose another --out"]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    import signal
    import time

    whole = train(small_run(synthetic_shards, tmp_path / "whole", 6, arch="soundnet5", checkpoint_every=3))
    out = tmp_path / "killed"
    args = [
        "--steps", "6", "--arch", "soundnet5", "--batch-size", "2", "--workers", "1", "--seed", "3",
        "--checkpoint-every", "3", "--log-every", "1",
    ]  # fmt: skip
    cmd = [str(BIN / "student"), "train", "--shards", str(synthetic_shards), "--out", str(out), *args]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step-0000003.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_checkpoint(out / "checkpoints" / "step-0000003.pt")["step"] == 3
    resumed = student_train(synthetic_shards, out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == 3 and summary["weights_sha256"] == whole["weights_sha256"]
