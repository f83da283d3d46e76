"""Loopback servers for reading shards remotely: a static HTTP server that answers byte ranges (as static servers,
S3 and CDNs do), and a real S3-protocol server (moto's server mode). Nothing leaves 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Traffic:
    """What a loopback HTTP server was asked: GET requests per path, and transient failures still to answer."""

    gets: Counter = field(default_factory=Counter)
    fail_next: int = 0  # answer this many further requests with 503 (a busy server), then serve normally
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failing(self) -> bool:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder; ``Range: bytes=a-b`` is answered with 206 and those bytes only."""

    traffic: Traffic

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        if self.traffic.failing():
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "busy, try again")
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        if send_body:
            with self.traffic.lock:
                self.traffic.gets[self.path] += 1
        size = path.stat().st_size
        start, end = 0, size
        match = _RANGE_RE.fullmatch(self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1 if match.group(2) else size, size)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if send_body:
            with open(path, "rb") as stream:
                stream.seek(start)
                self.wfile.write(stream.read(end - start))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def serve_http(folder: Path) -> Iterator[tuple[str, Traffic]]:
    """Serve ``folder`` on a free loopback port, answering byte ranges; yields (base URL, its traffic)."""
    traffic = Traffic()
    handler = type("Handler", (RangeHandler,), {"traffic": traffic})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", traffic
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def serve_s3() -> Iterator[dict[str, str]]:
    """A real S3-protocol server (moto's) on a free loopback port; yields the standard AWS variables that point
    clients at it (endpoint and keys), to put in a process's environment."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    s3fs = pytest.importorskip("s3fs", reason="needs s3fs (the s3 extra)")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # no later test may meet a client of this server


def upload(folder: Path, url: str, env: dict[str, str]) -> None:
    """Copy ``folder`` to ``url`` (``s3://bucket/prefix``) with s3fs, as a user publishes finished shards."""
    import s3fs

    with _environment(env):
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        bucket = url[len("s3://") :].split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{url}/{path.relative_to(folder).as_posix()}")


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
