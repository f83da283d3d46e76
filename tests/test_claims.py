"""Runs that stall, lose their claims, or lose a decoding worker: nothing lost, nothing counted twice, no traceback.

The stall harness runs a real ``ingest run`` (A) that stops itself (SIGSTOP, as a suspended job or a paused VM
would be) right after its ownership check before one step of the commit of task 2 (the ``SOUNDNET_INGEST_STOP_AT``
hook of :mod:`soundnet.ingest.task`), with a claim timeout of 2 s. Another run (B) joins with ``--resume``, takes
the stale claim over, and is killed or finishes; then A is continued, and one more ``--resume`` checks the result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from soundnet.ingest.claims import Claim, ClaimLost, Claims
from soundnet.ingest.config import IngestConfig, ShardTask
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.local import DecodePool
from soundnet.ingest.task import STOP_AT_ENV, TaskWriter
from soundnet.shards.ledger import RunLayout, write_table
from soundnet.shards.writer import ShardWriter
from tests.conftest import shared_path
from tests.decode_faults import decode_or_fail
from tests.test_engines import alive, children, claim_file
from tests.test_ingest import assert_exactly_once, teacher_args, video_list

FAST = ("imageio_realshort.mp4", "moviepy_transparent.webm", "fluentffmpeg_testvideo-43_noaudio.avi")
"""Three real inputs that decode in well under a second (one without audio): one per task, tasks 0, 1, 2."""


def fast_sources() -> list[str]:
    return [str(shared_path("videos") / name) for name in FAST]


# --- claims ------------------------------------------------------------------------------------------------


def test_unreadable_claims_are_named_and_taken_over(tmp_path, caplog) -> None:
    layout = RunLayout(tmp_path)
    with Claims(layout, timeout_s=60) as claims:
        for task, content in enumerate([b"\xe8\xff garbage", b"[1, 2]", b'{"host": "x", "pi']):
            layout.claim_path(task).write_bytes(content)
            taken = claims.claim(task)
            assert taken is not None and taken.held(), content
            assert f"{layout.claim_path(task)} is not a claim written by `ingest run`" in caplog.text


def test_a_heartbeat_from_the_future_is_reported_once_and_counts_as_stale(tmp_path, caplog) -> None:
    layout = RunLayout(tmp_path)
    elsewhere = {"host": "elsewhere", "pid": 1, "run": "skewed"}
    claim_file(layout, 0, elsewhere, age_s=-30)  # less than one timeout ahead: a small skew, still live
    claim_file(layout, 1, elsewhere, age_s=-3600)  # an hour ahead
    with Claims(layout, timeout_s=60) as claims:
        assert claims.live_others() == {0}
        assert claims.live_others() == {0}
        assert claims.claim(0) is None
        assert claims.claim(1) is not None
    assert caplog.text.count("heartbeat is 3600 s in the future") == 1


def test_files_that_are_not_claims_are_ignored_with_a_warning(tmp_path, caplog) -> None:
    layout = RunLayout(tmp_path)
    claim_file(layout, 1, {"host": "elsewhere", "pid": 1, "run": "live"}, age_s=0)
    for name in ("shard-000001 (1).claim", "shard-000001.sync-conflict-20240101.claim", "notes.txt"):
        (layout.claims_dir / name).write_text("copy")
    with Claims(layout, timeout_s=60) as claims:
        assert claims.live_others() == {1}
        assert claims.live_others() == {1}
    for name in ("shard-000001 (1).claim", "notes.txt"):
        assert caplog.text.count(f"ignoring {layout.claims_dir / name}: not a claim file name") == 1


def test_a_taken_over_claim_is_not_held_whatever_the_inode(tmp_path) -> None:
    """Ownership is the attempt id in the file: a new claim file that reuses the old inode number is not ours."""
    layout = RunLayout(tmp_path)
    with Claims(layout, timeout_s=1) as first, Claims(layout, timeout_s=1) as second:
        mine = first.claim(0)
        path = layout.claim_path(0)
        path.write_text(json.dumps({**second.owner, "attempt": "another"}))  # same inode, new owner
        assert not mine.held()


def test_a_stuck_run_stops_renewing_its_claims(tmp_path) -> None:
    layout = RunLayout(tmp_path)
    with Claims(layout, timeout_s=2, stall_s=2) as stuck, Claims(layout, timeout_s=2) as other:
        claim = stuck.claim(0)
        start_time = time.monotonic()
        while 0 in other.live_others():  # renewed while progress is recent, then no more
            assert time.monotonic() < start_time + 20, "the stuck run kept its claim"
            time.sleep(0.1)
        assert time.monotonic() - start_time > 3  # no progress for 2 s, then stale 2 s after the last heartbeat
        taken = other.claim(0)
        assert taken is not None and not claim.held()
        stuck.progress()  # it recovers: it beats again, but only for what it still holds
        time.sleep(1)
        assert taken.held()


# --- completeness ------------------------------------------------------------------------------------------


def test_a_task_is_complete_only_when_shard_stats_and_parts_agree(tmp_path) -> None:
    from soundnet.ingest.stats import TaskStats
    from tests.test_shards import failure_row, make_sample

    layout = RunLayout(tmp_path)
    with ShardWriter(layout.shard_path(0)) as writer:
        writer.write(make_sample("/videos/a.mp4"))
    size = layout.shard_path(0).stat().st_size
    TaskStats(0, "shard-000000.tar", 2, samples=1, bytes=size, attempt="a1").write(layout)
    layout.write_parts(0, writer.index_rows, [failure_row("/videos/b.mp4")], attempt="a1")
    assert layout.is_complete(0) and layout.completed_tasks() == [0]

    layout.write_part(0, "failures", [failure_row("/videos/b.mp4")], attempt="late")  # a late part of another attempt
    assert not layout.is_complete(0)
    layout.write_part(0, "failures", [failure_row("/videos/b.mp4")], attempt="a1")
    TaskStats(0, "shard-000000.tar", 2, samples=1, bytes=size, attempt="late").write(layout)  # late stats
    assert not layout.is_complete(0)
    TaskStats(0, "shard-000000.tar", 2, samples=1, bytes=size + 512, attempt="a1").write(layout)  # another shard
    assert not layout.is_complete(0)
    TaskStats(0, "shard-000000.tar", 2, samples=1, bytes=size, attempt="a1").write(layout)
    assert layout.is_complete(0)
    layout.shard_path(0).unlink()  # removed by another run: redone, never merged
    assert not layout.is_complete(0) and layout.completed_tasks() == []

    # parts without an attempt (earlier runs): complete when the shard their samples are in is there
    write_table(layout.part_paths(1)[0], [{**writer.index_rows[0], "shard": "shard-000001.tar"}], "index")
    write_table(layout.part_paths(1)[1], [], "failures")
    assert not layout.is_complete(1)
    layout.shard_path(1).write_bytes(layout.stats_path(0).read_bytes())
    assert layout.is_complete(1)


def test_discarding_a_task_removes_its_stats_first_and_stops_when_the_claim_is_lost(tmp_path) -> None:
    layout = RunLayout(tmp_path)
    layout.parts_dir.mkdir()
    files = layout.task_files(3)
    for path in (*files, tmp_path / ".shard-000003.tar.x.tmp", tmp_path / ".shard-000033.tar.x.tmp"):
        path.write_bytes(b"left")
    answers = iter([True, False])
    assert layout.discard_task(3, still_ours=lambda: next(answers)) == [layout.stats_path(3)]
    assert layout.discard_task(3) == [*files[1:], tmp_path / ".shard-000003.tar.x.tmp"]
    assert (tmp_path / ".shard-000033.tar.x.tmp").exists()


def test_a_claim_a_killed_run_was_making_is_swept_once_older_than_the_timeout(tmp_path) -> None:
    layout = RunLayout(tmp_path)
    layout.claims_dir.mkdir()
    old, young = layout.claims_dir / ".shard-000002.claim.ab.tmp", layout.claims_dir / ".shard-000003.claim.cd.tmp"
    for path in (old, young):
        path.write_text("{}")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert layout.sweep_temporaries(min_age_s=60) == [old] and young.exists()


# --- the stall harness -------------------------------------------------------------------------------------


def ingest_args(listing: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--videos", str(listing), "--out", str(out), "--keep-silent", "--workers", "1",
            "--samples-per-shard", "1", *extra, *teacher_args()]  # fmt: skip


@pytest.fixture
def jobs() -> Iterator[list[subprocess.Popen]]:
    """The `ingest` processes a test starts: killed at its end whatever happened (a stopped one included)."""
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()


def start(jobs: list[subprocess.Popen], args: list[str], **env: str) -> subprocess.Popen:
    """`ingest` in a process of its own (that a test can stop, continue or kill)."""
    cmd = [sys.executable, "-m", "soundnet.ingest", *args]
    jobs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True, env={**os.environ, **env}))  # fmt: skip
    return jobs[-1]


def ingest_here(args: list[str]) -> Result:
    """`ingest` in this process: the teachers stay loaded from one call to the next."""
    from soundnet.ingest.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def wait_for(condition, what: str, job: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if job is not None and job.poll() is not None:
            pytest.fail(f"the run ended before {what}: {job.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def finish(job: subprocess.Popen) -> tuple[int, str, str]:
    out, err = job.communicate(timeout=600)
    assert "Traceback" not in err, err[-3000:]
    return job.returncode, out, err


def check_result(out: Path, listing: Path, sources: list[str]) -> None:
    """One more --resume: nothing left to do, every input exactly once, `shards verify` passes."""
    result = ingest_here([*ingest_args(listing, out), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"nothing left to do: the run in {out} is complete (3 inputs: 2 samples, 1 failures" in result.output
    assert "videos/s" not in result.output
    assert_exactly_once(out, sources)
    from soundnet.shards.cli import main as shards_main

    verified = CliRunner().invoke(shards_main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output


def stopped_in_commit(
    jobs: list[subprocess.Popen], tmp_path: Path, step: str
) -> tuple[subprocess.Popen, Path, Path, list[str]]:
    """Run A, stopped inside its commit of task 2 before ``step``, its claims stale (older than the 2 s timeout)."""
    sources = fast_sources()
    listing, out = video_list(tmp_path, sources), tmp_path / "out"
    a = start(jobs, ingest_args(listing, out, "--claim-timeout", "2"), **{STOP_AT_ENV: f"2:{step}"})
    wait_for(lambda: state(a.pid) == "T", f"A stops before the {step} step of task 2", a)
    claim = RunLayout(out).claim_path(2)
    wait_for(lambda: time.time() - claim.stat().st_mtime > 3, "A's claim on task 2 is stale", timeout_s=10)
    return a, out, listing, sources


@pytest.mark.slow
def test_a_run_stopped_in_its_commit_while_another_takes_over_and_is_killed(tmp_path, jobs) -> None:
    """The issue's stall: A stopped after its stats, before its ledger parts; B takes task 2 over, removes A's
    shard and is killed; A continues: it is told, keeps nothing of task 2, and does it again."""
    a, out, listing, sources = stopped_in_commit(jobs, tmp_path, "failures")
    layout = RunLayout(out)
    assert layout.shard_path(2).exists() and layout.stats_path(2).exists()
    b = start(jobs, [*ingest_args(listing, out), "--resume"])  # the default --claim-timeout: it takes the run's 2 s
    wait_for(lambda: not layout.stats_path(2).exists(), "B removes what A wrote of task 2", b)
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    os.kill(a.pid, signal.SIGCONT)
    code, stdout, err = finish(a)
    assert code == 0, err[-3000:]
    assert err.count("task 2 was taken over by another run; nothing of it was kept") == 1
    assert "3 inputs: 2 samples, 1 failures (no_audio 1)" in stdout
    check_result(out, listing, sources)


@pytest.mark.slow
def test_a_run_stopped_in_its_commit_while_another_finishes_the_run(tmp_path, caplog, jobs) -> None:
    """B, with another --claim-timeout, takes the run's, takes task 2 over and merges the run; A continues: its
    late index part (over B's) is not counted, it says so and does task 2 again."""
    a, out, listing, sources = stopped_in_commit(jobs, tmp_path, "index")
    b = ingest_here([*ingest_args(listing, out), "--resume", "--claim-timeout", "30"])
    assert b.exit_code == 0, b.output
    assert "--claim-timeout 30: using the run's 2 s from run.json" in caplog.text
    assert "1 shard tasks run, 2 already done" in b.output
    os.kill(a.pid, signal.SIGCONT)
    code, stdout, err = finish(a)
    assert code == 0, err[-3000:]
    assert err.count("task 2 was taken over by another run; nothing of it was kept") == 1
    assert "3 shard tasks run, 0 already done" in stdout  # 0, 1, and 2 again
    check_result(out, listing, sources)


@dataclass(frozen=True)
class LateClaim(Claim):
    """A claim whose holder passes its checks ``passes`` times, then finds it taken over: a run that was stopped
    right after a check while another run took the task over and finished it."""

    passes: list[bool] = field(default_factory=list)

    def held(self) -> bool:
        return bool(self.passes and self.passes.pop())


def test_a_late_shard_never_replaces_the_shard_of_the_run_that_took_the_task_over(tmp_path) -> None:
    from tests.test_shards import make_sample

    layout = RunLayout(tmp_path)
    task = ShardTask(0, (VideoInput("/videos/a.mp4", "a"),))
    with TaskWriter(layout, task) as b:  # the run that took the task over, and finished it
        b.add([make_sample("/videos/a.mp4", seed=1)])
    finished = layout.shard_path(0).read_bytes()
    assert layout.is_complete(0)
    late = TaskWriter(layout, task, LateClaim(0, layout.claim_path(0), "a-late", passes=[True]))
    with pytest.raises(ClaimLost, match="task 0 was taken over by another run; nothing of it was kept"), late:
        late.add([make_sample("/videos/a.mp4", seed=2)])
    assert layout.shard_path(0).read_bytes() == finished and layout.is_complete(0)
    assert not list(tmp_path.glob(".*.tmp"))


# --- dead decoding workers ---------------------------------------------------------------------------------


def test_a_dead_or_hung_worker_costs_only_its_input(tmp_path) -> None:
    video = str(shared_path("videos") / FAST[0])
    keys = ["ok1", "dies", "ok2", "hangs", f"once:{tmp_path / 'marker'}", "ok3"]
    pool = DecodePool(2, IngestConfig(), timeout_s=5)
    pool.fn = decode_or_fail
    start_time = time.monotonic()
    try:
        results = list(pool.map(iter([VideoInput(video, key) for key in keys]), window=4))
    finally:
        pool.close()
    assert [r.item.key for r in results] == keys  # in order
    reasons = [r.failure["reason"] if r.failure else "sample" for r in results]
    assert reasons == ["sample", "worker_crashed", "sample", "worker_crashed", "sample", "sample"]
    assert "died on this input twice" in results[1].failure["message"]
    assert "no result within 5 s, twice" in results[3].failure["message"]
    assert time.monotonic() - start_time < 60
    workers = [p for p in children(os.getpid()) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert not [p for p in workers if alive(p)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "when"),
    [
        (("--samples-per-shard", "8", "--batch-frames", "1"), ".shard-000000.tar.*.tmp"),
        (("--samples-per-shard", "2"), ".shard-000000.tar.*.tmp"),
        (("--samples-per-shard", "2"), "shard-000001.tar"),
    ],
)
def test_a_decoding_worker_killed_mid_shard(tmp_path, options, when) -> None:
    """One of two decoding workers SIGKILLed once the first shard is being written (or once the second is in
    place): the run finishes with every input exactly once; the killed worker's input was retried and is a sample.
    Nine inputs (copies of three small videos), more than the decoding window holds, so inputs are still being
    handed out when the worker dies. The moment is an event of the run, not a time, so a fast machine cannot
    finish the run before it."""
    sources = []
    for i in range(3):
        for source in fast_sources():
            copy = tmp_path / f"{i}-{Path(source).name}"
            shutil.copyfile(source, copy)
            sources.append(str(copy))
    listing, out = video_list(tmp_path, sources), tmp_path / "out"
    killed: list[int] = []

    def workers() -> list[int]:
        return sorted(p for p in children(os.getpid()) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())

    def kill_one() -> None:
        wait_for(lambda: len(workers()) == 2 and list(out.glob(when)), f"{when} is there")
        killed.extend(workers()[:1])
        os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_one)
    killer.start()
    result = ingest_here(["run", "--videos", str(listing), "--out", str(out), "--keep-silent", "--workers", "2",
                          *options, *teacher_args()])  # fmt: skip
    killer.join()
    assert killed and result.exit_code == 0, result.output
    assert_exactly_once(out, sources)
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert [r["reason"] for r in failures] == ["no_audio"] * 3  # the killed worker's input was retried: a sample


# --- messages ----------------------------------------------------------------------------------------------


def test_without_internet_the_default_teacher_is_one_clear_line(tmp_path) -> None:
    """No --teacher: the default downloads its weights; offline (here: a proxy on a closed loopback port) the run
    says so in one line, with how to pass local weights, and leaves no run behind."""
    listing, out = video_list(tmp_path, fast_sources()[:1]), tmp_path / "out"
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(listing), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **offline})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "weights of teacher imagenet=resnet50:IMAGENET1K_V2 could not be downloaded" in error
    assert "pass local weights with --teacher NAME=ARCH:FILE" in error
    assert not (out / "run.json").exists()


def test_resume_names_the_options_that_differ_and_a_complete_run_has_nothing_to_do(tmp_path) -> None:
    from soundnet.ingest.cli import main

    listing, out = video_list(tmp_path, fast_sources()[:1]), tmp_path / "out"
    args = ["run", "--videos", str(listing), "--out", str(out), "--workers", "1", *teacher_args()]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    other = CliRunner().invoke(main, [*args, "--resume", "--samples-per-shard", "8", "--frame-seek", "keyframe"])
    assert other.exit_code == 1
    assert "options that differ from the run in" in other.output
    assert (
        "--samples-per-shard 8 (run has 500)" in other.output
        and "--frame-seek keyframe (run has accurate)" in other.output
    )
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert f"nothing left to do: the run in {out} is complete (1 inputs: 1 samples, 0 failures (none))" in again.output
    assert "videos/s" not in again.output
