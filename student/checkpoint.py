"""Checkpoint format shared by training, weight import and evaluation, and every model file a user may hold.

A checkpoint is a plain dict saved with ``torch.save`` that loads with ``torch.load(..., weights_only=True)``:
``{"format": "soundnet-checkpoint", "version": 3, "config": {...}, "model": state_dict, ...}``; training adds
``optimizer``, ``step``, ``rng``, ``broken`` (the broken samples met so far) and ``data`` (what fixes the data
order: seed, shards, sample counts) entries. Version 2 added the input convention to the config (``sample_rate``,
``input_scale``); a version 1 checkpoint has the released model's convention (22050 Hz, x256), the defaults.
Version 3 added ``head_kinds`` (embedding heads); a version 2 checkpoint's heads are all posteriors. A new config
field means a new version, so an older release refuses the file by its version rather than on the field.

:func:`load_checkpoint` also reads the released ``soundnet8.npz`` and ``sound8.npy`` and ``.safetensors`` files
(:func:`save_safetensors`: the weights, with the model config in the file's metadata and in a JSON file beside it,
the ``config.json`` of a model hub). The format is told by the file's first bytes, not its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from soundnet.shards.atomic import atomic_path
from soundnet.student.model import ModelConfig, SoundNet
from soundnet.student.soundnet_import import NPY_MAGIC, ZIP_MAGIC, import_soundnet8, npy_dtype

FORMAT = "soundnet-checkpoint"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ACCEPTED = (
    "a checkpoint (student train, student import-soundnet), the released soundnet8.npz or sound8.npy, "
    "or .safetensors with its config (student export)"
)
SAFETENSORS_CONFIG = "soundnet_config"
"""The metadata key of a ``.safetensors`` file that holds the model config (JSON)."""


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
    """The raw checkpoint dict, validated; raises a one-line error for anything that is not one of ours."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types, with many lines, for a corrupt or foreign file
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it holds {foreign.group(1)} objects, not only tensors" if foreign else "damaged or not PyTorch"
        raise ValueError(f"{path} is not a readable checkpoint ({what}); accepted: {ACCEPTED}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (import released weights with `student import-soundnet`)")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} is {FORMAT} version {payload.get('version')!r}; this release reads {READABLE_VERSIONS}"
        )
    return payload


def model_format(path: str | os.PathLike) -> str:
    """``checkpoint``, ``released`` (soundnet8.npz, sound8.npy) or ``safetensors``, from the file's first bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}; accepted: {ACCEPTED}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a model file: {ACCEPTED}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):  # torch.save and np.savez both write zip archives
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            names = []
        if names and all(name.endswith(".npy") for name in names):
            return "released"
        if any(name.endswith("data.pkl") for name in names):
            return "checkpoint"
    elif head.startswith(NPY_MAGIC):
        with open(path, "rb") as f, contextlib.suppress(ValueError):
            if npy_dtype(f).hasobject:  # a pickled dict, as sound8.npy is; a plain array is no model
                return "released"
    elif head[:1] == b"\x80":  # a pickle: torch.save's format before zip archives
        return "checkpoint"
    elif len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    raise ValueError(f"{path} is not a SoundNet model file; accepted: {ACCEPTED}")


def load_checkpoint(path: str | os.PathLike) -> SoundNet:
    """Rebuild the network stored in ``path`` (any accepted format, see :func:`model_format`), in eval mode."""
    kind = model_format(path)
    if kind == "released":
        return import_soundnet8(path)
    if kind == "safetensors":
        return load_safetensors(path)
    payload = read_checkpoint(path)
    model = SoundNet(ModelConfig(**payload["config"]))
    model.load_state_dict(payload["model"], strict=True)
    return model.eval()


def config_json_path(path: str | os.PathLike) -> Path:
    """The JSON config written beside a ``.safetensors`` file: ``model.safetensors`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def save_safetensors(path: str | os.PathLike, model: SoundNet, **metadata: str) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its config to :func:`config_json_path`; the config
    is also in the file's metadata, so the file alone loads. Returns the JSON path. Both writes are atomic."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file name must end in .safetensors")
    config = dataclasses.asdict(model.config)
    blob = save(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        metadata={"format": "pt", SAFETENSORS_CONFIG: json.dumps(config, sort_keys=True), **metadata},
    )
    beside = config_json_path(path)
    with writing(beside), atomic_path(beside) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with writing(path), atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return beside


def load_safetensors(path: str | os.PathLike) -> SoundNet:
    """A network from a ``.safetensors`` file: its config from the file's metadata, else ``NAME.json`` or
    ``config.json`` beside it (the layout of a model hub)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .safetensors file ({exc})") from None
    text = metadata.get(SAFETENSORS_CONFIG)
    source = path
    if text is None:
        source = next((p for p in (config_json_path(path), path.with_name("config.json")) if p.is_file()), None)
        if source is None:
            raise ValueError(
                f"{path} has no SoundNet config: neither in its metadata ({SAFETENSORS_CONFIG}) nor in "
                f"{config_json_path(path).name} or config.json beside it (student export writes both)"
            )
        text = source.read_text(encoding="utf-8")
    try:
        config = ModelConfig(**json.loads(text))
        with torch.device("meta"):  # the shapes first: a config of huge heads takes no memory before it is refused
            SoundNet(config).load_state_dict({k: v.to("meta") for k, v in state.items()}, strict=True)
        model = SoundNet(config)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        message = " ".join(str(exc).split())  # load_state_dict lists each mismatch on a line of its own
        raise ValueError(f"{path}: weights and config (from {source.name}) do not match: {message}") from None
    return model.eval()
