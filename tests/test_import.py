"""The released SoundNet8 weights: import, checkpoint round trip, shape checking, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundnet.audio import read_audio
from soundnet.student.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from soundnet.student.cli import main as student_cli
from soundnet.student.soundnet_import import import_soundnet8, sound8_arrays
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def released(soundnet8_npz):
    return import_soundnet8(soundnet8_npz)


def test_every_released_tensor_lands(released, soundnet8_npz) -> None:
    state = released.state_dict()
    with np.load(soundnet8_npz) as npz:
        assert len(npz.files) == 46
        np.testing.assert_array_equal(state["blocks.conv1.0.weight"].numpy(), npz["conv1.weight"])
        np.testing.assert_array_equal(state["blocks.conv7.1.running_var"].numpy(), npz["bn7.running_var"])
        np.testing.assert_array_equal(state["heads.places.weight"].numpy(), npz["conv8_scns.weight"])
    assert released.config.heads == {"imagenet": 1000, "places": 401}
    assert sum(p.numel() for p in released.parameters()) + 2 * 7 * 16 == 14_352_713 + 224  # + BN running stats
    assert not released.training


def test_checkpoint_round_trip(released, tmp_path) -> None:
    path = tmp_path / "w.ckpt"
    save_checkpoint(path, released, note="round trip")
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and dicts only
    assert payload["note"] == "round trip" and payload["config"]["arch"] == "soundnet8"
    loaded = load_checkpoint(path)
    for key, tensor in released.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    x = torch.randn(2, 1, 10 * 22050) * 50
    with torch.inference_mode():
        a, b = released(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".*.tmp"))


def test_released_weights_hear_real_sounds(released) -> None:
    """The scene head on real soundtracks tiled to 20 s: Chaplin's piano music sounds like a music studio or a
    stage, the airliner clip like the sky (both measured: top-1 music_studio 0.05, sky 0.045; uniform is 0.0025)."""
    places = shared_path("soundnet8", "categories_places.txt").read_text().split()
    videos = shared_path("videos")
    expected = {
        "moviepy_chaplin.mp4": {"/m/music_studio", "/s/stage/indoor"},
        "moviepy_video_with_failing_audio.mp4": {"/s/sky"},
    }
    for name, scenes in expected.items():
        audio = read_audio(videos / name).as_float()
        x = torch.from_numpy(np.resize(audio, 20 * 22050))[None, None]
        with torch.inference_mode():
            probs = released(x)["places"].softmax(dim=1).mean(dim=(0, 2))
        top = {places[i] for i in probs.topk(3).indices}
        assert scenes & top, (name, top)
        assert probs.max() > 0.03


def test_shape_mismatch_is_named(soundnet8_npz, tmp_path) -> None:
    with np.load(soundnet8_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["conv3.weight"] = arrays["conv3.weight"][:, :, :8]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"conv3\.weight has shape \(64, 32, 8\) but SoundNet8 expects \(64, 32, 16\)"):
        import_soundnet8(bad)
    del arrays["conv3.weight"]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=f"{bad}: released weights lack.*conv3.0.weight"):
        import_soundnet8(bad)


def test_foreign_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a soundnet-checkpoint"):
        read_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint .damaged or not PyTorch.; accepted: a checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_sound8_npy_holds_exactly_the_tensors_of_soundnet8_npz(sound8_npy, soundnet8_npz) -> None:
    """The pickle the public ports publish, read with the numpy-only unpickler and turned from TF's [k, 1, in, out]
    into PyTorch's [out, in, k], equals the converted .npz bit for bit: every name, dtype and value."""
    arrays = sound8_arrays(sound8_npy)
    with np.load(soundnet8_npz) as npz:
        assert sorted(arrays) == sorted(npz.files) and len(arrays) == 46
        for name in npz.files:
            assert arrays[name].dtype == npz[name].dtype == np.float32, name
            np.testing.assert_array_equal(arrays[name], npz[name], err_msg=name)


def test_a_damaged_sound8_npy_is_named(sound8_npy, tmp_path) -> None:
    cut = tmp_path / "sound8.npy"
    cut.write_bytes(sound8_npy.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match=f"{cut}: damaged pickle"):
        import_soundnet8(cut)
    other = tmp_path / "other.npy"
    np.save(other, np.array({"conv1": {"weights": np.zeros((64, 16, 1, 16), np.float32)}}), allow_pickle=True)
    with pytest.raises(ValueError, match=r"conv1\.weights has shape \(64, 16, 1, 16\), expected \[k, 1, in, out\]"):
        import_soundnet8(other)


def test_a_damaged_or_pickling_npz_is_named(soundnet8_npz, tmp_path) -> None:
    """One line naming the file, not zlib's traceback or numpy's message without a file name."""
    damaged = tmp_path / "damaged.npz"
    with np.load(soundnet8_npz) as npz:
        np.savez_compressed(damaged, **{"conv1.weight": npz["conv1.weight"]})
    data = bytearray(damaged.read_bytes())
    data[60:80] = b"\xff" * 20  # inside the compressed member
    damaged.write_bytes(data)
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{"conv1.weight": np.array([{"run": "code"}], dtype=object)})
    for path, cause in ((damaged, "error"), (objects, "Object arrays cannot be loaded when allow_pickle=False")):
        result = CliRunner().invoke(student_cli, ["import-soundnet", str(path), "--out", str(tmp_path / "x.ckpt")])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"Error: {path}: not a readable soundnet8.npz (") and cause in result.output


@pytest.mark.parametrize("file", ["soundnet8_npz", "sound8_npy"])
def test_import_cli(file, request, released, tmp_path) -> None:
    out = tmp_path / "w.ckpt"
    source = request.getfixturevalue(file)
    result = CliRunner().invoke(student_cli, ["import-soundnet", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "14,352,713 parameters" in result.output
    state = read_checkpoint(out)["model"]
    assert all(torch.equal(tensor, state[key]) for key, tensor in released.state_dict().items())
