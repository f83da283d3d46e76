"""The HEAR 2021 API (https://hearbenchmark.com): ``load_model``, ``get_scene_embeddings``,
``get_timestamp_embeddings``, on SoundNet's ``pool5`` (256-d, the paper's feature layer).

``load_model()`` with no path loads the released SoundNet8 weights by name (downloaded once and cached, see
:mod:`soundnet.weights`); a path loads any model file. Check it with
``pip install hearvalidator && hear-validator soundnet.hear`` (the validator needs TensorFlow).

* Timestamp embeddings: pool5's own hop is 8192 samples (371.5 ms at 22050 Hz). To reach a hop of at most 50 ms
  the network runs ``k`` = 8 passes over the clip shifted by hop = 8192 / 8 = 1024 samples (46.4 ms), and the
  passes' steps are interleaved: every embedding is an exact network output, centred on its timestamp. The clip is
  set in silence (explicit zeros, a receptive field's worth on each side) so that timestamps run from the clip's
  start to within one hop of its end, and every embedding sees a full field of real samples or zeros.
* Scene embeddings: the mean over time of :func:`soundnet.api.embed`'s pool5 steps (a clip shorter than pool5's
  field is tiled, as in the paper's evaluation); the same vector as ``student embed --scene``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from soundnet.api import check_samples, embed_batch, layer_width, receptive_field, tile_to
from soundnet.api import load_model as load_soundnet
from soundnet.student.model import SoundNet

LAYER = "pool5"
MAX_HOP_S = 0.050
DEFAULT_MODEL = "soundnet8"


class HearModel(nn.Module):
    """A SoundNet with the attributes HEAR asks for (ints) and the pass plan for a dense timestamp hop."""

    def __init__(self, net: SoundNet, layer: str = LAYER) -> None:
        super().__init__()
        self.net = net.eval()
        self.layer = layer
        self.sample_rate = int(net.config.sample_rate)
        width = layer_width(net, layer)
        self.scene_embedding_size = width
        self.timestamp_embedding_size = width
        stride = receptive_field(net, layer).stride
        passes = math.ceil(stride / (MAX_HOP_S * self.sample_rate))
        while stride % passes:  # the hop must divide the stride so that the passes interleave evenly
            passes += 1
        self.passes = passes
        self.hop_samples = stride // passes


def load_model(model_file_path: str = "") -> HearModel:
    """The HEAR model from a model file, or with no path (HEAR's convention) the released SoundNet8 weights."""
    return HearModel(load_soundnet(model_file_path or DEFAULT_MODEL))


def _as_batch(audio: torch.Tensor, model: HearModel) -> np.ndarray:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[1] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ValueError(f"audio must be a torch tensor [n_sounds, n_samples] at {model.sample_rate} Hz, got {shape}")
    waveforms = audio.detach().float().cpu().numpy()
    check_samples(waveforms)
    return waveforms


def timestamp_embeddings(model: HearModel, waveforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[B, T, D]`` embeddings every ``model.hop_samples`` and their times in samples ``[T]`` (module docstring)."""
    net, layer, hop, k = model.net, model.layer, model.hop_samples, model.passes
    field = receptive_field(net, layer)
    batch, n = waveforms.shape
    centre = field.centre(0)
    base = math.floor(centre)  # shift that puts step 0's centre at sample (centre - base) of the clip
    count = max(1, math.floor((n - 1 - (centre - base)) / hop) + 1)  # timestamps within the clip
    lead = math.ceil(max(-field.start, (k - 1) * hop - base) / field.stride)  # steps of silence before the clip
    out = np.empty((batch, count, model.timestamp_embedding_size), np.float32)
    for r in range(min(k, count)):
        steps = len(range(r, count, k))
        offset = lead * field.stride + base - r * hop  # the clip's first sample in this pass's input
        length = max(offset + n, field.first(lead + steps - 1) + field.size)
        padded = np.zeros((batch, length), np.float32)
        padded[:, offset : offset + n] = waveforms
        out[:, r::k] = embed_batch(net, padded, layer)[:, lead : lead + steps]
    return out, centre - base + hop * np.arange(count)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[n_sounds, T, D]`` float32 every ~46 ms, and timestamps ``[n_sounds, T]`` in milliseconds."""
    embeddings, samples = timestamp_embeddings(model, _as_batch(audio, model))
    times_ms = torch.from_numpy(samples * 1000.0 / model.sample_rate).float()
    return (
        torch.from_numpy(embeddings).to(audio.device),
        times_ms.expand(embeddings.shape[0], -1).contiguous().to(audio.device),
    )


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """One embedding per sound ``[n_sounds, D]`` float32: the mean of its pool5 steps."""
    waveforms = tile_to(_as_batch(audio, model), model.net.min_input_samples(model.layer))
    return torch.from_numpy(embed_batch(model.net, waveforms, model.layer).mean(axis=1)).to(audio.device)
