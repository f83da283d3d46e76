"""Benchmark: training throughput (clips/s) of SoundNet8 on 20 s clips, batch 64 by default.

* our loop (:func:`student.train.train`: each step's clips read by index in loader worker processes, int16 audio
  pinned and converted to float on the device, bf16 autocast on CUDA, ``--compile`` for torch.compile) against a
  plain eager float32 loop on the same shards (samples read one after another in the main process, float32 made
  on the CPU, no autocast, no compile), both with the same loss and Adam step;
* the data loader alone (batches read and copied to the device, no model) against the training step alone (one
  batch kept on the device, our step and the eager float32 one), which says which of the two bounds the loop;
* reading (``--reading`` for these alone): one batch read in this process (alternating rounds, median) and the loader
  alone on the same run folder, with and without the sha256 check of every sample, in both read orders (``sample``,
  ``shard``), locally and from a loopback HTTP server that answers byte ranges, with the GET requests per clip.

Each figure is clips/s over ``--steps`` steps after as many steps of warm-up (worker start, compilation, cuDNN
autotuning). Without ``--shards`` a synthetic run is written to a temporary folder (shards and their index):
random audio and random log-softmax posteriors for 1000 + 365 classes, 4 frames per 20 s clip (the cost of a step
does not depend on what the audio holds).

    python bench/train.py [--shards PATTERN] [--batch-size 64] [--steps 20] [--workers 8] [--device auto]
                          [--compile] [--reading] [--open-shards 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ would come first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch.utils.data import default_collate

from soundnet.shards import remote
from soundnet.shards.contract import AUDIO_SCALE, FRAMES_PER_CLIP, SAMPLE_RATE
from soundnet.shards.ledger import RunLayout
from soundnet.shards.reader import expand_shards
from soundnet.shards.schema import Sample
from soundnet.shards.writer import ShardWriter
from soundnet.student.data import (
    CLIP_SAMPLES,
    READ_ORDERS,
    Alignment,
    Clips,
    StepBatches,
    make_loader,
    model_alignment,
    scan_shards,
    to_device,
)
from soundnet.student.distributed import resolve_device
from soundnet.student.model import ModelConfig, build_model
from soundnet.student.train import TrainConfig, train, train_step

HEADS = {"imagenet": 1000, "places": 365}


def synthetic_shards(folder: Path, clips: int, per_shard: int) -> list[str]:
    """A run of random 20 s clips with 4 frames of random log-softmax rows per teacher: shards and their index."""
    rng = np.random.default_rng(0)
    teachers = {n: {"arch": "random", "weights": "-", "classes": c, "sha256": "0" * 64} for n, c in HEADS.items()}
    layout = RunLayout(folder)
    paths = []
    for first in range(0, clips, per_shard):
        path = layout.shard_path(first // per_shard)
        with ShardWriter(path) as writer:
            for i in range(first, min(first + per_shard, clips)):
                logits = {n: rng.normal(scale=3.0, size=(FRAMES_PER_CLIP, c)) for n, c in HEADS.items()}
                writer.write(
                    Sample(
                        key=f"clip{i:06d}",
                        audio=rng.integers(-8000, 8000, size=CLIP_SAMPLES, dtype=np.int16),
                        posteriors={
                            n: torch.log_softmax(torch.from_numpy(z), dim=1).numpy().astype(np.float16)
                            for n, z in logits.items()
                        },
                        meta={
                            "source": f"synthetic/{i}",
                            "duration_s": CLIP_SAMPLES / SAMPLE_RATE,
                            "frame_times_s": [2.5 + 5 * t for t in range(FRAMES_PER_CLIP)],
                            "teachers": teachers,
                            "tool_version": "bench",
                        },
                    )
                )
        layout.write_parts(first // per_shard, writer.index_rows, [])
        paths.append(str(path))
    layout.finalize()
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clips_per_s(step: Callable[[], None], steps: int, batch_size: int, device: torch.device) -> float:
    """Run ``steps`` warm-up steps, then time ``steps`` more."""
    for _ in range(steps):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def our_loop(urls: list[str], args: argparse.Namespace, out: Path) -> float:
    """The real training loop: the second report window of a run of 2 x steps steps."""
    config = TrainConfig(
        shards=urls,
        out=str(out),
        steps=2 * args.steps,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        compile=args.compile,
        log_every=args.steps,
        checkpoint_every=10 * args.steps,
    )
    train(config)
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["clips_per_s"]


def plain_batches(clips: Clips, batch_size: int) -> Iterator[dict]:
    """The same clips as our loop, read one by one in this process, in order, as float32."""
    indices = itertools.cycle(range(len(clips)))
    while True:
        batch = default_collate([clips.example(next(indices)) for _ in range(batch_size)])
        batch["audio"] = batch["audio"].float() / AUDIO_SCALE
        batch["targets"] = {n: t.float() for n, t in batch["targets"].items()}
        yield batch


def plain_loop(clips: Clips, args: argparse.Namespace, device: torch.device) -> float:
    """Eager float32, data read in the main process, nothing overlapped."""
    net, optimizer = fresh_model(clips.shards.heads, device)
    batches = plain_batches(clips, args.batch_size)

    def step() -> None:
        batch = next(batches)
        x = batch["audio"].to(device).unsqueeze(1)
        targets = {n: t.to(device).transpose(1, 2) for n, t in batch["targets"].items()}
        train_step(net, optimizer, x, targets, amp=False)

    return clips_per_s(step, args.steps, args.batch_size, device)


def our_batches(
    clips: Clips, args: argparse.Namespace, workers: int, device: torch.device, read_order: str = "sample"
) -> Iterator[dict]:
    steps = 2 * args.steps + 1  # warm-up and timed steps
    loader = make_loader(
        clips, args.batch_size, seed=0, start=0, steps=steps, workers=workers, pin_memory=device.type == "cuda",
        read_order=read_order, open_shards=args.open_shards,
    )  # fmt: skip
    return iter(loader)


def loader_alone(clips: Clips, args: argparse.Namespace, device: torch.device, read_order: str = "sample") -> float:
    """Our loader's batches, copied to the device and converted, with no model."""
    batches = our_batches(clips, args, args.workers, device, read_order)
    return clips_per_s(lambda: to_device(next(batches), device), args.steps, args.batch_size, device)


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """A static HTTP server for ``folder`` that answers byte ranges (as S3 and CDNs do), on loopback, in a process of
    its own as a server elsewhere would be; yields its base URL."""
    ready: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(folder, ready), daemon=True)
    server.start()
    try:
        yield ready.get(timeout=60)
    finally:
        server.terminate()
        server.join()


def _serve(folder: Path, ready: multiprocessing.Queue) -> None:
    from tests.remote_servers import serve_http

    with serve_http(folder) as (base, _):
        ready.put(base)
        threading.Event().wait()


@contextlib.contextmanager
def counted_requests() -> Iterator[list[int]]:
    """Count the ranged requests this process makes to URLs (one GET each)."""
    counts = [0]
    read_ranges = remote.read_ranges

    def counting(ranges):
        counts[0] += sum(remote.is_url(url) for url, _, _ in ranges)
        return read_ranges(ranges)

    remote.read_ranges = counting
    try:
        yield counts
    finally:
        remote.read_ranges = read_ranges


def reading(
    run: str, alignment: Alignment, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The reading path on one run folder, locally and from a loopback HTTP server, in both read orders, locally
    also without the digest check:

    * one batch read in this process (what a loader worker does per step), in rounds that alternate between the
      variants so that load from other jobs drifts alike: median clips/s;
    * the loader alone (``--workers`` processes, batches converted on the device): clips/s;
    * GET requests per clip.
    """
    folder = Path(run)
    batch_speeds: dict[str, list[float]] = {}
    loader_speeds: dict[str, float] = {}
    requests: dict[str, float] = {}
    with http_server(folder.parent) as base, counted_requests() as gets:
        variants = {}
        for where, source in (("local", run), ("loopback HTTP", f"{base}/{folder.name}")):
            shards = scan_shards(expand_shards(source))
            for order in READ_ORDERS:
                for verify in (True, False) if (where, order) == ("local", "sample") else (True,):
                    name = f"{where}, {order} order" + ("" if verify else ", no digest check")
                    first = StepBatches(shards.sizes, args.batch_size, seed=0, start=0, steps=1, read_order=order,
                                        open_shards=args.open_shards).batch(0)  # fmt: skip
                    variants[name] = (Clips(shards, alignment, verify), first, order)
        for _ in range(args.rounds):
            for name, (clips, indices, _) in variants.items():
                before, start = gets[0], time.perf_counter()
                clips.__getitems__(indices)
                batch_speeds.setdefault(name, []).append(len(indices) / (time.perf_counter() - start))
                if name.startswith("loopback"):
                    requests[name] = (gets[0] - before) / len(indices)
        for name, (clips, _, order) in variants.items():
            loader_speeds[name] = loader_alone(clips, args, device, order)
    return {name: float(np.median(v)) for name, v in batch_speeds.items()}, loader_speeds, requests


def step_alone(clips: Clips, args: argparse.Namespace, device: torch.device, ours: bool) -> float:
    """Training steps on one batch kept on the device: ours (bf16 autocast on CUDA, --compile) or eager float32."""
    x, targets = to_device(next(our_batches(clips, args, 0, device)), device)
    net, optimizer = fresh_model(clips.shards.heads, device, compile_=ours and args.compile)
    amp = ours and device.type == "cuda"
    return clips_per_s(lambda: train_step(net, optimizer, x, targets, amp), args.steps, args.batch_size, device)


def fresh_model(heads: dict[str, int], device: torch.device, compile_: bool = False):
    model = build_model(ModelConfig("soundnet8", heads)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    return (torch.compile(model) if compile_ else model), optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="Shards to read [default: synthetic shards in a temporary folder].")
    parser.add_argument("--clips", type=int, default=512, help="Synthetic clips to write.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps (after as many warm-up steps).")
    parser.add_argument("--workers", type=int, default=8, help="Loader processes of our loop.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile in our loop and step.")
    parser.add_argument("--reading", action="store_true", help="Only the reading figures (digests, orders, HTTP).")
    parser.add_argument("--open-shards", type=int, default=8, help="Shards read at once in the shard read order.")
    parser.add_argument("--rounds", type=int, default=7, help="Alternating rounds of the one-batch reads.")
    parser.add_argument("--json", type=Path, help="Write the numbers here.")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        urls = expand_shards(args.shards) if args.shards else synthetic_shards(Path(tmp) / "shards", args.clips, 32)
        shards = scan_shards(urls)
        clips = Clips(shards, model_alignment(fresh_model(shards.heads, device)[0], shards.layout, urls[0]))
        one_batch, loader, requests = reading(remote.parent(urls[0]), clips.alignment, args, device)
        results: dict[str, float] = {}
        if not args.reading:
            results = {
                "data loader alone": loader_alone(clips, args, device),
                "training step alone (ours)": step_alone(clips, args, device, ours=True),
                "training step alone (eager fp32)": step_alone(clips, args, device, ours=False),
                "our loop": our_loop(urls, args, Path(tmp) / "run"),
                "plain eager fp32 loop": plain_loop(clips, args, device),
            }
    b, n = args.batch_size, args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"\nSoundNet8, 20 s clips, batch {b}, {n} timed steps; {device} ({name}), torch {torch.__version__}")
    if results:
        print(f"{'':34s} {'clips/s':>9s}")
        for what, value in results.items():
            print(f"{what:34s} {value:9.1f}")
    print(f"\nreading, {args.workers} loader workers, --open-shards {args.open_shards}; clips/s of one batch read in")
    print(f"one process (median of {args.rounds} alternating rounds), of the loader alone, and GET requests per clip")
    print(f"{'':40s} {'one batch':>10s} {'loader':>8s} {'GET/clip':>9s}")
    for what, value in one_batch.items():
        gets = f"{requests[what]:.3f}" if what in requests else ""
        print(f"{what:40s} {value:10.1f} {loader[what]:8.1f} {gets:>9s}")
    if args.json:
        document = {
            "device": str(device), "device_name": name, "batch_size": b, "steps": n, "workers": args.workers,
            "open_shards": args.open_shards, "clips_per_s": results,
            "reading": {"one_batch_clips_per_s": one_batch, "loader_clips_per_s": loader, "gets_per_clip": requests},
        }  # fmt: skip
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
