"""Benchmark: training throughput (clips/s) of SoundNet8 on 20 s clips, batch 64 by default.

* our loop (:func:`student.train.train`: each step's clips read by index in loader worker processes, int16 audio
  pinned and converted to float on the device, bf16 autocast on CUDA, ``--compile`` for torch.compile) against a
  plain eager float32 loop on the same shards (samples read one after another in the main process, float32 made
  on the CPU, no autocast, no compile), both with the same loss and Adam step;
* the data loader alone (batches read and copied to the device, no model) against the training step alone (one
  batch kept on the device, our step and the eager float32 one), which says which of the two bounds the loop.

Each figure is clips/s over ``--steps`` steps after as many steps of warm-up (worker start, compilation, cuDNN
autotuning). Without ``--shards`` synthetic shards are written to a temporary folder: random audio and random
log-softmax posteriors for 1000 + 365 classes, 4 frames per 20 s clip (the cost of a step does not depend on
what the audio holds).

    python bench/train.py [--shards PATTERN] [--batch-size 64] [--steps 20] [--workers 8] [--device auto]
                          [--compile] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ would come first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch.utils.data import default_collate

from soundnet.shards.contract import AUDIO_SCALE, FRAMES_PER_CLIP, SAMPLE_RATE
from soundnet.shards.reader import expand_shards
from soundnet.shards.schema import Sample
from soundnet.shards.writer import ShardWriter
from soundnet.student.data import CLIP_SAMPLES, Clips, make_loader, model_alignment, scan_shards, to_device
from soundnet.student.distributed import resolve_device
from soundnet.student.model import ModelConfig, build_model
from soundnet.student.train import TrainConfig, train, train_step

HEADS = {"imagenet": 1000, "places": 365}


def synthetic_shards(folder: Path, clips: int, per_shard: int) -> list[str]:
    """Shards of random 20 s clips with 4 frames of random log-softmax rows per teacher."""
    rng = np.random.default_rng(0)
    teachers = {n: {"arch": "random", "weights": "-", "classes": c, "sha256": "0" * 64} for n, c in HEADS.items()}
    paths = []
    for first in range(0, clips, per_shard):
        path = folder / f"shard-{first // per_shard:06d}.tar"
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
        paths.append(str(path))
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


def our_batches(clips: Clips, args: argparse.Namespace, workers: int, device: torch.device) -> Iterator[dict]:
    steps = 2 * args.steps + 1  # warm-up and timed steps
    loader = make_loader(
        clips, args.batch_size, seed=0, start=0, steps=steps, workers=workers, pin_memory=device.type == "cuda"
    )
    return iter(loader)


def loader_alone(clips: Clips, args: argparse.Namespace, device: torch.device) -> float:
    """Our loader's batches, copied to the device and converted, with no model."""
    batches = our_batches(clips, args, args.workers, device)
    return clips_per_s(lambda: to_device(next(batches), device), args.steps, args.batch_size, device)


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
    parser.add_argument("--json", type=Path, help="Write the numbers here.")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        urls = expand_shards(args.shards) if args.shards else synthetic_shards(Path(tmp), args.clips, 32)
        shards = scan_shards(urls)
        clips = Clips(shards, model_alignment(fresh_model(shards.heads, device)[0], shards.layout, urls[0]))
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
    print(f"{'':34s} {'clips/s':>9s}")
    for what, value in results.items():
        print(f"{what:34s} {value:9.1f}")
    if args.json:
        document = {"device": str(device), "device_name": name, "batch_size": b, "steps": n, "clips_per_s": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
