"""Benchmark: what `student train --probe DATASET:DIR` costs: decoding the set once at start, then per probe the
network's features and the SVM fits (the evaluator's protocol), for a SoundNet8 as training starts it (seed 0)
and, with `--checkpoint`, for trained weights. Wall seconds and the process's CPU seconds (steadier on a shared
machine); `--device cuda` puts the network on a GPU (the SVM stays on the CPU).

    python bench/probe.py --dataset esc10 --data-dir ../shared/data/esc50 [--checkpoint runs/soundnet8.ckpt]
                          [--layer pool5] [--repeat 2] [--device cpu] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ would come first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from soundnet.evaluate.probe import Probe
from soundnet.evaluate.protocol import run_protocol
from soundnet.student.checkpoint import load_checkpoint
from soundnet.student.model import ModelConfig, build_model


def timed(work, *args, **kwargs):
    """``(result, wall s, CPU s)`` of ``work(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="esc10")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--checkpoint", help="Trained weights to probe besides the randomly initialised SoundNet8.")
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--repeat", type=int, default=2, help="Probes per model (the first includes warm-up).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    options = parser.parse_args()

    probe, wall, cpu = timed(Probe.load, f"{options.dataset}:{options.data_dir}", options.dataset, options.layer)
    print(f"decode {len(probe.clips)} clips once: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    torch.manual_seed(0)
    models = {"random SoundNet8 (seed 0)": build_model(ModelConfig("soundnet8"))}
    if options.checkpoint:
        models[Path(options.checkpoint).name] = load_checkpoint(options.checkpoint)
    labels = np.array([c.label for c in probe.data.clips])
    folds = np.array([c.fold for c in probe.data.clips])
    rows = []
    for name, model in models.items():
        model.to(options.device)
        for _ in range(options.repeat):
            features, f_wall, f_cpu = timed(probe.features, model, options.device, options.batch_size)
            result, s_wall, s_cpu = timed(run_protocol, features, labels, folds, probe.svm, verbose=False)
            rows.append((name, result.accuracy, f_wall, f_cpu, s_wall, s_cpu))
            print(f"{name}: accuracy {result.accuracy:.4f}, features {f_wall:.1f} s, SVM {s_wall:.1f} s", flush=True)
    print(f"\n| model ({options.dataset} {options.layer}, {options.device}) | accuracy | features wall / CPU s | "
          "SVM wall / CPU s | probe wall s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, acc, f_wall, f_cpu, s_wall, s_cpu in rows:
        times = f"{f_wall:.1f} / {f_cpu:.1f} | {s_wall:.1f} / {s_cpu:.1f} | {f_wall + s_wall:.1f}"
        print(f"| {name} | {acc:.4f} | {times} |")


if __name__ == "__main__":
    main()
