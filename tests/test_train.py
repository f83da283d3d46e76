"""Stage two end to end on real shards (real videos, the two real teachers): training, resume, torchrun, isolation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soundnet.shards.reader import iter_samples
from soundnet.student.checkpoint import load_checkpoint, read_checkpoint
from soundnet.student.distributed import weights_digest
from soundnet.student.loss import distill_loss, top1_agreement
from soundnet.student.train import NonFiniteLoss, TrainConfig, train
from tests.conftest import shared_path
from tests.test_ingest import teacher_args

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of this environment: student, evaluate
SMALL = ("--batch-size", "2", "--workers", "1", "--shuffle", "8")
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


def test_run_writes_metrics_and_checkpoints_resumes_and_evaluates(real_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    held_out = real_shards / "shard-000003.tar"
    first = student_train(
        real_shards, out, "--steps", "4", *SMALL, "--log-every", "1", "--checkpoint-every", "2",
        "--val-shards", str(held_out), "--val-every", "4",
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
        shards=[str(real_shards)], out=str(out), steps=6, batch_size=2, workers=0, shuffle=8, checkpoint_every=2,
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
        shuffle=4, kl_norm="sample", temperature=2.0,
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
    run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", BIN / "student",
        "train", "--shards", f"{real_shards}/shard-{{000000..000003}}.tar", "--out", out, "--steps", "6", *SMALL,
        "--log-every", "3", "--val-shards", held_out, "--val-every", "6",
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


@pytest.mark.acceptance
def test_150_steps_at_batch_8_cut_the_loss_and_resume_to_160(real_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    options = ("--batch-size", "8", "--workers", "1", "--shuffle", "64", "--log-every", "1")
    first = student_train(real_shards, out, "--steps", "150", *options, "--checkpoint-every", "50")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 150
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-5:])

    resumed = student_train(real_shards, out, "--steps", "160", *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 161))
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 160
