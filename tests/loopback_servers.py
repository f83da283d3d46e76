"""Servers on 127.0.0.1 that tests fetch inputs and weights from: static web servers with and without byte ranges
(with scripted failures and bodies cut short), and an S3 server (moto's server mode)."""

from __future__ import annotations

import functools
import http.server
import io
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class VideoHandler(http.server.SimpleHTTPRequestHandler):
    """Static files. With ``ranges``, byte ranges as real web servers serve video (MP4s with a trailing index need
    seeks); without, always the whole file with 200, as a plain ``http.server`` and many dynamic endpoints do. Each
    path's ``script`` of (status, headers) replies is answered first; ``requests`` records (path, time, status).
    The first ``cut`` bodies sent stop halfway and the connection drops (their Content-Length announced the whole);
    without ``announce``, no Content-Length is sent and a body ends when the connection closes."""

    ranges = True
    script: dict[str, list[tuple[int, dict[str, str]]]] = {}
    requests: list[tuple[str, float, int]] = []
    cut = 0
    announce = True

    def log_message(self, *args) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self.requests.append((self.path, time.monotonic(), code))
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if self.announce or keyword != "Content-Length":
            super().send_header(keyword, value)

    def copyfile(self, source, outputfile) -> None:
        if type(self).cut > 0:
            type(self).cut -= 1
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            self.connection.shutdown(socket.SHUT_RDWR)  # gone mid-body, as a dropped connection is
            return
        super().copyfile(source, outputfile)

    def send_head(self):
        replies = self.script.get(self.path)
        if replies:
            status, headers = replies.pop(0)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": "0"}.items():
                self.send_header(name, value)
            self.end_headers()
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not self.ranges or not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start, end = int(match.group(1)), int(match.group(2) or len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up mid-answer is expected here
            super().handle_error(request, client_address)


@contextmanager
def video_server(
    directory: Path, ranges: bool = True, cut: int = 0, announce: bool = True
) -> Iterator[tuple[str, type[VideoHandler]]]:
    """(base URL, handler class) of a fresh server over ``directory`` (options: :class:`VideoHandler`); set the
    class's ``script`` to make it fail."""
    attributes = {"ranges": ranges, "script": {}, "requests": [], "cut": cut, "announce": announce}
    handler = type("Handler", (VideoHandler,), attributes)
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def statuses(handler: type[VideoHandler], path: str) -> list[int]:
    """The statuses ``path`` was answered with, in order."""
    return [status for p, _, status in handler.requests if p == path]


@contextmanager
def s3_server(tmp: Path) -> Iterator[dict[str, str]]:
    """A real S3-protocol server (moto's server mode) on a free loopback port. Yields the environment a client
    needs, all in the standard AWS variables (endpoint, keys, region; no profile files of the user's)."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
    server_mode = pytest.importorskip("moto.server", reason="moto is not installed (pip install -e '.[dev]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mode.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "loopback-test-key",
        "AWS_SECRET_ACCESS_KEY": "loopback-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
    }
    try:
        yield env
    finally:
        server.stop()


def s3_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``env`` (from :func:`s3_server`), for a subprocess."""
    return {**{k: v for k, v in os.environ.items() if k != "AWS_PROFILE"}, **env}


def s3_filesystem(env: dict[str, str]):
    """An s3fs client of the server :func:`s3_server` started (for the test's own uploads)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL"]
    )
