"""Benchmark `student embed`: files/s on a corpus of clips against the network alone, and memory on a long file.

Clips (``--clips``, default the ESC-10 folder): the same clips timed four ways, side by side in one run:

* decoding alone, in one process (what one ``--workers`` process does per file);
* the network alone, on the clips already decoded in memory, batched as ``student embed`` batches them (the model's
  own forward throughput: the ceiling);
* ``student embed`` end to end (a subprocess) for each ``--workers`` value, its fixed start-up (the same command on
  one clip) taken off, and its ratio to the network alone.

Each is measured ``--repeat`` times, interleaved, and the fastest kept.

Long file (``--minutes``): a stereo 44.1 kHz FLAC of a tone plus noise, made with the ffmpeg imageio-ffmpeg ships,
embedded once per ``--chunk-seconds`` value; the peak RSS is the kernel's figure for that process and its decoding
workers (``os.wait4``: the largest), so it includes Python, torch and PyAV themselves.

    python bench/embed.py --weights ../shared/data/soundnet8/soundnet8.npz --clips ../shared/data/esc50/audio
        [--workers 0 1 2] [--device cuda] [--minutes 10 --chunk-seconds 15 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np

STUDENT = Path(sys.executable).parent / "student"


def make_file(path: Path, minutes: float) -> None:
    source = f"aevalsrc=0.3*sin(2*PI*440*t)+0.1*random(0)|0.2*sin(2*PI*660*t)+0.1*random(1):s=44100:d={minutes * 60}"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", source, "-c:a", "flac", str(path)]
    subprocess.run(cmd, check=True)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process (and of its largest waited-for child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9


def decode_alone(paths: list[str]) -> tuple[float, list[np.ndarray]]:
    """Seconds to decode every clip in this process, and the clips (float32, as `student embed` feeds them)."""
    from soundnet.shards.contract import AUDIO_SCALE
    from soundnet.student.embed_decode import Block, decode_file

    start = time.perf_counter()
    clips = []
    for path in paths:
        blocks = [m.samples for m in decode_file(path) if isinstance(m, Block)]
        clips.append(np.concatenate(blocks).astype(np.float32) / AUDIO_SCALE)
    return time.perf_counter() - start, clips


def network_alone(weights: str, clips: list[np.ndarray], layer: str, device: str, bf16: bool) -> float:
    """Seconds for the network on decoded clips, batched as `student embed` does (windows of CHUNK_SECONDS)."""
    import torch

    from soundnet.api import CHUNK_SECONDS, embed_many, load_model
    from soundnet.shards.contract import SAMPLE_RATE

    model = load_model(weights, device)
    budget = int(CHUNK_SECONDS * SAMPLE_RATE)
    windows, window, held = [], [], 0
    for clip in clips:
        if window and held + len(clip) > budget:
            windows.append(window)
            window, held = [], 0
        window.append(clip)
        held += len(clip)
    windows.append(window)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        embed_many(model, windows[0], layer)  # warm-up (one-time kernel selection)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for window in windows:
            embed_many(model, window, layer)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - start


def clips_benchmark(args: argparse.Namespace) -> None:
    """Every measurement ``--repeat`` times, interleaved, the fastest kept (other jobs on a shared machine only
    ever slow a run down)."""
    folder = Path(args.clips)
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg"))
    paths = paths[: args.limit] if args.limit else paths
    n = len(paths)
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(seconds, best.get(name, seconds))

    with tempfile.TemporaryDirectory() as tmp:
        base = [str(STUDENT), "embed", "--checkpoint", args.weights, "--layer", args.layer, "--device", args.device]
        base += ["--bf16"] if args.bf16 else []
        listing = Path(tmp) / "clips.txt"
        listing.write_text("\n".join(paths))
        for _ in range(args.repeat):
            decode_s, clips = decode_alone(paths)
            keep("decode", decode_s)
            keep("network", network_alone(args.weights, clips, args.layer, args.device, args.bf16))
            del clips
            keep("start-up", run([*base, paths[0], "--out", str(Path(tmp) / "one.parquet"), "--workers", "0"])[0])
            for workers in args.workers:
                out = Path(tmp) / f"w{workers}"
                keep(workers, run([*base, str(listing), "--out", str(out), "--workers", str(workers)])[0])
                shutil.rmtree(out)
    network = best["network"]
    print(f"{n} clips from {folder}, layer {args.layer}, device {args.device}{', bf16' if args.bf16 else ''}, "
          f"{os.cpu_count()} CPUs, fastest of {args.repeat}")  # fmt: skip
    print("| what | s | files/s | vs network alone |\n| --- | --- | --- | --- |")
    print(f"| decoding alone (1 process) | {best['decode']:.1f} | {n / best['decode']:.1f} | "
          f"{network / best['decode']:.2f} |")  # fmt: skip
    print(f"| network alone (decoded clips in memory) | {network:.1f} | {n / network:.1f} | 1.00 |")
    for workers in args.workers:
        work = best[workers] - best["start-up"]
        print(f"| student embed --workers {workers} | {work:.1f} | {n / work:.1f} | {network / work:.2f} |")
    print(f"(student embed: its start-up, {best['start-up']:.1f} s for one clip, taken off)")


def long_file_benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "long.flac"
        make_file(audio, args.minutes)
        print(f"{args.minutes:g} min stereo 44.1 kHz FLAC, layer {args.layer}")
        print("| chunk s | wall s | audio s per wall s | peak RSS GB |\n| --- | --- | --- | --- |")
        for chunk in args.chunk_seconds:
            cmd = [str(STUDENT), "embed", str(audio), "--checkpoint", args.weights, "--layer", args.layer,
                   "--out", str(Path(tmp) / "out.parquet"), "--chunk-seconds", str(chunk)]  # fmt: skip
            wall, peak = run(cmd)
            print(f"| {chunk:g} | {wall:.1f} | {args.minutes * 60 / wall:.1f} | {peak:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="A checkpoint or the released soundnet8.npz.")
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--clips", help="A folder of clips (e.g. ../shared/data/esc50/audio).")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N clips.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="Times each measurement; the fastest is kept.")
    parser.add_argument("--minutes", type=float, help="Also time a long file of this many minutes.")
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[15.0, 60.0])
    args = parser.parse_args()
    if args.clips:
        clips_benchmark(args)
    if args.minutes:
        long_file_benchmark(args)


if __name__ == "__main__":
    main()
