"""Benchmark: `student embed` on a long file, wall seconds and peak resident memory of the whole process.

Makes a stereo 44.1 kHz FLAC of ``--minutes`` (a tone plus noise per channel, with the ffmpeg that imageio-ffmpeg
ships) and runs ``student embed`` on it once per ``--chunk-seconds`` value; the peak RSS is the kernel's figure for
that process (``os.wait4``), so it includes Python, torch and PyAV themselves.

    python bench/embed.py --weights ../shared/data/soundnet8/soundnet8.npz [--minutes 10] [--chunk-seconds 15 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg


def make_file(path: Path, minutes: float) -> None:
    source = f"aevalsrc=0.3*sin(2*PI*440*t)+0.1*random(0)|0.2*sin(2*PI*660*t)+0.1*random(1):s=44100:d={minutes * 60}"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", source, "-c:a", "flac", str(path)]
    subprocess.run(cmd, check=True)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="A checkpoint or the released soundnet8.npz.")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[15.0, 60.0])
    args = parser.parse_args()
    student = Path(sys.executable).parent / "student"
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "long.flac"
        make_file(audio, args.minutes)
        print(f"{args.minutes:g} min stereo 44.1 kHz FLAC, layer {args.layer}")
        print("| chunk s | wall s | audio s per wall s | peak RSS GB |\n| --- | --- | --- | --- |")
        for chunk in args.chunk_seconds:
            cmd = [str(student), "embed", str(audio), "--checkpoint", args.weights, "--layer", args.layer,
                   "--out", str(Path(tmp) / "out.parquet"), "--chunk-seconds", str(chunk)]  # fmt: skip
            wall, peak = run(cmd)
            print(f"| {chunk:g} | {wall:.1f} | {args.minutes * 60 / wall:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
