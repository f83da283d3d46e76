"""Import the released SoundNet8 weights (``soundnet8.npz``, layout of ../shared/data/soundnet8/README.md)."""

from __future__ import annotations

import os

import numpy as np
import torch

from soundnet.student.model import ModelConfig, SoundNet

# npz head name -> our teacher name
RELEASED_HEADS = {"conv8_objs": "imagenet", "conv8_scns": "places"}


def _npz_to_ours(name: str) -> str:
    """Map a released tensor name (``conv3.weight``, ``bn3.running_var``, ``conv8_objs.bias``) to our key."""
    layer, _, param = name.partition(".")
    if layer in RELEASED_HEADS:
        return f"heads.{RELEASED_HEADS[layer]}.{param}"
    if layer.startswith("conv"):
        return f"blocks.{layer}.0.{param}"
    if layer.startswith("bn"):
        return f"blocks.conv{layer[2:]}.1.{param}"
    raise KeyError(f"unexpected tensor {name!r} in released weights")


def import_soundnet8(npz_path: str | os.PathLike) -> SoundNet:
    """Build a SoundNet8 with the released weights; every tensor's name and shape is checked."""
    with np.load(npz_path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    heads = {ours: int(arrays[f"{theirs}.bias"].shape[0]) for theirs, ours in RELEASED_HEADS.items()}
    model = SoundNet(ModelConfig(arch="soundnet8", heads=heads))
    expected = model.state_dict()
    state = {}
    for name, array in arrays.items():
        key = _npz_to_ours(name)
        if key not in expected:
            raise KeyError(f"released tensor {name!r} maps to {key!r}, which SoundNet8 does not have")
        if tuple(array.shape) != tuple(expected[key].shape):
            raise ValueError(f"{name}: shape {tuple(array.shape)} but SoundNet8 expects {tuple(expected[key].shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    for key, tensor in expected.items():  # BN counters are not in the release
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(tensor))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"released weights lack {missing}")
    model.load_state_dict(state, strict=True)
    return model.eval()
