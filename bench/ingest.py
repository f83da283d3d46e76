"""Benchmark: our PyAV decoding against the ffmpeg command line a dataset tool would spawn, on the same files.

Three comparisons, each one thread per process (PyAV decoders and scaler at 1 thread; ``-threads 1
-filter_threads 1`` for the CLI):

* audio: ``decode_audio`` (mono, 22050 Hz, first 20 s) vs
  ``ffmpeg -i F -t 20 -vn -ac 1 -ar 22050 -f s16le -`` read from a pipe into numpy;
* frames: ``sample_frames`` at the slot times, ``accurate`` and ``keyframe`` modes, shorter side 256, vs one
  ``ffmpeg -ss T -i F -frames:v 1 -vf scale=-2:256 -f rawvideo -pix_fmt rgb24 -`` per slot (the per-timestamp
  extraction tools such as video2dataset's frame subsamplers run; ``-noaccurate_seek -skip_frame nokey``
  for the keyframe mode, the fastest CLI form of it);
* clip: ``decode_clip`` vs what a CLI pipeline needs for the same sample: a probe (``ffmpeg -i F``, for the
  duration), the audio call and the per-slot frame calls.

The ffmpeg CLI runs its demuxer, decoder and filters in threads of their own even with ``-threads 1``, so
besides wall seconds the table gives CPU seconds (user + system, children included), and videos/s per core is
computed from CPU time. Each figure is the median over ``--repeat`` runs of the whole file set.

    python bench/ingest.py [--videos DIR|FILE...] [--repeat 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

if __package__ in (
    None,
    "",
):  # run as a file: bench/ would come first on sys.path and shadow the ingest package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import imageio_ffmpeg
import numpy as np

from soundnet.audio import SAMPLE_RATE, decode_audio
from soundnet.ingest.decode import CLIP_SECONDS, decode_clip
from soundnet.ingest.frames import SHORT_SIDE, sample_frames, slot_times, video_duration_s
from soundnet.media import DecodeError, open_media

VIDEO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi"}
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
CLI_THREADS = ["-threads", "1", "-filter_threads", "1"]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the ffmpeg calls)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ffmpeg(args: list[str]) -> bytes:
    """One ffmpeg call as a tool makes it, reading stdout; a failed call counts as done (tools ledger it)."""
    return subprocess.run([FFMPEG, "-v", "error", *args], capture_output=True).stdout


# -- ours


def ours_audio(path: Path) -> None:
    try:
        with open_media(path) as container:
            decode_audio(container, max_seconds=CLIP_SECONDS, threads=1)
    except DecodeError:
        pass  # no audio stream: the same cost a worker pays to find that out


def ours_frames(path: Path, seek: str) -> None:
    with open_media(path) as container:
        sample_frames(container, slots_for(path), seek=seek, short_side=SHORT_SIDE, threads=1)


def ours_clip(path: Path) -> None:
    decode_clip(path, keep_silent=True, threads=1)


# -- the command line


def cli_audio(path: Path) -> np.ndarray:
    out = ffmpeg(
        [*CLI_THREADS, "-i", str(path), "-t", str(CLIP_SECONDS), "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE)]
        + ["-f", "s16le", "-"]
    )
    return np.frombuffer(out, np.int16)


def cli_frames(path: Path, seek: str, times: list[float] | None = None) -> list[bytes]:
    # for keyframes, -skip_frame nokey keeps ffmpeg from decoding (and dropping) the frames after the keyframe
    mode = [] if seek == "accurate" else ["-noaccurate_seek", "-skip_frame", "nokey"]
    return [
        ffmpeg(
            [*CLI_THREADS, *mode, "-ss", f"{t:.6f}", "-i", str(path), "-frames:v", "1"]
            + ["-vf", f"scale=-2:{SHORT_SIDE}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        )
        for t in (slots_for(path) if times is None else times)
    ]


def cli_probe_duration(path: Path) -> float | None:
    """The container duration ``ffmpeg -i F`` prints (imageio-style wrappers parse it without ffprobe)."""
    err = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True).stderr.decode(errors="replace")
    found = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", err)
    return None if found is None else int(found[1]) * 3600 + int(found[2]) * 60 + float(found[3])


def cli_clip(path: Path) -> None:
    duration = cli_probe_duration(path)
    audio = cli_audio(path)
    usable = min(CLIP_SECONDS, len(audio) / SAMPLE_RATE, duration or CLIP_SECONDS)
    cli_frames(path, "accurate", slot_times(usable))


# -- timing


def measure(task: Callable[[Path], object], files: list[Path], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``task`` over all ``files``: ``repeat`` runs after a warm-up run."""
    walls, cpus = [], []
    for run in range(repeat + 1):
        wall, cpu = time.perf_counter(), cpu_seconds()
        for f in files:
            task(f)
        if run:
            walls.append(time.perf_counter() - wall)
            cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def video_files(args: list[str]) -> list[Path]:
    paths = [Path(a) for a in args] or [VIDEO_DIR]
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES) if p.is_dir() else [p]
    return files


@cache
def slots_for(path: Path) -> list[float]:
    """A file's slot times from its video duration alone (so files without audio count too), computed once."""
    with open_media(path) as container:
        return slot_times(min(CLIP_SECONDS, video_duration_s(container) or CLIP_SECONDS))


def has_audio(path: Path) -> bool:
    with open_media(path) as container:
        return bool(container.streams.audio)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", nargs="*", default=[], help="files or folders (default: the shared videos)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    files = video_files(args.videos)
    if not files:
        parser.error("no video files found")
    with_audio = [f for f in files if has_audio(f)]
    n_slots = sum(len(slots_for(f)) for f in files)

    Task = Callable[[Path], object]
    cases: list[tuple[str, list[Path], Task, Task]] = [
        ("audio", files, ours_audio, cli_audio),
        *(
            (f"frames {seek}", files, partial(ours_frames, seek=seek), partial(cli_frames, seek=seek))
            for seek in ("accurate", "keyframe")
        ),
        ("clip", with_audio, ours_clip, cli_clip),
    ]
    print(
        f"{len(files)} files ({len(with_audio)} with audio), {n_slots} slot frames, "
        f"median of {args.repeat} runs, one thread per process; ffmpeg {FFMPEG}"
    )
    header = (
        f"{'task':16s} {'files':>5s} {'ours s':>8s} {'cli s':>8s} {'ours cpu':>9s} {'cli cpu':>9s} "
        f"{'ours v/s/core':>13s} {'cli v/s/core':>12s} {'ratio cpu':>9s} {'ratio wall':>10s}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name, fs, ours, cli in cases:
        ours_wall, ours_cpu = measure(ours, fs, args.repeat)
        cli_wall, cli_cpu = measure(cli, fs, args.repeat)
        row = {
            "task": name,
            "files": len(fs),
            "ours_wall_s": ours_wall,
            "cli_wall_s": cli_wall,
            "ours_cpu_s": ours_cpu,
            "cli_cpu_s": cli_cpu,
            "ours_videos_per_s_per_core": len(fs) / ours_cpu,
            "cli_videos_per_s_per_core": len(fs) / cli_cpu,
            "ratio_cpu": ours_cpu / cli_cpu,
            "ratio_wall": ours_wall / cli_wall,
        }
        rows.append(row)
        print(
            f"{name:16s} {len(fs):5d} {ours_wall:8.3f} {cli_wall:8.3f} {ours_cpu:9.3f} {cli_cpu:9.3f} "
            f"{row['ours_videos_per_s_per_core']:13.1f} {row['cli_videos_per_s_per_core']:12.1f} "
            f"{row['ratio_cpu']:9.2f} {row['ratio_wall']:10.2f}"
        )
    if args.json:
        result = {
            "files": [str(f) for f in files],
            "repeat": args.repeat,
            "cores": os.cpu_count(),
            "ffmpeg": FFMPEG,
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
