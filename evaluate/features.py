"""Fixed-length waveforms and windowed features from any named layer of a SoundNet.

The paper's protocol: a clip is tiled to a fixed length, a layer's output is cut into windows of about one second
(pool5: 3 steps, stride one step) and each window, flattened, is one SVM example.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from soundnet.audio import SAMPLE_RATE, DecodedAudio, read_audio
from soundnet.evaluate.cache import FeatureCache, FeatureKey
from soundnet.evaluate.datasets import Dataset, DatasetError
from soundnet.media import DecodeError
from soundnet.student.model import SoundNet

log = logging.getLogger(__name__)


def fixed_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Tile a clip cyclically (or cut it) to exactly ``num_samples``: a 5 s clip becomes two copies for 10 s."""
    return np.resize(waveform, num_samples)


def decode_clips(paths: list[Path], seconds: float, workers: int, progress: tqdm) -> Iterator[DecodedAudio | str]:
    """The first ``seconds`` of each file (mono 22050 Hz), in order, or a message naming a file that cannot be
    read; decoded in ``workers`` threads."""

    def load(path: Path) -> DecodedAudio | str:
        try:
            return read_audio(path, max_seconds=seconds)
        except DecodeError as exc:
            return f"{path}: {exc.reason}: {exc.message}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for result in pool.map(load, paths):
            progress.update()
            yield result


def _decode(
    paths: list[Path], seconds: float, num_samples: int, workers: int, progress: tqdm
) -> tuple[np.ndarray, list[str]]:
    """Decoded, tiled waveforms ``[clips, num_samples]`` and one message per file that could not be read."""
    out = np.empty((len(paths), num_samples), np.float32)
    errors = []
    for i, result in enumerate(decode_clips(paths, seconds, workers, progress)):
        if isinstance(result, str):
            errors.append(result)
        else:
            out[i] = fixed_length(result.as_float(), num_samples)
    return out, errors


def unreadable(errors: list[str]) -> DatasetError:
    shown = "\n  ".join(errors[:10])
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    return DatasetError(f"{len(errors)} audio file(s) could not be read:\n  {shown}{more}")


def load_waveforms(paths: list[Path], seconds: float, workers: int = 4, num_samples: int | None = None) -> np.ndarray:
    """Decode the first ``seconds`` of every file to mono 22050 Hz float32, tiled (or cut) to ``num_samples``
    (default: exactly ``seconds``); one error naming every bad file."""
    num_samples = num_samples or int(round(seconds * SAMPLE_RATE))
    with tqdm(total=len(paths), desc="decode audio", unit="clip") as progress:
        out, errors = _decode(paths, seconds, num_samples, workers, progress)
    if errors:
        raise unreadable(errors)
    return out


def input_samples(model: SoundNet, layer: str, seconds: float) -> int:
    """Samples fed to the network for clips of ``seconds``: the clip, tiled further where ``layer`` needs more
    input for one output step (a 0.1 s clip on conv7 is tiled to 4574 samples, as the paper tiles short clips)."""
    return max(int(round(seconds * model.config.sample_rate)), model.min_input_samples(layer))


def window_steps(model: SoundNet, layer: str, num_samples: int, window_seconds: float) -> int:
    """Steps of ``layer`` covering ``window_seconds`` (pool5, 1 s: 3), at most the whole output."""
    total = model.output_length(layer, num_samples)
    steps = model.output_length(layer, int(round(window_seconds * SAMPLE_RATE)))
    return min(steps, total) if steps >= 1 else total


@torch.inference_mode()
def window_features(
    model: SoundNet,
    waveforms: np.ndarray,
    layer: str,
    window_seconds: float = 1.0,
    batch_size: int = 16,
    device: str = "cpu",
    progress: tqdm | None = None,
) -> np.ndarray:
    """``[clips, windows, channels * window_steps]`` float32 features of ``layer`` for equal-length waveforms."""
    model = model.to(device).eval()
    num_samples = waveforms.shape[1]
    width = window_steps(model, layer, num_samples, window_seconds)
    batches = []
    starts = range(0, len(waveforms), batch_size)
    for start in starts if progress is not None else tqdm(starts, desc=f"features {layer}", unit="batch"):
        x = torch.from_numpy(waveforms[start : start + batch_size]).to(device)
        out = model.features(x, layer)[layer]  # [B, C, steps]
        windows = out.unfold(-1, width, 1)  # [B, C, W, width]
        batches.append(windows.permute(0, 2, 1, 3).flatten(2).float().cpu().numpy())
        if progress is not None:
            progress.update(len(x))
    return np.concatenate(batches)


def dataset_features(
    model: SoundNet,
    checkpoint: str | Path,
    data: Dataset,
    layer: str,
    seconds: float,
    window_seconds: float = 1.0,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 4,
    cache: FeatureCache | None = None,
    timings: dict[str, float] | None = None,
    chunk_clips: int = 256,
) -> np.ndarray:
    """Windowed ``layer`` features of every clip of ``data``, from the cache when an entry matches."""
    timings = {} if timings is None else timings
    cache = cache or FeatureCache(None)
    paths = [clip.path for clip in data.clips]
    num_samples = input_samples(model, layer, seconds)
    key = FeatureKey.of(checkpoint, layer, data.name, paths, num_samples, window_seconds)
    features = cache.load(key)
    if features is not None:
        log.info("features %s: from the cache in %s", layer, cache.folder)
        timings["decode_s"] = timings["features_s"] = 0.0
        return features
    # decode and embed in chunks: memory holds one chunk of waveforms, never the whole dataset's
    chunks, errors = [], []
    timings["decode_s"] = timings["features_s"] = 0.0
    with (
        tqdm(total=len(paths), desc="decode audio", unit="clip", position=0) as decoded,
        tqdm(total=len(paths), desc=f"features {layer}", unit="clip", position=1) as embedded,
    ):
        for start in range(0, len(paths), chunk_clips):
            t = time.perf_counter()
            waveforms, bad = _decode(paths[start : start + chunk_clips], seconds, num_samples, workers, decoded)
            timings["decode_s"] += time.perf_counter() - t
            errors += bad
            if errors:  # keep decoding to name every bad file, but spend no more time on the network
                continue
            t = time.perf_counter()
            chunks.append(window_features(model, waveforms, layer, window_seconds, batch_size, device, embedded))
            timings["features_s"] += time.perf_counter() - t
    if errors:
        raise unreadable(errors)
    features = np.concatenate(chunks)
    cache.save(key, features)
    return features
