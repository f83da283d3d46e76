"""SoundNet8/5 structure: output lengths per layer, named outputs, clear errors, initialisation."""

from __future__ import annotations

import pytest
import torch

from soundnet.student.model import SAMPLE_RATE, ModelConfig, SoundNet, build_model

# From the reference forward pass (../shared/data/soundnet8/README.md); None = too short for that layer.
SOUNDNET8_LENGTHS = {
    1: {"conv5": 12, "pool5": 3, "conv6": 2, "conv7": 2, "conv8_imagenet": None},
    5: {"conv5": 55, "pool5": 13, "conv6": 7, "conv7": 4, "conv8_imagenet": None},
    10: {"conv5": 109, "pool5": 27, "conv6": 14, "conv7": 8, "conv8_imagenet": 1},
    20: {"conv5": 217, "pool5": 54, "conv6": 28, "conv7": 15, "conv8_imagenet": 4},
    30: {"conv5": 324, "pool5": 81, "conv6": 41, "conv7": 21, "conv8_imagenet": 7},
}


@pytest.fixture(scope="module")
def soundnet8() -> SoundNet:
    return build_model(ModelConfig("soundnet8")).eval()


@pytest.mark.parametrize("seconds", sorted(SOUNDNET8_LENGTHS))
def test_soundnet8_lengths_match_reference(soundnet8: SoundNet, seconds: int) -> None:
    n = seconds * SAMPLE_RATE
    for layer, expected in SOUNDNET8_LENGTHS[seconds].items():
        predicted = soundnet8.output_length(layer, n)
        assert (predicted if predicted >= 1 else None) == expected, (seconds, layer)


@pytest.mark.parametrize("arch", ["soundnet8", "soundnet5"])
@pytest.mark.parametrize("seconds", [1, 2.5, 5, 10.3, 20])
def test_every_layer_runs_with_predicted_shape(arch: str, seconds: float) -> None:
    model = build_model(ModelConfig(arch, heads={"imagenet": 1000, "places": 365})).eval()
    n = int(seconds * SAMPLE_RATE)
    layers = [name for name in model.layer_names if model.output_length(name, n) >= 1]
    with torch.inference_mode():
        outs = model.features(torch.randn(2, 1, n), layers)
    assert list(outs) == layers
    for name, out in outs.items():
        assert out.shape[0] == 2 and out.shape[-1] == model.output_length(name, n), name
    if seconds == 20:  # the paper's clip: four output steps per head, one per sampled frame
        with torch.inference_mode():
            heads = model(torch.randn(1, 1, n))
        assert {k: tuple(v.shape) for k, v in heads.items()} == {
            "imagenet": (1, 1000, 4),
            "places": (1, 365, 4),
        }


def test_soundnet8_channels(soundnet8: SoundNet) -> None:
    with torch.inference_mode():
        outs = soundnet8.features(torch.randn(1, 1, 20 * SAMPLE_RATE), soundnet8.layer_names)
    channels = {name: out.shape[1] for name, out in outs.items()}
    assert channels == {
        "conv1": 16, "pool1": 16, "conv2": 32, "pool2": 32, "conv3": 64, "conv4": 128, "conv5": 256,
        "pool5": 256, "conv6": 512, "conv7": 1024, "conv8_imagenet": 1000, "conv8_places": 365,
    }  # fmt: skip


def test_features_stop_at_the_deepest_layer_asked(soundnet8: SoundNet) -> None:
    called = []
    hooks = [m.register_forward_hook(lambda *_, n=n: called.append(n)) for n, m in soundnet8.blocks.items()]
    hooks += [m.register_forward_hook(lambda *_, n=n: called.append(n)) for n, m in soundnet8.heads.items()]
    with torch.inference_mode():
        soundnet8.features(torch.randn(1, 1, SAMPLE_RATE), "pool2")
    for hook in hooks:
        hook.remove()
    assert called == ["conv1", "conv2"]


def test_too_short_input_is_a_clear_error(soundnet8: SoundNet) -> None:
    need = soundnet8.min_input_samples("conv8_imagenet")
    assert soundnet8.output_length("conv8_imagenet", need) == 1
    assert soundnet8.output_length("conv8_imagenet", need - 1) < 1
    with pytest.raises(ValueError, match=r"too short for layer 'conv8_imagenet'.*at least \d+ samples"):
        soundnet8(torch.zeros(1, 1, 5 * SAMPLE_RATE))
    with pytest.raises(ValueError, match="too short for layer 'pool5'"):
        soundnet8.features(torch.zeros(1, 1, 2000), "pool5")


def test_unknown_layer_and_bad_shapes(soundnet8: SoundNet) -> None:
    with pytest.raises(ValueError, match="unknown layer 'pool3'"):
        soundnet8.features(torch.zeros(1, 1, SAMPLE_RATE), "pool3")
    with pytest.raises(ValueError, match=r"expected a waveform batch"):
        soundnet8.features(torch.zeros(1, 2, SAMPLE_RATE), "conv1")
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig("soundnet11")


def test_paper_initialisation() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig("soundnet8"))
    conv7 = model.blocks["conv7"][0].weight
    bn7 = model.blocks["conv7"][1].weight
    assert abs(conv7.std().item() - 0.01) < 5e-4 and abs(conv7.mean().item()) < 5e-4
    assert abs(bn7.mean().item() - 1.0) < 5e-3 and abs(bn7.std().item() - 0.02) < 3e-3
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Conv1d))
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))


@pytest.mark.parametrize("arch", ["soundnet8", "soundnet5"])
def test_min_input_samples_is_the_true_minimum_of_every_layer(arch: str) -> None:
    """At the minimum every layer really runs; one sample less is a clear error, never an error inside torch."""
    model = build_model(ModelConfig(arch)).eval()
    for layer in model.layer_names:
        need = model.min_input_samples(layer)
        with torch.no_grad():
            out = model.features(torch.zeros(1, 1, need), layer)[layer]
        assert out.shape[-1] == model.output_length(layer, need) >= 1, layer
        with pytest.raises(ValueError, match=rf"too short for layer '{layer}'.*at least {need} samples"):
            model.features(torch.zeros(1, 1, need - 1), layer)


def test_the_model_applies_its_own_input_scale() -> None:
    """Callers pass waveforms in [-1, 1]; the config's input scale (the released model's x256) is applied inside."""
    torch.manual_seed(0)
    model = build_model(ModelConfig("soundnet8")).eval()
    unscaled = build_model(ModelConfig("soundnet8", input_scale=1.0)).eval()
    unscaled.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, SAMPLE_RATE) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.features(x, "conv1")["conv1"], unscaled.features(x * 256, "conv1")["conv1"])
    assert model.config.sample_rate == SAMPLE_RATE and model.config.input_scale == 256.0
