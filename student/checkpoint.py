"""Checkpoint format shared by training, weight import and evaluation.

A checkpoint is a plain dict saved with ``torch.save`` that loads with ``torch.load(..., weights_only=True)``:
``{"format": "soundnet-checkpoint", "version": 2, "config": {...}, "model": state_dict, ...}``; training adds
``optimizer``, ``step``, ``rng``, ``broken`` (the broken samples met so far) and ``data`` (what fixes the data
order: seed, shards, sample counts) entries. Version 2 added the input convention to the config (``sample_rate``,
``input_scale``); a version 1 checkpoint has the released model's convention (22050 Hz, x256), the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
from collections.abc import Iterator
from typing import Any

import torch

from soundnet.shards.atomic import atomic_path
from soundnet.student.model import ModelConfig, SoundNet

FORMAT = "soundnet-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class OutputError(RuntimeError):
    """A result could not be written (disk full, read-only file system, no permission): says which file and why."""


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an :class:`OutputError` that names it and the cause."""
    try:
        yield
    except OSError as exc:
        cause = {
            errno.ENOSPC: "no space left on device: free some space or choose another --out",
            errno.EDQUOT: "disk quota exceeded: free some space or choose another --out",
            errno.EROFS: "read-only file system: choose another --out",
            errno.EACCES: "permission denied: choose another --out",
        }.get(exc.errno, exc.strerror or str(exc))
        raise OutputError(f"cannot write {exc.filename or path}: {cause}") from exc


def save_checkpoint(path: str | os.PathLike, model: SoundNet, **extra: Any) -> None:
    """Write ``model`` (config + weights) and any ``extra`` entries atomically.

    The checkpoint is serialised in memory and written with plain file I/O, so a full disk is reported as such
    (:class:`OutputError`) rather than as torch's ``basic_ios::clear``.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with writing(path), atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


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
