"""Decoding for `student embed`: each input file becomes a run of messages, blocks of mono int16 samples at
22050 Hz and then its :class:`End` or its :class:`Failed`, decoded in this process or in worker processes.

Workers are fresh interpreters running this module (``python -m``; a multiprocessing spawn would re-run the
``student`` script, torch and all, in each): they import PyAV and numpy, never torch. Each reads paths from its
stdin and writes the pickled messages to its stdout, a pipe of :data:`PIPE_BYTES`: a worker that is that far ahead
waits, so memory is bounded however long a file is and however many files wait. File ``j`` of the list goes to
worker ``j mod W``, so the messages of the file being embedded are always next in one worker's pipe while the
others decode ahead. A worker whose parent dies exits at its next write (a broken pipe) or read (end of input); one
that dies itself (a decoder crash) costs its file only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

BLOCK_SAMPLES = 1 << 18  # 11.9 s at 22050 Hz, 512 KiB of int16
PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged pipe size
FILES_AHEAD = 4  # paths handed to each worker ahead of the one being embedded


@dataclass
class Block:
    samples: np.ndarray  # int16 [n], mono, 22050 Hz


@dataclass
class End:
    seconds: float


@dataclass
class Failed:
    error: str  # "reason: message", as the row's error column shows it


Message = Block | End | Failed


def decode_file(path: str, block_samples: int = BLOCK_SAMPLES) -> Iterator[Message]:
    """The messages of one file: its audio in blocks of ``block_samples`` (the last one shorter), then its end;
    or, at whatever point decoding fails, its failure."""
    from soundnet.audio import AudioStream
    from soundnet.media import DecodeError, decode_errors, open_media
    from soundnet.shards.contract import SAMPLE_RATE

    pending: list[np.ndarray] = []
    have = done = 0  # samples pending, samples handed out
    try:
        with decode_errors(path), open_media(path) as container:
            for samples in AudioStream(container):
                pending.append(samples)
                have += len(samples)
                if have >= block_samples:
                    joined = np.concatenate(pending)
                    cut = have - have % block_samples
                    for start in range(0, cut, block_samples):
                        yield Block(joined[start : start + block_samples])
                    pending, have, done = [joined[cut:]], have - cut, done + cut
    except DecodeError as exc:
        yield Failed(f"{exc.reason}: {exc.message}")
        return
    if have:
        yield Block(np.concatenate(pending))
    yield End((done + have) / SAMPLE_RATE)


def serve() -> None:
    """A worker: decode each pickled path from stdin into pickled messages on stdout, until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent ends the workers
    paths, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the message pipe
    try:
        while True:
            try:
                path = pickle.load(paths)
            except EOFError:
                return
            for message in decode_file(path):
                pickle.dump(message, out, pickle.HIGHEST_PROTOCOL)
                out.flush()
    except BrokenPipeError:  # the parent is gone
        os._exit(1)


class Decoders:
    """``workers`` decoding processes (0: decode in this process as each file is read), as a context manager."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._procs: list[subprocess.Popen | None] = [None] * workers
        self._assigned: list[deque[str]] = [deque() for _ in range(workers)]  # sent, and not yet read to the end
        for w in range(workers):
            self._start(w)

    def _start(self, w: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        with contextlib.suppress(OSError):  # a lower system limit: the default pipe (64 KiB) decodes less ahead
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._procs[w] = proc
        for path in self._assigned[w]:  # a restarted worker takes over what its predecessor had not done
            self._send(w, path)

    def _send(self, w: int, path: str) -> None:
        with contextlib.suppress(BrokenPipeError):  # a dead worker: found when its file is read, and restarted
            self._procs[w].stdin.write(pickle.dumps(path))
            self._procs[w].stdin.flush()

    def __enter__(self) -> Decoders:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the worker's end of input: it exits once idle
            if exc[0] is not None:
                proc.kill()  # interrupted: files in flight are not wanted
        for proc in self._procs:
            proc.stdout.close()  # a worker still writing gets a broken pipe and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def files(self, paths: Iterable[str]) -> Iterator[Iterator[Message]]:
        """The messages of each of ``paths``, in order. Each file's messages must be read to its end before the
        next file's iterator is taken."""
        if self.workers == 0:
            yield from map(decode_file, paths)
            return
        paths = iter(paths)
        order: deque[int] = deque()  # the worker of each file sent and not yet read
        sent = 0

        def send_next() -> None:
            nonlocal sent
            path = next(paths, None)
            if path is not None:
                w = sent % self.workers
                self._assigned[w].append(path)
                self._send(w, path)
                order.append(w)
                sent += 1

        for _ in range(FILES_AHEAD * self.workers):
            send_next()
        while order:
            yield self._messages(order.popleft())
            send_next()

    def _messages(self, w: int) -> Iterator[Message]:
        while True:
            try:
                message = pickle.load(self._procs[w].stdout)
            except (EOFError, pickle.UnpicklingError):  # the worker died
                dead = self._procs[w]
                dead.wait()
                for pipe in (dead.stdin, dead.stdout):
                    with contextlib.suppress(OSError):
                        pipe.close()
                self._assigned[w].popleft()
                self._start(w)
                yield Failed("worker_crashed: the decoding worker died on this file (decoder crash or out of memory)")
                return
            yield message
            if not isinstance(message, Block):
                self._assigned[w].popleft()
                return


if __name__ == "__main__":
    from soundnet.student.embed_decode import serve as serve_by_name  # messages pickled under the module's name

    serve_by_name()
