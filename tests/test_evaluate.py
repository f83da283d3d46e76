"""The evaluator: dataset layouts, clear errors, windowing and clip-level averaging, and the ESC-10 result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundnet.evaluate.cli import main as evaluate_cli
from soundnet.evaluate.datasets import DatasetError, load_dataset
from soundnet.evaluate.features import fixed_length, load_waveforms, window_features
from soundnet.evaluate.protocol import SVMConfig, _fit, clip_scores, run_protocol
from soundnet.student.checkpoint import load_checkpoint

ROOSTER, HELICOPTER, DOG = "1-26806-A-1", "1-172649-A-40", "1-100032-A-0"


def test_esc10_layout(esc50_dir) -> None:
    data = load_dataset("esc10", esc50_dir)
    assert len(data.clips) == 400 and len(data.classes) == 10
    assert data.classes[:3] == ["dog", "rooster", "rain"]
    assert [sum(c.fold == k for c in data.clips) for k in data.folds] == [80] * 5
    assert all(c.path.suffix == ".flac" for c in data.clips)


def _mini_esc(esc50_dir, tmp_path, stems):
    """A tiny ESC-50 tree with the given clips (copies of the real ones)."""
    (tmp_path / "audio").mkdir()
    lines = (esc50_dir / "esc50.csv").read_text().splitlines()
    keep = [lines[0]] + [row for row in lines[1:] if row.split(",")[0][:-4] in stems]
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(keep) + "\n")
    for stem in stems:
        shutil.copy(esc50_dir / "audio" / f"{stem}.flac", tmp_path / "audio")
    return tmp_path


def test_missing_audio_file_is_named(esc50_dir, tmp_path) -> None:
    root = _mini_esc(esc50_dir, tmp_path, [ROOSTER, DOG])
    (root / "audio" / f"{DOG}.flac").unlink()
    with pytest.raises(DatasetError, match=rf"1 esc10 audio file\(s\) missing:\n.*{DOG}\.wav"):
        load_dataset("esc10", root)


def test_corrupt_audio_file_is_named(esc50_dir, tmp_path) -> None:
    root = _mini_esc(esc50_dir, tmp_path, [ROOSTER, DOG])
    (root / "audio" / f"{DOG}.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    data = load_dataset("esc10", root)
    with pytest.raises(DatasetError, match=rf"1 audio file\(s\) could not be read:\n.*{DOG}\.flac: "):
        load_waveforms([c.path for c in data.clips], 10.0)


def test_fixed_length_tiles_and_cuts() -> None:
    x = np.arange(5, dtype=np.float32)
    assert fixed_length(x, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert fixed_length(x, 3).tolist() == [0, 1, 2]


def test_waveforms_are_22050_mono_and_tiled(esc50_dir) -> None:
    path = esc50_dir / "audio" / f"{ROOSTER}.flac"
    waves = load_waveforms([path], 10.0)
    assert waves.shape == (1, 220500) and waves.dtype == np.float32
    np.testing.assert_array_equal(waves[0, :110250], waves[0, 110250:])  # the 5 s clip, twice
    assert 0.01 < np.abs(waves).max() <= 1.0


def test_windows_are_flattened_pool5_steps(esc50_dir, soundnet8_checkpoint) -> None:
    """pool5 of a 10 s clip has 27 steps -> 25 windows of 3 steps x 256 channels, each a slice of the full map."""
    model = load_checkpoint(soundnet8_checkpoint)
    waves = load_waveforms([esc50_dir / "audio" / f"{s}.flac" for s in (ROOSTER, HELICOPTER)], 10.0)
    feats = window_features(model, waves, "pool5", batch_size=1)
    assert feats.shape == (2, 25, 768)
    with torch.inference_mode():
        pool5 = model.features(torch.from_numpy(waves[1:]), "pool5")["pool5"][0].numpy()
    for w in (0, 7, 24):
        np.testing.assert_allclose(feats[1, w], pool5[:, w : w + 3].reshape(-1), rtol=1e-5, atol=1e-5)
    conv8 = window_features(model, waves, "conv8_places")  # too short for a 1 s window: the whole clip
    assert conv8.shape == (2, 1, 401)


def test_clip_score_is_the_mean_window_decision(esc50_dir, soundnet8_checkpoint) -> None:
    model = load_checkpoint(soundnet8_checkpoint)
    stems = [ROOSTER, HELICOPTER, DOG]
    feats = window_features(model, load_waveforms([esc50_dir / "audio" / f"{s}.flac" for s in stems], 10.0), "pool5")
    labels = np.array([0, 1, 2])
    svm = _fit(feats, labels, C=0.01, config=SVMConfig())
    scores = clip_scores(svm, feats)
    manual = np.stack([svm.decision_function(clip).mean(axis=0) for clip in feats])
    np.testing.assert_allclose(scores, manual, rtol=1e-6)
    assert (scores.argmax(axis=1) == labels).all()  # training clips are separable


def test_protocol_never_tests_on_training_folds() -> None:
    """Two classes that swap meaning between folds: a protocol that leaked the test fold would score 100 %."""
    rng = np.random.default_rng(0)
    folds = np.repeat([1, 2], 20)
    labels = np.tile([0, 1], 20)
    sign = np.where(folds == 1, 1.0, -1.0) * np.where(labels == 1, 1.0, -1.0)
    feats = (sign[:, None, None] * 3 + rng.normal(size=(40, 4, 6))).astype(np.float32)
    result = run_protocol(feats, labels, folds, SVMConfig(C=1.0), n_jobs=1)
    assert result.accuracy < 0.2


def test_folder_and_dcase_layouts(esc50_dir, tmp_path) -> None:
    data = load_dataset("esc10", esc50_dir)
    by_class = {}
    for clip in data.clips:
        by_class.setdefault(data.classes[clip.label], []).append(clip.path)
    folder, dcase = tmp_path / "folder", tmp_path / "dcase"
    for name in ("rain", "rooster"):
        (folder / name).mkdir(parents=True)
        for i, path in enumerate(by_class[name][:10]):
            shutil.copy(path, folder / name / path.name)
            (dcase / "scenes_stereo").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dcase / "scenes_stereo" / f"{name}{i + 1:02d}{path.suffix}")
    for name, root in (("folder", folder), ("dcase", dcase)):
        loaded = load_dataset(name, root)
        assert loaded.classes == ["rain", "rooster"] and len(loaded.clips) == 20
        assert sorted(np.bincount([c.fold for c in loaded.clips])[1:].tolist()) == [4] * 5  # 2 per class per fold
    assert load_dataset("dcase", dcase).clip_seconds == 30.0
    (folder / "folds.csv").write_text(
        "filename,fold\n" + "".join(f"{p.name},{1 + (i % 2)}\n" for i, p in enumerate(sorted(folder.rglob("*.flac"))))
    )
    assert {c.fold for c in load_dataset("folder", folder).clips} == {1, 2}


@pytest.mark.slow
def test_esc10_reproduces_the_paper(soundnet8_checkpoint, esc50_dir, tmp_path) -> None:
    """The released SoundNet8, pool5, paper protocol: >= 0.90 mean accuracy on ESC-10 (paper: 0.922)."""
    out = tmp_path / "r.json"
    args = [
        "svm",
        "--layer",
        "pool5",
        "--checkpoint",
        str(soundnet8_checkpoint),
        "--dataset",
        "esc10",
        "--data-dir",
        str(esc50_dir),
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["accuracy"] >= 0.90, report["folds"]
    assert len(report["folds"]) == 5 and report["layer"] == "pool5" and report["dataset"] == "esc10"
    assert report["windows_per_clip"] == 25 and report["feature_dim"] == 768
    assert np.array(report["confusion"]).sum() == 400
    assert (tmp_path / "r.confusion.png").stat().st_size > 10_000
