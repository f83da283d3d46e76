"""timm models as teachers: ``timm:MODEL[:WEIGHTS]`` for a classifier (posteriors, as the other teachers) and
``timm-embed:MODEL[:WEIGHTS]`` for an image tower used for its embedding (built with ``num_classes=0``: the pooled
feature, L2-normalised by :class:`~soundnet.teachers.teacher.Teacher`).

timm is an optional extra (``pip install 'soundnet-distill[timm]'``), imported only when such a teacher is named.
The model's own pretrained config gives its preprocessing (``timm.data.resolve_model_data_config``: input size,
crop_pct, interpolation, mean/std) and, where it has them, its class names (its ``label_names``, else the ImageNet
subset timm infers from the class count, else indices).

WEIGHTS is either a local file in timm's format (safetensors or a torch state dict: the ``model.safetensors`` of the
model's ``timm/`` Hugging Face repository, or ``torch.save(model.state_dict())`` of the timm model), loaded strictly
and offline; or a pretrained tag (``timm:resnet50.a1_in1k``, ``timm:resnet50:a1_in1k``, or no WEIGHTS for the
default tag), which timm downloads through huggingface_hub into its cache, so only with internet.

This module has the registry's interface (``check_arch``, ``resolve_weights``, ``build``) for archs that start
with one of :data:`TIMM_KINDS`; :mod:`soundnet.teachers.teacher` dispatches on :func:`is_timm_arch`.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import re
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from soundnet.digest import sha256_file
from soundnet.shards.schema import EMBEDDING, POSTERIOR
from soundnet.teachers.preprocess import Preprocessing
from soundnet.teachers.registry import LoadedModel, load_strict, ready

log = logging.getLogger(__name__)

TIMM_KINDS = {"timm": POSTERIOR, "timm-embed": EMBEDDING}
"""The ARCH prefixes of timm teachers and the kind of target each gives."""
EXTRA = "pip install 'soundnet-distill[timm]'"
_TAG_RE = re.compile(r"[A-Za-z0-9_]+")


def is_timm_arch(arch: str) -> bool:
    return arch.partition(":")[0] in TIMM_KINDS


def _split(arch: str) -> tuple[str, str]:
    """``timm-embed:vit_small_patch14_dinov2.lvd142m`` -> (``embedding``, ``vit_small_patch14_dinov2.lvd142m``)."""
    prefix, _, model_name = arch.partition(":")
    return TIMM_KINDS[prefix], model_name


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"timm teachers need timm, an optional extra: {EXTRA}") from exc
    return timm


def check_arch(arch: str) -> None:
    """Refuse a timm model name that timm does not know, suggesting close ones."""
    prefix, _, model_name = arch.partition(":")
    if not model_name:
        raise ValueError(f"teacher arch {arch!r} names no model: {prefix}:MODEL, e.g. {prefix}:resnet50")
    timm = _timm()
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.partition(".")[0], timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown timm model {model_name!r}{hint}; timm.list_models('*pattern*') lists them")


def resolve_weights(arch: str, weights: str | None) -> Path | str:
    """A local weights file, or the name (with tag) of pretrained weights for timm to download; else ValueError."""
    check_arch(arch)
    _, model_name = _split(arch)
    timm = _timm()
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path.resolve()
        if not _TAG_RE.fullmatch(weights):
            raise ValueError(f"weights file not found for teacher arch {arch!r}: {weights}")
        tagged = f"{model_name}.{weights}"
        if "." not in model_name and timm.list_pretrained(tagged):
            return tagged
        tags = [name.partition(".")[2] for name in timm.list_pretrained(model_name.partition(".")[0])]
        raise ValueError(
            f"weights for teacher arch {arch!r}: {weights!r} is neither a file nor a pretrained tag of "
            f"{model_name.partition('.')[0]!r} (tags: {', '.join(tags) or 'none'})"
        )
    if not timm.list_pretrained(model_name):
        raise ValueError(f"timm has no pretrained weights named {model_name!r}: give WEIGHTS, a local file")
    config = timm.models.get_pretrained_cfg(model_name)
    return f"{config.architecture}.{config.tag}"  # the default tag named: what timm fetches


def build(arch: str, weights: Path | str, device: torch.device) -> LoadedModel:
    """Build the timm model of ``arch`` with ``weights`` (a file, loaded strictly; or a pretrained name, downloaded)."""
    timm = _timm()
    kind, model_name = _split(arch)
    if isinstance(weights, Path):
        model = timm.create_model(model_name, pretrained=False)
        state = _fit_classifier(model, _read(weights, timm), kind, arch, weights)
        load_strict(model, state, arch, weights)
        sha256, url, name = sha256_file(weights), None, None
    else:
        try:  # timm fetches the weights through huggingface_hub into its cache
            model = timm.create_model(weights, pretrained=True, **({"num_classes": 0} if kind == EMBEDDING else {}))
        except Exception as exc:  # network, hub and format errors come in many types
            raise ValueError(
                f"teacher arch {arch!r}: timm could not fetch pretrained weights {weights!r} "
                f"({type(exc).__name__}: {exc}); offline, give WEIGHTS, a local file"
            ) from exc
        sha256, url, name = _state_digest(model), _source_url(model.pretrained_cfg), weights
    preprocessing = _preprocessing(timm, model, arch)
    if kind == EMBEDDING:
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        loaded = LoadedModel(
            model, (), "none", preprocessing, sha256, url, kind=EMBEDDING, embedding_dim=dim, pretrained_name=name
        )
    else:
        classes, source = _class_names(timm, model)
        loaded = LoadedModel(model, classes, source, preprocessing, sha256, url, pretrained_name=name)
    ready(model, device)
    return loaded


def _read(path: Path, timm: ModuleType) -> dict[str, torch.Tensor]:
    """timm's reader: safetensors or ``torch.load(weights_only=True)``, unwrapped from training checkpoints."""
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as exc:  # safetensors and torch.load fail with many types
        raise ValueError(
            f"{path}: not a loadable safetensors file or PyTorch state dict ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _fit_classifier(
    model: nn.Module, state: dict[str, torch.Tensor], kind: str, arch: str, path: Path
) -> dict[str, torch.Tensor]:
    """Shape ``model``'s classifier after the file: none for an embedding (a classifier in the file is dropped),
    the file's class count for a classifier."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    if kind == EMBEDDING:
        model.reset_classifier(0)
        return {k: v for k, v in state.items() if k.rpartition(".")[0] not in names}
    key = f"{names[0]}.weight" if names else "?"
    if key not in state:
        raise ValueError(
            f"{path} does not fit teacher arch {arch!r}: it has no classifier weight {key!r} "
            f"(for the model's embedding: timm-embed:{arch.partition(':')[2]})"
        )
    if state[key].shape[0] != model.num_classes:
        model.reset_classifier(state[key].shape[0])
    return state


def _preprocessing(timm: ModuleType, model: nn.Module, arch: str) -> Preprocessing:
    """The model's eval recipe: resize the shorter side to ``floor(size / crop_pct)``, centre-crop ``size``."""
    config = timm.data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"teacher arch {arch!r} takes {height}x{width} input; teachers take square crops")
    if config["crop_mode"] != "center":
        log.warning(
            "%s: timm's recipe for it is crop_mode %r; frames are resized and centre-cropped instead",
            arch,
            config["crop_mode"],
        )
    return Preprocessing(
        resize=math.floor(height / config["crop_pct"]),
        crop=height,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config["interpolation"],
    )


def _class_names(timm: ModuleType, model: nn.Module) -> tuple[tuple[str, ...], str]:
    """The pretrained config's label names (with their descriptions), else those of the ImageNet subset timm infers
    from the class count, else ``class_<i>``; and where they came from."""
    count = model.num_classes
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == count:
        descriptions = model.pretrained_cfg.get("label_descriptions") or {}
        return tuple(descriptions.get(n, n) for n in names), "timm:label_names"
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == count:
            return tuple(info.label_descriptions()), f"timm:{subset}"
    return tuple(f"class_{i}" for i in range(count)), "index"


def _state_digest(model: nn.Module) -> str:
    """sha256 of every tensor's name and bytes, for weights timm fetched (the file is timm's business)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _source_url(config: dict) -> str | None:
    hub = config.get("hf_hub_id")
    return f"https://huggingface.co/{hub}" if hub else config.get("url")
