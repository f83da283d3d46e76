"""SoundNet sound networks (Aytar, Vondrick, Torralba, NIPS 2016) with every intermediate output by name.

The layer tables are the paper's Table 1 (and cvondrick/soundnet main_train.lua for the 8-layer net). A network is
a plain sequence of stages; each stage has a name (``conv1``, ``pool1``, ...) so that features can be taken from
any of them, and the last conv is split into one head per teacher (``conv8_imagenet``, ``conv8_places`` ...).
A head is of its teacher's kind: a posterior head outputs logits over the teacher's classes, an embedding head a
unit vector per step in the teacher's embedding space (its conv output, L2-normalised over channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from soundnet.shards.contract import SAMPLE_RATE
from soundnet.shards.schema import EMBEDDING, POSTERIOR, TEACHER_KINDS

INPUT_SCALE = 256.0
"""The released model's input convention: it saw waveforms in [-1, 1] times 256. The model applies it itself."""


@dataclass(frozen=True)
class ConvSpec:
    """A conv + BN + ReLU block, optionally followed by a max-pool stage of its own name."""

    name: str
    out_channels: int
    kernel: int
    stride: int
    padding: int
    pool: tuple[str, int] | None = None  # (pool stage name, kernel = stride)


@dataclass(frozen=True)
class HeadSpec:
    """The final conv, one copy per teacher, no BN or ReLU: it outputs logits per time step."""

    prefix: str
    kernel: int
    stride: int
    padding: int


ARCHITECTURES: dict[str, tuple[list[ConvSpec], HeadSpec]] = {
    "soundnet8": (
        [
            ConvSpec("conv1", 16, 64, 2, 32, pool=("pool1", 8)),
            ConvSpec("conv2", 32, 32, 2, 16, pool=("pool2", 8)),
            ConvSpec("conv3", 64, 16, 2, 8),
            ConvSpec("conv4", 128, 8, 2, 4),
            ConvSpec("conv5", 256, 4, 2, 2, pool=("pool5", 4)),
            ConvSpec("conv6", 512, 4, 2, 2),
            ConvSpec("conv7", 1024, 4, 2, 2),
        ],
        HeadSpec("conv8", kernel=8, stride=2, padding=0),
    ),
    "soundnet5": (
        [
            ConvSpec("conv1", 32, 64, 2, 32, pool=("pool1", 8)),
            ConvSpec("conv2", 64, 32, 2, 16, pool=("pool2", 8)),
            ConvSpec("conv3", 128, 16, 2, 8, pool=("pool3", 8)),
            ConvSpec("conv4", 256, 8, 2, 4),
        ],
        HeadSpec("conv5", kernel=16, stride=12, padding=4),
    ),
}

DEFAULT_HEADS = {"imagenet": 1000, "places": 365}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network: stored in every checkpoint."""

    arch: str = "soundnet8"
    heads: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HEADS))
    bn_eps: float = 1e-5
    sample_rate: int = SAMPLE_RATE  # the rate its input must have
    input_scale: float = INPUT_SCALE  # applied inside ``features``: callers pass waveforms in [-1, 1]
    head_kinds: dict[str, str] = field(default_factory=dict)  # head -> posterior | embedding; unnamed: posterior

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {sorted(ARCHITECTURES)}")
        if not self.heads:
            raise ValueError("a SoundNet needs at least one head (one per teacher)")
        for name in self.heads:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"head name {name!r} must be letters, digits, '_' or '-'")
        unknown = {n: k for n, k in self.head_kinds.items() if n not in self.heads or k not in TEACHER_KINDS}
        if unknown:
            raise ValueError(f"head kinds {unknown} name no head of {list(self.heads)} or no kind of {TEACHER_KINDS}")
        # every head's kind, in head order: checkpoints made before embedding heads have none and hold posteriors
        self.head_kinds = {name: self.head_kinds.get(name, POSTERIOR) for name in self.heads}


def _out_len(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class SoundNet(nn.Module):
    """A SoundNet of any registered architecture.

    ``forward(x)`` takes ``[B, 1, T]`` (or ``[B, T]``) waveforms in [-1, 1] at ``config.sample_rate`` (the model
    applies its own ``config.input_scale``) and returns the heads' logits
    ``{teacher: [B, C, steps]}``; ``features(x, layers)`` returns any named intermediate outputs and stops at the
    deepest one asked for.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        blocks, head = ARCHITECTURES[config.arch]
        self.blocks = nn.ModuleDict()
        in_ch = 1
        for spec in blocks:
            self.blocks[spec.name] = nn.Sequential(
                nn.Conv1d(in_ch, spec.out_channels, spec.kernel, spec.stride, spec.padding),
                nn.BatchNorm1d(spec.out_channels, eps=config.bn_eps),
                nn.ReLU(inplace=True),
            )
            in_ch = spec.out_channels
        self.heads = nn.ModuleDict(
            {
                name: nn.Conv1d(in_ch, classes, head.kernel, head.stride, head.padding)
                for name, classes in config.heads.items()
            }
        )
        self._blocks = blocks
        self._head = head

    # ---- layer bookkeeping -------------------------------------------------------------------------------
    @property
    def head_names(self) -> list[str]:
        """Stage names of the heads, e.g. ``conv8_imagenet``."""
        return [f"{self._head.prefix}_{name}" for name in self.config.heads]

    @property
    def layer_names(self) -> list[str]:
        """Every named output in forward order, heads last."""
        names = []
        for spec in self._blocks:
            names.append(spec.name)
            if spec.pool:
                names.append(spec.pool[0])
        return names + self.head_names

    def output_length(self, layer: str, num_samples: int) -> int:
        """Time steps that ``layer`` produces for an input of ``num_samples`` (may be <= 0: too short)."""
        self._check_layer(layer)
        if num_samples < 1:
            return 0
        n = num_samples
        for spec in self._blocks:
            n = _out_len(n, spec.kernel, spec.stride, spec.padding)
            if spec.name == layer or n < 1:  # an empty stage stops the network: padding cannot revive it
                return n
            if spec.pool:
                n = n // spec.pool[1]
                if spec.pool[0] == layer or n < 1:
                    return n
        return _out_len(n, self._head.kernel, self._head.stride, self._head.padding)

    def min_input_samples(self, layer: str) -> int:
        """The shortest input (in samples) for which ``layer`` has at least one output step."""
        lo, hi = 1, self.config.sample_rate
        while self.output_length(layer, hi) < 1:
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            if self.output_length(layer, mid) >= 1:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layer_names:
            raise ValueError(f"unknown layer {layer!r}; {self.config.arch} has {self.layer_names}")

    def _check_length(self, layer: str, num_samples: int) -> None:
        if self.output_length(layer, num_samples) < 1:
            need, rate = self.min_input_samples(layer), self.config.sample_rate
            raise ValueError(
                f"input of {num_samples} samples ({num_samples / rate:.2f} s) is too short for layer "
                f"{layer!r}: it needs at least {need} samples ({need / rate:.2f} s at {rate} Hz)"
            )

    # ---- forward -------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, layers: list[str] | str) -> dict[str, torch.Tensor]:
        """Named outputs ``{layer: [B, C, steps]}``; computes only as deep as the deepest layer asked for."""
        wanted = [layers] if isinstance(layers, str) else list(layers)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"expected a waveform batch [B, 1, T] or [B, T], got shape {tuple(x.shape)}")
        order = self.layer_names
        for layer in wanted:
            self._check_layer(layer)
            self._check_length(layer, x.shape[-1])
        last = max(order.index(layer) for layer in wanted)
        x = x * self.config.input_scale
        out: dict[str, torch.Tensor] = {}
        for spec in self._blocks:
            x = self.blocks[spec.name](x)
            out[spec.name] = x
            if order.index(spec.name) >= last:
                return {layer: out[layer] for layer in wanted}
            if spec.pool:
                x = nn.functional.max_pool1d(x, spec.pool[1], spec.pool[1])
                out[spec.pool[0]] = x
                if order.index(spec.pool[0]) >= last:
                    return {layer: out[layer] for layer in wanted}
        for name, head_name in zip(self.config.heads, self.head_names):
            if head_name in wanted:
                out[head_name] = self.heads[name](x)
                if self.config.head_kinds[name] == EMBEDDING:
                    out[head_name] = F.normalize(out[head_name], dim=1)
        return {layer: out[layer] for layer in wanted}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs ``{teacher name: [B, C, steps]}``: logits, or unit embeddings for an embedding head."""
        outs = self.features(x, self.head_names)
        return {name: outs[head] for name, head in zip(self.config.heads, self.head_names)}


def init_weights(model: SoundNet, generator: torch.Generator | None = None) -> None:
    """The paper's initialisation: conv weights N(0, 0.01), biases 0, BN gamma N(1, 0.02), beta 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv1d):
                module.weight.normal_(0.0, 0.01, generator=generator)
                module.bias.zero_()
            elif isinstance(module, nn.BatchNorm1d):
                module.weight.normal_(1.0, 0.02, generator=generator)
                module.bias.zero_()


def build_model(config: ModelConfig) -> SoundNet:
    """A freshly initialised network."""
    model = SoundNet(config)
    init_weights(model)
    return model
