"""Stage one's engines and run bookkeeping: what a decoding worker imports, workers that die with `ingest`, the
clip layout and statistics a run records, progress reported per input, several runs on one --out, claims, and
clear errors for a full disk, a read-only --out and teacher weights that do not load."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from soundnet.ingest.claims import Claims
from soundnet.ingest.config import IngestConfig
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.local import DecodePool
from soundnet.ingest.run import ProgressBar, run_ingest
from soundnet.ingest.stats import TaskStats
from soundnet.shards.contract import ClipLayout
from soundnet.shards.ledger import RunLayout
from soundnet.shards.reader import iter_samples
from tests.conftest import shared_path
from tests.test_ingest import assert_exactly_once, ingest, ledgers, teacher_args, video_list

HEAVY = ("torch", "torchvision", "webdataset")


def all_videos() -> list[str]:
    return sorted(str(p) for p in shared_path("videos").iterdir() if p.suffix not in (".md", ".csv"))


def test_decoding_workers_import_neither_torch_nor_webdataset() -> None:
    """The local engine's own pool: decode a real video, then list the worker's modules."""
    source = str(shared_path("videos") / "moviepy_chaplin.mp4")
    pool = DecodePool(1, IngestConfig())
    try:
        decoded = next(pool.map(iter([VideoInput(source, "chaplin")]), window=1))
        assert decoded.clip is not None and decoded.seconds > 0
        (worker,) = pool._workers
        worker.conn.send((eval, "sorted(__import__('sys').modules)"))
        modules = worker.conn.recv()
    finally:
        pool.close()
    assert "soundnet.ingest.worker" in modules and "av" in modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert "soundnet.shards.writer" not in modules


def children(pid: int) -> set[int]:
    """Processes below ``pid``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        kids = {p for p, pp in parents.items() if pp == parent}
        found |= kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_ingest_leaves_no_worker(tmp_path, sig) -> None:
    listing = video_list(tmp_path, all_videos())
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(tmp_path / "out"),
           "--workers", "2", "--samples-per-shard", "2", *teacher_args()]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(kids := children(job.pid)) < 2:  # the decoding workers (and multiprocessing's helper)
            assert job.poll() is None and time.monotonic() < deadline, "no decoding workers started"
            time.sleep(0.05)
        os.kill(job.pid, sig)  # the parent only, as a scheduler or the OOM killer would
        job.wait(timeout=60)
        deadline = time.monotonic() + 10
        while (left := {p for p in kids if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"workers left behind after {sig.name}: {left}"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory) -> Path:
    """Two real videos with a non-default clip layout: 8 frames of 2.5 s slots."""
    tmp = tmp_path_factory.mktemp("layout")
    videos = shared_path("videos")
    sources = [str(videos / "moviepy_big_buck_bunny_0_30.webm"), str(videos / "imageio_no_such.mp4")]
    out = tmp / "out"
    result = ingest("--videos", str(video_list(tmp, sources)), "--out", str(out), "--workers", "1",
                    "--frame-interval", "2.5", "--max-frames", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_layout_is_recorded_in_the_run_and_every_sample(layout_run) -> None:
    layout = ClipLayout(slot_seconds=2.5, frames_per_clip=8).to_json()
    run = json.loads((layout_run / "run.json").read_text())
    assert run["layout"] == layout
    assert run["config"]["short_side"] == 256  # both real teachers resize to 256
    (sample,) = iter_samples(str(layout_run / "shard-*.tar"))
    assert sample.meta["layout"] == layout
    assert len(sample.meta["frame_times_s"]) == 8 and sample.posteriors["imagenet"].shape == (8, 1000)
    assert sample.meta["source_sample_rate"] == 44100 and sample.meta["source_channels"] in (1, 2)
    assert "sample_rate" not in sample.meta and "channels" not in sample.meta


def test_stats_beside_each_shard_and_a_summary(layout_run) -> None:
    stats = json.loads((layout_run / "shard-000000_stats.json").read_text())
    assert stats["shard"] == "shard-000000.tar" and stats["inputs"] == 2 and stats["samples"] == 1
    assert stats["failures"] == {"not_found": 1}
    assert stats["bytes"] == (layout_run / "shard-000000.tar").stat().st_size
    assert 19.9 < stats["audio_seconds"] <= 20.0
    assert stats["decode_s"] > 0 and stats["label_s"] > 0 and stats["write_s"] > 0
    summary = json.loads((layout_run / "summary.json").read_text())
    index, failures = ledgers(layout_run)
    assert (summary["samples"], summary["failures"], summary["inputs"]) == (len(index), len(failures), 2)
    assert summary["failures_by_reason"] == {"not_found": 1}
    assert summary["last_run"]["engine"] == "local" and summary["last_run"]["tasks_run"] == 1


def test_two_runs_on_one_out_share_the_work(tmp_path) -> None:
    """Two `ingest run --resume` started at once on one --out: each shard task written by one of them."""
    sources = all_videos()
    listing = video_list(tmp_path, sources)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(out), "--resume",
           "--keep-silent", "--workers", "1", "--samples-per-shard", "2", *teacher_args()]  # fmt: skip
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    for job, (_, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
    stdout = "".join(o for o, _ in outputs)
    assert "16 inputs: 13 samples, 3 failures (no_audio 3)" in stdout
    ran = [int(m) for m in __import__("re").findall(r"(\d+) shard tasks run", stdout)]
    assert sum(ran) == 8 and all(ran), stdout  # every task once, and both runs did some
    assert_exactly_once(out, sources)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["samples"], summary["failures"], summary["tasks"]) == (13, 3, 8)
    assert not list((out / "claims").iterdir())
    from soundnet.shards.cli import main as shards_main

    result = CliRunner().invoke(shards_main, ["verify", str(out)])
    assert result.exit_code == 0, result.output


def claim_file(layout: RunLayout, task: int, owner: dict, age_s: float) -> None:
    path = layout.claim_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_claims_exclusive_stale_and_taken_over(tmp_path) -> None:
    layout = RunLayout(tmp_path)
    with Claims(layout, timeout_s=5) as first, Claims(layout, timeout_s=5) as second:
        mine = first.claim(0)
        assert mine is not None and mine.held()
        assert second.claim(0) is None  # held by a live run
        assert second.live_others() == {0}
        claim_file(layout, 1, {"host": "elsewhere", "pid": 1, "run": "x"}, age_s=1)
        assert second.claim(1) is None  # another host's fresh heartbeat
        claim_file(layout, 2, {"host": "elsewhere", "pid": 1, "run": "x"}, age_s=60)
        taken = second.claim(2)  # another host's stale heartbeat
        assert taken is not None and json.loads(taken.path.read_text())["run"] == second.run_id
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        claim_file(layout, 3, {**first.owner, "pid": int(dead.stdout), "run": "killed"}, age_s=0)
        assert second.claim(3) is not None  # a run of this host whose process is gone: at once
        time.sleep(1.5)  # heartbeats keep held claims fresh
        assert time.time() - mine.path.stat().st_mtime < 1.5
        first.release(mine)
        assert not mine.path.exists() and second.claim(0) is not None
    assert [p.name for p in layout.claims_dir.glob("*.claim")] == ["shard-000001.claim"]  # ours handed back
    assert not list(layout.claims_dir.glob(".*"))


def test_teacher_weights_that_fail_to_load_leave_no_run(tmp_path) -> None:
    listing = video_list(tmp_path, [str(shared_path("videos") / "moviepy_chaplin.mp4")])
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint" * 100)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(out),
           "--workers", "1", "--teacher", f"imagenet=efficientnet_lite0:{broken}"]  # fmt: skip
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "not a loadable PyTorch state dict" in failed.stderr
    assert "Traceback" not in failed.stderr and not (out / "run.json").exists()
    fixed = ingest("--videos", str(listing), "--out", str(out), "--workers", "1")  # no --resume needed
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert len(ledgers(out)[0]) == 1


def in_tmpfs(tmp_path: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) with a fresh tmpfs mounted at ``$T`` in a private mount namespace (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    full = f'mount -t tmpfs -o {options} tmpfs "$T" && {script}'
    env = {**os.environ, "T": str(mount)}
    return subprocess.run(["unshare", "-m", "sh", "-c", full], capture_output=True, text=True, env=env, timeout=600)


def ingest_sh(listing: Path, out: str, *extra: str) -> str:
    args = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", out, *extra,
            *teacher_args()]  # fmt: skip
    return " ".join(f"'{a}'" if not a.startswith("$") else f'"{a}"' for a in args)


def test_full_disk_is_one_clear_message(tmp_path) -> None:
    """A 4 MB --out fills up after a shard or two: exit 1, one message naming the folder, finished shards intact."""
    listing = video_list(tmp_path, all_videos())
    run = ingest_sh(listing, "$T/out", "--keep-silent", "--workers", "1", "--samples-per-shard", "2")
    check = f'{sys.executable} -m soundnet shards info "$T/out" >/dev/null 2>&1; ls -a "$T/out" "$T/out/parts"'
    result = in_tmpfs(tmp_path, "size=4m", f"{run}; echo rc=$?; {check}")
    assert "rc=1" in result.stdout, result.stderr[-3000:]
    assert "no space left on device while writing to --out" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    files = result.stdout.split()
    assert not [f for f in files if f.endswith(".tmp")]  # no partial file left
    done = [f for f in files if f.endswith(".index.parquet")]
    assert done and all(f.replace(".index.parquet", ".tar") in files for f in done)


def test_read_only_out_is_a_clear_error(tmp_path) -> None:
    listing = video_list(tmp_path, [str(shared_path("videos") / "moviepy_chaplin.mp4")])
    result = in_tmpfs(tmp_path, "ro", ingest_sh(listing, "$T/out", "--workers", "1"))
    assert result.returncode == 1
    assert "is not writable (Read-only file system)" in result.stderr and "Traceback" not in result.stderr


def test_sweep_spares_tasks_that_live_runs_hold(tmp_path) -> None:
    layout = RunLayout(tmp_path)
    claim_file(layout, 1, {"host": "elsewhere", "pid": 1, "run": "live"}, age_s=0)
    claim_file(layout, 2, {"host": "elsewhere", "pid": 1, "run": "gone"}, age_s=600)
    leftovers = {}
    for task in (1, 2):
        leftovers[task] = [tmp_path / f".shard-{task:06d}.tar.abc.tmp", layout.shard_path(task)]
        for path in leftovers[task]:
            path.write_bytes(b"partial")
    young = tmp_path / ".index.parquet.abc.tmp"  # a ledger another run is merging right now
    young.write_bytes(b"partial")
    with Claims(layout, timeout_s=60) as claims:
        assert claims.live_others() == {1}
        removed = layout.sweep_temporaries(busy=claims.live_others(), min_age_s=claims.timeout_s)
    assert sorted(removed) == sorted(leftovers[2])
    assert all(p.exists() for p in [*leftovers[1], young])


def test_an_impossible_clip_layout_is_a_usage_error(tmp_path) -> None:
    from soundnet.ingest.cli import main

    result = CliRunner().invoke(
        main, ["run", "--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--frame-interval", "0"]
    )
    assert result.exit_code == 2 and "clip layout needs a positive" in result.output
    assert not (tmp_path / "o").exists()


class Recorder:
    """The calls a run makes on its progress, and for each input's call whether its task was complete yet."""

    def __init__(self, out: Path) -> None:
        self.layout = RunLayout(out)
        self.calls: list[tuple[str, tuple]] = []
        self.complete_at_input: list[bool] = []

    def on_input(self, task: int, ok: bool) -> None:
        self.calls.append(("input", (task, ok)))
        self.complete_at_input.append(self.layout.is_complete(task))

    def on_task(self, stats: TaskStats) -> None:
        self.calls.append(("task", (stats,)))

    def on_dropped(self, task: int) -> None:
        self.calls.append(("dropped", (task,)))


def replay(calls: list[tuple[str, tuple]], bar: ProgressBar) -> None:
    for name, args in calls:
        getattr(bar, f"on_{name}")(*args)


@pytest.mark.slow
def test_progress_is_reported_per_input_while_the_shard_is_written(tmp_path) -> None:
    """The 16 real videos in one shard task: 16 input calls, each before the task is complete, then its stats;
    the bar shows them as they come and ends with the counts of the shard stats and summary.json."""
    out = tmp_path / "out"
    recorder = Recorder(out)
    config = IngestConfig(keep_silent=True, samples_per_shard=16)
    summary = run_ingest(video_list(tmp_path, all_videos()), out, teacher_args()[1::2], config, workers=2,
                         batch_frames=16, progress=recorder)  # fmt: skip
    *inputs, (last, (stats,)) = recorder.calls
    assert last == "task"
    assert [(name, task) for name, (task, _) in inputs] == [("input", 0)] * 16
    assert recorder.complete_at_input == [False] * 16  # reported while the shard was being written
    recorded = TaskStats.read(RunLayout(out), 0)
    assert (stats.task, stats.samples, stats.failures, stats.bytes, stats.audio_seconds) == (
        recorded.task, recorded.samples, recorded.failures, recorded.bytes, recorded.audio_seconds)  # fmt: skip
    oks = [ok for _, (_, ok) in inputs]
    assert (oks.count(True), oks.count(False)) == (stats.samples, stats.inputs - stats.samples) == (13, 3)
    totals = json.loads((out / "summary.json").read_text())
    assert (totals["samples"], totals["failures"]) == (summary.samples, summary.failures) == (13, 3)

    shown = io.StringIO()
    with ProgressBar(16, file=shown, mininterval=0) as bar:
        replay(inputs[:5], bar)
        assert bar.bar.n == 5 and bar.samples + bar.failures == 5 and "5/16" in shown.getvalue()
        replay([("dropped", (0,))], bar)  # a task given up takes back what its inputs reported
        assert (bar.bar.n, bar.samples, bar.failures) == (0, 0, 0)
        replay(recorder.calls, bar)
        assert (bar.bar.n, bar.samples, bar.failures) == (16, 13, 3)
    assert "16/16" in shown.getvalue() and "samples=13, failed=3" in shown.getvalue()
