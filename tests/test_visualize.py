"""`evaluate visualize` on 40 real ESC-10 clips with the released weights: the paper's three pictures."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from soundnet.evaluate.cli import main as evaluate_cli
from soundnet.evaluate.visualize import top_units, unit_activations


def _esc10_subset(esc50_dir, root, per_class: int = 4):
    """The first ``per_class`` clips of each ESC-10 class, in the ESC-50 layout."""
    lines = (esc50_dir / "esc50.csv").read_text().splitlines()
    keep, count = [lines[0]], {}
    for row in lines[1:]:
        filename, _, _, category, esc10, *_ = row.split(",")
        if esc10 == "True" and count.get(category, 0) < per_class:
            count[category] = count.get(category, 0) + 1
            keep.append(row)
            (root / "audio").mkdir(parents=True, exist_ok=True)
            shutil.copy(esc50_dir / "audio" / filename.replace(".wav", ".flac"), root / "audio")
    (root / "esc50.csv").write_text("\n".join(keep) + "\n")
    return root


def test_visualize_writes_filters_tsne_and_unit_page(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    data_dir = _esc10_subset(esc50_dir, tmp_path / "esc10")
    out = tmp_path / "pictures"
    args = ["visualize", "--checkpoint", str(soundnet8_checkpoint), "--dataset", "esc10"]
    args += ["--data-dir", str(data_dir), "--out", str(out), "--units", "6", "--cache-dir", str(tmp_path / "cache")]
    args += ["--clip-seconds", "5"]  # the clips as they are, untiled: half the network time
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    for name in ("conv1_filters.png", "tsne_pool5.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 400 and image.std() > 0.05, name
    page = (out / "units_conv7.html").read_text()
    units = re.findall(r'<section class="unit" id="unit-(\d+)">', page)
    assert len(units) == 6 and len(set(units)) == 6
    sources = re.findall(r'<audio controls preload="none" src="([^"]+)">', page)
    assert len(sources) == 6 * 5 and all((out / src).is_file() for src in sources)
    classes = {"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing", "clock_tick"}
    classes |= {"helicopter", "chainsaw"}
    shown = re.findall(r"<tr><td>\d+</td><td>([a-z_]+)</td>", page)
    assert len(shown) == 30 and set(shown) <= classes


def test_link_audio_points_at_the_dataset_files(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    data_dir = _esc10_subset(esc50_dir, tmp_path / "esc10", per_class=1)
    out = tmp_path / "pictures"
    args = ["visualize", "--checkpoint", str(soundnet8_checkpoint), "--dataset", "esc10", "--data-dir", str(data_dir)]
    args += ["--out", str(out), "--units", "2", "--top", "3", "--link-audio", "--no-cache", "--units-layer", "pool5"]
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    sources = re.findall(r'src="([^"]+)"', (out / "units_pool5.html").read_text())
    assert len(sources) == 6 and all(src.startswith("../esc10/audio/") for src in sources)
    assert all((out / src).resolve().is_file() for src in sources) and not (out / "audio").exists()


def test_top_units_rank_class_selective_units_first() -> None:
    """Unit 1 fires for class 0 only; unit 0 fires at random: unit 1 comes first, with the class-0 clips on top."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 4)
    activations = np.stack([rng.random(12), (labels == 0) * 5.0 + rng.random(12) * 0.1], axis=1)
    (first, clips), *_ = top_units(activations, labels, top=4, units=2)
    assert first == 1 and sorted(clips.tolist()) == [0, 1, 2, 3]
    # three units for class 0, one weaker one for class 2: the class-2 unit comes second
    selective = np.stack([(labels == 0) * (5.0 - u) for u in range(3)] + [(labels == 2) * 1.0], axis=1)
    assert [unit for unit, _ in top_units(selective, labels, top=4, units=4)] == [0, 3, 1, 2]
    windows = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 8)  # 2 clips, 3 windows, 4 units x 2 steps
    peaks = unit_activations(windows, channels=4)
    assert peaks.shape == (2, 4) and peaks[1, 3] == windows[1, 2, 7] and peaks[0, 0] == windows[0, 2, 1]


def test_a_read_only_out_is_one_line_naming_the_folder(esc50_dir, soundnet8_checkpoint, tmp_path) -> None:
    """A read-only --out (a read-only tmpfs in a mount namespace of our own) is refused before any work."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user namespaces) is not available here")
    data_dir = _esc10_subset(esc50_dir, tmp_path / "esc10", per_class=1)
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "pictures"
    evaluate = Path(sys.executable).parent / "evaluate"
    command = (
        f"{evaluate} visualize --checkpoint {soundnet8_checkpoint} --dataset esc10 --data-dir {data_dir} --out {out}"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-ec", f"mount -t tmpfs -o ro none {tmp_path / 'ro'}; {command}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.splitlines()[-1]
        == f"Error: --out {out} is not writable (Read-only file system): choose another folder"
    )
    assert ".tmp" not in done.stderr and "decode" not in done.stderr
