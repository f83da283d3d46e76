"""Inputs where users keep them: http(s) servers that answer byte ranges and servers that never do (a plain
``http.server``), and S3 (moto's server mode on loopback): video lists and videos on all of them, through the real
``ingest run`` command. The two videos are MP4s with their index at the end, so FFmpeg must seek to read them."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soundnet.ingest.decode import decode_clip
from soundnet.ingest.inputs import InputListError, read_video_list
from soundnet.media import DecodeError, UrlPolicy, open_media
from soundnet.shards.reader import iter_samples
from tests.conftest import shared_path
from tests.loopback_servers import s3_env, s3_filesystem, s3_server, statuses, video_server
from tests.test_ingest import ledgers, teacher_args

DOCS_SCALE = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
VIDEOS = ("moviepy_chaplin.mp4", "imageio_realshort.mp4")
BUCKET = "soundnet-inputs"
FLAKY = [(503, {"Retry-After": "0"})] * 2  # every video's first two requests


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """A loopback S3 server holding the two videos under ``videos/``; the environment that reaches it."""
    with s3_server(tmp_path_factory.mktemp("aws")) as env:
        fs = s3_filesystem(env)
        fs.mkdir(BUCKET)
        for name in VIDEOS:
            fs.put(str(shared_path("videos", name)), f"{BUCKET}/videos/{name}")
        fs.pipe(f"{BUCKET}/lists/notes.md", b"not a video")
        yield env


@pytest.fixture
def s3_here(s3, monkeypatch) -> dict[str, str]:
    """The S3 server's environment in this process (and no cached S3 client from another environment)."""
    import s3fs

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3


@pytest.fixture(scope="module")
def remote_run(s3, tmp_path_factory) -> dict:
    """One `ingest run --videos s3://.../list.parquet` over both videos from a server with byte ranges, from one
    without (each answering every video's first two requests with 503), and from S3, plus a missing one on each."""
    tmp = tmp_path_factory.mktemp("remote")
    videos = shared_path("videos")
    with video_server(videos) as (ranged, ranged_log), video_server(videos, ranges=False) as (whole, whole_log):
        for handler in (ranged_log, whole_log):
            handler.script.update({f"/{name}": list(FLAKY) for name in VIDEOS})
        sources = {
            "ranges": [f"{ranged}/{name}" for name in (*VIDEOS, "missing.mp4")],
            "no_ranges": [f"{whole}/{name}" for name in (*VIDEOS, "missing.mp4")],
            "s3": [f"s3://{BUCKET}/videos/{name}" for name in (*VIDEOS, "missing.mp4")],
        }
        listing = pa.table({"path": [s for group in sources.values() for s in group]})
        with s3_filesystem(s3).open(f"{BUCKET}/lists/videos.parquet", "wb") as f:
            pq.write_table(listing, f)
        out = tmp / "out"
        cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", f"s3://{BUCKET}/lists/videos.parquet",
               "--out", str(out), "--workers", "2", *teacher_args()]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=s3_env(s3))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "sources": sources, "logs": {"ranges": ranged_log, "no_ranges": whole_log}}


@pytest.mark.parametrize("server", ["ranges", "no_ranges"])
def test_urls_with_and_without_byte_ranges(remote_run, server) -> None:
    """Both servers: the two videos are samples after two 503s each, the missing one a row with its 404. Without
    ranges each video was downloaded once (the answer to the probe), with ranges streamed."""
    index, failures = ledgers(remote_run["out"])
    sources = remote_run["sources"][server]
    assert [r["source"] for r in index if r["source"] in sources] == sources[:2]
    [missing] = [r for r in failures if r["source"] in sources]
    assert (missing["source"], missing["stage"], missing["reason"]) == (sources[2], "open", "http_error")
    assert missing["message"] == f"{sources[2]}: HTTP 404 File not found after 1 try"
    log = remote_run["logs"][server]
    for name in VIDEOS:
        if server == "ranges":
            assert statuses(log, f"/{name}")[:3] == [503, 503, 206]
        else:
            assert statuses(log, f"/{name}") == [503, 503, 200]


def test_s3_list_and_videos(remote_run) -> None:
    """The list was read from S3, the S3 videos are samples, a missing key is a 'not_found' row."""
    index, failures = ledgers(remote_run["out"])
    sources = remote_run["sources"]["s3"]
    assert [r["source"] for r in index if r["source"] in sources] == sources[:2]
    [missing] = [r for r in failures if r["source"] in sources]
    assert (missing["source"], missing["reason"]) == (sources[2], "not_found")
    assert sources[2] in missing["message"]
    assert len(index) == 6 and len(failures) == 3


def test_remote_samples_equal_local_decodes(remote_run) -> None:
    samples = list(iter_samples(sorted(str(p) for p in remote_run["out"].glob("shard-*.tar"))))
    local = {name: decode_clip(shared_path("videos", name)).audio.samples for name in VIDEOS}
    assert len(samples) == 6
    for sample in samples:
        np.testing.assert_array_equal(sample.audio, local[Path(sample.meta["source"]).name])


def open_files_under(folder: Path) -> list[str]:
    """The files this process holds open under ``folder``, as /proc names them (one without a name ends in
    ' (deleted)')."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [target for target in targets if target.startswith(f"{folder}/")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files of this process from /proc")
def test_download_is_bounded_and_leaves_no_file(monkeypatch, tmp_path) -> None:
    """From a server without ranges: decoded from a temporary file in $TMPDIR that has no name even while it is
    open (so nothing is left even when the process is killed; the ingest run of remote_run relies on this), closed
    with the container; a file over --max-download-mb is refused naming the cause, before it is read."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    video = shared_path("videos", VIDEOS[0])
    with video_server(video.parent, ranges=False) as (base, log):
        url = f"{base}/{video.name}"
        with open_media(url) as container:
            assert container.streams.audio and not list(tmp_path.iterdir())
            [download] = open_files_under(tmp_path)
            assert download.endswith(" (deleted)")
        assert open_files_under(tmp_path) == []
        clip = decode_clip(url)
        with pytest.raises(DecodeError) as err, open_media(url, UrlPolicy(max_download_mb=0.5)):
            pass
    np.testing.assert_array_equal(clip.audio.samples, decode_clip(video).audio.samples)
    assert err.value.reason == "too_large"
    assert err.value.message == (
        f"{url}: the server does not support range requests and the file is larger than --max-download-mb 0.5 "
        "after 1 try"
    )
    assert statuses(log, f"/{video.name}") == [200, 200, 200]


def test_download_cut_short_is_retried() -> None:
    """An answer that breaks off before its Content-Length is a transient failure: tried again."""
    video = shared_path("videos", VIDEOS[0])
    with video_server(video.parent, ranges=False, cut=1) as (base, log):
        clip = decode_clip(f"{base}/{video.name}", url=UrlPolicy(backoff_s=0.01))
    assert statuses(log, f"/{video.name}") == [200, 200]
    np.testing.assert_array_equal(clip.audio.samples, decode_clip(video).audio.samples)


def test_a_download_this_machine_cannot_keep_is_an_io_error_not_retried(monkeypatch, tmp_path) -> None:
    """A temporary folder that is missing (or full) is this machine's failure: named as such, and not fetched again
    (each try would download the file anew)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    video = shared_path("videos", VIDEOS[0])
    with (
        video_server(video.parent, ranges=False) as (base, log),
        pytest.raises(DecodeError) as err,
        open_media(f"{base}/{video.name}", UrlPolicy(backoff_s=0.01)),
    ):
        pass
    assert err.value.reason == "io_error"
    assert f"cannot keep the download in {tmp_path / 'missing'}" in err.value.message and "TMPDIR" in err.value.message
    assert statuses(log, f"/{video.name}") == [200]


def test_s3_folder_and_list_errors(s3_here) -> None:
    """A prefix lists the videos under it; a missing list and a protocol that cannot be read are named."""
    found = read_video_list(f"s3://{BUCKET}/videos/")
    assert [i.source for i in found] == sorted(f"s3://{BUCKET}/videos/{name}" for name in VIDEOS)
    with pytest.raises(InputListError, match=f"--videos s3://{BUCKET}/lists/nope.txt: no such file or folder"):
        read_video_list(f"s3://{BUCKET}/lists/nope.txt")
    with pytest.raises(InputListError, match="--videos nope://x/list.txt: nope:// URLs cannot be read here"):
        read_video_list("nope://x/list.txt")


def test_listed_urls_of_an_unknown_protocol_are_refused(tmp_path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("nope://bucket/a.mp4\n")
    with pytest.raises(InputListError, match=r"lists nope:// videos, but nope:// URLs cannot be read here"):
        read_video_list(listing)


def test_s3_object_errors_are_rows(s3_here) -> None:
    with pytest.raises(DecodeError) as err, open_media(f"s3://{BUCKET}/videos/gone.mp4"):
        pass
    assert err.value.reason == "not_found"
    with pytest.raises(DecodeError) as err, open_media(f"s3://{BUCKET}/lists/notes.md"):
        pass
    assert err.value.reason == "not_media"
    assert s3_here["AWS_SECRET_ACCESS_KEY"] not in err.value.message  # credentials never appear in a message


def test_publishing_recipe_of_docs_scale(remote_run, s3_here) -> None:
    """docs/scale.md's fsspec block, as written there but for the run folder and bucket: a finished run's shards,
    stats, ledgers, run.json and summary.json are uploaded; claims/ and parts/ are not."""
    [block] = [b for b in re.findall(r"```python\n(.*?)```", DOCS_SCALE.read_text(), re.S) if "fs.put_file" in b]
    out = remote_run["out"]
    (out / "claims").mkdir(exist_ok=True)  # as a run that was joined leaves it
    exec(
        block.replace("s3://BUCKET/runs/shards", f"s3://{BUCKET}/published").replace('"runs/shards"', repr(str(out))),
        {},
    )
    fs = s3_filesystem(s3_here)
    uploaded = sorted(Path(key).name for key in fs.find(f"{BUCKET}/published"))
    expected = ["failures.parquet", "index.parquet", "run.json", "shard-000000.tar", "shard-000000_stats.json",
                "summary.json"]  # fmt: skip
    assert uploaded == expected
    assert fs.cat_file(f"{BUCKET}/published/index.parquet") == (out / "index.parquet").read_bytes()


def test_out_must_be_a_folder_not_a_url(tmp_path) -> None:
    from click.testing import CliRunner

    from soundnet.ingest.cli import main

    result = CliRunner().invoke(main, ["run", "--videos", str(tmp_path), "--out", "s3://bucket/run"])
    assert result.exit_code == 2
    assert "Invalid value for --out: must be a folder" in result.output and "docs/scale.md" in result.output
    assert not Path("s3:").exists()  # no folder named after the URL
