"""Claims on shard tasks, so that several runs (on one machine or many, over a shared filesystem) can work on one
``--out`` at once without doing a task twice.

A run claims a task by creating ``OUT/claims/shard-NNNNNN.claim`` (complete, and only if it does not exist: one
creator wins), holding its owner (host, pid, run id) and a fresh attempt id, the task's fencing token. A heartbeat
thread refreshes the mtime of every claim the run holds, as long as the run makes progress (a run whose engine
reports nothing for ``stall_s`` is stuck: it stops renewing its claims, so other runs take its tasks over). A claim
is stale when its heartbeat is older than the timeout, or at once when its owner is a process of this host that
no longer exists (a killed run on the same machine). A stale claim is taken over atomically: it is renamed away
first (only one taker's rename succeeds) and the taker checks that what it moved is the stale file it judged,
putting a fresh one back.

A run can be stopped at any point for longer than the timeout (a suspended job, a paused VM) and lose its claim
without knowing. So it checks that it still holds the claim (its attempt id is in the claim file,
:meth:`Claim.held`) immediately before each step of a commit, and stamps every file of the commit with its
attempt: a step that still comes late from a run that lost the task is never counted (see
:meth:`soundnet.shards.ledger.RunLayout.is_complete`), and the task is redone.

Clocks: heartbeats compare file mtimes (set by the claim owner's host, or by the file server) with this host's
clock, so hosts sharing an ``--out`` need clocks that agree to well within the timeout (NTP). Where they do not,
runs take each other's tasks over too early (work is wasted, never lost or counted twice). A heartbeat more than
one timeout in the future is reported once and treated as stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from soundnet.shards.atomic import create_exclusive
from soundnet.shards.ledger import RunLayout

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_S = 60.0
STALL_S = 3600.0
"""A run whose engine reported no progress for this long is stuck: its claims are no longer renewed. Longer than an
input may take in a decoding worker (a try and a retry of :data:`soundnet.ingest.local.DECODE_TIMEOUT_S` each)
plus a batch for the teachers."""

_CLAIM_NAME = re.compile(r"shard-(\d{6,})\.claim")


class ClaimLost(Exception):
    """Another run took over a task this run was writing, or removed its files: nothing of the task is kept."""

    def __init__(self, task: int) -> None:
        super().__init__(task)
        self.task = task

    def __str__(self) -> str:
        return f"task {self.task} was taken over by another run; nothing of it was kept"


@dataclass(frozen=True)
class Claim:
    """One run's claim on one task: its claim file and attempt id (picklable, checked where the shard is written)."""

    task: int
    path: Path
    attempt: str

    def held(self) -> bool:
        """True while the claim file is still the one this attempt created (not taken over)."""
        try:
            owner = _read_owner(self.path)
        except FileNotFoundError:
            return False
        return owner is not None and owner.get("attempt") == self.attempt


def _read_owner(path: Path) -> dict | None:
    """The owner recorded in a claim file; None when it is not a claim written by `ingest` (garbage, not UTF-8).
    Raises FileNotFoundError when there is no claim."""
    try:
        owner = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """The claims this run holds on the tasks of one run folder, kept alive by a heartbeat thread while the run
    makes progress (:meth:`progress`)."""

    def __init__(self, layout: RunLayout, timeout_s: float = CLAIM_TIMEOUT_S, stall_s: float = STALL_S) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self.run_id = uuid.uuid4().hex[:12]
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": self.run_id}
        self._held: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()
        self._warned: set[str] = set()

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

    def progress(self) -> None:
        """The run's engine made progress: keep renewing its claims."""
        self._progress = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.2, self.timeout_s / 6)):
            stalled = time.monotonic() - self._progress
            if stalled > self.stall_s:
                self._warn_once(
                    "stalled",
                    f"this run made no progress for {stalled:.0f} s: its claims are no longer renewed, so other "
                    "runs can take its tasks over",
                )
                continue
            with self._lock:
                claims = list(self._held.values())
            for claim in claims:
                with contextlib.suppress(FileNotFoundError):
                    if claim.held():
                        os.utime(claim.path)
                        continue
                with self._lock:  # taken over: the task says so when it tries to commit
                    self._held.pop(claim.task, None)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def claim(self, task: int) -> Claim | None:
        """Claim ``task``; None when another live run holds it."""
        path = self.layout.claim_path(task)
        for _ in range(3):
            claim = Claim(task, path, uuid.uuid4().hex[:16])
            if not create_exclusive(path, json.dumps({**self.owner, "attempt": claim.attempt})):
                if not self._take_stale(path):
                    return None
                continue
            self.progress()
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
            mtime = os.stat(path).st_mtime
            owner = _read_owner(path)
        except FileNotFoundError:
            return True
        if owner is None:
            self._warn_once(
                f"unreadable {path}", f"{path} is not a claim written by `ingest run` (unreadable): taking it over"
            )
            return True
        here = owner.get("host") == self.owner["host"] and owner.get("run") != self.run_id
        if here and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
            return True
        age = time.time() - mtime
        if age < -self.timeout_s:
            self._warn_once(
                f"future {path}",
                f"{path}: its heartbeat is {-age:.0f} s in the future (clocks that disagree, or a bad mtime); "
                f"a heartbeat more than --claim-timeout {self.timeout_s:g} s ahead counts as stale",
            )
            return True
        return age > self.timeout_s

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
            owner = moved.read_bytes()[:200].decode(errors="replace")
            log.warning("taking over %s from a run that stopped: %s", path.stem, owner)
            return True
        finally:
            moved.unlink(missing_ok=True)

    def live_others(self) -> set[int]:
        """Tasks that another run holds with a live claim (their files are not leftovers to sweep). Files in
        ``claims/`` that are not claims (a copy made by a file manager or a sync tool) are named once and ignored."""
        if not self.layout.claims_dir.is_dir():
            return set()
        with self._lock:
            ours = set(self._held)
        tasks = set()
        for path in self.layout.claims_dir.iterdir():
            if path.name.startswith("."):  # being created or taken over
                continue
            if (match := _CLAIM_NAME.fullmatch(path.name)) is None:
                self._warn_once(f"name {path}", f"ignoring {path}: not a claim file name (delete it)")
                continue
            tasks.add(int(match.group(1)))
        return {t for t in tasks - ours if not self.is_stale(self.layout.claim_path(t))}
