"""The HEAR 2021 API on the released weights: the checks hear-validator makes (attributes, shapes, dtypes, regular
millisecond timestamps), a hop of at most 50 ms covering the whole input, batch consistency, and embeddings that are
exact network outputs centred on their timestamps. `pytest -m hear` also runs the real `hear-validator`."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

import soundnet
from soundnet import hear
from soundnet.api import embed_batch, receptive_field
from soundnet.audio import read_audio

RATE = 22050


@pytest.fixture(scope="module")
def model(soundnet8_npz) -> hear.HearModel:
    return hear.load_model(str(soundnet8_npz))


@pytest.fixture(scope="module")
def sounds(esc50_dir) -> torch.Tensor:
    """Two real 5 s ESC-10 clips (a dog, rain) as a HEAR batch."""
    names = ("1-100032-A-0.flac", "1-17367-A-10.flac")
    return torch.from_numpy(np.stack([read_audio(esc50_dir / "audio" / name).as_float() for name in names]))


def test_model_has_the_int_attributes_hear_asks_for(model):
    assert isinstance(model, torch.nn.Module)
    for name, value in (("sample_rate", 22050), ("scene_embedding_size", 256), ("timestamp_embedding_size", 256)):
        assert type(getattr(model, name)) is int and getattr(model, name) == value
    assert model.hop_samples * model.passes == receptive_field(model.net, "pool5").stride


def test_load_model_without_a_path_loads_the_released_weights(released_home, model, monkeypatch):
    """HEAR's convention: no path, the default weights (downloaded once by name; here from a prepared cache)."""
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    default = hear.load_model()
    assert default.sample_rate == 22050 and default.scene_embedding_size == 256 and not default.net.training
    reference = model.net.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in default.net.state_dict().items())


def test_int16_scale_float_audio_is_refused(model, sounds):
    with pytest.raises(ValueError, match="divide them by 32768"):
        hear.get_scene_embeddings(sounds * 32768, model)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 4.0])
def test_timestamp_embeddings_pass_the_validator_checks_with_a_dense_hop(model, sounds, seconds):
    audio = sounds[:, : int(seconds * RATE)]
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    assert embeddings.shape[0] == 2 and embeddings.shape[2] == model.timestamp_embedding_size
    assert timestamps.shape == embeddings.shape[:2]
    assert torch.equal(timestamps[0], timestamps[1])
    steps = torch.diff(timestamps)
    assert torch.all(torch.abs(steps - steps.mean()) < 1e-3)  # hear-validator's regularity rule
    hop_ms = 1000 * model.hop_samples / RATE
    assert steps.mean() <= 50.0 and torch.allclose(steps, torch.tensor(hop_ms), atol=1e-3)
    duration_ms = 1000 * audio.shape[1] / RATE
    assert 0 <= timestamps[0, 0] < hop_ms and duration_ms - hop_ms <= timestamps[0, -1] < duration_ms
    assert torch.all(torch.isfinite(embeddings))
    alone, _ = hear.get_timestamp_embeddings(audio[1:], model)
    torch.testing.assert_close(alone[0], embeddings[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(embeddings[0], embeddings[1], atol=1e-2)  # different sounds, different features


def test_each_timestamp_embedding_is_the_network_output_centred_there(model, sounds):
    """The interleaved shifted passes equal single passes over the clip set in silence."""
    audio = sounds[:1, : 2 * RATE]
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    field = receptive_field(model.net, "pool5")
    for shift in (0, 3, 7):  # one pass per shift of the clip on pool5's grid
        offset = 4 * field.stride + int(field.centre(0)) - shift * model.hop_samples
        padded = np.zeros((1, offset + audio.shape[1] + 3 * field.stride), np.float32)
        padded[0, offset : offset + audio.shape[1]] = audio.numpy()
        direct = embed_batch(model.net, padded, "pool5")[0]
        centres_ms = 1000 * (field.centre(np.arange(len(direct))) - offset) / RATE
        for i in range(shift, timestamps.shape[1], model.passes):
            step = int(np.argmin(np.abs(centres_ms - timestamps[0, i].item())))
            assert abs(centres_ms[step] - timestamps[0, i].item()) < 1e-2
            np.testing.assert_allclose(embeddings[0, i].numpy(), direct[step], atol=1e-4)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 4.0])
def test_scene_embeddings_are_the_mean_of_the_api_embedding(model, sounds, seconds):
    audio = sounds[:, : int(seconds * RATE)]
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32 and scene.shape == (2, model.scene_embedding_size)
    for i in range(2):
        steps, _ = soundnet.embed(model.net, audio[i], RATE)
        np.testing.assert_allclose(scene[i].numpy(), steps.mean(axis=0), atol=1e-5)


def test_bad_audio_is_refused_clearly(model):
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\] at 22050 Hz"):
        hear.get_scene_embeddings(torch.zeros(22050), model)


@pytest.mark.hear
def test_hear_validator_passes(soundnet8_npz):
    """The real validator (pip install hearvalidator; it needs TensorFlow)."""
    exe = shutil.which("hear-validator")
    if exe is None:
        pytest.skip("hear-validator is not installed (pip install hearvalidator; it needs TensorFlow)")
    done = subprocess.run(
        [exe, "soundnet.hear", "-m", str(soundnet8_npz), "-d", "cpu"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "Looks good!" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "We suggest a interval" not in done.stderr
