"""Labelled sound datasets with their cross-validation folds: ESC-50/ESC-10, DCASE 2013 scenes, a class-per-folder tree.

Each loader returns a :class:`Dataset` of (path, label, fold) clips and checks that every audio file exists, so a
missing file is reported by name before any decoding starts.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus", ".aiff", ".aif")


class DatasetError(Exception):
    """A dataset folder that does not have the expected layout or files."""


@dataclass(frozen=True)
class Clip:
    path: Path
    label: int
    fold: int


@dataclass
class Dataset:
    name: str
    clips: list[Clip]
    classes: list[str]
    clip_seconds: float  # every clip is tiled (or cut) to this length before feature extraction

    @property
    def folds(self) -> list[int]:
        return sorted({clip.fold for clip in self.clips})


def _require_files(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetError(f"{len(missing)} {what} audio file(s) missing:\n  {shown}{more}")


def _find_audio(audio_dir: Path, stem: str) -> Path:
    """ESC-50 ships .wav; converted copies may be .flac (or another format) with the same stem."""
    for ext in AUDIO_EXTENSIONS:
        candidate = audio_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return audio_dir / f"{stem}.wav"


def _read_table(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """The rows of a CSV metadata file with their line numbers; a clear error for a missing or unreadable file,
    or a missing column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise DatasetError(
                    f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                    f"(it has {', '.join(map(repr, header)) or 'no header'}; expected {', '.join(columns)})"
                )
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except (OSError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read the metadata file: {exc}") from exc


def _field(path: Path, line: int, row: dict[str, str], column: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise DatasetError(f"{path}, line {line}: column {column!r} is empty")
    return value.strip()


def _int_field(path: Path, line: int, row: dict[str, str], column: str) -> int:
    value = _field(path, line, row, column)
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}, line {line}: column {column!r} must be an integer, got {value!r}") from None


def _bool_field(path: Path, line: int, row: dict[str, str], column: str) -> bool:
    value = _field(path, line, row, column).lower()
    if value not in ("true", "false"):
        raise DatasetError(f"{path}, line {line}: column {column!r} must be True or False, got {value!r}")
    return value == "true"


def _labelled(
    name: str, path: Path, entries: list[tuple[Path, int, str, int]], clip_seconds: float, what: str
) -> Dataset:
    """A dataset from ``(audio path, class id, class name, fold)`` entries; classes in class-id order, remapped
    to 0..K-1. A class id with two names is a metadata error."""
    names: dict[int, str] = {}
    for _, target, category, _ in entries:
        if names.setdefault(target, category) != category:
            raise DatasetError(f"{path}: class id {target} is named both {names[target]!r} and {category!r}")
    targets = sorted(names)
    remap = {t: i for i, t in enumerate(targets)}
    clips = [Clip(audio, remap[target], fold) for audio, target, _, fold in entries]
    _require_files([c.path for c in clips], what)
    return Dataset(name, clips, [names[t] for t in targets], clip_seconds=clip_seconds)


def load_esc(data_dir: Path, esc10: bool) -> Dataset:
    """ESC-50 layout: ``esc50.csv`` (or ``meta/esc50.csv``) and ``audio/``; ESC-10 is the ``esc10 == True`` subset.

    Folds are the dataset's own five (never reshuffled: clips of one recording stay in one fold). Class indices
    are remapped to 0..K-1 in order of the ESC-50 target.
    """
    csv_path = next((p for p in (data_dir / "esc50.csv", data_dir / "meta" / "esc50.csv") if p.is_file()), None)
    if csv_path is None:
        raise DatasetError(f"{data_dir}: no esc50.csv or meta/esc50.csv (expected the ESC-50 layout)")
    columns = ("filename", "fold", "target", "category") + (("esc10",) if esc10 else ())
    rows = _read_table(csv_path, columns)
    if esc10:
        rows = [(line, r) for line, r in rows if _bool_field(csv_path, line, r, "esc10")]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows{' with esc10 == True' if esc10 else ''}")
    audio_dir = data_dir / "audio"
    entries = [
        (
            _find_audio(audio_dir, Path(_field(csv_path, line, r, "filename")).stem),
            _int_field(csv_path, line, r, "target"),
            _field(csv_path, line, r, "category"),
            _int_field(csv_path, line, r, "fold"),
        )
        for line, r in rows
    ]
    name = "esc10" if esc10 else "esc50"
    return _labelled(name, csv_path, entries, 10.0, name)


URBANSOUND_CSV = ("UrbanSound8K.csv", "metadata/UrbanSound8K.csv")


def _urbansound_csv(data_dir: Path) -> Path | None:
    return next((data_dir / name for name in URBANSOUND_CSV if (data_dir / name).is_file()), None)


def load_urbansound8k(data_dir: Path) -> Dataset:
    """UrbanSound8K as distributed: ``metadata/UrbanSound8K.csv`` (or ``UrbanSound8K.csv``; columns
    ``slice_file_name``, ``fold``, ``classID``, ``class``) and ``audio/fold<N>/<slice_file_name>``.

    Its ten predefined folds are used as they are (slices of one recording share a fold). Clips are at most 4 s;
    shorter ones are tiled to 4 s.
    """
    csv_path = _urbansound_csv(data_dir)
    if csv_path is None:
        raise DatasetError(f"{data_dir}: no metadata/UrbanSound8K.csv or UrbanSound8K.csv (the UrbanSound8K layout)")
    rows = _read_table(csv_path, ("slice_file_name", "fold", "classID", "class"))
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    entries = []
    for line, r in rows:
        fold = _int_field(csv_path, line, r, "fold")
        audio = data_dir / "audio" / f"fold{fold}" / _field(csv_path, line, r, "slice_file_name")
        entries.append((audio, _int_field(csv_path, line, r, "classID"), _field(csv_path, line, r, "class"), fold))
    return _labelled("urbansound8k", csv_path, entries, 4.0, "urbansound8k")


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def _round_robin_folds(labels: list[int], num_folds: int) -> list[int]:
    """Stratified, deterministic folds: the i-th file of each class (in name order) goes to fold i mod K + 1."""
    seen: dict[int, int] = {}
    folds = []
    for label in labels:
        folds.append(seen.get(label, 0) % num_folds + 1)
        seen[label] = seen.get(label, 0) + 1
    return folds


def _read_fold_csv(data_dir: Path, files: list[Path]) -> list[int] | None:
    """An optional ``folds.csv`` (columns ``filename,fold``) fixes the folds of any folder dataset."""
    fold_csv = data_dir / "folds.csv"
    if not fold_csv.is_file():
        return None
    table = {
        _field(fold_csv, line, row, "filename"): _int_field(fold_csv, line, row, "fold")
        for line, row in _read_table(fold_csv, ("filename", "fold"))
    }
    folds = []
    for path in files:
        key = next((k for k in (path.name, str(path.relative_to(data_dir))) if k in table), None)
        if key is None:
            raise DatasetError(f"{fold_csv} has no fold for {path.relative_to(data_dir)}")
        folds.append(table[key])
    return folds


def load_dcase2013(data_dir: Path, num_folds: int = 5) -> Dataset:
    """DCASE 2013 acoustic scenes: files named ``<scene><NN>.wav`` (``bus01.wav``) anywhere under ``data_dir``.

    The class is the name without its trailing number. Folds come from ``folds.csv`` when present, otherwise
    stratified round-robin in file-number order (10 clips per class -> 2 per class per fold). Clips are 30 s
    and are used whole.
    """
    files = _audio_files(data_dir)
    if not files:
        raise DatasetError(f"{data_dir}: no audio files (expected DCASE 2013 scenes such as bus01.wav)")
    pattern = re.compile(r"^([A-Za-z_]+?)_?(\d+)$")
    scenes = []
    for path in files:
        match = pattern.match(path.stem)
        if not match:
            raise DatasetError(f"{path}: name is not <scene><number> (DCASE 2013 layout)")
        scenes.append(match.group(1).lower())
    classes = sorted(set(scenes))
    labels = [classes.index(s) for s in scenes]
    folds = _read_fold_csv(data_dir, files) or _round_robin_folds(labels, num_folds)
    clips = [Clip(p, y, k) for p, y, k in zip(files, labels, folds)]
    return Dataset("dcase", clips, classes, clip_seconds=30.0)


def load_folder(data_dir: Path, num_folds: int = 5) -> Dataset:
    """A generic tree ``data_dir/<class>/<audio files>``; folds from ``folds.csv`` or stratified round-robin.

    A folder holding UrbanSound8K's metadata file is read as UrbanSound8K (its own folds and classes).
    """
    if _urbansound_csv(data_dir) is not None:
        return load_urbansound8k(data_dir)
    class_dirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    empty = []
    for label, class_dir in enumerate(class_dirs):
        found = _audio_files(class_dir)
        if not found:
            empty.append(class_dir)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise DatasetError(
            f"{data_dir}: expected one sub-folder of audio files ({', '.join(AUDIO_EXTENSIONS)}) per class"
        )
    if empty:
        raise DatasetError(
            f"{data_dir}: class folder(s) without audio files: {', '.join(str(p) for p in empty)} "
            "(remove them or add their clips)"
        )
    folds = _read_fold_csv(data_dir, files) or _round_robin_folds(labels, num_folds)
    clips = [Clip(p, y, k) for p, y, k in zip(files, labels, folds)]
    return Dataset("folder", clips, [d.name for d in class_dirs], clip_seconds=10.0)


LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "esc10": lambda d: load_esc(d, esc10=True),
    "esc50": lambda d: load_esc(d, esc10=False),
    "dcase": load_dcase2013,
    "folder": load_folder,
    "urbansound8k": load_urbansound8k,
}


def load_dataset(name: str, data_dir: str | Path) -> Dataset:
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data directory not found: {data_dir}")
    return LOADERS[name](data_dir)
