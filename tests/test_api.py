"""The feature API on the released weights and real ESC-10 audio: loading, shapes and times at any rate, channel
count and length, tiling of short clips, chunked passes equal to one pass, receptive fields, clear errors."""

from __future__ import annotations

import re
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import soundnet
from soundnet.api import embed_batch, receptive_field
from soundnet.audio import read_audio, resample
from soundnet.student.checkpoint import read_checkpoint
from soundnet.student.model import SAMPLE_RATE

CLIP = "1-100032-A-0.flac"  # a dog bark, 5 s at 22050 Hz


@pytest.fixture(scope="module")
def model(soundnet8_npz):
    return soundnet.load_model(soundnet8_npz)


@pytest.fixture(scope="module")
def clip(esc50_dir) -> np.ndarray:
    return read_audio(esc50_dir / "audio" / CLIP).as_float()


def test_load_model_takes_checkpoints_v1_v2_v3_and_the_released_npz(model, soundnet8_checkpoint, tmp_path, clip):
    """Version 3 added head_kinds to the config (a release reading (1, 2) refuses it by its version), version 2 the
    input convention; older files load with the defaults."""
    v3 = soundnet.load_model(soundnet8_checkpoint)
    payload = read_checkpoint(soundnet8_checkpoint)
    posteriors = {"imagenet": "posterior", "places": "posterior"}
    assert payload["version"] == 3 and payload["config"]["head_kinds"] == posteriors
    payload["version"] = 2
    del payload["config"]["head_kinds"]
    torch.save(payload, tmp_path / "v2.ckpt")
    v2 = soundnet.load_model(tmp_path / "v2.ckpt")
    payload["version"] = 1
    for key in ("sample_rate", "input_scale"):
        del payload["config"][key]
    torch.save(payload, tmp_path / "v1.ckpt")
    v1 = soundnet.load_model(tmp_path / "v1.ckpt")
    reference, _ = soundnet.embed(model, clip, SAMPLE_RATE)
    for loaded in (v1, v2, v3):
        assert loaded.config.head_kinds == posteriors
        assert not loaded.training and loaded.config.sample_rate == SAMPLE_RATE
        np.testing.assert_allclose(soundnet.embed(loaded, clip, SAMPLE_RATE)[0], reference, atol=1e-5)
    assert not model.training and model.config.sample_rate == SAMPLE_RATE
    with pytest.raises(FileNotFoundError, match="no model file.*soundnet8.npz"):
        soundnet.load_model(tmp_path / "missing.pt")


def test_pool5_of_a_real_clip_matches_the_network(model, clip):
    embeddings, times = soundnet.embed(model, clip, SAMPLE_RATE)
    with torch.inference_mode():
        direct = model.features(torch.from_numpy(clip)[None], "pool5")["pool5"][0].T.numpy()
    assert embeddings.dtype == np.float32 and embeddings.shape == (13, 256)  # 5 s -> 13 pool5 steps
    np.testing.assert_allclose(embeddings, direct, atol=1e-5)
    assert times.shape == (13,) and np.all(np.diff(times) > 0)
    np.testing.assert_allclose(np.diff(times), 8192 / SAMPLE_RATE)  # pool5 hop: 371.5 ms
    assert 0 < times[0] < times[-1] < len(clip) / SAMPLE_RATE


def test_torch_numpy_mono_and_identical_stereo_agree(model, clip):
    reference, times = soundnet.embed(model, clip, SAMPLE_RATE)
    both = np.stack([clip, clip])
    for audio in (torch.from_numpy(clip), both, torch.from_numpy(both), both.astype(np.float64)):
        embeddings, same_times = soundnet.embed(model, audio, SAMPLE_RATE)
        np.testing.assert_allclose(embeddings, reference, atol=1e-5)
        np.testing.assert_array_equal(same_times, times)


def test_other_rates_are_resampled_like_files(tmp_path, clip):
    """A stereo 44.1 kHz array gives the same mono 22050 Hz waveform as the same audio read from a WAV file."""
    rng = np.random.default_rng(0)
    up = resample(clip, SAMPLE_RATE, 44100)
    stereo = np.stack([up, 0.5 * up + 0.01 * rng.standard_normal(len(up)).astype(np.float32)])
    pcm = np.round(np.clip(stereo, -1, 1 - 1 / 32768) * 32768).astype(np.int16)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(44100)
        f.writeframes(pcm.T.tobytes())
    from_file = read_audio(tmp_path / "stereo.wav").as_float()
    from_array = soundnet.api.as_mono(pcm.astype(np.float32) / 32768, 44100, SAMPLE_RATE)
    assert abs(len(from_file) - len(from_array)) <= 1
    n = min(len(from_file), len(from_array))
    assert np.abs(from_file[:n] - from_array[:n]).max() < 4 / 32768  # a few int16 steps of rounding


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100])
@pytest.mark.parametrize("seconds", [0.1, 0.5, 1.0, 5.0])
def test_any_rate_and_length_gives_pool5_steps_and_increasing_times(model, clip, rate, seconds):
    audio = resample(clip, SAMPLE_RATE, rate)[: int(seconds * rate)]
    embeddings, times = soundnet.embed(model, np.stack([audio, audio[::-1]]), rate)
    expected = max(1, model.output_length("pool5", int(round(seconds * SAMPLE_RATE))))
    assert embeddings.dtype == np.float32 and embeddings.shape[1] == 256
    assert abs(embeddings.shape[0] - expected) <= 1  # resampling may round the length by a sample
    assert np.all(np.isfinite(embeddings)) and np.all(np.diff(times) > 0)


def test_a_short_clip_is_tiled_to_the_layer_minimum(model, clip):
    short = clip[:2205]  # 0.1 s: pool5 needs 4574 samples
    embeddings, times = soundnet.embed(model, short, SAMPLE_RATE)
    tiled = np.tile(short, 3)[: model.min_input_samples("pool5")]
    np.testing.assert_allclose(embeddings, soundnet.embed(model, tiled, SAMPLE_RATE)[0], atol=1e-6)
    assert embeddings.shape == (1, 256) and times.shape == (1,)


def test_every_layer_works_on_every_clip_length(model, clip):
    for seconds in (0.01, 0.1, 1.0, 5.0):
        audio = clip[: int(seconds * SAMPLE_RATE)]
        for layer in model.layer_names:
            embeddings, times = soundnet.embed(model, audio, SAMPLE_RATE, layer=layer)
            assert embeddings.shape[0] >= 1 and embeddings.shape[0] == len(times), (seconds, layer)
            assert np.all(np.isfinite(embeddings)) and np.all(np.diff(times) > 0), (seconds, layer)
    assert soundnet.embed(model, clip, SAMPLE_RATE, layer="conv8_places")[0].shape == (1, 401)


def test_many_clips_batched_by_length_equal_one_by_one(model, clip):
    clips = [clip, clip[:2205], clip[::-1].copy(), clip[:SAMPLE_RATE], clip * 0.5, np.resize(clip, 70 * SAMPLE_RATE)]
    together = soundnet.api.embed_many(model, clips)
    assert len(together) == len(clips)
    for audio, (embeddings, times) in zip(clips, together):
        alone, alone_times = soundnet.embed(model, audio, SAMPLE_RATE)
        np.testing.assert_allclose(embeddings, alone, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(times, alone_times)


@pytest.mark.parametrize("layer", ["conv2", "pool5", "conv7", "conv8_imagenet"])
def test_chunked_passes_equal_one_pass(model, clip, layer):
    audio = np.resize(clip, 20 * SAMPLE_RATE)
    with torch.inference_mode():
        whole = model.features(torch.from_numpy(audio)[None], layer)[layer][0].T.numpy()
    chunked = embed_batch(model, audio[None], layer, chunk_samples=3 * SAMPLE_RATE)[0]
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(soundnet.embed(model, audio, SAMPLE_RATE, layer, chunk_seconds=3)[0], chunked)


@pytest.mark.parametrize("layer", ["pool2", "pool5", "conv7"])
def test_receptive_field_bounds_what_each_step_hears(model, layer):
    """Changing one input sample changes only the steps whose computed field contains it, and the step centred
    nearest to it."""
    rng = np.random.default_rng(1)
    audio = rng.uniform(-0.5, 0.5, 8 * SAMPLE_RATE).astype(np.float32)
    field = receptive_field(model, layer)
    before = embed_batch(model, audio[None], layer)[0]
    for position in (3 * SAMPLE_RATE + 17, 5 * SAMPLE_RATE + 4001):
        bumped = audio.copy()
        bumped[position - 2 : position + 3] += 40.0
        changed = np.flatnonzero(np.abs(embed_batch(model, bumped[None], layer)[0] - before).max(axis=1) > 1e-4)
        steps = np.arange(len(before))
        inside = steps[(field.first(steps) <= position - 2) & (field.first(steps) + field.size > position + 2)]
        touching = steps[(field.first(steps) <= position + 2) & (field.first(steps) + field.size > position - 2)]
        assert len(changed) and set(changed) <= set(touching), (changed, touching)
        assert np.argmin(np.abs(field.centre(steps) - position)) in changed and len(inside)


def test_bad_audio_gets_a_clear_error(model, clip):
    with pytest.raises(TypeError, match="floating point.*divide by 32768"):
        soundnet.embed(model, (clip * 32767).astype(np.int16), SAMPLE_RATE)
    with pytest.raises(TypeError, match="floating point"):
        soundnet.embed(model, torch.from_numpy((clip * 32767).astype(np.int16)), SAMPLE_RATE)
    half, _ = soundnet.embed(model, torch.from_numpy(clip).to(torch.bfloat16), SAMPLE_RATE)
    assert half.dtype == np.float32 and half.shape == (13, 256)
    with pytest.raises(ValueError, match=r"looks like \[samples, channels\]"):
        soundnet.embed(model, np.stack([clip, clip], axis=1), SAMPLE_RATE)
    with pytest.raises(ValueError, match="samples > 0"):
        soundnet.embed(model, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="NaN"):
        soundnet.embed(model, np.full(100, np.nan, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="positive integer"):
        soundnet.embed(model, clip, 0)
    with pytest.raises(ValueError, match="unknown layer 'pool9'"):
        soundnet.embed(model, clip, SAMPLE_RATE, layer="pool9")


def test_float_audio_at_int16_scale_is_refused_with_the_fix(model, clip):
    """The commonest mistake with audio readers: int16 samples cast to float without dividing by 32768. Without the
    check it gives embeddings unrelated to the right ones; audio within range, even hot, passes without a word."""
    int16_scale = np.round(clip * 32768).astype(np.float32)  # what int16_samples.astype(np.float32) gives
    for audio in (int16_scale, torch.from_numpy(int16_scale), np.stack([int16_scale, int16_scale])):
        with pytest.raises(ValueError, match=r"peaks at \d+, far outside \[-1, 1\].*divide them by 32768"):
            soundnet.embed(model, audio, SAMPLE_RATE)
    with pytest.raises(ValueError, match="divide them by 32768"):
        soundnet.embed(model, resample(int16_scale, SAMPLE_RATE, 44100), 44100)
    with pytest.raises(ValueError, match="divide them by 32768"):  # the batched entry point checks too
        soundnet.embed_many(model, [clip, int16_scale])
    with pytest.raises(ValueError, match="NaN or infinite"):
        soundnet.embed_many(model, [np.full(100, np.nan, np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hot = clip * (1.9 / np.abs(clip).max())  # a clipped float recording may pass 1 a little
        for audio in (clip, hot):
            embeddings, _ = soundnet.embed(model, audio, SAMPLE_RATE)
            assert embeddings.shape == (13, 256) and np.all(np.isfinite(embeddings))


def test_load_model_by_name_gives_the_released_weights(released_home, soundnet8_npz, monkeypatch):
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    by_name = soundnet.load_model("soundnet8")
    reference = soundnet.load_model(soundnet8_npz).state_dict()
    assert not by_name.training and by_name.config.heads == {"imagenet": 1000, "places": 401}
    assert all(torch.equal(tensor, reference[key]) for key, tensor in by_name.state_dict().items())


def test_the_readme_python_example_runs_as_written(released_home, monkeypatch, capsys):
    """The first block of the README's "Use the features", exactly as written, from the repository root (the
    released weights by name come from a prepared cache: tests do not reach the internet)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme.split("## Use the features")[1], re.S)[0]
    assert 'soundnet.load_model("soundnet8")' in block
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    exec(compile(block, "README.md", "exec"), {})
    expected = block.strip().splitlines()[-1].split("# ")[-1]
    assert capsys.readouterr().out.strip() == expected == "(13, 256) float32 [0.104 0.475 0.847]"
