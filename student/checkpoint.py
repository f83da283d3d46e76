"""Checkpoint format shared by training, weight import and evaluation.

A checkpoint is a plain dict saved with ``torch.save`` that loads with ``torch.load(..., weights_only=True)``:
``{"format": "soundnet-checkpoint", "version": 2, "config": {...}, "model": state_dict, ...}``; training adds
``optimizer``, ``step`` and ``rng`` entries. Version 2 added the input convention to the config (``sample_rate``,
``input_scale``); a version 1 checkpoint has the released model's convention (22050 Hz, x256), the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from soundnet.shards.atomic import atomic_path
from soundnet.student.model import ModelConfig, SoundNet

FORMAT = "soundnet-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def save_checkpoint(path: str | os.PathLike, model: SoundNet, **extra: Any) -> None:
    """Write ``model`` (config + weights) and any ``extra`` entries atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, validated; raises a clear error for anything that is not one of ours."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (import released weights with `student import-soundnet`)")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} is {FORMAT} version {payload.get('version')!r}; this release reads {READABLE_VERSIONS}"
        )
    return payload


def load_checkpoint(path: str | os.PathLike) -> SoundNet:
    """Rebuild the network stored in ``path``, in eval mode."""
    payload = read_checkpoint(path)
    model = SoundNet(ModelConfig(**payload["config"]))
    model.load_state_dict(payload["model"], strict=True)
    return model.eval()
