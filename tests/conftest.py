"""Shared fixtures: the real data in ../shared/data (skipped with a reason where it is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test that needs it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (clone with ../shared beside the repository)")
    return path


@pytest.fixture(scope="session")
def soundnet8_npz() -> Path:
    return shared_path("soundnet8", "soundnet8.npz")


@pytest.fixture(scope="session")
def sound8_npy() -> Path:
    """The released weights as the public ports publish them (a pickle; see ../shared/data/soundnet8/README.md)."""
    return shared_path("soundnet8", "sound8.npy")


@pytest.fixture(scope="session")
def released_home(tmp_path_factory, sound8_npy) -> Path:
    """A $SOUNDNET_HOME holding the converted released weights, as a first `load_model("soundnet8")` leaves it (made
    from sound8.npy put into the cache folder by hand, the documented offline route: no server needed)."""
    from soundnet.weights import HOME_ENV, RELEASES, fetch

    home = tmp_path_factory.mktemp("soundnet-home")
    (home / "weights").mkdir()
    (home / "weights" / "sound8.npy").symlink_to(sound8_npy)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(HOME_ENV, str(home))
        fetch(RELEASES["soundnet8"])
    return home


@pytest.fixture(scope="session")
def esc50_dir() -> Path:
    return shared_path("esc50")


@pytest.fixture(scope="session")
def soundnet8_checkpoint(tmp_path_factory, soundnet8_npz) -> Path:
    """The released weights imported once per test session."""
    from soundnet.student.checkpoint import save_checkpoint
    from soundnet.student.soundnet_import import import_soundnet8

    path = tmp_path_factory.mktemp("weights") / "soundnet8.ckpt"
    save_checkpoint(path, import_soundnet8(soundnet8_npz))
    return path


@pytest.fixture(scope="session")
def ffmpeg_exe() -> str:
    """The ffmpeg command line used as a reference decoder (system ffmpeg, else the one imageio-ffmpeg ships)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        try:
            import imageio_ffmpeg

            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError):
            pytest.skip("no ffmpeg command line (install the dev extra: imageio-ffmpeg)")
    return exe


@pytest.fixture(autouse=True)
def private_feature_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate svm` caches features under $SOUNDNET_CACHE: tests never write into the user's cache."""
    monkeypatch.setenv("SOUNDNET_CACHE", str(tmp_path_factory.mktemp("soundnet-cache")))


@pytest.fixture(autouse=True)
def private_weights_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Released weights by name are cached under $SOUNDNET_HOME (an empty folder per test) and downloaded from
    $SOUNDNET_WEIGHTS_URL (a closed loopback port unless a test serves them): tests never reach the internet."""
    monkeypatch.setenv("SOUNDNET_HOME", str(tmp_path_factory.mktemp("soundnet-home")))
    monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", "http://127.0.0.1:9/sound8.npy")


LONGEST_MODULES = ("test_train.py", "test_ray.py", "test_engines.py", "test_ingest.py", "test_claims.py")
"""The modules that take longest (minutes each on 2 cores), run first: the workers of ``pytest -n`` take whole
modules in collection order (``--dist loadfile``), so the long ones started last would leave one worker idle."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept
