"""Benchmark `student embed`: files/s on a corpus of clips against the network alone, and memory on a long file.

Clips (``--clips``, default the ESC-10 folder): the same clips timed four ways, side by side in one run:

* decoding alone, in one process (what one ``--workers`` process does per file);
* the network alone, on the clips already decoded in memory, batched as ``student embed`` batches them (the model's
  own forward throughput: the ceiling);
* ``student embed`` end to end (a subprocess) for each ``--workers`` value, from its first file to its last as it
  reports them (its start-up left out), with the time it spent waiting for decoded audio, and its ratio to the
  network alone.

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
import re
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


def embed_run(cmd: list[str]) -> tuple[float, float]:
    """Seconds of a `student embed` run from its first file to its last (its own report: start-up left out) and
    the seconds of it spent waiting for decoded audio."""
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"files in ([\d.]+) s .*waiting for decoded audio ([\d.]+) s", result.stdout)
    return float(found.group(1)), float(found.group(2))


def clips_benchmark(args: argparse.Namespace) -> None:
    """Every measurement ``--repeat`` times, interleaved, the fastest kept (other jobs on a shared machine only
    ever slow a run down)."""
    folder = Path(args.clips)
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg"))
    paths = paths[: args.limit] if args.limit else paths
    n = len(paths)
    best: dict[object, tuple[float, float]] = {}

    def keep(name: object, seconds: float, waiting: float = 0.0) -> None:
        best[name] = min((seconds, waiting), best.get(name, (seconds, waiting)))

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "clips.txt"
        listing.write_text("\n".join(paths))
        cmd = [str(STUDENT), "embed", str(listing), "--checkpoint", args.weights, "--layer", args.layer,
               "--device", args.device, *(["--bf16"] if args.bf16 else [])]  # fmt: skip
        for _ in range(args.repeat):
            decode_s, clips = decode_alone(paths)
            keep("decode", decode_s)
            keep("network", network_alone(args.weights, clips, args.layer, args.device, args.bf16))
            del clips
            for workers in args.workers:
                out = Path(tmp) / f"w{workers}"
                keep(workers, *embed_run([*cmd, "--out", str(out), "--workers", str(workers)]))
                shutil.rmtree(out)
    network = best["network"][0]
    print(f"{n} clips from {folder}, layer {args.layer}, device {args.device}{', bf16' if args.bf16 else ''}, "
          f"{os.cpu_count()} CPUs, fastest of {args.repeat}")  # fmt: skip
    print("| what | s | files/s | of which waiting for decoded audio, s | vs network alone |")
    print("| --- | --- | --- | --- | --- |")
    decode = best["decode"][0]
    print(f"| decoding alone (1 process) | {decode:.1f} | {n / decode:.1f} | | {network / decode:.2f} |")
    print(f"| network alone (decoded clips in memory) | {network:.1f} | {n / network:.1f} | | 1.00 |")
    for workers in args.workers:
        took, waiting = best[workers]
        print(f"| student embed --workers {workers} | {took:.1f} | {n / took:.1f} | {waiting:.1f} | "
              f"{network / took:.2f} |")  # fmt: skip
    print("(student embed: from its first file to its last, as it reports; its start-up is left out)")


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
