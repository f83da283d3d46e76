"""Inputs as users give them: flaky http(s) servers (a local http.server on 127.0.0.1 serving the real videos), one
video as --videos, list files that are not text, odd file names, and the same file under two spellings. Servers
without byte ranges and S3: tests/test_remote_inputs.py."""

from __future__ import annotations

import email.utils
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from soundnet import media
from soundnet.ingest import inputs
from soundnet.ingest.decode import decode_clip
from soundnet.ingest.inputs import InputListError, read_video_list
from soundnet.media import DecodeError, UrlPolicy, open_media
from soundnet.retry import retry_after_s
from soundnet.shards.schema import make_key
from tests.conftest import shared_path
from tests.loopback_servers import VideoHandler, statuses, video_server
from tests.test_ingest import ingest

FAST = UrlPolicy(retries=3, timeout_s=5.0, backoff_s=0.05)


@pytest.fixture
def server() -> Iterator[tuple[str, type[VideoHandler]]]:
    """(base URL, handler class) of a fresh loopback server over the real videos, answering byte ranges."""
    with video_server(shared_path("videos")) as served:
        yield served


def test_url_503_twice_then_200_decodes(server, monkeypatch) -> None:
    base, handler = server
    handler.script["/moviepy_chaplin.mp4"] = [(503, {}), (503, {})]
    monkeypatch.setattr(media, "URL_POLICY", FAST)  # what decode_clip's open uses
    clip = decode_clip(f"{base}/moviepy_chaplin.mp4")
    local = decode_clip(shared_path("videos", "moviepy_chaplin.mp4"))
    np.testing.assert_array_equal(clip.audio.samples, local.audio.samples)
    assert [status for _, _, status in handler.requests[:3]] == [503, 503, 206]


def test_url_404_is_final_with_its_status(server) -> None:
    base, handler = server
    with pytest.raises(DecodeError) as err, open_media(f"{base}/no_such_video.mp4", FAST):
        pass
    assert err.value.reason == "http_error"
    assert "HTTP 404" in err.value.message and "after 1 try" in err.value.message
    assert len(handler.requests) == 1  # a client error is not retried


def test_url_5xx_retries_are_bounded(server) -> None:
    base, handler = server
    handler.script["/moviepy_chaplin.mp4"] = [(500, {})] * 10
    with (
        pytest.raises(DecodeError) as err,
        open_media(f"{base}/moviepy_chaplin.mp4", UrlPolicy(retries=2, backoff_s=0.01)),
    ):
        pass
    assert err.value.reason == "http_error"
    assert err.value.message.endswith("HTTP 500 Internal Server Error after 3 tries")
    assert len(handler.requests) == 3


def test_url_429_retry_after_is_honoured_and_capped(server) -> None:
    base, handler = server
    handler.script["/moviepy_chaplin.mp4"] = [(429, {"Retry-After": "1"}), (429, {"Retry-After": "3600"})]
    policy = UrlPolicy(retries=3, backoff_s=0.01, max_wait_s=2.0)
    start = time.monotonic()
    with open_media(f"{base}/moviepy_chaplin.mp4", policy):
        pass
    times = [t for _, t, _ in handler.requests[:3]]
    assert times[1] - times[0] >= 0.95  # the server's 1 s, not the 0.01 s backoff
    assert 1.9 <= times[2] - times[1] < 3.0  # an hour asked, the 2 s cap waited
    assert time.monotonic() - start < 5.0


def test_retry_after_forms() -> None:
    assert retry_after_s("120") == 120.0
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= retry_after_s(in_30s) <= 30.0
    assert retry_after_s(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_url_that_never_answers_is_a_timeout() -> None:
    silent = socket.socket()  # listens, so connections are accepted by the kernel, but never answers them
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/video.mp4"
    try:
        start = time.monotonic()
        with pytest.raises(DecodeError) as err, open_media(url, UrlPolicy(retries=1, timeout_s=0.5, backoff_s=0.05)):
            pass
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    assert err.value.reason == "timeout"
    assert err.value.message == f"{url}: no answer within 0.5 s after 2 tries"
    assert 1.0 <= elapsed < 2.5  # two tries of 0.5 s and one short wait, not FFmpeg's "Immediate exit requested"


def test_refused_connection_is_retried_then_named(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        pytest.raises(DecodeError) as err,
        open_media(f"http://127.0.0.1:{port}/x.mp4", UrlPolicy(retries=2, backoff_s=0.01)),
    ):
        pass
    assert err.value.reason == "connection_failed"
    assert "Connection refused" in err.value.message and "after 3 tries" in err.value.message


def test_ingest_run_flaky_missing_and_respelled(server, tmp_path) -> None:
    """The command line: a URL answering 503 twice becomes a sample, a 404 a failure row with its status, and a file
    listed again under another spelling a 'duplicate' row recording that spelling."""
    base, handler = server
    handler.script["/moviepy_chaplin.mp4"] = [(503, {"Retry-After": "0"}), (503, {"Retry-After": "0"})]
    videos = shared_path("videos")
    direct = str(videos / "moviepy_fire2.mp4")
    dotted = f"{videos}/../{videos.name}/moviepy_fire2.mp4"
    sources = [f"{base}/moviepy_chaplin.mp4", f"{base}/gone.mp4", direct, dotted]
    (tmp_path / "list.txt").write_text("".join(f"{s}\n" for s in sources))
    out = tmp_path / "out"
    result = ingest("--videos", str(tmp_path / "list.txt"), "--out", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert pq.read_table(out / "index.parquet").column("source").to_pylist() == [sources[0], direct]
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert [(f["source"], f["reason"]) for f in failures] == [(sources[1], "http_error"), (dotted, "duplicate")]
    assert failures[0]["message"] == f"{sources[1]}: HTTP 404 File not found after 1 try"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".part"))]  # streamed, nothing partial


def test_a_list_at_a_url_is_fetched_with_retries_and_a_size_limit(tmp_path, monkeypatch) -> None:
    """A list file on a flaky server: tried again as URL inputs are; a 404 is named; a list over the limit is refused
    whether its size is announced or only counted as it comes."""
    sources = [f"https://videos.example/{i}.mp4" for i in range(3)]
    (tmp_path / "list.txt").write_text("".join(f"{s}\n" for s in sources))
    for announce in (True, False):
        with video_server(tmp_path, ranges=False, announce=announce) as (base, handler):
            handler.script["/list.txt"] = [(503, {"Retry-After": "0"})] * 2
            assert [i.source for i in read_video_list(f"{base}/list.txt")] == sources
            assert statuses(handler, "/list.txt") == [503, 503, 200]
            with pytest.raises(InputListError) as err:
                read_video_list(f"{base}/gone.txt")
            assert str(err.value) == f"--videos {base}/gone.txt: HTTP 404 File not found"
            monkeypatch.setattr(inputs, "MAX_LIST_MB", 50 / 2**20)  # 50 bytes: the list has 90
            with pytest.raises(InputListError) as err:
                read_video_list(f"{base}/list.txt")
            monkeypatch.undo()
        assert str(err.value) == (
            f"--videos {base}/list.txt: the list is over {50 / 2**20:g} MB, the most read from a URL: copy it here, "
            "or split it"
        )


def test_one_video_file_is_one_input() -> None:
    video = shared_path("videos", "decord_flipping_a_pancake.mkv")
    assert read_video_list(video) == read_video_list(video)
    [only] = read_video_list(video)
    assert only.source == str(video) and only.key == make_key(str(video))


def test_video_without_extension_and_binary_lists_are_named(tmp_path) -> None:
    video = tmp_path / "clip"
    video.write_bytes(shared_path("videos", "moviepy_chaplin.mp4").read_bytes())
    with pytest.raises(InputListError, match=rf"{video}: is a MP4/MOV file without a video extension"):
        read_video_list(video)
    blob = tmp_path / "weights.bin"
    blob.write_bytes(np.arange(256, dtype=np.uint8).tobytes())
    with pytest.raises(InputListError, match=rf"{blob}: is binary data, not a list of videos"):
        read_video_list(blob)
    fake = tmp_path / "list.parquet"
    fake.write_text("path\n/videos/a.mp4\n")
    with pytest.raises(InputListError, match=rf"{fake}: not a readable Parquet file"):
        read_video_list(fake)


def test_non_utf8_list_names_file_and_line(tmp_path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"/videos/a.mp4\n# caf\xc3\xa9 is fine\n/videos/caf\xe9.mp4\n")
    with pytest.raises(InputListError) as err:
        read_video_list(listing)
    assert str(err.value) == f"--videos {listing}: line 3 is not UTF-8 text (byte 0xe9); save the list as UTF-8"
    table = tmp_path / "list.csv"
    table.write_bytes(b"\xef\xbb\xbfpath,id\n/videos/a.mp4,a\n")  # a byte order mark, as Windows tools write
    assert [i.key for i in read_video_list(table)] == ["a"]
    table.write_bytes(b"path,id\n/videos/a.mp4,a\n/videos/\xff.mp4,b\n")
    with pytest.raises(InputListError, match=rf"{table}: line 3 is not UTF-8"):
        read_video_list(table)


def test_non_utf8_file_name_in_folder_is_named_and_left_out(tmp_path, caplog) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    good = folder / "chaplin.mp4"
    good.write_bytes(shared_path("videos", "moviepy_chaplin.mp4").read_bytes())
    bad = os.fsencode(folder) + b"/caf\xe9.mp4"
    with open(bad, "wb") as f:
        f.write(good.read_bytes())
    assert [i.source for i in read_video_list(folder)] == [str(good)]
    assert f"{folder}/caf\\xe9.mp4: file name is not UTF-8, left out" in caplog.text


def test_trailing_blank_in_a_listed_file_name(tmp_path) -> None:
    spaced = tmp_path / "clip.mp4 "
    spaced.write_bytes(b"x")
    plain = tmp_path / "other.mp4"
    plain.write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{spaced}\n  {plain}  \r\n\n   # comment\n{tmp_path / 'gone.mp4'} \n")
    sources = [i.source for i in read_video_list(listing)]
    # only the name that exists with its blanks keeps them; the others are stripped as before
    assert sources == [str(spaced), str(plain), str(tmp_path / "gone.mp4")]


def test_same_file_under_two_spellings_is_one_input(tmp_path) -> None:
    videos = shared_path("videos")
    direct = str(videos / "moviepy_chaplin.mp4")
    dotted = f"{videos}/../{videos.name}/moviepy_chaplin.mp4"
    (tmp_path / "link.mp4").symlink_to(direct)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{direct}\n{dotted}\n{tmp_path / 'link.mp4'}\n{videos / 'imageio_cockatoo.mp4'}\n")
    inputs = read_video_list(listing)
    other = str(videos / "imageio_cockatoo.mp4")
    assert [i.source for i in inputs] == [direct, dotted, str(tmp_path / "link.mp4"), other]
    # keys come from the first spelling as listed, so existing lists keep their keys; later spellings are duplicates
    assert [i.key for i in inputs] == [make_key(direct), None, None, make_key(other)]


def test_ingest_one_video_as_videos(tmp_path) -> None:
    video = shared_path("videos", "moviepy_chaplin.mp4")
    result = ingest("--videos", str(video), "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 inputs: 1 samples, 0 failures" in result.stdout
    assert pq.read_table(tmp_path / "out" / "index.parquet").column("source").to_pylist() == [str(video)]


def test_folder_inputs_keep_their_keys(tmp_path) -> None:
    """Keys stay derived from the source as listed: a folder listing gives the same keys as before."""
    videos: Path = shared_path("videos")
    inputs = read_video_list(videos)
    assert [i.key for i in inputs] == [make_key(i.source) for i in inputs]
