"""Claims on shard tasks, so that several runs (on one machine or many, over a shared filesystem) can work on one
``--out`` at once without doing a task twice.

A run claims a task by creating ``OUT/claims/shard-NNNNNN.claim`` with ``O_CREAT|O_EXCL`` (one creator wins), holding
its owner (host, pid, run id). A heartbeat thread refreshes the mtime of every claim the run holds. A claim is
stale when its heartbeat is older than the timeout, or at once when its owner is a process of this host that no
longer exists (a killed run on the same machine). A stale claim is taken over atomically: it is renamed away first
(only one taker's rename succeeds) and the taker checks that what it moved is the stale file it judged, putting a
fresh one back. A run commits a task only while it still holds the claim (:meth:`Claim.held`), and removes the
claim after the task is complete. Heartbeats compare file mtimes with this host's clock: hosts sharing an ``--out``
need clocks that agree to well within the timeout (NTP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from soundnet.shards.ledger import RunLayout

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_S = 60.0


class ClaimLost(Exception):
    """Another run took over a task this run was writing (its heartbeat stalled past the timeout)."""


@dataclass(frozen=True)
class Claim:
    """One run's claim on one task: the claim file it created (picklable, checked where the shard is written)."""

    task: int
    path: Path
    inode: int

    def held(self) -> bool:
        """True while the claim file is still the one this run created (not taken over)."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """The claims this run holds on the tasks of one run folder, kept alive by a heartbeat thread."""

    def __init__(self, layout: RunLayout, timeout_s: float = CLAIM_TIMEOUT_S) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.run_id = uuid.uuid4().hex[:12]
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": self.run_id}
        self._held: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        self.layout.claims_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for claim in list(self._held.values()):
            self.release(claim)

    def _beat(self) -> None:
        while not self._stop.wait(max(0.2, self.timeout_s / 6)):
            with self._lock:
                claims = list(self._held.values())
            for claim in claims:
                try:
                    if claim.held():
                        os.utime(claim.path)
                        continue
                except FileNotFoundError:
                    pass
                log.warning("shard task %d was taken over by another run; this run will not commit it", claim.task)
                with self._lock:
                    self._held.pop(claim.task, None)

    def claim(self, task: int) -> Claim | None:
        """Claim ``task``; None when another live run holds it."""
        path = self.layout.claim_path(task)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._take_stale(path):
                    return None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
                claim = Claim(task, path, os.fstat(f.fileno()).st_ino)
            with self._lock:
                self._held[task] = claim
            return claim
        return None

    def held(self, task: int) -> Claim | None:
        with self._lock:
            return self._held.get(task)

    def release(self, claim: Claim | None) -> None:
        """Give up a claim (after its task is complete, or to leave it to another run)."""
        if claim is None:
            return
        with self._lock:
            self._held.pop(claim.task, None)
        if claim.held():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim.path)

    def is_stale(self, path: Path) -> bool:
        try:
            st = os.stat(path)
            owner = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return True
        except (OSError, ValueError):  # being written, or unreadable: judge by its heartbeat alone
            owner = {}
        here = owner.get("host") == self.owner["host"] and owner.get("run") != self.run_id
        if here and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
            return True
        return time.time() - st.st_mtime > self.timeout_s

    def _take_stale(self, path: Path) -> bool:
        """Move a stale claim out of the way; True when the caller may try to create the claim again."""
        try:
            before = os.stat(path)
        except FileNotFoundError:
            return True
        if not self.is_stale(path):
            return False
        moved = path.with_name(f".{path.name}.{self.run_id}.stale")
        try:
            os.rename(path, moved)
        except FileNotFoundError:  # another taker was first
            return True
        try:
            if os.stat(moved).st_ino != before.st_ino:  # a fresh claim made meanwhile: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(moved, path)
                return False
            log.warning("taking over %s from a run that stopped: %s", path.stem, moved.read_text())
            return True
        finally:
            moved.unlink(missing_ok=True)

    def live_others(self) -> set[int]:
        """Tasks that another run holds with a live claim (their files are not leftovers to sweep)."""
        if not self.layout.claims_dir.is_dir():
            return set()
        with self._lock:
            ours = set(self._held)
        tasks = {int(p.stem.split("-")[1]) for p in self.layout.claims_dir.glob("shard-*.claim")}
        return {t for t in tasks - ours if not self.is_stale(self.layout.claim_path(t))}
