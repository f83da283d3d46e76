"""Benchmark: teacher frames/s on one device, and where a frame's time goes (decode, crop, transfer, model).

Frames are the slot frames of real videos, decoded by PyAV straight to a shorter side of 256 (the teachers'
resize size, as ``ingest run`` decodes them), then cycled to ``--frames``. Per teacher and batch size:

* ``frames/s``: ``Teacher.outputs`` over all frames, the path ``ingest run`` uses: on CUDA pinned uint8 crops,
  non-blocking copies, normalisation on the GPU, bf16 autocast, channels-last, one synchronisation at the end, so
  the host work of one batch overlaps the kernels of the previous one;
* the split, each stage timed alone (``torch.cuda.synchronize`` around it) in ms per frame: ``crop`` (host: centre
  crop and channel order into a uint8 batch, pinned on CUDA), ``h2d`` (the copy to the device), ``model``
  (normalise, forward, log-softmax or L2 normalisation on the device);
* ``x resnet50``: frames/s relative to ``resnet50`` at the same batch size, measured in the same run.

Decoding is one thread per process and reported per core: one GPU needs ``frames/s / decode frames/s/core``
cores to keep it fed. ``resnet50`` has random weights (throughput does not depend on them; nothing is
downloaded); the real teachers of ``../shared/data/teachers`` are added where they exist, and where timm is
installed a timm image tower used for its embedding, ``vit_tiny=timm-embed:vit_tiny_patch16_224``. ``--teacher
SPEC`` adds any teacher; a timm spec without WEIGHTS gets random weights saved locally (nothing is downloaded).

    python bench/teachers.py [--device cpu|cuda] [--frames N] [--batch-size 64 256] [--repeat 3] [--json OUT]
        [--teacher clip=timm-embed:vit_base_patch16_clip_224]...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ would come first on sys.path and shadow the packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torchvision

from bench.ingest import VIDEO_DIR, cpu_seconds, slots_for, video_files
from soundnet.ingest.frames import SHORT_SIDE, sample_frames
from soundnet.media import DecodeError, open_media
from soundnet.teachers import Teacher, TeacherSpec, load_teacher, parse_spec
from soundnet.teachers.timm_teacher import is_timm_arch

TEACHER_DIR = VIDEO_DIR.parent / "teachers"
REAL_TEACHERS = {
    "efficientnet_lite0": TEACHER_DIR / "efficientnet_lite0_imagenet.pth",
    "squeezenet_bn_places365": TEACHER_DIR / "squeezenet_v11bn_places365.pth",
}
TIMM_TEACHER = "vit_tiny=timm-embed:vit_tiny_patch16_224"


def decode_frames(files: list[Path]) -> tuple[list[np.ndarray], float]:
    """The slot frames of ``files`` (accurate seek, one thread) and the CPU seconds decoding them took."""
    frames: list[np.ndarray] = []
    slots = {path: slots_for(path) for path in files}  # probed before the clock starts
    start = cpu_seconds()
    for path in files:
        try:
            with open_media(path) as container:
                frames += sample_frames(container, slots[path], short_side=SHORT_SIDE, threads=1)[0]
        except DecodeError:
            pass
    return frames, cpu_seconds() - start


def make_teachers(device: str, folder: Path, extra: list[str]) -> list[Teacher]:
    """ResNet-50 with random weights (saved as a local state dict, so it loads like any teacher), the real
    teachers that are present, a timm tower where timm is installed, and the ``extra`` specs."""
    torch.manual_seed(0)
    weights = folder / "resnet50_random.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    specs = [f"resnet50=resnet50:{weights}"]
    specs += [f"{arch}={arch}:{path}" for arch, path in REAL_TEACHERS.items() if path.is_file()]
    specs += [TIMM_TEACHER] if importlib.util.find_spec("timm") and not extra else []
    parsed = [parse_spec(spec, check_weights=False) for spec in specs + extra]
    return [load_teacher(random_timm_weights(spec, folder), device) for spec in parsed]


def random_timm_weights(spec: TeacherSpec, folder: Path) -> TeacherSpec:
    """A timm spec without weights gets random ones saved in ``folder``; other specs are returned as they are."""
    if not is_timm_arch(spec.arch) or spec.weights:
        return spec
    import timm

    model_name = spec.arch.partition(":")[2]
    path = folder / f"{spec.name}_random.pth"
    torch.save(timm.create_model(model_name, pretrained=False).state_dict(), path)
    return TeacherSpec(spec.name, spec.arch, str(path))


def split(teacher: Teacher, frames: list[np.ndarray], batch_size: int, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds per stage over all ``frames``, each stage timed alone (synchronised before and after)."""
    cuda = teacher.device.type == "cuda"
    pre = teacher.preprocessing
    seconds = {"crop": 0.0, "h2d": 0.0, "model": 0.0}

    def clock() -> float:
        sync()
        return time.perf_counter()

    with torch.inference_mode():
        for start in range(0, len(frames), batch_size):
            t0 = clock()
            crops = pre.crops(frames[start : start + batch_size], pin_memory=cuda)
            t1 = clock()
            x = crops.to(teacher.device, non_blocking=cuda)
            t2 = clock()
            with torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=cuda):
                teacher.rows(pre.normalize(x))
            t3 = clock()
            for stage, took in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[stage] += took
    return seconds


def bench(
    teacher: Teacher, frames: list[np.ndarray], batch_size: int, repeat: int, sync: Callable[[], None]
) -> dict[str, float]:
    """End-to-end frames/s of ``Teacher.outputs`` and the per-stage split, medians over ``repeat`` runs."""
    teacher.outputs(frames[:batch_size], batch_size=batch_size)  # warm-up: allocators, cuDNN's choices
    walls = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        teacher.outputs(frames, batch_size=batch_size)  # ends with a copy to the host: synchronised
        walls.append(time.perf_counter() - start)
    stages = [split(teacher, frames, batch_size, sync) for _ in range(repeat)]
    row = {"teacher": teacher.name, "batch_size": batch_size, "frames_per_s": len(frames) / statistics.median(walls)}
    for stage in stages[0]:
        row[f"{stage}_ms_per_frame"] = 1000 * statistics.median(s[stage] for s in stages) / len(frames)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--videos", nargs="*", default=[], help="files or folders (default: the shared videos)")
    parser.add_argument("--frames", type=int, help="frames per measurement [default: 4096 on CUDA, 64 on CPU]")
    parser.add_argument("--batch-size", type=int, nargs="+", help="[default: 64 256 on CUDA, 32 on CPU]")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--teacher", action="append", default=[], help="NAME=ARCH[:WEIGHTS], repeatable (replaces the timm default)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    n_frames = args.frames or (4096 if cuda else 64)
    batch_sizes = args.batch_size or ([64, 256] if cuda else [32])

    decoded, decode_cpu = decode_frames(video_files(args.videos))
    if not decoded:
        parser.error("no frames could be decoded")
    decode_rate = len(decoded) / decode_cpu
    frames = [decoded[i % len(decoded)] for i in range(n_frames)]
    name = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()} CPU cores"
    print(
        f"{name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {n_frames} frames cycled from "
        f"{len(decoded)} decoded; median of {args.repeat}; decode (PyAV, short side {SHORT_SIDE}, 1 thread): "
        f"{decode_rate:.1f} frames/s/core ({1000 / decode_rate:.2f} ms/frame); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'teacher':24s} {'batch':>5s} {'frames/s':>9s} {'x resnet50':>10s} {'crop ms':>8s} {'h2d ms':>7s} "
        f"{'model ms':>9s} {'decode cores/device':>19s}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        baseline: dict[int, float] = {}
        for teacher in make_teachers(args.device, Path(folder), args.teacher):
            for batch_size in batch_sizes:
                row = bench(teacher, frames, batch_size, args.repeat, sync)
                row["decode_cores_per_device"] = row["frames_per_s"] / decode_rate
                row["vs_resnet50"] = row["frames_per_s"] / baseline.setdefault(batch_size, row["frames_per_s"])
                rows.append(row)
                print(
                    f"{row['teacher']:24s} {batch_size:5d} {row['frames_per_s']:9.1f} {row['vs_resnet50']:10.2f} "
                    f"{row['crop_ms_per_frame']:8.3f} {row['h2d_ms_per_frame']:7.3f} {row['model_ms_per_frame']:9.3f} "
                    f"{row['decode_cores_per_device']:19.1f}"
                )
    if args.json:
        result = {
            "device": name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "frames": n_frames,
            "decode_frames_per_s_per_core": decode_rate,
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
