"""Released weights by name and every model file a user may hold: the real sound8.npy served by a loopback server
(downloaded once, digest-checked, converted, cached, then used with the server gone), interrupted and tampered
downloads, the offline message, a malicious pickle, files that are no model, and .safetensors export."""

from __future__ import annotations

import copyreg
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import soundnet
from soundnet.evaluate.cli import main as evaluate_cli
from soundnet.student.checkpoint import SAFETENSORS_CONFIG, load_checkpoint, save_checkpoint
from soundnet.student.cli import main as student_cli
from soundnet.student.model import ModelConfig, build_model
from soundnet.student.soundnet_import import UnsafePickle, import_soundnet8, read_pickled_npy
from soundnet.weights import RELEASES, WeightsUnavailable, resolve
from tests.loopback_servers import VideoHandler, statuses, video_server

BIN = Path(sys.executable).parent  # the console scripts of this environment, as a user runs them
RELEASE = RELEASES["soundnet8"]
CLIPS = ("1-100032-A-0.flac", "1-17367-A-10.flac")  # a dog, rain


@contextmanager
def serving(payload: bytes | Path, folder: Path, **options) -> Iterator[tuple[str, type[VideoHandler]]]:
    """(URL, handler) of a loopback server of ``payload`` as ``sound8.npy`` (options: :func:`video_server`)."""
    folder.mkdir(exist_ok=True)
    served = folder / "sound8.npy"
    served.unlink(missing_ok=True)
    if isinstance(payload, Path):
        served.symlink_to(payload)
    else:
        served.write_bytes(payload)
    with video_server(folder, ranges=False, **options) as (base, handler):
        yield f"{base}/sound8.npy", handler


def requests(handler: type[VideoHandler]) -> int:
    return len(statuses(handler, "/sound8.npy"))


def closed_port_url() -> str:
    """A loopback URL nobody listens on: what a machine without a network gets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/sound8.npy"


def cache_files(home: Path) -> list[str]:
    """Everything under the weights cache, hidden temporary files included."""
    folder = home / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def student(*args: str, home: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOUNDNET_HOME": str(home), "SOUNDNET_WEIGHTS_URL": url}
    return subprocess.run([str(BIN / "student"), *args], env=env, capture_output=True, text=True, timeout=300)


def embeddings(path: Path) -> np.ndarray:
    return np.stack(pq.read_table(path).column("embedding").to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def sound8_bytes(sound8_npy) -> bytes:
    return sound8_npy.read_bytes()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty $SOUNDNET_HOME for this test (in-process and for the commands it runs)."""
    monkeypatch.setenv("SOUNDNET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---- weights by name -------------------------------------------------------------------------------------------


def test_student_embed_by_name_downloads_once_then_offline(sound8_npy, esc50_dir, soundnet8_npz, home, tmp_path):
    clips = [str(esc50_dir / "audio" / name) for name in CLIPS]
    with serving(sound8_npy, tmp_path / "served") as (url, server):
        first = student("embed", *clips, "--checkpoint", "soundnet8", "--scene", "--out", str(tmp_path / "a.parquet"),
                        home=home, url=url)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        assert requests(server) == 1
    assert "sound8.npy" in first.stderr and "54.8M" in first.stderr  # the progress bar of the 57 MB download
    assert cache_files(home) == ["soundnet8.json", "soundnet8.safetensors"]  # no download left over

    second = student("embed", *clips, "--checkpoint", "soundnet8", "--scene", "--out", str(tmp_path / "b.parquet"),
                     home=home, url=url)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]  # the server is gone: the cache alone serves
    assert "downloading" not in second.stderr
    args = ["embed", *clips, "--checkpoint", str(soundnet8_npz), "--scene", "--out", str(tmp_path / "c.parquet")]
    result = CliRunner().invoke(student_cli, args)  # the same command on the converted .npz, in this process
    assert result.exit_code == 0, result.output
    reference = embeddings(tmp_path / "c.parquet")
    assert reference.shape == (2, 256)
    np.testing.assert_array_equal(embeddings(tmp_path / "a.parquet"), reference)
    np.testing.assert_array_equal(embeddings(tmp_path / "b.parquet"), reference)
    assert json.loads(pq.read_schema(tmp_path / "b.parquet").metadata[b"soundnet"])["checkpoint"] == "soundnet8"


def test_a_wrong_digest_is_refused_and_nothing_is_kept(sound8_bytes, home, tmp_path, monkeypatch):
    tampered = bytearray(sound8_bytes)
    tampered[len(tampered) // 2] ^= 1
    with serving(bytes(tampered), tmp_path / "served") as (url, server):
        monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", url)
        with pytest.raises(WeightsUnavailable, match=f"sha256 [0-9a-f]{{64}}, not {RELEASE.sha256}") as error:
            resolve("soundnet8")
        assert requests(server) == 1  # a wrong file is not fetched again
    assert f"{url}: served 57,429,057 bytes" in str(error.value) and "nothing was kept" in str(error.value)
    assert cache_files(home) == []


def test_a_larger_file_is_refused_without_being_kept_whole(sound8_bytes, home, tmp_path, monkeypatch):
    """A mirror serving another file (or a server streaming without end) costs neither the bandwidth nor the disk:
    the announced size is refused before the body, an unannounced one once it passes the release's size."""
    for announce, message in ((True, "serves 58,477,633 bytes, not the 57,429,057"), (False, "serves more than")):
        with serving(sound8_bytes + bytes(1 << 20), tmp_path / "served", announce=announce) as (url, server):
            monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", url)
            with pytest.raises(WeightsUnavailable, match=f"{url}: {message}.*\\(1 try\\)"):
                resolve("soundnet8")
            assert requests(server) == 1
        assert cache_files(home) == []


def test_an_interrupted_download_is_retried_and_leaves_nothing(sound8_npy, home, tmp_path, monkeypatch):
    """Transient failures are tried again as URL inputs are (soundnet.retry): jittered waits doubling from 1 s, or
    the server's Retry-After."""
    waits: list[float] = []
    monkeypatch.setattr("soundnet.retry.time.sleep", waits.append)
    with serving(sound8_npy, tmp_path / "served", cut=99) as (url, server):
        monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", url)
        with pytest.raises(WeightsUnavailable, match=r"after 28,714,528 of 57,429,057 bytes \(3 tries\)"):
            resolve("soundnet8")
        assert requests(server) == 3
        assert len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2
    assert cache_files(home) == []  # the partial download is gone and nothing was converted

    waits.clear()
    with serving(sound8_npy, tmp_path / "served", cut=1) as (url, server):  # a 503, a drop, then the whole file
        server.script["/sound8.npy"] = [(503, {"Retry-After": "0"})]
        monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", url)
        cached = resolve("soundnet8")
        assert statuses(server, "/sound8.npy") == [503, 200, 200]
        assert waits[0] == 0 and 1 <= waits[1] <= 2  # the server asked for no wait
    assert cache_files(home) == ["soundnet8.json", "soundnet8.safetensors"]
    reference = import_soundnet8(sound8_npy).state_dict()
    for key, tensor in load_checkpoint(cached).state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_offline_without_a_cache_says_where_to_put_the_file(esc50_dir, sound8_npy, home, tmp_path, monkeypatch):
    url = closed_port_url()
    clip = str(esc50_dir / "audio" / CLIPS[0])
    done = student("embed", clip, "--checkpoint", "soundnet8", "--out", str(tmp_path / "x.parquet"), home=home, url=url)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], done.stderr
    for part in (url, "cannot connect", RELEASE.sha256, str(home / "weights" / "sound8.npy"), "nothing was kept"):
        assert part in errors[0], part
    assert not (tmp_path / "x.parquet").exists() and cache_files(home) == []

    (home / "weights" / "sound8.npy").write_bytes(b"not the weights")  # a wrong file put by hand is refused
    monkeypatch.setenv("SOUNDNET_WEIGHTS_URL", url)
    with pytest.raises(
        WeightsUnavailable, match=f"sha256 [0-9a-f]{{64}}, not the soundnet8 release's {RELEASE.sha256}"
    ):
        resolve("soundnet8")
    (home / "weights" / "sound8.npy").unlink()
    (home / "weights" / "sound8.npy").symlink_to(sound8_npy)  # the right one is converted with no network
    assert resolve("soundnet8") == home / "weights" / "soundnet8.safetensors"


def test_the_built_in_urls_are_pinned_by_commit():
    for url in RELEASE.urls:
        assert url.startswith("https://github.com/") and url.endswith("/models/sound8.npy")
        assert len(url.split("/raw/")[1].split("/")[0]) == 40  # a commit, not a branch that can move


def test_evaluate_takes_a_name(released_home, esc50_dir, tmp_path, monkeypatch):
    """`evaluate svm --checkpoint soundnet8` (the feature cache keys on the cached file's bytes);
    `soundnet.load_model` and `soundnet.hear.load_model()` are tested in test_api and test_hear."""
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    data = tmp_path / "mini"  # two classes of two real clips, two folds: about the smallest dataset evaluate takes
    rows = [line.split(",") for line in (esc50_dir / "esc50.csv").read_text().splitlines()[1:]]
    for category in ("dog", "rain"):
        (data / category).mkdir(parents=True)
        for stem in [row[0][:-4] for row in rows if row[3] == category][:2]:
            (data / category / f"{stem}.flac").symlink_to(esc50_dir / "audio" / f"{stem}.flac")
    (data / "folds.csv").write_text("filename,fold\n" + "".join(f"{p.name},{i % 2 + 1}\n" for i, p in
                                                                 enumerate(sorted(data.rglob("*.flac")))))  # fmt: skip
    result = CliRunner().invoke(evaluate_cli, ["svm", "--checkpoint", "soundnet8", "--dataset", "folder", "--data-dir",
                                               str(data), "--clip-seconds", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_folder_named_like_a_release_does_not_hide_it(released_home, tmp_path, monkeypatch):
    """Run from ../shared/data, `--checkpoint soundnet8` meets the folder soundnet8/: the name still means the
    release; a file of that name would win."""
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "soundnet8").mkdir()
    assert resolve("soundnet8") == released_home / "weights" / "soundnet8.safetensors"
    assert resolve(tmp_path) == tmp_path  # any other folder is given back, for the caller's "is a folder" message


# ---- files a user may hold -------------------------------------------------------------------------------------


class Foreign:
    """Something a foreign PyTorch checkpoint pickles beside its tensors."""


def evil_npy(path: Path, marker: Path, how: str) -> Path:
    """A pickled .npy, like sound8.npy, whose unpickling runs a command that creates ``marker``."""

    class Evil:
        def __reduce__(self):
            if how == "os.system":
                return os.system, (f"touch {marker}",)
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    np.save(path, np.array({"conv1": {"weights": Evil()}}, dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_a_malicious_pickle_is_refused_and_runs_nothing(how, esc50_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_npy(tmp_path / "sound8.npy", marker, how)
    np.load(evil, allow_pickle=True)  # the control: a naive load runs the command
    assert marker.exists()
    marker.unlink()

    clip = str(esc50_dir / "audio" / CLIPS[0])
    commands = [
        (student_cli, ["embed", clip, "--checkpoint", str(evil), "--out", str(tmp_path / "x.parquet")]),
        (student_cli, ["import-soundnet", str(evil), "--out", str(tmp_path / "x.ckpt")]),
        (student_cli, ["export", str(evil), "--out", str(tmp_path / "x.safetensors")]),
        (evaluate_cli, ["svm", "--checkpoint", str(evil), "--dataset", "esc10", "--data-dir", str(esc50_dir)]),
    ]
    called = "posix.system" if how == "os.system" else "builtins.exec"
    for cli, args in commands:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1, result.output  # one line
        assert f"refused to unpickle: it calls {called}" in result.output and "nothing in it was run" in result.output
        assert not marker.exists()
    assert not list(tmp_path.glob("x.*"))


class Forged:
    """An object that pickles as ``reduce`` (a callable and its arguments, then an optional BUILD state)."""

    def __init__(self, *reduce) -> None:
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


class ForgedArray(Forged):
    """Passes the pickler's check that NEWOBJ names the object's own class."""

    __class__ = property(lambda self: np.ndarray)  # type: ignore[assignment]


REBUILD = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array rebuilder, as its pickles name it
ONE_OBJECT = {"a": (np.dtype("O"), 0)}  # a field holding an object pointer, read from the array's raw bytes
FORGERIES = {  # pickles that call only numpy's array and dtype rebuilders, but not as numpy's pickles do
    "a float dtype made a record of object pointers": Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (), Forged(
        np.dtype, ("f8", False, True), (3, "|", None, ("a",), ONE_OBJECT, 8, 1, 0)), False, b"A" * 8)),
    "a record dtype": Forged(np.dtype, ("f4,O", False, True)),
    "ndarray called: uninitialised memory": Forged(np.ndarray, ((64, 1, 1, 16), "f4")),
    "ndarray.__new__ (NEWOBJ)": ForgedArray(copyreg.__newobj__, (np.ndarray, (64, 1, 1, 16), "f4")),
    "_reconstruct with a shape": Forged(REBUILD, (np.ndarray, (1 << 20,), b"f")),
    "more elements than bytes": Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (1 << 40,), np.dtype("f4"), False, b"")),
    "an empty array whose strides overflow": Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (0, 2**63 - 1, 2**63 - 1),
                                                                                np.dtype("f4"), False, b"")),
    "more objects than given": Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (1 << 20,), np.dtype("O"), False, [])),
}  # fmt: skip


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_pickle_that_forges_numpy_state_is_refused(forgery, tmp_path):
    """Admitting numpy's rebuilders is not enough: with a forged dtype state a pickle makes numpy read object pointers
    from bytes it chose (a crash, or worse, when the weights are read), and ndarray itself hands out uninitialised
    memory. Only the calls and states numpy's own pickles hold get through."""
    path = tmp_path / "sound8.npy"
    np.save(path, np.array({"conv1": {"weights": FORGERIES[forgery]}}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickle, match=f"{path}: refused to unpickle: .*nothing in it was run"):
        read_pickled_npy(path)


def test_a_pickle_cannot_give_object_pointers_a_byte_order(tmp_path):
    """A dtype's state may set its byte order, but only as numpy itself would: an object dtype made big-endian has
    its pointers byte-swapped by numpy's copies (``np.asarray(a, dtype=object)`` crashed the process)."""
    big_endian_objects = Forged(np.dtype, ("O8", False, True), (3, ">", None, None, None, -1, -1, 63))
    weights = Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (2,), big_endian_objects, False, [1.5, 2.5]))
    big_endian_floats = Forged(np.dtype, ("f4", False, True), (3, ">", None, None, None, -1, -1, 0))
    biases = Forged(REBUILD, (np.ndarray, (0,), b"b"), (1, (1,), big_endian_floats, False, b"\x3f\x80\x00\x00"))
    path = tmp_path / "sound8.npy"
    np.save(path, np.array({"conv1": {"weights": weights, "biases": biases}}, dtype=object), allow_pickle=True)
    loaded = read_pickled_npy(path)["conv1"]
    assert loaded["weights"].dtype.byteorder == "|"
    assert np.asarray(loaded["weights"], dtype=object).tolist() == [1.5, 2.5]
    assert loaded["biases"].tolist() == [1.0]  # a big-endian float stays big-endian: numpy's own pickles allow it


def no_model_files(folder: Path) -> dict[str, Path]:
    files = {name: folder / name for name in ("notes.pt", "empty.ckpt", "random.npy", "foreign.pt", "plain.npy")}
    files["notes.pt"].write_text("not a checkpoint")
    files["empty.ckpt"].write_bytes(b"")
    files["random.npy"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Foreign()}, files["foreign.pt"])
    np.save(files["plain.npy"], np.zeros(3, np.float32))
    files["archive.zip"] = Path(shutil.make_archive(str(folder / "archive"), "zip", folder, "notes.pt"))
    files["folder"] = folder
    return files


def test_a_file_that_is_no_model_gets_one_line_naming_it_and_the_formats(esc50_dir, tmp_path):
    clip = str(esc50_dir / "audio" / CLIPS[0])
    for name, path in no_model_files(tmp_path).items():
        for cli, args in (
            (student_cli, ["embed", clip, "--checkpoint", str(path), "--out", str(tmp_path / "x.parquet")]),
            (evaluate_cli, ["svm", "--checkpoint", str(path), "--dataset", "esc10", "--data-dir", str(esc50_dir)]),
        ):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 1 and result.output.count("\n") == 1, (name, result.output)
            assert result.output.startswith(f"Error: {path}"), (name, result.output)
            assert "soundnet8.npz" in result.output and "sound8.npy" in result.output, (name, result.output)
            assert "weights_only" not in result.output
    result = CliRunner().invoke(student_cli, ["embed", clip, "--checkpoint", "soundnet9", "--out", "x.parquet"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no model file at soundnet9 and no released model of that name (soundnet8)" in result.output
    foreign = CliRunner().invoke(evaluate_cli, ["svm", "--checkpoint", str(tmp_path / "foreign.pt"), "--dataset",
                                                "esc10", "--data-dir", str(esc50_dir)])  # fmt: skip
    assert "it holds tests.test_weights.Foreign objects, not only tensors" in foreign.output


def test_the_format_is_told_by_content_not_by_name(sound8_npy, soundnet8_npz, soundnet8_checkpoint, tmp_path):
    reference = import_soundnet8(soundnet8_npz).state_dict()
    disguised = {"weights.bin": sound8_npy, "weights.pt": soundnet8_npz, "weights.npz": soundnet8_checkpoint}
    for name, source in disguised.items():
        (tmp_path / name).symlink_to(source)
        state = load_checkpoint(tmp_path / name).state_dict()
        assert all(torch.equal(tensor, reference[key]) for key, tensor in state.items()), name


def test_export_writes_safetensors_and_json_that_round_trip(released_home, soundnet8_npz, tmp_path, monkeypatch):
    trained = build_model(ModelConfig(arch="soundnet5", heads={"birds": 7}, sample_rate=16000))
    save_checkpoint(tmp_path / "trained.pt", trained, step=3)
    monkeypatch.setenv("SOUNDNET_HOME", str(released_home))
    for source, model in (("soundnet8", import_soundnet8(soundnet8_npz)), (str(tmp_path / "trained.pt"), trained)):
        out = tmp_path / f"{Path(source).stem}.safetensors"
        result = CliRunner().invoke(student_cli, ["export", source, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"wrote {out} and {out.with_suffix('.json')}" in result.output
        loaded = soundnet.load_model(out)
        assert loaded.config == model.config
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())

    # the layout of a model hub: weights without our metadata, the config in config.json beside them
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(trained.state_dict(), hub / "model.safetensors")
    with pytest.raises(ValueError, match="no SoundNet config.*model.json or config.json beside it"):
        load_checkpoint(hub / "model.safetensors")
    shutil.copy(tmp_path / "trained.json", hub / "config.json")
    assert load_checkpoint(hub / "model.safetensors").config == trained.config
    (hub / "config.json").write_text('{"arch": "soundnet8"}')
    with pytest.raises(ValueError, match=r"do not match.*Missing key\(s\)"):
        load_checkpoint(hub / "model.safetensors")

    result = CliRunner().invoke(student_cli, ["export", "soundnet8", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1 and "must end in .safetensors" in result.output


def test_a_safetensors_config_that_does_not_fit_is_refused_before_the_network_is_built(tmp_path):
    """A config naming a huge head beside small weights is refused on their shapes alone: the 1 GiB the head would
    take is never allocated (measured in a fresh process), and the error is one line."""
    model = build_model(ModelConfig(arch="soundnet5", heads={"birds": 7}))
    config = {**dataclasses.asdict(model.config), "heads": {"birds": 65536}}  # 65536 x 256 x 16 float32: 1 GiB
    path = tmp_path / "birds.safetensors"
    save_file(model.state_dict(), path, metadata={"format": "pt", SAFETENSORS_CONFIG: json.dumps(config)})
    code = (
        "import resource, sys\n"
        "from soundnet.student.checkpoint import load_checkpoint\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "before = peak()\n"
        "try:\n"
        f"    load_checkpoint({str(path)!r})\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
        "print(peak() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, grown_mb = done.stdout.splitlines()
    assert message.startswith(f"{path}: weights and config (from birds.safetensors) do not match: ")
    assert "size mismatch for heads.birds.weight" in message
    assert int(grown_mb) < 256
