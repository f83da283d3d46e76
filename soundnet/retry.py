"""http(s) requests that are tried again: one policy, one rule for what is worth another try, one loop.

URL inputs (:mod:`soundnet.media`), video lists at a URL (:mod:`soundnet.ingest.inputs`) and the released weights
(:mod:`soundnet.weights`) fetch with it. Transient failures (connection errors, timeouts, 408, 429, 5xx, an answer
cut short) are tried again after exponential backoff with jitter, or after the server's ``Retry-After``; anything
else fails at once. No media library is imported here, so a weights download does not load one.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import ssl
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import TypeVar

URL_RETRIES = 3
URL_TIMEOUT_S = 30.0
MAX_DOWNLOAD_MB = 2048.0
USER_AGENT = f"soundnet-distill/{version('soundnet-distill')}"

T = TypeVar("T")


@dataclass(frozen=True)
class UrlPolicy:
    """How http(s) sources are fetched. Retries are bounded: a server that never answers costs at most
    ``(retries + 1) x timeout_s`` plus the waits (about two minutes with the defaults), then it is a failure."""

    retries: int = URL_RETRIES  # further tries after a transient failure
    timeout_s: float = URL_TIMEOUT_S  # per request: to connect, and for each wait for data
    backoff_s: float = 1.0  # the first wait; it doubles with every retry
    max_wait_s: float = 30.0  # no single wait is longer, a server's Retry-After included
    max_download_mb: float = MAX_DOWNLOAD_MB  # a video from a server without byte ranges is downloaded, up to this

    def wait_s(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds before retry number ``retry`` (1, 2, ...): the server's Retry-After, else jittered backoff."""
        if retry_after_s is not None:
            return min(retry_after_s, self.max_wait_s)
        return min(self.backoff_s * 2 ** (retry - 1), self.max_wait_s) * random.uniform(0.5, 1.0)


def retry_after_s(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds, or an HTTP date), or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo is not None else None


class UrlFailure(Exception):
    """One failed try at a URL: a short ``reason`` (a failure ledger's), what happened, whether another try may
    succeed, the wait the server asked for; :func:`with_retries` counts the ``tries`` made."""

    def __init__(self, reason: str, what: str, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.reason, self.what, self.transient, self.retry_after = reason, what, transient, retry_after
        self.tries = 1

    def tried(self) -> str:
        """``1 try``, ``3 tries``: for messages."""
        return f"{self.tries} {'try' if self.tries == 1 else 'tries'}"


def url_failure(exc: OSError | http.client.HTTPException, policy: UrlPolicy) -> UrlFailure:
    """What a urllib request that raised ``exc`` failed of: an HTTP status (transient: 408, 429, 5xx, with their
    Retry-After), a timeout, a connection not made (a bad certificate stays bad), or one lost on the way."""
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()
        transient = exc.code in (408, 429) or exc.code >= 500
        wait = retry_after_s(exc.headers.get("Retry-After"))
        return UrlFailure("http_error", f"HTTP {exc.code} {exc.reason}", transient, wait)
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError):
        return UrlFailure("timeout", f"no answer within {policy.timeout_s:g} s", True)
    if isinstance(exc, urllib.error.URLError):
        transient = not isinstance(cause, (ssl.SSLError, ValueError))
        return UrlFailure("connection_failed", f"cannot connect ({cause})", transient)
    return UrlFailure("connection_failed", f"connection failed ({type(exc).__name__}: {exc})", True)


def with_retries(
    policy: UrlPolicy, attempt: Callable[[], T], on_retry: Callable[[UrlFailure, float], None] | None = None
) -> T:
    """``attempt()``, tried again after each transient :class:`UrlFailure` while ``policy`` allows; the last failure
    is raised with its ``tries``. ``on_retry(failure, wait_s)`` hears of each failure that will be tried again."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except UrlFailure as failed:
            failed.tries = tries
            if not failed.transient or tries > policy.retries:
                raise
            wait = policy.wait_s(tries, failed.retry_after)
            if on_retry is not None:
                on_retry(failed, wait)
            time.sleep(wait)
