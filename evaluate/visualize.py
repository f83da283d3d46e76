"""The paper's pictures of a SoundNet (Aytar et al. 2016, figures 4-6): the conv1 filters, a t-SNE of clip features
coloured by class, and the clips that most activate each unit of a deep layer, as a page with audio players."""

from __future__ import annotations

import html
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from soundnet.evaluate.cache import FeatureCache
from soundnet.evaluate.datasets import Dataset
from soundnet.evaluate.features import dataset_features
from soundnet.shards.atomic import atomic_path, unwritable_out
from soundnet.student.checkpoint import OutputError, load_checkpoint
from soundnet.student.model import SoundNet

log = logging.getLogger(__name__)


def _save(fig, path: Path, dpi: int) -> None:
    """Write a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_conv1_filters(model: SoundNet, path: Path) -> None:
    """Each conv1 filter's waveform (its taps) above its frequency response (dB, 0 .. Nyquist), sorted by the
    frequency of the response's peak so that low- and high-frequency detectors read left to right."""
    plt = _pyplot()
    weights = model.blocks["conv1"][0].weight.detach().cpu().numpy()[:, 0, :]  # [filters, taps]
    rate = model.config.sample_rate
    n_fft = 512
    response = np.abs(np.fft.rfft(weights, n=n_fft, axis=1))
    response_db = 20 * np.log10(response / response.max(axis=1, keepdims=True) + 1e-6)
    freqs_khz = np.fft.rfftfreq(n_fft, 1 / rate) / 1000
    order = np.argsort(freqs_khz[response.argmax(axis=1)], kind="stable")
    columns = 4
    rows = -(-len(order) // columns)
    fig = plt.figure(figsize=(3.4 * columns, 3.0 * rows), layout="constrained")
    cells = fig.subfigures(rows, columns, squeeze=False, wspace=0.03, hspace=0.03)
    taps_ms = np.arange(weights.shape[1]) / rate * 1000
    for slot, cell in enumerate(cells.flat):
        if slot >= len(order):
            continue
        unit = order[slot]
        cell.set_facecolor("0.96" if (slot // columns + slot % columns) % 2 else "white")
        wave_ax, freq_ax = cell.subplots(2, 1)
        peak = freqs_khz[response[unit].argmax()]
        cell.suptitle(f"filter {unit}: peak {peak:.1f} kHz", fontsize=9)
        wave_ax.plot(taps_ms, weights[unit], color="tab:blue", linewidth=1)
        wave_ax.axhline(0, color="0.7", linewidth=0.5)
        wave_ax.set_xlabel("time (ms)", fontsize=7, labelpad=1)
        freq_ax.plot(freqs_khz, response_db[unit], color="tab:red", linewidth=1)
        freq_ax.set_ylim(-40, 2)
        freq_ax.set_xlabel("frequency (kHz)", fontsize=7, labelpad=1)
        freq_ax.set_ylabel("dB", fontsize=7, labelpad=1)
        for ax in (wave_ax, freq_ax):
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{model.config.arch} conv1: {len(order)} filters (waveform above, frequency response below)")
    _save(fig, path, dpi=100)


def clip_vectors(features: np.ndarray) -> np.ndarray:
    """One vector per clip: the mean of its window features ``[clips, windows, dim] -> [clips, dim]``."""
    return features.mean(axis=1)


def plot_tsne(vectors: np.ndarray, data: Dataset, layer: str, path: Path, seed: int = 0) -> None:
    """2-D t-SNE (scikit-learn) of one feature vector per clip, each point coloured by its class."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    labels = np.array([clip.label for clip in data.clips])
    cmap = plt.get_cmap("tab10" if len(data.classes) <= 10 else "tab20")
    markers = "os^Dv<>phX*"
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for label, name in enumerate(data.classes):
        mine = labels == label
        ax.scatter(
            points[mine, 0],
            points[mine, 1],
            s=22,
            color=cmap(label % cmap.N),
            marker=markers[(label // cmap.N) % len(markers)],
            label=f"{name} ({mine.sum()})",
            alpha=0.85,
            edgecolors="none",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{data.name} {layer}: t-SNE of {len(vectors)} clips (mean over windows, perplexity {perplexity:g})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, ncol=1 + len(data.classes) // 26)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def unit_activations(features: np.ndarray, channels: int) -> np.ndarray:
    """Each unit's peak over time per clip ``[clips, channels]`` from windowed features (every window is
    ``channels x steps``, flattened channel-major; windows cover every output step)."""
    clips, windows, dim = features.shape
    return features.reshape(clips, windows, channels, dim // channels).max(axis=(1, 3))


def top_units(activations: np.ndarray, labels: np.ndarray, top: int, units: int) -> list[tuple[int, np.ndarray]]:
    """The ``units`` units whose ``top`` clips agree most on one class (ties: stronger peak first), each with its
    top clips, strongest first: the paper's view of which units detect which sounds. The best unit of each class
    comes before the second best of any, so that the page covers many classes."""
    ranked = np.argsort(-activations, axis=0, kind="stable")[:top].T  # [channels, top]
    counts = [np.bincount(labels[clips]) for clips in ranked]
    purity = np.array([c.max() for c in counts])
    majority = np.array([c.argmax() for c in counts])
    strength = activations[ranked[:, 0], np.arange(activations.shape[1])]
    order = [unit for unit in np.lexsort((-strength, -purity)) if strength[unit] > 0]
    seen: dict[int, int] = {}
    rounds = []
    for unit in order:  # how many better units share this unit's class
        rounds.append(seen.get(majority[unit], 0))
        seen[majority[unit]] = rounds[-1] + 1
    order = [order[i] for i in np.argsort(rounds, kind="stable")]
    return [(int(unit), ranked[unit]) for unit in order[:units]]


def _audio_link(index: int, clip_path: Path, out: Path, copy: bool) -> str:
    """The src of a clip's <audio> element, relative to the page: a copy under ``out/audio`` (prefixed with the
    clip's index, as two class folders may hold the same file name) or the file itself."""
    if copy:
        name = f"{index:05d}-{clip_path.name}"
        target = out / "audio" / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(clip_path, target)
        return quote(f"audio/{name}")
    return quote(Path(os.path.relpath(clip_path.resolve(), out.resolve())).as_posix())


def write_units_page(
    activations: np.ndarray,
    data: Dataset,
    layer: str,
    path: Path,
    top: int = 5,
    units: int = 24,
    copy_audio: bool = True,
) -> int:
    """An HTML page: for each selected unit of ``layer``, its ``top`` clips with an audio player, class and peak
    activation. Returns the number of units listed."""
    labels = np.array([clip.label for clip in data.clips])
    chosen = top_units(activations, labels, top, units)
    out = path.parent
    sections = []
    for unit, clips in chosen:
        names = [data.classes[labels[i]] for i in clips]
        majority = max(set(names), key=names.count)
        rows = "\n".join(
            f"<tr><td>{rank + 1}</td><td>{html.escape(data.classes[labels[i]])}</td>"
            f"<td>{activations[i, unit]:.2f}</td><td>{html.escape(data.clips[i].path.name)}</td>"
            f'<td><audio controls preload="none" src="{_audio_link(int(i), data.clips[i].path, out, copy_audio)}">'
            "</audio></td></tr>"
            for rank, i in enumerate(clips)
        )
        sections.append(
            f'<section class="unit" id="unit-{unit}"><h2>{layer} unit {unit}: '
            f"{html.escape(majority)} ({names.count(majority)}/{len(names)})</h2>\n"
            f"<table><tr><th>#</th><th>class</th><th>peak</th><th>clip</th><th>listen</th></tr>\n{rows}\n</table>"
            "</section>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{layer} units on {html.escape(data.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}} table{{border-collapse:collapse}}
td,th{{padding:2px 8px;text-align:left}} tr:nth-child(even){{background:#f3f3f3}} h2{{font-size:1.05em}}</style>
</head><body>
<h1>What the units of {layer} hear</h1>
<p>{len(chosen)} of {activations.shape[1]} units of <code>{layer}</code>, each with the {top} clips of
{html.escape(data.name)} ({len(data.clips)} clips) that activate it most (peak over time), the units whose top clips
agree most on one class first (the best unit of each class before the second best of any). The heading names that
class and how many of the top clips have it.</p>
{chr(10).join(sections)}
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return len(chosen)


def make_pictures(
    checkpoint: str | Path,
    data: Dataset,
    out: Path,
    tsne_layer: str = "pool5",
    units_layer: str = "conv7",
    clip_seconds: float | None = None,
    top: int = 5,
    units: int = 24,
    copy_audio: bool = True,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 4,
    cache: FeatureCache | None = None,
) -> list[Path]:
    """``conv1_filters.png``, ``tsne_<tsne_layer>.png`` and ``units_<units_layer>.html`` in ``out``; returns them."""
    if problem := unwritable_out(out):
        raise OutputError(problem)
    model = load_checkpoint(checkpoint)
    for layer in (tsne_layer, units_layer):
        model.output_length(layer, 0)  # an unknown layer fails before any decoding
    seconds = clip_seconds or data.clip_seconds
    written = [out / "conv1_filters.png", out / f"tsne_{tsne_layer}.png", out / f"units_{units_layer}.html"]
    plot_conv1_filters(model, written[0])
    log.info("wrote %s", written[0])
    features = {
        layer: dataset_features(model, checkpoint, data, layer, seconds, 1.0, batch_size, device, workers, cache)
        for layer in dict.fromkeys((tsne_layer, units_layer))
    }
    plot_tsne(clip_vectors(features[tsne_layer]), data, tsne_layer, written[1])
    log.info("wrote %s", written[1])
    channels = model.features(torch.zeros(1, model.min_input_samples(units_layer)), units_layer)[units_layer].shape[1]
    listed = write_units_page(
        unit_activations(features[units_layer], channels), data, units_layer, written[2], top, units, copy_audio
    )
    log.info("wrote %s (%d units)", written[2], listed)
    return written
