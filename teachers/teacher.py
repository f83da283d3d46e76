"""``--teacher NAME=ARCH[:WEIGHTS]`` specs and the loaded :class:`Teacher` (frames to log-probabilities).

A model is loaded once per process and device and shared by every :class:`Teacher` that names it, so a worker
that handles many shards (or two names for the same model) pays the load once.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import WeightsEnum

from soundnet.shards.schema import TEACHER_NAME_RE
from soundnet.teachers.preprocess import Frames, Preprocessing, as_frame_list
from soundnet.teachers.registry import LoadedModel, build, check_arch, resolve_weights


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``NAME=ARCH[:WEIGHTS]``; NAME becomes the shard field ``<key>.<NAME>.npy``."""

    name: str
    arch: str
    weights: str | None

    def __str__(self) -> str:
        return f"{self.name}={self.arch}" + (f":{self.weights}" if self.weights else "")


def parse_spec(spec: str, *, check_weights: bool = True) -> TeacherSpec:
    """Parse ``NAME=ARCH[:WEIGHTS]``; WEIGHTS is everything after the first ':' (paths may contain ':').

    ``check_weights=False`` skips the file / weight-name check, for a driver that cannot see workers' files.
    """
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ValueError(f"teacher spec {spec!r} is not NAME=ARCH[:WEIGHTS], e.g. imagenet=efficientnet_lite0:w.pth")
    if not TEACHER_NAME_RE.fullmatch(name) or name == "audio":
        raise ValueError(
            f"teacher name {name!r} in {spec!r} must match {TEACHER_NAME_RE.pattern} and not be 'audio': "
            "it names the shard member <key>.<name>.npy, and WebDataset lower-cases member suffixes"
        )
    arch, _, weights = rest.partition(":")
    check_arch(arch)
    parsed = TeacherSpec(name, arch, weights or None)
    if check_weights:
        resolve_weights(arch, parsed.weights)
    return parsed


def parse_specs(specs: Iterable[str], *, check_weights: bool = True) -> list[TeacherSpec]:
    """Parse several specs; names must be distinct since each is one field of every sample."""
    parsed = [parse_spec(s, check_weights=check_weights) for s in specs]
    names = [p.name for p in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"teacher names must be distinct; repeated: {', '.join(dupes)}")
    return parsed


class Teacher:
    """A named, loaded teacher: frames (RGB uint8) in, ``[N, C]`` float32 log-probabilities out."""

    def __init__(self, spec: TeacherSpec, loaded: LoadedModel, device: torch.device) -> None:
        self.name = spec.name
        self.arch = spec.arch
        self.weights = spec.weights
        self.weights_sha256 = loaded.weights_sha256
        self.classes = list(loaded.classes)
        self.num_classes = len(loaded.classes)
        self.preprocessing: Preprocessing = loaded.preprocessing
        self.device = device
        self._loaded = loaded

    @property
    def model(self) -> nn.Module:
        return self._loaded.model

    def __repr__(self) -> str:
        return f"Teacher({self.name}={self.arch}:{self.weights}, {self.num_classes} classes, {self.device})"

    def metadata(self) -> dict:
        """What a shard records about this teacher (JSON-serialisable); classes are named by their hash."""
        return {
            "name": self.name,
            "arch": self.arch,
            "weights": self.weights,
            "sha256": self.weights_sha256,
            "weights_url": self._loaded.weights_url,
            "classes": self.num_classes,  # the shard schema's name for the class count
            "num_classes": self.num_classes,
            "class_source": self._loaded.class_source,
            "classes_sha256": hashlib.sha256("\n".join(self.classes).encode()).hexdigest(),
            "preprocessing": self.preprocessing.to_dict(),
        }

    def preprocess(self, frames: Frames) -> torch.Tensor:
        """Model input for ``frames``: float32 ``[N, 3, crop, crop]`` on CPU (stored channels-last)."""
        return self.preprocessing(frames)

    def log_probs(self, frames: Frames, batch_size: int = 32) -> torch.Tensor:
        """``log_softmax`` of the model output, float32 ``[N, C]`` on CPU.

        On CUDA: uint8 crops go from pinned memory without blocking, are normalised on the GPU and run in bf16
        autocast; results stay on the GPU until the end so the CPU prepares the next batch meanwhile.
        """
        frames = as_frame_list(frames)
        cuda = self.device.type == "cuda"
        outs = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                crops = self.preprocessing.crops(frames[start : start + batch_size], pin_memory=cuda)
                x = self.preprocessing.normalize(crops.to(self.device, non_blocking=cuda))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = self.model(x)
                outs.append(logits.float().log_softmax(dim=1))
        if not outs:
            return torch.empty((0, self.num_classes), dtype=torch.float32)
        return torch.cat(outs).cpu()


_load_lock = threading.Lock()


@functools.cache
def _load(arch: str, weights: Path | WeightsEnum, device: torch.device) -> LoadedModel:
    return build(arch, weights, device)


def load_teacher(spec: str | TeacherSpec, device: str | torch.device = "cpu") -> Teacher:
    """Parse (if need be) and load a teacher; one model per process per (arch, weights, device)."""
    if isinstance(spec, str):
        spec = parse_spec(spec, check_weights=False)
    weights = resolve_weights(spec.arch, spec.weights)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _load_lock:
        loaded = _load(spec.arch, weights, device)
    return Teacher(spec, loaded, device)
