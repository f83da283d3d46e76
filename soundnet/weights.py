"""Released weights by name: ``soundnet.load_model("soundnet8")``, ``--checkpoint soundnet8`` in every command.

The first use of a name downloads the release file from its pinned URLs, each in turn and each tried again after
a transient failure as URL inputs are (:mod:`soundnet.retry`; ``$SOUNDNET_WEIGHTS_URL``, one URL or several
separated by spaces, replaces them: a mirror, or a loopback server in tests), checks its sha256,
converts it and keeps the converted weights as ``NAME.safetensors`` (with ``NAME.json``) in ``$SOUNDNET_HOME/weights``
(default ``~/.cache/soundnet/weights``). Later uses read that file and need no network.

* The download goes to a hidden temporary file that is removed whatever happens; only the converted weights of a
  file with the pinned digest are ever written under a name that is read back, so an interrupted download or a wrong
  digest leaves nothing behind.
* Without a network, a release file put by hand into the cache folder is checked and converted the same way; the
  error message says where, with the URLs and the sha256.
* A file of that name always wins over a release's name; a folder does not (``../shared/data/soundnet8/``).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from soundnet.digest import sha256_file
from soundnet.retry import USER_AGENT, UrlFailure, UrlPolicy, url_failure, with_retries
from soundnet.student.checkpoint import ACCEPTED, OutputError, save_safetensors
from soundnet.student.soundnet_import import import_soundnet8

log = logging.getLogger(__name__)

URL_ENV = "SOUNDNET_WEIGHTS_URL"
HOME_ENV = "SOUNDNET_HOME"
POLICY = UrlPolicy(retries=2, timeout_s=30.0)  # each URL: 3 tries, about 1 s then 2 s apart (or as Retry-After asks)
STALE_S = 600  # a temporary download untouched this long belongs to a process that died
MODEL_HELP = (
    "A released model's name (soundnet8: downloaded once into $SOUNDNET_HOME) or a model file: a checkpoint "
    "(student train, student import-soundnet), soundnet8.npz, sound8.npy or .safetensors (student export)."
)


@dataclass(frozen=True)
class Release:
    """A published weights file: where to get it, what its bytes must hash to, how it becomes a SoundNet."""

    name: str
    filename: str
    sha256: str
    size: int
    urls: tuple[str, ...]


RELEASES = {
    "soundnet8": Release(
        name="soundnet8",
        filename="sound8.npy",  # Aytar, Vondrick, Torralba's SoundNet8, as the public ports publish it
        sha256="7bef691761d00a23b027751bb8e7bdadc603a03f3bbec5574e7cd54c98a850c5",
        size=57_429_057,
        urls=(  # byte-identical copies (git blob 96766f1571489fdac071e132ef605f1440dda856), pinned by commit
            "https://github.com/pseeth/soundnet_keras/raw/fb793cd5f5973ca6c6bccc90286c49d9312707c2/models/sound8.npy",
            "https://github.com/naotokui/soundnet_keras/raw/ee48fcbb0b2c8d275c28fed420be62dc32ab753a/models/sound8.npy",
        ),
    ),
}


class WeightsUnavailable(OSError):
    """Released weights that could not be had: every URL failed, or a file put by hand has the wrong digest."""


def soundnet_home() -> Path:
    """``$SOUNDNET_HOME``, else ``$XDG_CACHE_HOME/soundnet``, else ``~/.cache/soundnet``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soundnet"


def weights_dir() -> Path:
    return soundnet_home() / "weights"


def resolve(model: str | os.PathLike) -> Path:
    """The model file for ``model``: the path itself when it exists (a file, or anything but the name of a release),
    else the converted weights of the release of that name (downloaded and converted on first use)."""
    path = Path(model)
    if path.is_file() or (path.exists() and str(model) not in RELEASES):
        return path
    if str(model) in RELEASES:
        return fetch(RELEASES[str(model)])
    names = ", ".join(RELEASES)
    raise FileNotFoundError(f"no model file at {model} and no released model of that name ({names}); files: {ACCEPTED}")


def fetch(release: Release) -> Path:
    """The cached converted weights of ``release``, made from a file put by hand or a download when absent."""
    folder = weights_dir()
    cached = folder / f"{release.name}.safetensors"
    if cached.is_file():
        return cached
    by_hand = folder / release.filename
    if by_hand.is_file():
        digest = sha256_file(by_hand)
        if digest != release.sha256:
            raise WeightsUnavailable(
                f"{by_hand} has sha256 {digest}, not the {release.name} release's {release.sha256}: delete it"
            )
        _convert(release, by_hand, cached)
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{release.filename}.", suffix=".tmp", dir=folder)
        os.close(fd)
        download = Path(name)
        try:
            _sweep_stale(folder, release.filename)
            _download(release, download, by_hand)
            _convert(release, download, cached)
            log.info("%s: sha256 checked, converted weights kept in %s", release.name, cached)
        finally:
            download.unlink(missing_ok=True)
    except OSError as exc:
        if isinstance(exc, WeightsUnavailable):
            raise
        message = f"cannot write into {folder} ({exc.strerror or exc}): free some space or set ${HOME_ENV}"
        raise WeightsUnavailable(message) from None
    return cached


def _convert(release: Release, source: Path, cached: Path) -> None:
    model = import_soundnet8(source)
    try:
        save_safetensors(cached, model, soundnet_source=f"{release.filename} sha256 {release.sha256}")
    except OutputError as exc:
        raise WeightsUnavailable(f"{exc} (the weights cache: set ${HOME_ENV} to put it elsewhere)") from None


def _sweep_stale(folder: Path, filename: str) -> None:
    """Remove temporary downloads left by processes that were killed (a live download touches its file often)."""
    for leftover in folder.glob(f".{filename}.*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()
        except OSError:
            pass  # another process swept it first


def _download(release: Release, dest: Path, by_hand: Path) -> None:
    """Fill ``dest`` with the release's bytes from the first URL that serves them with the pinned sha256."""
    urls = os.environ.get(URL_ENV, "").split() or list(release.urls)
    failures = []
    for url in urls:
        try:
            with_retries(POLICY, functools.partial(_download_once, url, release, dest), functools.partial(_warn, url))
            return
        except UrlFailure as failure:
            failures.append(f"{url}: {failure.what} ({failure.tried()})")
    raise WeightsUnavailable(
        f"cannot download the {release.name} weights ({'; '.join(failures)}); nothing was kept. Without a network, "
        f"get {release.filename} (sha256 {release.sha256}) from {' or '.join(urls)} and put it at {by_hand}, or "
        "give its path instead of the name"
    )


def _warn(url: str, failure: UrlFailure, wait_s: float) -> None:
    log.warning("%s: %s; trying again in %.1f s", url, failure.what, wait_s)


def _download_once(url: str, release: Release, dest: Path) -> None:
    """One try at ``url``: its body into ``dest``, or a :class:`UrlFailure` (the release's size and digest, or the
    transfer's rules of :mod:`soundnet.retry`)."""
    log.info("%s: downloading %s from %s", release.name, release.filename, url)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=POLICY.timeout_s) as response, open(dest, "wb") as out:
            expected = int(response.headers.get("Content-Length") or release.size)
            if expected != release.size:  # another file: not worth the bandwidth or the disk
                wrong = f"serves {expected:,} bytes, not the {release.size:,} of {release.filename}"
                raise UrlFailure("wrong_file", wrong, False)
            progress = tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=release.filename, leave=False
            )
            with progress:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    progress.update(len(block))
                    if received > release.size:  # a body longer than announced, or never announced
                        longer = f"serves more than the {release.size:,} bytes of {release.filename}"
                        raise UrlFailure("wrong_file", longer, False)
    except urllib.error.URLError as exc:  # an HTTP status, or no connection (other OSErrors are this machine's)
        raise url_failure(exc, POLICY) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:  # a reset, a stall, a body cut short
        lost = f"connection lost after {received:,} bytes ({type(exc).__name__}: {exc})"
        raise UrlFailure("connection_failed", lost, True) from None
    if received != expected:
        raise UrlFailure("connection_failed", f"connection closed after {received:,} of {expected:,} bytes", True)
    if digest.hexdigest() != release.sha256:
        wrong = f"served {received:,} bytes with sha256 {digest.hexdigest()}, not {release.sha256}"
        raise UrlFailure("wrong_file", wrong, False)
