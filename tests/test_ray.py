"""`ingest run --engine ray` on real Ray clusters started by the tests: the same samples as the local engine, a
resumed run, and a run whose Ray worker processes are killed midway.

Ray replaces 127.0.0.1 with the machine's network address and probes the network when it starts, so every Ray here
runs inside a private network namespace that holds only loopback (``unshare``; skipped where that is not possible),
with usage statistics off. Run as ``python -m tests.test_ray INGEST-COMMAND...``, this file is the driver that
holds a cluster for the ``--ray-address`` test; ``python -m tests.test_ray crash`` makes a decoder crash, and
``python -m tests.test_ray silent INGEST-COMMAND...`` points a driver at a port that never answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from tests.test_ingest import assert_exactly_once, ledgers, teacher_args, video_list

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
SAMPLES_PER_SHARD = 2  # 16 videos -> 8 shard tasks: room to kill workers between finished shards
# the process titles Ray gives a worker while it runs each kind of work
TITLES = ("ray::decode_input", "ray::Teachers.label", "ray::write_shard")


def loopback_only(cmd: list[str]) -> list[str]:
    """``cmd`` in a new network namespace whose only interface is loopback (as root, else in a user namespace)."""
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    return [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


@pytest.fixture(scope="module")
def netns() -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (util-linux, iproute2): no loopback-only network namespace")
    probe = subprocess.run(loopback_only(["true"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a loopback-only network namespace here: {probe.stderr.strip()}")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The reference: the local engine on the 16 real videos."""
    videos = shared_path("videos")
    sources = sorted(str(p) for p in videos.iterdir() if p.suffix not in (".md", ".csv"))
    tmp = tmp_path_factory.mktemp("ray")
    out = tmp / "local"
    result = subprocess.run(
        ingest_cmd(video_list(tmp, sources), out, "--engine", "local"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, sources


def ingest_cmd(listing: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(out),
            "--keep-silent",
            "--workers", "2", "--samples-per-shard", str(SAMPLES_PER_SHARD), *teacher_args(), *args]  # fmt: skip


def comparable(tables: tuple[list[dict], list[dict]]) -> tuple[list[dict], list[dict]]:
    """Ledgers without the posterior members' digests, which differ where float16 rounding does."""
    index, failures = tables
    exact = ("audio.npy", "json")
    return [{**row, "sha256": [d for d in row["sha256"] if d[0] in exact]} for row in index], failures


def assert_same_samples(out: Path, reference: Path) -> None:
    """Same keys, ledgers, metadata and audio bytes; posteriors at most one float16 step apart (teacher batches
    differ between engines, so float32 results may round to neighbouring float16 values)."""
    from soundnet.shards.reader import iter_samples

    assert comparable(ledgers(out)) == comparable(ledgers(reference))
    ours, theirs = (
        {s.key: s for s in iter_samples(sorted(str(p) for p in d.glob("shard-*.tar")))} for d in (out, reference)
    )
    assert ours.keys() == theirs.keys()
    for key, sample in ours.items():
        expected = theirs[key]
        assert sample.audio.tobytes() == expected.audio.tobytes()
        assert sample.meta == expected.meta
        assert sample.posteriors.keys() == expected.posteriors.keys()
        for name, p in sample.posteriors.items():
            q = expected.posteriors[name]
            step = np.spacing(np.maximum(np.abs(p), np.abs(q))).astype(np.float32)
            assert np.all(np.abs(p.astype(np.float32) - q.astype(np.float32)) <= step), (key, name)


def test_resume_on_an_existing_cluster(netns, local_run, tmp_path) -> None:
    """A local run killed after four of eight shards is finished by Ray (--ray-address, --resume): the four kept
    shards are untouched and the whole run equals the local one."""
    reference, sources = local_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for path in [out / "index.parquet", out / "failures.parquet", *out.glob("shard-00000[4-7].*"),
                 *(out / "parts").glob("shard-00000[4-7].*")]:  # fmt: skip
        path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert len(kept) == 4

    cmd = ingest_cmd(video_list(tmp_path, sources), out, "--engine", "ray", "--resume")
    holder = loopback_only([sys.executable, "-m", "tests.test_ray", *cmd])
    result = subprocess.run(holder, capture_output=True, text=True, env=RAY_ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 shard tasks run, 4 already done" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[0-3].tar")} == kept
    assert_exactly_once(out, sources)
    assert_same_samples(out, reference)


def readme_block(containing: str) -> str:
    """The README's ```bash block that contains ``containing``, as written there."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"the README has {len(found)} bash blocks with {containing!r}"
    return found[0]


@pytest.mark.slow
def test_the_readme_cluster_recipe(netns, tmp_path) -> None:
    """The README's cluster recipe, run exactly as written (a token, `ray start --head`, `ingest run
    --ray-address`, `ray stop`) after its local quickstart: both in a loopback-only namespace, their run folders
    under a temporary `runs/`. The Ray run equals the local one; a driver without the token is refused with a
    message that says what to set (checked just before the recipe's `ray stop`)."""
    shared_path("videos")
    home, runs = tmp_path / "home", tmp_path / "runs"
    (home / "elsewhere").mkdir(parents=True)
    quickstart = readme_block("ingest run --videos ../shared/data/videos --out runs/shards ")
    recipe = readme_block("ray start --head")
    assert recipe.rstrip().endswith("ray stop")
    tokenless = re.search(r"^ingest run --engine ray --ray-address .*?(?<!\\)$", recipe, re.S | re.M).group(0)
    tokenless = tokenless.replace("runs/shards-ray", "runs/tokenless")
    script = (
        f"set -e\n{quickstart}\n{recipe.rstrip().removesuffix('ray stop')}\n"
        f'HOME={home / "elsewhere"} {tokenless} || echo "tokenless exit $?"\nray stop\n'
    ).replace("runs/", f"{runs}/")
    env = {k: v for k, v in RAY_ENV.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    result = subprocess.run(loopback_only(["sh", "-c", script]), capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (home / ".ray" / "auth_token").is_file()
    assert result.stdout.count("16 inputs: 13 samples, 3 failures (no_audio 3)") == 2, result.stdout
    sources = [r["source"] for part in ledgers(runs / "shards") for r in part]
    assert_exactly_once(runs / "shards-ray", sources)
    assert_same_samples(runs / "shards-ray", runs / "shards")
    assert "tokenless exit 1" in result.stdout
    assert "cannot join the Ray cluster" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr


def descendants(root: int) -> dict[int, str]:
    """Command lines of the processes below ``root`` (Ray workers are children of the raylet the driver started)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.update({pid: titles[pid] for pid in children})
        frontier += children
    return found


def test_killed_workers_are_retried(netns, local_run, tmp_path) -> None:
    """SIGKILL a decoding worker, the teacher actor while it labels, and a shard task's worker once a shard is
    done: Ray redoes their work and the run still gives every input exactly once, as the local engine does."""
    reference, sources = local_run
    out = tmp_path / "out"
    cmd = loopback_only(ingest_cmd(video_list(tmp_path, sources), out, "--engine", "ray"))
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        job = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=RAY_ENV)
        killed: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 300
            while job.poll() is None and len(killed) < len(TITLES) and time.monotonic() < deadline:
                shards_done = any((out / "parts").glob("*.index.parquet"))
                for pid, title in descendants(job.pid).items():
                    name = title.split(" ", 1)[0]
                    if name in TITLES and name not in killed and (name != "ray::write_shard" or shards_done):
                        os.kill(pid, signal.SIGKILL)
                        killed[name] = pid
                time.sleep(0.02)
            job.wait(timeout=600)
        finally:
            if job.poll() is None:  # the driver's SIGTERM handler stops the Ray it started
                job.terminate()
                job.wait(timeout=60)
        stdout.seek(0), stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    assert job.returncode == 0, errors[-3000:]
    assert set(killed) == set(TITLES), f"only killed {killed} before the run ended"
    assert "16 inputs: 13 samples, 3 failures (no_audio 3)" in output
    assert_exactly_once(out, sources)
    assert_same_samples(out, reference)


def test_ray_options_need_the_ray_engine(tmp_path) -> None:
    from click.testing import CliRunner

    from soundnet.ingest.cli import main

    result = CliRunner().invoke(
        main, ["run", "--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--ray-address", "auto"]
    )
    assert result.exit_code == 2 and "need --engine ray" in result.output


@pytest.mark.parametrize("where", ["no head", "not a head"])
def test_a_wrong_ray_address_fails_within_the_timeout(netns, tmp_path, where) -> None:
    """A driver pointed at an address where no Ray head answers gives up after --ray-timeout with one line that
    names the address and what to check (Ray alone retries for about 13 minutes): nothing listening at the port,
    or something that accepts connections but never answers (inside the namespace, port 6399 is free)."""
    listing = video_list(tmp_path, [str(shared_path("videos", "moviepy_chaplin.mp4"))])
    cmd = ingest_cmd(listing, tmp_path / "out", "--engine", "ray", "--ray-timeout", "5")
    driver = (
        [*cmd, "--ray-address", "127.0.0.1:6399"]
        if where == "no head"
        else [sys.executable, "-m", "tests.test_ray", "silent", *cmd]
    )
    start = time.monotonic()
    result = subprocess.run(loopback_only(driver), capture_output=True, text=True, env=RAY_ENV, cwd=ROOT, timeout=180)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    said = {"no head": "nothing answers there", "not a head": "something answers there, but no Ray cluster"}[where]
    assert re.match(rf"Error: --ray-address 127\.0\.0\.1:\d+: {said} within 5 s \(--ray-timeout\)\. Check ", error)
    assert "ray start --head" in error and "port" in error
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "run.json").exists()  # nothing that would block the corrected rerun
    assert elapsed < 120, elapsed  # imports and the 5 s wait (the bound: 2 minutes; Ray alone: 13)


def test_a_decoder_that_always_crashes_is_a_failure_row(netns) -> None:
    result = subprocess.run(
        loopback_only([sys.executable, "-m", "tests.test_ray", "crash"]),
        capture_output=True,
        text=True,
        env=RAY_ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert (row["source"], row["stage"], row["reason"]) == ("crash.mp4", "decode", "worker_crashed")
    assert row["error_class"] == "WorkerCrashedError" and "died 3 times" in row["message"]


def fetch_from_a_crashing_decoder() -> dict[str, str]:
    """What the Ray engine records for an input whose decoding worker dies on every try."""
    import ray

    from soundnet.ingest.inputs import VideoInput
    from soundnet.ingest.ray_engine import DECODE_RETRIES, _fetch

    @ray.remote(num_cpus=1, max_retries=DECODE_RETRIES)  # as the engine's decode tasks
    def crash() -> None:
        os._exit(1)

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        return _fetch(VideoInput("crash.mp4", "crash"), crash.remote()).failure
    finally:
        ray.shutdown()


def hold_cluster_and_run(ingest: list[str]) -> int:
    """Start a Ray cluster, run ``ingest`` against it with ``--ray-address``, stop the cluster."""
    import ray

    context = ray.init(num_cpus=3, include_dashboard=False)
    try:
        return subprocess.run([*ingest, "--ray-address", context.address_info["gcs_address"]]).returncode
    finally:
        ray.shutdown()


def run_against_a_silent_port(ingest: list[str]) -> int:
    """Run ``ingest`` with ``--ray-address`` at a port that accepts connections but never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        return subprocess.run([*ingest, "--ray-address", f"127.0.0.1:{silent.getsockname()[1]}"]).returncode


if __name__ == "__main__":
    if sys.argv[1:] == ["crash"]:
        print(json.dumps(fetch_from_a_crashing_decoder()))
    elif sys.argv[1:2] == ["silent"]:
        sys.exit(run_against_a_silent_port(sys.argv[2:]))
    else:
        sys.exit(hold_cluster_and_run(sys.argv[1:]))
