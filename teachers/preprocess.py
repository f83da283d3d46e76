"""Frame preprocessing for teachers: RGB uint8 frames in, normalised crops out.

The work is split in two so that on a GPU only uint8 crops cross the bus (a quarter of the float32 bytes):
resize and centre crop run on CPU per frame (frames may differ in size), normalisation runs wherever the model
is. Resizing stays in uint8 with antialiasing, as PIL does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

Frames = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """How a teacher wants its input.

    A crop's value in channel c is ``(pixel / 255 * pixel_max - mean[c]) / std[c]``, with channels in
    ``channel_order`` (mean and std are given in that order too). ``pixel_max`` is 1.0 for the usual [0, 1]
    scale and 255.0 for Caffe-style models that work on raw pixel values.
    """

    resize: int  # shorter side, before the crop
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    pixel_max: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}")
        InterpolationMode(self.interpolation)
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.resize}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def crops(self, frames: Frames, pin_memory: bool = False) -> torch.Tensor:
        """Resize the shorter side, centre-crop, reorder channels: uint8 ``[N, 3, crop, crop]`` on CPU.

        The result is stored channels-last (NHWC), the layout frames come in: copying crops row by row through
        numpy is two orders of magnitude faster than a per-frame HWC to CHW transpose in torch.
        """
        frames = as_frame_list(frames)
        out = torch.empty((len(frames), self.crop, self.crop, 3), dtype=torch.uint8, pin_memory=pin_memory)
        dst = out.numpy()
        for i, frame in enumerate(frames):
            crop = self._crop(frame)
            dst[i] = crop[..., ::-1] if self.channel_order == "BGR" else crop
        return out.permute(0, 3, 1, 2)

    def _crop(self, frame: np.ndarray) -> np.ndarray:
        """A view of the centre crop, after an antialiased uint8 resize unless the frame is already sized."""
        if min(frame.shape[:2]) != self.resize:
            chw = torch.from_numpy(frame).permute(2, 0, 1)
            mode = InterpolationMode(self.interpolation)
            frame = TF.resize(chw, [self.resize], interpolation=mode, antialias=True).permute(1, 2, 0).numpy()
        h, w = frame.shape[:2]
        top, left = (
            int(round((h - self.crop) / 2.0)),
            int(round((w - self.crop) / 2.0)),
        )  # torchvision's rounding
        return frame[top : top + self.crop, left : left + self.crop]

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops (any device) to float32 model input on the same device."""
        scale, shift = _affine(self, crops.device)
        return crops.float().mul_(scale).add_(shift)

    def __call__(self, frames: Frames) -> torch.Tensor:
        return self.normalize(self.crops(frames))


@functools.cache
def _affine(pre: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation as ``x * scale + shift``, made once per device: building it per batch would be a blocking
    host-to-device copy that stalls the CUDA pipeline."""
    mean = torch.tensor(pre.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float64).view(1, 3, 1, 1)
    scale, shift = pre.pixel_max / 255.0 / std, -mean / std
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def as_frame_list(frames: Frames) -> list[np.ndarray]:
    """Accept ``[N, H, W, 3]`` or a sequence of ``[H, W, 3]`` (sizes may differ); uint8 RGB only."""
    if isinstance(frames, np.ndarray | torch.Tensor):
        if frames.ndim != 4:
            raise ValueError(f"frames must be [N, H, W, 3] or a list of [H, W, 3]; got shape {tuple(frames.shape)}")
        frames = list(frames)
    out = []
    for frame in frames:
        a = np.ascontiguousarray(frame.cpu().numpy() if isinstance(frame, torch.Tensor) else frame)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"each frame must be uint8 [H, W, 3] RGB; got {a.dtype} {a.shape}")
        out.append(a)
    return out
