"""EfficientNet-Lite0 in plain torch, matching the TF-Lite checkpoint converted by ML Illustrated.

Written from the architecture notes in the teacher README rather than imported, so no extra package is needed.
Key names follow lukemelas ``efficientnet_pytorch`` so the released state dict loads with ``strict=True``.
What matters for agreeing with the TF original: "SAME" padding (asymmetric for stride 2), BatchNorm eps 1e-3,
ReLU6, and no squeeze-excitation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3

# (repeats, kernel, stride of the first block, expand ratio, out channels), one row per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Conv2dSame(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding.

    For stride 1 and an odd kernel SAME is symmetric, so the conv does it; for stride 2 it depends on the
    input size and puts the extra pixel after, so it is computed per call.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            groups=groups,
            bias=False,
            padding=kernel // 2 if stride == 1 else 0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        pad_h = _same_pad(x.shape[-2], k, s)
        pad_w = _same_pad(x.shape[-1], k, s)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class MBConvBlock(nn.Module):
    """Inverted residual: optional 1x1 expand, depthwise kxk, 1x1 projection, skip when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.expand = expand != 1
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk and classifier; returns logits."""

    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_ch, HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = x.mean(dim=(2, 3))
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes)
