"""The shard sample format shared by ingest (writer) and student (reader).

Everything a stage needs to agree on lives here: member names, dtypes, the key rule, and a validator that says
in words what is wrong with a sample, so a bad sample is caught when it is written rather than when it is
trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from soundnet.shards.contract import SAMPLE_RATE

AUDIO_MEMBER = "audio.npy"
META_MEMBER = "json"
TEACHER_SUFFIX = ".npy"
AUDIO_DTYPE = np.dtype(np.int16)
POSTERIOR_DTYPE = np.dtype(np.float16)
"""Every teacher's rows are float16, whatever their kind."""

POSTERIOR = "posterior"
"""A teacher kind: each row is a log-softmax over the teacher's classes; the student learns it by KL."""
EMBEDDING = "embedding"
"""A teacher kind: each row is an image tower's pooled feature, L2-normalised; the student learns it by cosine."""
TEACHER_KINDS = (POSTERIOR, EMBEDDING)

REQUIRED_META_KEYS = ("source", "duration_s", "frame_times_s", "teachers", "tool_version")
TEACHER_META_KEYS = ("arch", "weights", "sha256")
WIDTH_KEYS = {POSTERIOR: "classes", EMBEDDING: "dim"}
"""The meta key that gives a teacher's row width: a posterior's class count, an embedding's dimension."""

MAX_KEY_LEN = 64
"""Keeps ``<key>.<teacher>.npy`` under the 100-character member name limit of the ustar tar format."""
KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
TEACHER_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,29}")
"""Lower case because WebDataset lower-cases member suffixes on read; ``audio`` is reserved."""

LOGSUMEXP_TOL = 0.01
"""Allowed |logsumexp| of a float16 log-softmax row: rounding costs < 1e-3; probabilities or logits miss."""
UNIT_NORM_TOL = 0.01
"""Allowed |norm - 1| of a float16 embedding row: rounding costs < 1e-3; an unnormalised feature misses."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HASH_CHARS = 10


def make_key(source: str, explicit_id: str | None = None) -> str:
    """Return ``source``'s sample key: a readable stem plus 10 hex chars of sha1 of the whole source string.

    The hash makes keys unique for different sources with the same file name and stable across runs, so a
    resumed or repeated ingest gives the same keys. An ``explicit_id`` (e.g. a YouTube id from the video list)
    is used unchanged after stripping surrounding whitespace; it is rejected rather than rewritten, because
    rewriting could silently merge two distinct ids.
    """
    if explicit_id is not None:
        key = explicit_id.strip()
        if not KEY_RE.fullmatch(key) or len(key) > MAX_KEY_LEN:
            raise ValueError(f"explicit id {explicit_id!r} is not a valid key: use 1..{MAX_KEY_LEN} of [A-Za-z0-9_-]")
        return key
    name = re.split(r"[/\\]", source.rstrip("/\\"))[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[: MAX_KEY_LEN - _HASH_CHARS - 1] or "clip"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    return f"{stem}-{digest}"


def teacher_kind(info: dict[str, Any]) -> str:
    """A teacher's kind as its meta records it; shards written before embeddings existed hold posteriors only."""
    return info.get("kind", POSTERIOR)


def teacher_width(info: dict[str, Any]) -> int:
    """The width of a teacher's rows: ``classes`` for a posterior, ``dim`` for an embedding (KeyError if absent)."""
    return int(info[WIDTH_KEYS[teacher_kind(info)]])


@dataclass
class Sample:
    """One clip: int16 waveform at SAMPLE_RATE, per-teacher float16 rows [F, C] (log-softmax for a posterior
    teacher, a unit vector for an embedding teacher: the teacher's meta says which), and metadata."""

    key: str
    audio: np.ndarray
    posteriors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        """Number of labelled frames F (0 if there are no teachers)."""
        return next(iter(self.posteriors.values())).shape[0] if self.posteriors else 0

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_meta(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return [f"meta is {type(meta).__name__}, expected dict"]
    problems = [f"meta lacks {name!r}" for name in REQUIRED_META_KEYS if name not in meta]
    if "source" in meta and not (isinstance(meta["source"], str) and meta["source"]):
        problems.append("meta 'source' must be a non-empty string")
    if "duration_s" in meta and not (_is_number(meta["duration_s"]) and meta["duration_s"] > 0):
        problems.append(f"meta 'duration_s' must be a positive finite number, got {meta['duration_s']!r}")
    if "tool_version" in meta and not (isinstance(meta["tool_version"], str) and meta["tool_version"]):
        problems.append("meta 'tool_version' must be a non-empty string")
    times = meta.get("frame_times_s")
    if "frame_times_s" in meta and not (isinstance(times, list) and all(_is_number(t) and t >= 0 for t in times)):
        problems.append("meta 'frame_times_s' must be a list of non-negative finite numbers")
    teachers = meta.get("teachers")
    if "teachers" in meta and not isinstance(teachers, dict):
        problems.append("meta 'teachers' must be an object {name: {arch, weights, classes, sha256}}")
    elif isinstance(teachers, dict):
        for name, info in teachers.items():
            if not isinstance(info, dict):
                problems.append(f"meta teachers[{name!r}] must be an object")
                continue
            kind = teacher_kind(info)
            if kind not in TEACHER_KINDS:
                problems.append(f"meta teachers[{name!r}]['kind'] must be one of {TEACHER_KINDS}, got {kind!r}")
                continue
            keys = (*TEACHER_META_KEYS, WIDTH_KEYS[kind])
            problems += [f"meta teachers[{name!r}] lacks {k!r}" for k in keys if k not in info]
            for k in ("arch", "weights"):
                if k in info and not (isinstance(info[k], str) and info[k]):
                    problems.append(f"meta teachers[{name!r}][{k!r}] must be a non-empty string")
            for k, what in (("classes", "a class count"), ("dim", "a dimension")):
                value = info.get(k)
                if k in info and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                    problems.append(f"meta teachers[{name!r}][{k!r}] must be {what}, got {value!r}")
            if "sha256" in info and not (isinstance(info["sha256"], str) and _SHA256_RE.fullmatch(info["sha256"])):
                problems.append(f"meta teachers[{name!r}]['sha256'] must be 64 lower-case hex digits")
    return problems


def _validate_rows(name: str, arr: Any, kind: str) -> list[str]:
    """Problems with teacher ``name``'s rows: float16 [F, C], finite, and log-softmax or unit rows by ``kind``."""
    if not TEACHER_NAME_RE.fullmatch(str(name)) or name == "audio":
        return [f"teacher name {name!r} must match {TEACHER_NAME_RE.pattern} and not be 'audio'"]
    if not isinstance(arr, np.ndarray):
        return [f"posteriors[{name!r}] is {type(arr).__name__}, expected numpy array"]
    if arr.dtype != POSTERIOR_DTYPE:
        return [f"posteriors[{name!r}] dtype is {arr.dtype}, expected {POSTERIOR_DTYPE}"]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        return [f"posteriors[{name!r}] shape is {arr.shape}, expected [F>=1, C>=1]"]
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        return [f"posteriors[{name!r}] has non-finite values"]
    if kind == EMBEDDING:
        norms = np.linalg.norm(values, axis=1)
        worst = int(np.abs(norms - 1).argmax())
        if abs(norms[worst] - 1) > UNIT_NORM_TOL:
            return [
                f"posteriors[{name!r}] row {worst} has norm {norms[worst]:.4g}, expected 1 "
                "(embedding rows must be L2-normalised)"
            ]
        return []
    top = values.max(axis=1)
    lse = top + np.log(np.exp(values - top[:, None]).sum(axis=1))
    worst = int(np.abs(lse).argmax())
    if abs(lse[worst]) > LOGSUMEXP_TOL:
        return [
            f"posteriors[{name!r}] row {worst} has logsumexp {lse[worst]:.4g}, expected 0 "
            "(rows must be log-softmax, not probabilities or logits)"
        ]
    return []


def validate_sample(sample: Sample) -> list[str]:
    """Return every problem with ``sample`` as a readable sentence; an empty list means it is fit to write."""
    problems: list[str] = []
    if not (isinstance(sample.key, str) and KEY_RE.fullmatch(sample.key) and len(sample.key) <= MAX_KEY_LEN):
        problems.append(f"key {sample.key!r} must be 1..{MAX_KEY_LEN} characters of [A-Za-z0-9_-]")
    audio = sample.audio
    if not isinstance(audio, np.ndarray):
        problems.append(f"audio is {type(audio).__name__}, expected numpy array")
    elif audio.dtype != AUDIO_DTYPE:
        problems.append(f"audio dtype is {audio.dtype}, expected {AUDIO_DTYPE}")
    elif audio.ndim != 1 or audio.size == 0:
        problems.append(f"audio shape is {audio.shape}, expected non-empty [T]")
    if not isinstance(sample.posteriors, dict) or not sample.posteriors:
        problems.append("posteriors must be a non-empty dict {teacher: float16 [F, C]}")
        posteriors: dict[str, Any] = {}
    else:
        posteriors = sample.posteriors
    meta = sample.meta if isinstance(sample.meta, dict) else {}
    teachers_meta = meta.get("teachers")
    infos = teachers_meta if isinstance(teachers_meta, dict) else {}
    bad_teachers = set()
    for name, arr in posteriors.items():
        info = infos.get(name)
        found = _validate_rows(name, arr, teacher_kind(info) if isinstance(info, dict) else POSTERIOR)
        problems += found
        if found:
            bad_teachers.add(name)
    problems += _validate_meta(sample.meta)
    good = {name: arr for name, arr in posteriors.items() if name not in bad_teachers}
    frame_counts = {name: arr.shape[0] for name, arr in good.items()}
    if len(set(frame_counts.values())) > 1:
        problems.append(f"teachers disagree on the number of frames F: {frame_counts}")
    times = meta.get("frame_times_s")
    if isinstance(times, list) and frame_counts and any(f != len(times) for f in frame_counts.values()):
        problems.append(f"len(frame_times_s) is {len(times)} but posteriors have F={frame_counts}")
    if isinstance(teachers_meta, dict):
        if set(teachers_meta) != set(posteriors):
            problems.append(
                f"meta teachers {sorted(teachers_meta)} do not match posterior members {sorted(posteriors)}"
            )
        for name, arr in good.items():
            info = teachers_meta.get(name)
            for k, unit in (("classes", "classes"), ("dim", "dimensions")):
                width = info.get(k) if isinstance(info, dict) else None
                if isinstance(width, int) and width != arr.shape[1]:
                    problems.append(f"posteriors[{name!r}] has C={arr.shape[1]} but meta says {width} {unit}")
    return problems


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Turn a sample into the WebDataset dict ``{'__key__', member suffix: bytes}`` a TarWriter stores."""
    raw: dict[str, Any] = {"__key__": sample.key, AUDIO_MEMBER: _npy_bytes(sample.audio)}
    for name, arr in sample.posteriors.items():
        raw[name + TEACHER_SUFFIX] = _npy_bytes(arr)
    raw[META_MEMBER] = json.dumps(sample.meta, sort_keys=True, allow_nan=False).encode("utf-8")
    return raw


def member_digests(raw: dict[str, Any]) -> dict[str, str]:
    """Return ``{member suffix: sha256 hex}`` for every member of a raw sample (``__key__``-style fields excluded).

    Recorded by the writer in the index and recomputed by ``shards verify`` from the tar, so that any change to
    a member after writing (negated audio, swapped posterior columns, a zeroed block) is caught and named.
    """
    return {
        member: hashlib.sha256(data).hexdigest() for member, data in sorted(raw.items()) if not member.startswith("__")
    }


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_npy(data: Any, key: str, member: str) -> np.ndarray:
    """Parse a .npy member without ever unpickling; every failure names the sample and member in plain words.

    The header is checked against the data length before numpy reads the array, so a damaged header cannot make
    it allocate a huge array, and trailing bytes are an error rather than ignored.
    """
    where = f"sample {key!r}: member {member!r} is not a readable .npy array"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where} (it is {type(data).__name__}, not bytes)")
    stream = io.BytesIO(data)
    if stream.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
        raise ValueError(f"{where} (its {len(data)} bytes do not start with the .npy header)")
    stream.seek(0)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = _NPY_HEADER_READERS[version](stream)
    except Exception as exn:  # numpy parses the header with ast/tokenize: damaged bytes raise many kinds
        detail = ascii(str(exn))[1:-1]  # the header text may be damaged bytes: keep the message printable
        raise ValueError(f"{where} (bad header: {detail[:100]})") from exn
    if dtype.hasobject:  # numpy's own message would advise allow_pickle: never for data read from a shard
        raise ValueError(f"{where} (it holds pickled Python objects, which shards never store)")
    needed = math.prod(shape) * dtype.itemsize
    have = len(data) - stream.tell()
    if have != needed:
        raise ValueError(f"{where} (header says {dtype} {shape}: {needed} bytes of data, found {have})")
    stream.seek(0)
    return np.lib.format.read_array(stream, allow_pickle=False)


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Rebuild a Sample from a raw WebDataset dict (as yielded by any wds pipeline before decoding).

    Members other than ``audio.npy``, ``<teacher>.npy`` and ``json`` are ignored so that older readers keep
    working when the format gains members. Raises ValueError naming the key and member when a member is
    missing or broken. Structural checks only; run ``validate_sample`` for the content.
    """
    key = raw.get("__key__")
    if not isinstance(key, str):
        raise ValueError(f"raw sample has no '__key__' (members: {sorted(raw)})")
    for member in (AUDIO_MEMBER, META_MEMBER):
        if member not in raw:
            raise ValueError(f"sample {key!r} lacks member {member!r} (members: {sorted(raw)})")
    audio = _load_npy(raw[AUDIO_MEMBER], key, AUDIO_MEMBER)
    posteriors = {
        member[: -len(TEACHER_SUFFIX)]: _load_npy(data, key, member)
        for member, data in sorted(raw.items())
        if member.endswith(TEACHER_SUFFIX) and member != AUDIO_MEMBER and not member.startswith("_")
    }
    try:
        meta = json.loads(raw[META_MEMBER])
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"sample {key!r}: member {META_MEMBER!r} is not valid UTF-8 JSON ({exn})") from exn
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key!r}: member {META_MEMBER!r} is {type(meta).__name__}, expected an object")
    return Sample(key=key, audio=audio, posteriors=posteriors, meta=meta)
