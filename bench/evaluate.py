"""Benchmark: `evaluate svm` recipes end to end, wall and CPU time, as the README's evaluator table.

Each recipe is one `evaluate svm` command in a child process (imports, dataset, features, SVM, report), timed by
wall clock and by the CPU time (user + system) the child used: on a shared machine the CPU time is the steadier
figure. The first recipe starts from an empty feature cache (decoding and the network included); the others
reuse its features, as a second run with other SVM settings does. `--random-init` scores a SoundNet8 as
`student train` initialises it (seed 0) instead of a checkpoint: the SVM's time on the features of a network that
has learnt nothing. The child imports the installed `soundnet`, or the one `PYTHONPATH` names (to time another
version side by side).

    python bench/evaluate.py --checkpoint runs/soundnet8.ckpt --data-dir ../shared/data/esc50 \\
        [--dataset esc10] [--layer pool5] [--repeat 2] [--recipes 0,1] [--with-standardized-cv] [--json OUT]
    python bench/evaluate.py --random-init --data-dir ../shared/data/esc50 --recipes 0
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES: list[tuple[str, list[str]]] = [
    ("default C, cold cache", []),
    ("C / 10, cached features", ["--C", "0.2"]),
    ("standardised features, default C, cached features", ["--standardize"]),
    ("--cv-c, cached features", ["--cv-c"]),
]
STANDARDIZED_CV = ("standardised features, --cv-c, cached features", ["--standardize", "--cv-c"])


def run(args: list[str], out: Path) -> dict:
    """One `evaluate svm` child: its wall and CPU seconds and the accuracy it reports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "soundnet", "evaluate", "svm", *args, "--json", str(out)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"evaluate svm {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(out.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"accuracy": report["accuracy"], "wall_s": wall, "cpu_s": cpu, "phases_s": report["timings_s"]}


def random_checkpoint(path: Path) -> str:
    """A SoundNet8 with `student train`'s initialisation (seed 0) and the heads of the paper's teachers."""
    import torch

    from soundnet.student.checkpoint import save_checkpoint
    from soundnet.student.model import ModelConfig, build_model

    torch.manual_seed(0)
    save_checkpoint(path, build_model(ModelConfig("soundnet8")))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint")
    which.add_argument("--random-init", action="store_true", help="A SoundNet8 as training starts it (seed 0).")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="esc10")
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--repeat", type=int, default=2, help="Run the whole table this many times.")
    parser.add_argument("--recipes", help="Comma-separated indices of the recipes to run (0: the cold default).")
    parser.add_argument("--with-standardized-cv", action="store_true", help="Add --standardize --cv-c (slow).")
    parser.add_argument("--json", type=Path, help="Write every measurement here.")
    options = parser.parse_args()
    recipes = RECIPES + ([STANDARDIZED_CV] if options.with_standardized_cv else [])
    if options.recipes:
        recipes = [recipes[int(i)] for i in options.recipes.split(",")]
    rows: dict[str, list[dict]] = {name: [] for name, _ in recipes}
    for repeat in range(options.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = options.checkpoint or random_checkpoint(Path(tmp) / "random.ckpt")
            common = ["--checkpoint", checkpoint, "--dataset", options.dataset, "--layer", options.layer]
            common += ["--data-dir", options.data_dir, "--cache-dir", str(Path(tmp) / "cache")]
            for name, extra in recipes:
                result = run(common + extra, Path(tmp) / "report.json")
                rows[name].append(result)
                print(
                    f"[{repeat + 1}/{options.repeat}] {name}: accuracy {result['accuracy']:.4f}, "
                    f"wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s, phases {result['phases_s']}",
                    flush=True,
                )
    what = "random SoundNet8" if options.random_init else Path(options.checkpoint).name
    print(f"\n| recipe ({what}, {options.dataset} {options.layer}) | mean accuracy | wall s | CPU s |")
    print("| --- | --- | --- | --- |")
    for name, results in rows.items():
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in results)
        cpus = " / ".join(f"{r['cpu_s']:.0f}" for r in results)
        print(f"| {name} | {results[0]['accuracy']:.4f} | {walls} | {cpus} |")
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
