"""The feature API: load a SoundNet, get embeddings of any named layer for any audio, with their times.

``load_model(model)`` takes a released model's name (``"soundnet8"``: downloaded once, see :mod:`soundnet.weights`)
or any model file (a checkpoint, the released ``soundnet8.npz`` or ``sound8.npy``, ``.safetensors``);
``embed(model, audio, sample_rate, layer)`` takes numpy or torch audio, mono ``[samples]`` or
``[channels, samples]``, at any rate and of any length, and returns ``(embeddings [T, D] float32, times_s [T])``.

* Channels are averaged to mono (for stereo that is (L + R) / 2, what libswresample's downmix gives for a stereo
  file) and the rate is converted with libswresample (:func:`soundnet.audio.resample`), as for audio files.
* A clip shorter than the layer needs is tiled (repeated) up to the layer's minimum length, as the paper's
  evaluation tiles its clips: tiling keeps the sound's level and texture where zeros would add silence the
  network never heard in the middle of a clip. Its timestamps are then those of the tiled input.
* A long input runs in chunks that start on the layer's stride grid and carry a receptive field of context on
  each side; only the output steps whose receptive field lies wholly inside a chunk (or touches the true start or
  end of the input) are kept, so the result equals one pass over the whole input while memory stays bounded.
* ``times_s[t]`` is the centre of output step ``t``'s receptive field, computed from the architecture table
  (:func:`receptive_field`): evenly spaced by the layer's stride (pool5: 8192 samples, 371.5 ms). The first fields
  of the deep layers reach into the network's zero padding, so their centres can lie before 0 s (conv7: -0.45 s).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from soundnet.student.checkpoint import load_checkpoint
from soundnet.student.model import ARCHITECTURES, SoundNet
from soundnet.weights import resolve

DEFAULT_LAYER = "pool5"
MAX_PEAK = 2.0
"""Float audio peaking above this is not in [-1, 1]: almost always int16 samples converted without scaling."""
CHUNK_SECONDS = 60.0
"""Audio per forward pass for long inputs: about 0.25 GB of activations for SoundNet8 (bench/embed.py)."""


def load_model(model: str | os.PathLike, device: str | torch.device = "cpu") -> SoundNet:
    """A SoundNet in eval mode from a released model's name (``"soundnet8"``) or a model file of any accepted format
    (:func:`soundnet.student.checkpoint.load_checkpoint`); ``model.config.sample_rate`` is its rate."""
    return load_checkpoint(resolve(model)).to(device).eval()


@dataclass(frozen=True)
class ReceptiveField:
    """Where a layer's output steps sit in the input, in samples: step ``t`` sees ``[start + t * stride,
    start + t * stride + size)`` (``start`` < 0 where the first field reaches into the zero padding)."""

    start: int
    size: int
    stride: int

    def first(self, step: int) -> int:
        return self.start + step * self.stride

    def centre(self, step: int | np.ndarray) -> float | np.ndarray:
        return self.start + np.asarray(step) * self.stride + (self.size - 1) / 2


def receptive_field(model: SoundNet, layer: str) -> ReceptiveField:
    """The receptive field of ``layer``, walked through the architecture table (convs, pools, then the heads)."""
    if layer not in model.layer_names:
        raise ValueError(f"unknown layer {layer!r}; {model.config.arch} has {model.layer_names}")
    blocks, head = ARCHITECTURES[model.config.arch]
    start, size, stride = 0, 1, 1

    def through(kernel: int, step: int, padding: int) -> None:
        nonlocal start, size, stride
        start -= padding * stride
        size += (kernel - 1) * stride
        stride *= step

    for spec in blocks:
        through(spec.kernel, spec.stride, spec.padding)
        if spec.name == layer:
            return ReceptiveField(start, size, stride)
        if spec.pool:
            through(spec.pool[1], spec.pool[1], 0)
            if spec.pool[0] == layer:
                return ReceptiveField(start, size, stride)
    through(head.kernel, head.stride, head.padding)
    return ReceptiveField(start, size, stride)


def check_samples(audio: np.ndarray) -> None:
    """Refuse float audio that cannot be a waveform in [-1, 1]: NaN or infinite samples, or a peak above
    :data:`MAX_PEAK` (int16 samples cast to float without scaling give embeddings unrelated to the right ones)."""
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite values")
    peak = float(np.abs(audio).max())
    if peak > MAX_PEAK:
        raise ValueError(
            f"audio peaks at {peak:g}, far outside [-1, 1]: int16 samples stored as floats? divide them by 32768 "
            "(int32 samples by 2147483648)"
        )


def as_mono(audio: np.ndarray | torch.Tensor, sample_rate: int, to_rate: int) -> np.ndarray:
    """Float32 mono audio at ``to_rate`` from numpy/torch ``[samples]`` or ``[channels, samples]`` in [-1, 1]
    (checked by :func:`check_samples`)."""
    if isinstance(audio, torch.Tensor):  # float16/bfloat16 have no numpy twin: float32, as the network computes
        audio = (audio.detach().float() if audio.is_floating_point() else audio.detach()).cpu().numpy()
    audio = np.asarray(audio)
    if not np.issubdtype(audio.dtype, np.floating):
        raise TypeError(f"audio must be floating point in [-1, 1], got {audio.dtype} (int16 audio: divide by 32768)")
    if audio.ndim == 2 and audio.shape[0] > audio.shape[1]:
        raise ValueError(
            f"audio of shape {audio.shape} looks like [samples, channels]; pass [channels, samples] (audio.T)"
        )
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"audio must be [samples] or [channels, samples] with samples > 0, got shape {audio.shape}")
    check_samples(audio)
    if int(sample_rate) != sample_rate or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    mono = audio.astype(np.float32, copy=False) if audio.ndim == 1 else audio.mean(axis=0, dtype=np.float32)
    if sample_rate == to_rate:
        return mono
    from soundnet.audio import resample  # PyAV only here: the training command line imports this module

    return resample(mono, int(sample_rate), to_rate)


def tile_to(waveforms: np.ndarray, num_samples: int) -> np.ndarray:
    """Repeat ``[..., N]`` waveforms cyclically up to ``num_samples`` (unchanged if already that long)."""
    n = waveforms.shape[-1]
    return waveforms if n >= num_samples else waveforms[..., np.arange(num_samples) % n]


def _device(model: SoundNet) -> torch.device:
    return next(model.parameters()).device


def embed_batch(model: SoundNet, waveforms: np.ndarray, layer: str, chunk_samples: int | None = None) -> np.ndarray:
    """``[B, T, D]`` float32 outputs of ``layer`` for equal-length mono waveforms ``[B, N]`` at the model's rate.

    Inputs longer than ``chunk_samples`` run chunk by chunk with the exact method of the module docstring; the
    input must be at least the layer's minimum length (:meth:`SoundNet.min_input_samples`).
    """
    return np.concatenate(list(_chunked(model, [waveforms], layer, chunk_samples)), axis=1)


def embed_stream(
    model: SoundNet, blocks: Iterable[np.ndarray], layer: str = DEFAULT_LAYER, chunk_seconds: float = CHUNK_SECONDS
) -> Iterator[np.ndarray]:
    """Embeddings ``[steps, D]`` of one mono float32 waveform at the model's rate that arrives as consecutive
    ``blocks`` (of any sizes), piece by piece as soon as they are exact: joined, the pieces equal
    ``embed(...)[0]`` of the whole waveform, computed with the same chunks, while memory holds one chunk. The
    waveform must be at least the layer's minimum length (:func:`embed` tiles shorter clips)."""
    chunk = int(chunk_seconds * model.config.sample_rate)
    for piece in _chunked(model, (block[None] for block in blocks), layer, chunk):
        yield piece[0]


@torch.inference_mode()
def _chunked(
    model: SoundNet, blocks: Iterable[np.ndarray], layer: str, chunk_samples: int | None
) -> Iterator[np.ndarray]:
    """The chunked pass of the module docstring over ``[B, n]`` blocks that join into the input ``[B, N]``: yields
    ``[B, steps, D]`` pieces in order. Blocks are read only as far as the next chunk needs (and one sample beyond,
    which tells whether the chunk ends the input), so ``N`` need not be known in advance."""
    field = receptive_field(model, layer)
    if chunk_samples is None:
        chunk_samples = int(CHUNK_SECONDS * model.config.sample_rate)
    # a chunk holds at least two fields plus a stride, so that each one yields at least one exact step
    chunk = max(chunk_samples, 2 * (field.size + field.stride))
    chunk += -chunk % field.stride
    device = _device(model)
    blocks = iter(blocks)
    held: list[np.ndarray] = []  # the input from sample `offset` on, as read so far
    offset = have = 0  # have: samples read so far
    n: int | None = None  # the input's length, once the blocks are exhausted
    total = step = 0
    while n is None or step < total:
        first = max(0, field.first(step) // field.stride)
        begin = first * field.stride  # on the stride grid: chunk step i is global step first + i
        while n is None and have <= begin + chunk:
            block = next(blocks, None)
            if block is None:
                n, total = have, model.output_length(layer, have)
                if total < 1:
                    need = model.min_input_samples(layer)
                    raise ValueError(
                        f"{n} samples are too short for layer {layer!r}: it needs at least {need} (tile or pad)"
                    )
            elif block.shape[-1]:
                held.append(block)
                have += block.shape[-1]
        if n is not None and step >= total:
            break
        end = min(have, begin + chunk)
        window = np.concatenate(held, axis=-1)[:, begin - offset :] if len(held) > 1 else held[0][:, begin - offset :]
        held, offset = [window], begin  # what lies before `begin` is never needed again
        x = torch.from_numpy(np.ascontiguousarray(window[:, : end - begin], dtype=np.float32)).to(device)
        out = model.features(x, layer)[layer]  # [B, D, steps]
        steps = first + np.arange(out.shape[-1])
        exact = steps >= step
        if n is not None:
            exact &= steps < total
        if begin > 0:
            exact &= field.first(steps) >= begin
        if end < have:  # more input follows (when `n` is unknown, at least one sample does)
            exact &= field.first(steps) + field.size <= end
        keep = np.flatnonzero(exact)
        if len(keep) == 0 or keep[0] + first != step:
            raise RuntimeError(f"chunking lost step {step} of {layer} (chunk {begin}:{end}); this is a bug")
        yield out[:, :, keep].permute(0, 2, 1).float().cpu().numpy()
        step = first + int(keep[-1]) + 1


def layer_width(model: SoundNet, layer: str) -> int:
    """Channels (or classes, for a head) of ``layer``: the D of its embeddings."""
    return int(embed_batch(model, np.zeros((1, model.min_input_samples(layer)), np.float32), layer).shape[-1])


def embed(
    model: SoundNet,
    audio: np.ndarray | torch.Tensor,
    sample_rate: int,
    layer: str = DEFAULT_LAYER,
    chunk_seconds: float = CHUNK_SECONDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[T, D]`` float32 of ``layer`` and the times (s) of their receptive-field centres ``[T]``.

    ``audio``: numpy or torch, ``[samples]`` or ``[channels, samples]``, floats in [-1, 1] at ``sample_rate``.
    A clip shorter than the layer's minimum is tiled up to it; long inputs run in chunks of ``chunk_seconds``
    with the same result as one pass.
    """
    waveform = as_mono(audio, sample_rate, model.config.sample_rate)
    return embed_many(model, [waveform], layer, chunk_seconds)[0]


def embed_many(
    model: SoundNet, waveforms: Sequence[np.ndarray], layer: str = DEFAULT_LAYER, chunk_seconds: float = CHUNK_SECONDS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`embed` for many mono float32 waveforms at the model's rate, faster: clips of equal length run as one
    batch of at most ``chunk_seconds`` of audio (a batch of 12 five-second clips is several times faster than
    12 single passes on a CPU), longer ones one by one in chunks. Each is checked by :func:`check_samples`."""
    for waveform in waveforms:
        check_samples(waveform)
    chunk = int(chunk_seconds * model.config.sample_rate)
    need = model.min_input_samples(layer)  # tiled up to it, as the paper's evaluation tiles short clips
    tiled = [tile_to(waveform, need) for waveform in waveforms]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, waveform in enumerate(tiled):
        by_length[len(waveform)].append(i)
    results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(tiled)  # type: ignore[list-item]
    for n, indices in by_length.items():
        per_batch = max(1, chunk // n)
        for start in range(0, len(indices), per_batch):
            group = indices[start : start + per_batch]
            batch = tiled[group[0]][None] if len(group) == 1 else np.stack([tiled[i] for i in group])
            for i, out in zip(group, embed_batch(model, batch, layer, chunk)):
                results[i] = (out, step_times(model, layer, len(out)))
    return results


def step_times(model: SoundNet, layer: str, steps: int) -> np.ndarray:
    """The times (s) of the centres of the first ``steps`` output steps of ``layer``: the ``times`` of :func:`embed`."""
    return (receptive_field(model, layer).centre(np.arange(steps)) / model.config.sample_rate).astype(np.float64)
