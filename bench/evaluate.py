"""Benchmark: `evaluate svm` recipes end to end, wall and CPU time, as the README's evaluator table.

Each recipe is one `evaluate svm` command in a child process (imports, dataset, features, SVM, report), timed by
wall clock and by the CPU time (user + system) the child used: on a shared machine the CPU time is the steadier
figure. The first recipe starts from an empty feature cache (decoding and the network included); the others
reuse its features, as a second run with other SVM settings does.

    python bench/evaluate.py --checkpoint runs/soundnet8.ckpt --data-dir ../shared/data/esc50 \\
        [--dataset esc10] [--layer pool5] [--repeat 2] [--with-standardized-cv] [--json OUT]
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
    ("raw features, C=0.01 (default), cold cache", []),
    ("raw features, C=0.001, cached features", ["--C", "0.001"]),
    ("standardised features, C=0.01, cached features", ["--standardize"]),
    ("raw features, --cv-c, cached features", ["--cv-c"]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="esc10")
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--repeat", type=int, default=2, help="Run the whole table this many times.")
    parser.add_argument("--with-standardized-cv", action="store_true", help="Add --standardize --cv-c (slow).")
    parser.add_argument("--json", type=Path, help="Write every measurement here.")
    options = parser.parse_args()
    recipes = RECIPES + ([STANDARDIZED_CV] if options.with_standardized_cv else [])
    rows: dict[str, list[dict]] = {name: [] for name, _ in recipes}
    for repeat in range(options.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            common = ["--checkpoint", options.checkpoint, "--dataset", options.dataset, "--layer", options.layer]
            common += ["--data-dir", options.data_dir, "--cache-dir", str(Path(tmp) / "cache")]
            for name, extra in recipes:
                result = run(common + extra, Path(tmp) / "report.json")
                rows[name].append(result)
                print(
                    f"[{repeat + 1}/{options.repeat}] {name}: accuracy {result['accuracy']:.4f}, "
                    f"wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s, phases {result['phases_s']}",
                    flush=True,
                )
    print(f"\n| recipe ({options.dataset} {options.layer}) | mean accuracy | wall s | CPU s |")
    print("| --- | --- | --- | --- |")
    for name, results in rows.items():
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in results)
        cpus = " / ".join(f"{r['cpu_s']:.0f}" for r in results)
        print(f"| {name} | {results[0]['accuracy']:.4f} | {walls} | {cpus} |")
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
