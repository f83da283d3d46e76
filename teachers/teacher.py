"""``--teacher NAME=ARCH[:WEIGHTS]`` specs and the loaded :class:`Teacher` (frames to the rows a shard stores:
log-probabilities for a classifier, unit embeddings for an image tower).

ARCH is a built-in or torchvision name (:mod:`soundnet.teachers.registry`) or ``timm:MODEL`` / ``timm-embed:MODEL``
(:mod:`soundnet.teachers.timm_teacher`); each module answers ``check_arch``, ``resolve_weights`` and ``build``.

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
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import WeightsEnum

from soundnet.shards.schema import EMBEDDING, POSTERIOR, TEACHER_NAME_RE
from soundnet.teachers import registry, timm_teacher
from soundnet.teachers.preprocess import Frames, Preprocessing, as_frame_list
from soundnet.teachers.registry import LoadedModel


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``NAME=ARCH[:WEIGHTS]``; NAME becomes the shard field ``<key>.<NAME>.npy``. A timm ARCH keeps its
    model: ``timm-embed:vit_small_patch14_dinov2``."""

    name: str
    arch: str
    weights: str | None

    def __str__(self) -> str:
        return f"{self.name}={self.arch}" + (f":{self.weights}" if self.weights else "")


def _backend(arch: str) -> ModuleType:
    """The module that knows ``arch``: timm's for ``timm:...`` and ``timm-embed:...``, else the registry."""
    return timm_teacher if timm_teacher.is_timm_arch(arch) else registry


def parse_spec(spec: str, *, check_weights: bool = True) -> TeacherSpec:
    """Parse ``NAME=ARCH[:WEIGHTS]``; WEIGHTS is everything after the first ':' (paths may contain ':'), after the
    second for ``timm:MODEL[:WEIGHTS]``.

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
    if arch in timm_teacher.TIMM_KINDS:
        model_name, _, weights = weights.partition(":")
        arch = f"{arch}:{model_name}"
    _backend(arch).check_arch(arch)
    parsed = TeacherSpec(name, arch, weights or None)
    if check_weights:
        _backend(arch).resolve_weights(arch, parsed.weights)
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
    """A named, loaded teacher: frames (RGB uint8) in, ``[N, dim]`` float32 rows out: log-probabilities of its
    classes (kind ``posterior``) or its L2-normalised embedding (kind ``embedding``)."""

    def __init__(self, spec: TeacherSpec, loaded: LoadedModel, device: torch.device) -> None:
        self.name = spec.name
        self.arch = spec.arch
        self.weights = spec.weights
        self.weights_sha256 = loaded.weights_sha256
        self.kind = loaded.kind
        self.dim = loaded.dim
        self.classes = list(loaded.classes)  # empty for an embedding
        self.preprocessing: Preprocessing = loaded.preprocessing
        self.device = device
        self._loaded = loaded

    @property
    def model(self) -> nn.Module:
        return self._loaded.model

    def __repr__(self) -> str:
        return f"Teacher({self.name}={self.arch}:{self.weights}, {self.kind} {self.dim}, {self.device})"

    def metadata(self) -> dict:
        """What a shard records about this teacher (JSON-serialisable); classes are named by their hash.

        The width is ``classes`` for a posterior (the name the shard schema always had) and ``dim`` for an
        embedding, which has no classes: a reader that predates embeddings refuses it instead of taking it for one.
        """
        meta = {
            "name": self.name,
            "arch": self.arch,
            # a timm tag without WEIGHTS: where timm got it, else the tag's name (a config may have no URL)
            "weights": self.weights or self._loaded.weights_url or self._loaded.pretrained_name,
            "sha256": self.weights_sha256,
            "weights_url": self._loaded.weights_url,
            "kind": self.kind,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }
        if self.kind == POSTERIOR:
            meta |= {
                "classes": self.dim,  # the shard schema's name for a posterior's width
                "num_classes": self.dim,
                "class_source": self._loaded.class_source,
                "classes_sha256": hashlib.sha256("\n".join(self.classes).encode()).hexdigest(),
            }
        return meta

    def preprocess(self, frames: Frames) -> torch.Tensor:
        """Model input for ``frames``: float32 ``[N, 3, crop, crop]`` on CPU (stored channels-last)."""
        return self.preprocessing(frames)

    def outputs(self, frames: Frames, batch_size: int = 32) -> torch.Tensor:
        """The rows a shard stores, float32 ``[N, dim]`` on CPU: ``log_softmax`` of the model output for a
        posterior teacher, the output divided by its L2 norm for an embedding teacher.

        On CUDA: uint8 crops go from pinned memory without blocking, are normalised on the GPU and run in bf16
        autocast; results stay on the GPU until the end so the CPU prepares the next batch meanwhile.
        """
        frames = as_frame_list(frames)
        cuda = self.device.type == "cuda"
        outs = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                crops = self.preprocessing.crops(frames[start : start + batch_size], pin_memory=cuda)
                outs.append(self.rows(self.preprocessing.normalize(crops.to(self.device, non_blocking=cuda))))
        if not outs:
            return torch.empty((0, self.dim), dtype=torch.float32)
        return torch.cat(outs).cpu()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised model input on the device to float32 rows on the device (bf16 autocast on CUDA)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x).float()
        return F.normalize(out, dim=1) if self.kind == EMBEDDING else out.log_softmax(dim=1)


_load_lock = threading.Lock()


@functools.cache
def _load(arch: str, weights: Path | WeightsEnum | str, device: torch.device) -> LoadedModel:
    return _backend(arch).build(arch, weights, device)


def load_teacher(spec: str | TeacherSpec, device: str | torch.device = "cpu") -> Teacher:
    """Parse (if need be) and load a teacher; one model per process per (arch, weights, device)."""
    if isinstance(spec, str):
        spec = parse_spec(spec, check_weights=False)
    weights = _backend(spec.arch).resolve_weights(spec.arch, spec.weights)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _load_lock:
        loaded = _load(spec.arch, weights, device)
    return Teacher(spec, loaded, device)
