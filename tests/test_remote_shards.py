"""Shards where users keep them: a run folder served by a loopback HTTP server that answers byte ranges, and the
same folder uploaded to a real S3-protocol server on loopback (moto), with endpoint and keys only in the standard
AWS variables. Training from either equals training from the local folder, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from soundnet.shards import remote
from soundnet.shards.cli import main as shards_cli
from soundnet.shards.reader import expand_shards
from soundnet.student.data import Clips, make_loader, scan_shards
from tests.loopback_servers import s3_filesystem, s3_server, video_server
from tests.test_shard_reading import real_clips, train_cli  # noqa: F401 (a fixture)
from tests.test_shards import make_real_run
from tests.test_student_data import PAPER

pytest.importorskip("s3fs", reason="the S3 tests need the s3 extra (pip install -e '.[dev]')")

STEPS = ("--steps", "3", "--batch-size", "2", "--arch", "soundnet5", "--log-every", "1", "--seed", "5")
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, real_clips) -> Path:  # noqa: F811
    """A finished run of real audio (2 shards, 4 samples) with its index, as `ingest run` leaves it."""
    layout, _ = make_real_run(tmp_path_factory.mktemp("remote") / "run", real_clips)
    return layout.out_dir


@pytest.fixture(scope="module")
def http_run(run_dir: Path):
    """(URL of the run folder on a range-answering loopback HTTP server, the server's handler class)."""
    with video_server(run_dir.parent) as (base, handler):
        yield f"{base}/{run_dir.name}", handler


def range_reads(handler) -> int:
    """How many byte ranges of shards the server has sent so far."""
    return sum(1 for path, _, status in handler.requests if path.endswith(".tar") and status == 206)


@pytest.fixture(scope="module")
def s3_run(run_dir: Path, tmp_path_factory):
    """(s3:// URL of the run folder uploaded to a loopback S3 server, the AWS variables that reach it)."""
    with s3_server(tmp_path_factory.mktemp("aws")) as env:
        fs = s3_filesystem(env)
        fs.mkdir("shards")
        fs.put(f"{run_dir}/", "shards/run/", recursive=True)  # as a user publishes a finished run
        yield "s3://shards/run", {**env, **LOOPBACK}


@pytest.fixture
def s3_env(s3_run, monkeypatch) -> str:
    """This process pointed at the loopback S3 server through the standard variables; yields the run's URL."""
    url, env = s3_run
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    type(remote.filesystem(url)[0]).clear_instance_cache()  # a client of another test's server must not be reused
    yield url
    type(remote.filesystem(url)[0]).clear_instance_cache()


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_three_steps_from_http_and_from_s3_equal_the_local_run_bit_for_bit(
    run_dir: Path, http_run, s3_run, tmp_path: Path
) -> None:
    local = train_cli(run_dir, tmp_path / "local", *STEPS, "--workers", "0")
    assert local.returncode == 0, local.stderr[-3000:]
    over_http = train_cli(http_run[0], tmp_path / "http", *STEPS, "--workers", "2", env={**os.environ, **LOOPBACK})
    assert over_http.returncode == 0, over_http.stderr[-3000:]
    url, env = s3_run
    over_s3 = train_cli(url, tmp_path / "s3", *STEPS, "--workers", "2", env={**os.environ, **env})
    assert over_s3.returncode == 0, over_s3.stderr[-3000:]
    want = summary(tmp_path / "local")
    assert want["clips"] == 4 and want["skipped"] == 0 and want["steps"] == 3
    for out in ("http", "s3"):
        got = summary(tmp_path / out)
        assert (got["weights_sha256"], got["clips"], got["skipped"]) == (want["weights_sha256"], 4, 0), out
    assert env["AWS_SECRET_ACCESS_KEY"] not in over_s3.stderr + over_s3.stdout  # credentials never logged


def test_loader_workers_read_a_url_as_the_local_folder_in_both_orders_with_fewer_requests_by_shard(
    run_dir: Path, http_run
) -> None:
    url, handler = http_run
    local = Clips(scan_shards(expand_shards(run_dir)), PAPER)
    remote_clips = Clips(scan_shards(expand_shards(url)), PAPER)
    assert remote_clips.shards.urls == [f"{url}/shard-000000.tar", f"{url}/shard-000001.tar"]
    assert [[s.start, s.end] for s in remote_clips.shards.spans[1]] == [[s.start, s.end] for s in local.shards.spans[1]]

    def batches(clips: Clips, order: str) -> tuple[list[list[str]], list[np.ndarray]]:
        loader = make_loader(clips, 2, seed=1, start=0, steps=4, workers=2, read_order=order, open_shards=1)
        read = list(loader)
        return [list(b["key"]) for b in read], [b["audio"].numpy() for b in read]

    gets = {}
    for order in ("sample", "shard"):
        before = range_reads(handler)
        keys, audio = batches(remote_clips, order)
        gets[order] = range_reads(handler) - before
        want_keys, want_audio = batches(local, order)
        assert keys == want_keys and all(np.array_equal(a, b) for a, b in zip(audio, want_audio, strict=True))
    # 2 passes over 4 clips: by shard one request per run of 2 clips; by sample at most one per clip (fewer where
    # a batch happens to hold two clips that lie back to back)
    assert gets["shard"] == 4 and gets["shard"] < gets["sample"] <= 8


def test_shards_verify_and_info_accept_http_and_s3_urls(run_dir: Path, http_run, s3_env: str) -> None:
    for url in (http_run[0], s3_env):
        result = CliRunner().invoke(shards_cli, ["verify", url])
        assert result.exit_code == 0, result.output
        assert f"OK: 2 shards, 4 samples in {url} verified, sha256 of 4 samples' members matched" in result.stdout
    assert "cannot be listed (plain HTTP)" in CliRunner().invoke(shards_cli, ["verify", http_run[0]]).stderr
    info = CliRunner().invoke(shards_cli, ["info", s3_env])
    assert info.exit_code == 0, info.output
    assert any(line.split()[:3] == ["samples", "4", "from"] for line in info.output.splitlines())
    missing = CliRunner().invoke(shards_cli, ["verify", http_run[0] + "-typo"])
    assert missing.exit_code == 1 and "holds no run" in missing.stderr


def test_transient_failures_are_retried_and_a_server_without_ranges_is_named(
    run_dir: Path, http_run, tmp_path: Path, monkeypatch
) -> None:
    url, handler = http_run
    shard = f"{url}/shard-000000.tar"
    path = f"/{run_dir.name}/shard-000000.tar"
    want = (run_dir / "shard-000000.tar").read_bytes()[1000:3000]
    monkeypatch.setattr(remote, "POLICY", dataclasses.replace(remote.POLICY, backoff_s=0.01))
    handler.script[path] = [(503, {})] * 3  # a busy server: 503 three times, then the bytes
    assert remote.read_range(shard, 1000, 3000) == want
    handler.script[path] = [(503, {})] * (remote.POLICY.retries + 1)
    with pytest.raises(OSError, match=f"{shard}: bytes 1000-3000 failed after {remote.POLICY.retries + 1} tries"):
        remote.read_range(shard, 1000, 3000)

    no_ranges = pytest.raises(OSError, match="ignores byte ranges. Serve the shards from a server that answers Range")
    with video_server(run_dir, ranges=False) as (whole_files, _), no_ranges:
        remote.read_range(f"{whole_files}/shard-000000.tar", 1000, 3000)


def test_a_missing_shard_url_and_an_unlistable_folder_are_one_line(http_run, tmp_path: Path) -> None:
    url, _ = http_run
    gone = train_cli(f"{url}/shard-{{000000..000002}}.tar", tmp_path / "gone", *STEPS, "--workers", "0")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert f"{url}/shard-000002.tar" in gone.stderr and "not found" in gone.stderr
    with pytest.raises(FileNotFoundError, match="plain HTTP cannot list"):
        expand_shards(url.rsplit("/", 1)[0])
