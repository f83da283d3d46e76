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
