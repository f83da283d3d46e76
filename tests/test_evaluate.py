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
    (tmp_path / "audio").mkdir(parents=True)
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
def test_esc10_reproduces_the_paper(sound8_npy, esc50_dir, tmp_path) -> None:
    """The released SoundNet8, read from the sound8.npy users download (its tensors equal soundnet8.npz's and the
    checkpoint's, test_import), pool5, paper protocol: >= 0.91 mean accuracy on ESC-10 (paper: 0.922); a rerun
    with another C reads the cached features."""
    out = tmp_path / "r.json"
    args = ["svm", "--layer", "pool5", "--checkpoint", str(sound8_npy), "--dataset", "esc10"]
    args += ["--data-dir", str(esc50_dir), "--json", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["accuracy"] >= 0.91, report["folds"]
    assert len(report["folds"]) == 5 and report["layer"] == "pool5" and report["dataset"] == "esc10"
    assert report["windows_per_clip"] == 25 and report["feature_dim"] == 768
    assert np.array(report["confusion"]).sum() == 400
    assert (tmp_path / "r.confusion.png").stat().st_size > 10_000
    assert report["svm"]["standardize"] is False and report["timings_s"]["features_s"] > 0

    result = CliRunner().invoke(evaluate_cli, args + ["--C", "0.2"])
    assert result.exit_code == 0, result.output
    rerun = json.loads(out.read_text())
    assert rerun["timings_s"]["features_s"] == 0 and rerun["svm"]["C"] == 0.2 and rerun["accuracy"] >= 0.90


# ---- helpers for small real datasets -------------------------------------------------------------------------------


def _esc10_rows(esc50_dir, per_class_fold: int, folds=(1, 2, 3), classes=None) -> list[str]:
    """Stems of real ESC-10 clips: ``per_class_fold`` of each class in each of ``folds``."""
    rows = [line.split(",") for line in (esc50_dir / "esc50.csv").read_text().splitlines()[1:]]
    picked, count = [], {}
    for filename, fold, _, category, esc10, *_ in rows:
        if esc10 != "True" or int(fold) not in folds or (classes and category not in classes):
            continue
        if count.get((category, fold), 0) < per_class_fold:
            count[(category, fold)] = count.get((category, fold), 0) + 1
            picked.append(filename[:-4])
    return picked


def _write_wav(path, mono: np.ndarray, rate: int, codec: str, channels: int) -> None:
    """Encode a 22050 Hz float clip as a WAV of another rate, sample format and channel count (PyAV)."""
    import av

    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(mono[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = 22050
        for chunk in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))


# ---- the feature cache -------------------------------------------------------------------------------------------


def test_second_run_reads_features_from_the_cache(esc50_dir, soundnet8_checkpoint, tmp_path, monkeypatch) -> None:
    from soundnet.evaluate import features as features_module
    from soundnet.evaluate.cache import FeatureCache
    from soundnet.evaluate.svm import evaluate_svm

    root = _mini_esc(esc50_dir, tmp_path / "esc", _esc10_rows(esc50_dir, 1, classes=("dog", "rooster")))
    cache = FeatureCache(tmp_path / "cache")
    first = evaluate_svm(soundnet8_checkpoint, "esc10", root, "pool5", SVMConfig(), cache=cache)
    entries = list((tmp_path / "cache").glob("esc10-pool5-*.npy"))
    assert len(entries) == 1 and first["timings_s"]["features_s"] > 0

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although the features were cached")

    monkeypatch.setattr(features_module, "window_features", no_network)
    monkeypatch.setattr(features_module, "load_waveforms", no_network)
    second = evaluate_svm(soundnet8_checkpoint, "esc10", root, "pool5", SVMConfig(C=0.2), cache=cache)
    assert second["clips"] == first["clips"] == 6 and second["svm"]["C"] == 0.2
    assert second["timings_s"]["features_s"] == 0.0

    changed = tmp_path / "changed.ckpt"  # same weights, other bytes: another entry, computed again
    changed.write_bytes(soundnet8_checkpoint.read_bytes() + b"\0")
    with pytest.raises(AssertionError, match="the network ran"):
        evaluate_svm(changed, "esc10", root, "pool5", SVMConfig(), cache=cache)


def test_an_entry_whose_bytes_changed_is_recomputed_with_a_warning(tmp_path, caplog) -> None:
    """The entry's name holds the sha256 of its bytes: one changed feature value (the file still a valid .npy of
    the right shape) is noticed, named, removed and not returned."""
    import hashlib

    from soundnet.evaluate.cache import FeatureCache, FeatureKey

    key = FeatureKey("0" * 64, "pool5", "folder", 22050, 1.0, (("/a.wav", 1, 2), ("/b.wav", 3, 4)))
    features = np.random.default_rng(0).random((2, 3, 8)).astype(np.float32)
    cache = FeatureCache(tmp_path)
    cache.save(key, features)
    (entry,) = cache.entries(key)
    assert entry.name == f"{key.stem()}.{hashlib.sha256(entry.read_bytes()).hexdigest()}.npy"
    changed = features.copy()
    changed[1, 2, 5] += 1.0
    with open(entry, "r+b") as f:  # rewrite the data in place: header and size unchanged
        np.save(f, changed, allow_pickle=False)
    with caplog.at_level("WARNING"):
        assert cache.load(key) is None
    assert f"feature cache entry {entry} changed since it was written" in caplog.text and not entry.exists()


def test_damaged_cache_entry_is_recomputed(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    from soundnet.evaluate.cache import FeatureCache
    from soundnet.evaluate.features import dataset_features

    root = _mini_esc(esc50_dir, tmp_path / "esc", [ROOSTER, DOG])
    data = load_dataset("esc10", root)
    model = load_checkpoint(soundnet8_checkpoint)
    cache = FeatureCache(tmp_path / "cache")
    fresh = dataset_features(model, soundnet8_checkpoint, data, "conv5", 2.0, cache=cache)
    (entry,) = (tmp_path / "cache").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:200])
    again = dataset_features(model, soundnet8_checkpoint, data, "conv5", 2.0, cache=cache)
    np.testing.assert_array_equal(fresh, again)
    (rewritten,) = (tmp_path / "cache").glob("*.npy")
    np.testing.assert_array_equal(np.load(rewritten), fresh)  # rewritten whole


# ---- the SVM phase -----------------------------------------------------------------------------------------------


def test_cv_c_shares_inner_fits_and_matches_plain_leave_one_fold_out() -> None:
    """Choosing C with each pair of held-out folds fitted once gives the choice a naive inner loop makes."""
    from soundnet.evaluate.protocol import _predict

    rng = np.random.default_rng(1)
    folds = np.repeat([1, 2, 3, 4], 12)
    labels = np.tile([0, 1, 2], 16)
    feats = (labels[:, None, None] * 0.4 + rng.normal(size=(48, 3, 8))).astype(np.float32)
    config = SVMConfig(cv_c=True, c_grid=(0.0001, 0.01, 10.0))
    result = run_protocol(feats, labels, folds, config, n_jobs=2)
    for outer in (1, 2, 3, 4):
        train = folds != outer
        f, y, k = feats[train], labels[train], folds[train]
        means = []
        for C in config.c_grid:
            accs = [np.mean(_predict(_fit(f[k != j], y[k != j], C, config), f[k == j]) == y[k == j]) for j in set(k)]
            means.append(np.mean(accs))
        assert result.chosen_c[outer] == config.c_grid[int(np.argmax(np.array(means) > max(means) - 1e-12))]
    assert set(result.chosen_c.values()) <= set(config.c_grid)


def test_the_svm_does_not_depend_on_the_scale_of_the_features() -> None:
    """Windows scaled by 2^-12 or 2^12 (exactly representable: the same numbers after the SVM's own scaling) give
    the same predictions: C means the same for a network whose features are tiny or large. On raw features the
    tiny ones would be all but unregularised away (every clip one class) and the large ones fitted with a C
    16 million times larger."""
    rng = np.random.default_rng(3)
    labels, folds = np.repeat([0, 1, 2], 20), np.tile([1, 2, 3, 4, 5], 12)
    feats = np.maximum(rng.normal(size=(60, 4, 16)) + labels[:, None, None] * np.linspace(-0.5, 0.5, 16), 0)
    feats = feats.astype(np.float32)
    results = [run_protocol(feats * 2.0**k, labels, folds, SVMConfig(), n_jobs=1) for k in (-12, 0, 12)]
    assert results[0].accuracy > 0.6  # the classes are learnt at every scale
    for other in results[1:]:
        np.testing.assert_array_equal(other.predictions, results[0].predictions)
        assert other.fold_accuracies == results[0].fold_accuracies


def test_one_fold_is_refused_for_cv_c() -> None:
    feats = np.zeros((4, 1, 2), np.float32)
    with pytest.raises(ValueError, match="at least 3 folds"):
        run_protocol(feats, np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2]), SVMConfig(cv_c=True), n_jobs=1)


# ---- every layer on every clip length, any file format -------------------------------------------------------------


def test_every_layer_works_on_a_tenth_of_a_second(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    """A 0.1 s clip is tiled to the length each layer needs (conv7 and the heads need 4574 samples)."""
    from soundnet.evaluate.features import input_samples

    model = load_checkpoint(soundnet8_checkpoint)
    clip = load_waveforms([esc50_dir / "audio" / f"{ROOSTER}.flac"], 5.0)[0]
    short = tmp_path / "short.wav"
    _write_wav(short, clip[:2205], 22050, "pcm_s16le", 1)
    for layer in model.layer_names:
        n = input_samples(model, layer, 0.1)
        waves = load_waveforms([short], 0.1, num_samples=n)
        assert n >= max(2205, model.min_input_samples(layer))
        np.testing.assert_array_equal(waves[0, 2205:], waves[0, : n - 2205])  # tiled, not zero-padded
        feats = window_features(model, waves, layer)
        assert feats.shape[:2] == (1, 1) and np.isfinite(feats).all(), layer
    assert input_samples(model, "conv7", 0.1) == 4574 and input_samples(model, "pool5", 10.0) == 220500


@pytest.mark.parametrize(
    ("codec", "rate", "channels", "seconds"),
    [
        ("pcm_u8", 8000, 1, 0.3),
        ("pcm_s16le", 44100, 2, 7.0),
        ("pcm_s24le", 22050, 1, 5.0),
        ("pcm_f32le", 48000, 2, 2.5),
    ],
)
def test_any_bit_depth_rate_and_channel_count(esc50_dir, tmp_path, codec, rate, channels, seconds) -> None:
    """8-, 16-, 24-bit and float WAVs at other rates and channel counts decode to the same 22050 Hz mono sound."""
    reference = load_waveforms([esc50_dir / "audio" / f"{HELICOPTER}.flac"], 5.0)[0]  # sound from the start
    source = np.resize(reference, int(seconds * 22050))
    path = tmp_path / f"{codec}.wav"
    _write_wav(path, source, rate, codec, channels)
    (wave,) = load_waveforms([path], 10.0)
    assert wave.shape == (220500,)
    n = min(len(source), 20000)
    corr = np.corrcoef(wave[1000:n], source[1000:n])[0, 1]
    assert corr > (0.999 if rate == 22050 else 0.5), corr  # 8 kHz keeps only the band below 4 kHz
    if codec == "pcm_s24le":
        np.testing.assert_allclose(wave[:n], source[:n], atol=2 / 32768)


# ---- dataset metadata errors and layouts -------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["esc10", "fold", "category"])
def test_esc_csv_without_a_column_is_named(esc50_dir, soundnet8_checkpoint, tmp_path, column) -> None:
    root = _mini_esc(esc50_dir, tmp_path, [ROOSTER, DOG])
    csv_path = root / "meta" / "esc50.csv"
    lines = [row.split(",") for row in csv_path.read_text().splitlines()]
    drop = lines[0].index(column)
    csv_path.write_text("\n".join(",".join(r[:drop] + r[drop + 1 :]) for r in lines) + "\n")
    with pytest.raises(DatasetError, match=rf"esc50\.csv: missing column\(s\) '{column}'"):
        load_dataset("esc10", root)
    result = CliRunner().invoke(
        evaluate_cli, ["svm", "--checkpoint", str(csv_path), "--dataset", "esc10", "--data-dir", str(root)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_non_integer_fold_names_file_line_and_value(esc50_dir, tmp_path) -> None:
    root = _mini_esc(esc50_dir, tmp_path, [ROOSTER, DOG])
    csv_path = root / "meta" / "esc50.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",one,", 1)
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv, line 3: column 'fold' must be an integer, got 'one'"):
        load_dataset("esc10", root)


def test_empty_class_folder_is_refused(esc50_dir, tmp_path) -> None:
    for name, stem in (("dog", DOG), ("rooster", ROOSTER)):
        (tmp_path / name).mkdir()
        shutil.copy(esc50_dir / "audio" / f"{stem}.flac", tmp_path / name)
    (tmp_path / "helicopter").mkdir()
    with pytest.raises(DatasetError, match=r"class folder\(s\) without audio files: .*helicopter"):
        load_dataset("folder", tmp_path)


def test_malformed_folds_csv_is_named(esc50_dir, tmp_path) -> None:
    (tmp_path / "dog").mkdir()
    shutil.copy(esc50_dir / "audio" / f"{DOG}.flac", tmp_path / "dog")
    (tmp_path / "folds.csv").write_text("name,fold\nx,1\n")
    with pytest.raises(DatasetError, match=r"folds\.csv: missing column\(s\) 'filename'"):
        load_dataset("folder", tmp_path)
    (tmp_path / "folds.csv").write_bytes(b"filename,fold\n\xff\xfe.flac,1\n")
    with pytest.raises(DatasetError, match=r"folds\.csv: not UTF-8"):
        load_dataset("folder", tmp_path)


def _urbansound_tree(esc50_dir, root) -> list[str]:
    """An UrbanSound8K-shaped tree (metadata/UrbanSound8K.csv, audio/foldN/) of real ESC-10 clips as WAVs."""
    stems = _esc10_rows(esc50_dir, 1, folds=(1, 2, 3), classes=("dog", "rain"))
    lines = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    for i, stem in enumerate(stems):
        fold = 7 + i % 3
        class_id, name = (3, "dog_bark") if stem.endswith("-0") else (9, "rain")  # ESC target 0 is dog
        wav = f"{stem}.wav"
        (root / "audio" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        clip = load_waveforms([esc50_dir / "audio" / f"{stem}.flac"], 4.0)[0]
        _write_wav(root / "audio" / f"fold{fold}" / wav, clip, 44100, "pcm_s24le", 2)
        lines.append(f"{wav},{i},0,4,1,{fold},{class_id},{name}")
    (root / "metadata").mkdir()
    (root / "metadata" / "UrbanSound8K.csv").write_text("\n".join(lines) + "\n")
    return stems


def test_urbansound8k_metadata_is_read_with_its_own_folds(esc50_dir, tmp_path) -> None:
    stems = _urbansound_tree(esc50_dir, tmp_path)
    for name in ("urbansound8k", "folder"):  # a folder dataset with UrbanSound8K.csv is read as UrbanSound8K
        data = load_dataset(name, tmp_path)
        assert data.name == "urbansound8k" and data.classes == ["dog_bark", "rain"] and data.clip_seconds == 4.0
        assert len(data.clips) == len(stems) == 6 and data.folds == [7, 8, 9]
        assert all(c.path.parent.name == f"fold{c.fold}" for c in data.clips)
    waves = load_waveforms([c.path for c in data.clips], data.clip_seconds)
    assert waves.shape == (6, 88200) and np.abs(waves).max() > 0.01
    csv_path = tmp_path / "metadata" / "UrbanSound8K.csv"
    csv_path.write_text(csv_path.read_text().replace(",7,3,", ",7,three,", 1))
    with pytest.raises(DatasetError, match=r"UrbanSound8K\.csv, line \d: column 'classID' must be an integer"):
        load_dataset("urbansound8k", tmp_path)


def test_features_in_chunks_equal_one_pass_and_name_every_bad_file(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    from soundnet.evaluate.features import dataset_features

    root = _mini_esc(esc50_dir, tmp_path, [ROOSTER, DOG, HELICOPTER])
    data = load_dataset("esc10", root)
    model = load_checkpoint(soundnet8_checkpoint)
    chunked = dataset_features(model, soundnet8_checkpoint, data, "pool5", 3.0, chunk_clips=2)
    whole = window_features(model, load_waveforms([c.path for c in data.clips], 3.0), "pool5")
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    for stem in (ROOSTER, HELICOPTER):  # one bad file in each chunk: both named
        (root / "audio" / f"{stem}.flac").write_bytes(b"not audio" * 100)
    with pytest.raises(DatasetError, match=r"2 audio file\(s\) could not be read:\n") as error:
        dataset_features(model, soundnet8_checkpoint, data, "pool5", 3.0, chunk_clips=2)
    assert ROOSTER in str(error.value) and HELICOPTER in str(error.value) and DOG not in str(error.value)


def test_one_fold_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        run_protocol(np.zeros((4, 1, 2), np.float32), np.array([0, 1, 0, 1]), np.ones(4, int), SVMConfig(), n_jobs=1)


def test_racing_cache_writes_leave_one_complete_entry(tmp_path) -> None:
    """Two runs that finish the same features at once: each writes a temporary file and renames it; the entry
    is complete and no temporary file is left."""
    from concurrent.futures import ThreadPoolExecutor

    from soundnet.evaluate.cache import FeatureCache, FeatureKey

    key = FeatureKey("0" * 64, "pool5", "esc10", 220500, 1.0, (("/a.wav", 1, 2), ("/b.wav", 3, 4)))
    features = np.random.default_rng(0).random((2, 25, 768 * 20)).astype(np.float32)  # 3 MB: writes overlap
    cache = FeatureCache(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: cache.save(key, features), range(8)))
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in cache.entries(key)]
    assert len(cache.entries(key)) == 1
    np.testing.assert_array_equal(cache.load(key), features)
    other = FeatureKey("0" * 64, "pool5", "esc10", 220500, 2.0, key.clips)  # another window length: another entry
    assert other.stem() != key.stem() and cache.load(other) is None


def test_a_training_set_of_one_class_is_a_clear_error() -> None:
    feats = np.random.default_rng(0).random((4, 2, 3)).astype(np.float32)
    labels, folds = np.array([0, 1, 1, 1]), np.array([1, 2, 2, 2])  # without fold 1, only class 1 is left
    with pytest.raises(ValueError, match="holds clips of class 1 only"):
        run_protocol(feats, labels, folds, SVMConfig(), n_jobs=1)


def test_a_one_clip_class_in_five_folds_is_named_and_left_out_of_the_accuracy(
    esc50_dir, soundnet8_checkpoint, tmp_path, caplog
) -> None:
    """rain has one clip: it is never in the training folds when its fold is tested. It is named, its figure is
    n/a (not 0.000), and the mean is over the clips that could be tested."""
    rows = [line.split(",") for line in (esc50_dir / "esc50.csv").read_text().splitlines()[1:]]
    for category, count in (("dog", 5), ("rooster", 5), ("rain", 1)):
        (tmp_path / "data" / category).mkdir(parents=True)
        for filename, *_ in [r for r in rows if r[3] == category and r[4] == "True"][:count]:
            stem = filename[:-4]
            (tmp_path / "data" / category / f"{stem}.flac").symlink_to(esc50_dir / "audio" / f"{stem}.flac")
    (rain,) = (tmp_path / "data" / "rain").iterdir()
    report = tmp_path / "r.json"
    args = [
        "svm",
        "--checkpoint",
        str(soundnet8_checkpoint),
        "--dataset",
        "folder",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    args += ["--json", str(report), "--clip-seconds", "2", "--workers", "1", "--no-cache"]
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    assert "class 'rain' has 1 clip(s) for 5 folds, all in fold 1: it is never in the training folds" in caplog.text
    assert "dog" not in caplog.text and "rooster" not in caplog.text
    document = json.loads(report.read_text())
    assert document["per_class_accuracy"]["rain"] is None and "  rain     n/a (untestable)" in result.output
    assert document["untestable_clips"] == [str(rain)]
    matrix = np.array(document["confusion"])  # classes in folder order: dog, rain, rooster
    assert document["classes"] == ["dog", "rain", "rooster"] and matrix.sum() == 10 and matrix[1].sum() == 0
    tested = matrix.trace() / 10
    per_fold = document["folds"]  # two tested clips per fold, the rain clip of fold 1 not among them
    assert np.mean(per_fold) == pytest.approx(tested) and document["accuracy"] == pytest.approx(tested)
