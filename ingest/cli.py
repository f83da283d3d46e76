"""`ingest`: stage one, videos -> WebDataset shards of waveform + teacher log-posteriors."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

import click

from soundnet.ingest.claims import CLAIM_TIMEOUT_S
from soundnet.ingest.frames import MAX_FRAMES, MIN_SECONDS, SEEK_MODES, SLOT_INTERVAL_S
from soundnet.ingest.ray_auth import RAY_TIMEOUT_S
from soundnet.media import MAX_DOWNLOAD_MB, URL_RETRIES, URL_TIMEOUT_S, is_remote

DEFAULT_TEACHERS = ("imagenet=resnet50:IMAGENET1K_V2",)


def _fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at 128 KiB: its sliding default let the main process's heap grow with the number
    of videos (2.1 GB at 60 videos, 2.8 GB at 240; fixed: 1.8 and 1.9 GB; see docs/scale.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to fix
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


@click.group()
def main() -> None:
    """Turn videos into training shards for the SoundNet student."""
    _fixed_mmap_threshold()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


@main.command()
@click.option(
    "--videos",
    required=True,
    help="One video file, a folder (searched recursively), a text file of paths/URLs, "
    "or a CSV/Parquet file with a 'path' column (optional 'id'); the list or folder may be at a URL (s3://...).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder for shards and ledgers.")
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    metavar="NAME=ARCH[:WEIGHTS]",
    help="A vision teacher; NAME becomes the shard field. Repeatable. "
    f"[default: {' '.join(DEFAULT_TEACHERS)} (downloads weights)]",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default="all cores",
    help="Decoding processes (--engine ray without --ray-address: CPUs for decoding in the Ray it starts).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: processes on this machine; ray: shard tasks on a Ray cluster (pip install 'soundnet-distill[ray]').",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="With --engine ray: the cluster to join (host:port, or 'auto'); default: start a Ray on this machine.",
)
@click.option(
    "--ray-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=RAY_TIMEOUT_S,
    show_default=True,
    help="With --ray-address: seconds to wait for the cluster to answer before giving up.",
)
@click.option(
    "--ray-teachers",
    type=click.IntRange(min=1),
    help="With --engine ray: teacher actors, each holding a GPU (or a CPU on a cluster without GPUs).  "
    "[default: one per GPU; 1 without GPUs]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out (finished shards are kept, others redone), or join it while other runs "
    "work on it (one per machine over a shared filesystem; each shard task is written by one run).",
)
@click.option(
    "--claim-timeout",
    type=click.FloatRange(min=1),
    default=CLAIM_TIMEOUT_S,
    show_default=True,
    help="Seconds without a heartbeat after which another run's claim on a shard task is taken over "
    "(a run on this machine whose process is gone is taken over at once). Recorded in run.json: runs that join "
    "use the run's value.",
)
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=500, show_default=True)
@click.option(
    "--clip-seconds",
    type=float,
    help="Audio kept per video.  [default: --frame-interval x --max-frames, 20 s]",
)
@click.option(
    "--frame-interval",
    type=float,
    default=SLOT_INTERVAL_S,
    show_default=True,
    help="Seconds per frame slot; frames at slot centres.",
)
@click.option("--max-frames", type=click.IntRange(min=1), default=MAX_FRAMES, show_default=True)
@click.option(
    "--frame-seek",
    type=click.Choice(SEEK_MODES),
    default="accurate",
    show_default=True,
    help="accurate: the frame shown at the slot centre; keyframe: the keyframe before it (faster).",
)
@click.option(
    "--min-seconds",
    type=float,
    default=MIN_SECONDS,
    show_default=True,
    help="Shorter clips fail as too_short; clips shorter than one slot give one frame at their middle.",
)
@click.option("--keep-silent", is_flag=True, help="Keep clips whose audio is digital silence.")
@click.option("--device", default="auto", show_default=True, help="Teacher device: auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--batch-frames",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Frames per teacher batch (across videos).",
)
@click.option(
    "--url-retries",
    type=click.IntRange(min=0),
    default=URL_RETRIES,
    show_default=True,
    help="Further tries of an http(s) input after a transient failure (connection error, timeout, 429, 5xx); "
    "waits double from 1 s or follow Retry-After, at most 30 s.",
)
@click.option(
    "--url-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=URL_TIMEOUT_S,
    show_default=True,
    help="Seconds an http(s) server may take to connect or to send more data.",
)
@click.option(
    "--max-download-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=MAX_DOWNLOAD_MB,
    show_default=True,
    help="An http(s) video from a server without byte ranges is downloaded to a temporary file (in $TMPDIR, "
    "removed after decoding), if no larger than this; servers with ranges are streamed. Per decoding worker: each "
    "holds at most one download at a time, so $TMPDIR (often in RAM) may need --workers times this.",
)
def run(
    videos,
    out,
    teachers,
    workers,
    engine,
    ray_address,
    ray_timeout,
    ray_teachers,
    resume,
    claim_timeout,
    samples_per_shard,
    clip_seconds,
    frame_interval,
    max_frames,
    frame_seek,
    min_seconds,
    keep_silent,
    device,
    batch_frames,
    url_retries,
    url_timeout,
    max_download_mb,
) -> None:
    """Decode videos, label their frames with the teachers, write shards + index/failure ledgers.

    Exits 0 when every input is accounted for (failures are recorded in failures.parquet, they are data);
    non-zero for bad options, an unwritable --out, or when not a single sample could be made.
    """
    from soundnet.ingest.config import IngestConfig
    from soundnet.ingest.errors import RunError
    from soundnet.ingest.inputs import InputListError
    from soundnet.ingest.run import run_ingest
    from soundnet.media import UrlPolicy

    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: decoding workers stop, claims are handed back
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if engine != "ray" and (ray_address or ray_teachers):
        raise click.UsageError("--ray-address and --ray-teachers need --engine ray")
    if is_remote(out):
        raise click.BadParameter(
            "must be a folder (local, or a filesystem every node mounts), not a URL: write the run there, then "
            "publish the finished shards (docs/scale.md, 'Publishing shards to object storage')",
            param_hint="--out",
        )
    if device == "auto" and engine == "local":  # on Ray, the cluster's GPUs decide
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        config = IngestConfig(
            clip_seconds=clip_seconds,
            frame_interval=frame_interval,
            max_frames=max_frames,
            frame_seek=frame_seek,
            min_seconds=min_seconds,
            keep_silent=keep_silent,
            samples_per_shard=samples_per_shard,
            url=UrlPolicy(retries=url_retries, timeout_s=url_timeout, max_download_mb=max_download_mb),
        )
    except ValueError as exc:  # the clip layout names what is wrong
        raise click.UsageError(f"--frame-interval/--max-frames: {exc}") from exc
    try:
        summary = run_ingest(
            videos,
            out,
            list(teachers or DEFAULT_TEACHERS),
            config,
            workers,
            engine,
            resume,
            device,
            batch_frames,
            ray_address,
            ray_teachers,
            claim_timeout,
            ray_timeout_s=ray_timeout,
        )
    except (InputListError, RunError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if summary.tasks_elsewhere:
        click.echo(
            f"{summary.tasks_run} shard tasks run here ({summary.samples} samples, {summary.failures} failures); "
            f"{summary.tasks_elsewhere} still being written by other runs on {out}: the last run to finish merges "
            "the ledgers (if one was killed, run again with --resume)"
        )
        return
    reasons = ", ".join(f"{r} {n}" for r, n in summary.reasons.items()) or "none"
    counts = f"{summary.inputs} inputs: {summary.samples} samples, {summary.failures} failures ({reasons})"
    if summary.tasks_run == 0:
        click.echo(f"nothing left to do: the run in {out} is complete ({counts})")
    else:
        click.echo(
            f"{counts}; {summary.tasks_run} shard tasks run, {summary.tasks_skipped} already done; "
            f"{summary.seconds:.1f} s, {summary.videos_per_s:.2f} videos/s"
        )
    if summary.samples == 0:
        raise click.ClickException("no input could be made into a sample; see failures.parquet")
