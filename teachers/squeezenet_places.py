"""SqueezeNet-v1.1 with BatchNorm, the Places365 variant of urbste/squeezenet_places365, in plain torch.

It is not torchvision's SqueezeNet: every conv has BN (eps 1e-4, from Lasagne's stored ``inv_std``) and is
followed by a leaky ReLU of slope 0.55 (Lasagne's randomized rectifier at test time), conv10 included. The
output is the globally pooled conv10 scores; it was trained with a softmax on exactly these, so they act
as logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-4
SLOPE = 0.55

# (name, in channels, squeeze channels, expand channels per branch); "pool" is a 3x3 stride-2 max-pool.
FIRE_LAYOUT: tuple[tuple[str, int, int, int] | str, ...] = (
    ("fire2", 64, 16, 64),
    ("fire3", 128, 16, 64),
    "pool",
    ("fire4", 128, 32, 128),
    ("fire5", 256, 32, 128),
    "pool",
    ("fire6", 256, 48, 192),
    ("fire7", 384, 48, 192),
    ("fire8", 384, 64, 256),
    ("fire9", 512, 64, 256),
)


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.bn(self.conv(x)), SLOPE)


class Fire(nn.Module):
    def __init__(self, in_ch: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = ConvBNReLU(in_ch, squeeze, 1)
        self.expand1x1 = ConvBNReLU(squeeze, expand, 1)
        self.expand3x3 = ConvBNReLU(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], dim=1)


class SqueezeNetBNPlaces(nn.Module):
    def __init__(self, num_classes: int = 365) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, 3, stride=2, padding=1)
        self.order: list[str] = []
        for entry in FIRE_LAYOUT:
            if entry == "pool":
                self.order.append("pool")
            else:
                name, in_ch, squeeze, expand = entry
                self.add_module(name, Fire(in_ch, squeeze, expand))
                self.order.append(name)
        self.dropout = nn.Dropout(0.5)
        self.conv10 = nn.Conv2d(512, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 3, 2)
        for name in self.order:
            x = F.max_pool2d(x, 3, 2) if name == "pool" else getattr(self, name)(x)
        x = F.leaky_relu(self.conv10(self.dropout(x)), SLOPE)
        return x.mean(dim=(2, 3))


def squeezenet_bn_places365(num_classes: int = 365) -> SqueezeNetBNPlaces:
    return SqueezeNetBNPlaces(num_classes)
