"""`student embed`: embeddings of any layer for audio and video files, one parquet row per input file.

Inputs are files, folders (searched recursively for audio and video files) and list files (``.txt``/``.lst``: one
path per line; ``.csv``/``.parquet``: a ``path`` column). A file that cannot be read becomes a row with an
``error`` and is named in the summary; it never stops the run.

PyAV (:mod:`soundnet.audio`) is imported only when files are read, so that importing the ``student`` command line
(for training) keeps decoding code out of the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from soundnet.api import CHUNK_SECONDS, DEFAULT_LAYER, embed_many, layer_width, load_model, receptive_field
from soundnet.shards.atomic import atomic_path
from soundnet.shards.contract import SAMPLE_RATE
from soundnet.student.model import SoundNet
from soundnet.weights import MODEL_HELP, resolve

AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".aifc", ".au",
    ".snd", ".caf", ".mka", ".ac3", ".amr", ".ape", ".wv",
)  # fmt: skip
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv", ".parquet", ".pq")
ROWS_PER_GROUP = 64
BYTES_PER_GROUP = 256 << 20  # a row group is written when either bound is reached (deep layers of long files)


@dataclass
class Result:
    path: str
    seconds: float | None = None
    embeddings: np.ndarray | None = None  # [T, D], or [D] with --scene
    timestamps: np.ndarray | None = None  # [T] seconds
    error: str | None = None


def list_inputs(specs: tuple[str, ...]) -> list[str]:
    """Every media file named by ``specs``, folders expanded (sorted) and list files read, in order."""
    from soundnet.ingest.inputs import VIDEO_EXTENSIONS, InputListError, read_video_list

    media = AUDIO_EXTENSIONS + VIDEO_EXTENSIONS
    paths: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in media and p.is_file())
            if not found:
                raise click.ClickException(f"{spec}: folder holds no audio or video files ({', '.join(media)})")
            paths += found
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            try:
                paths += [item.source for item in read_video_list(path)]
            except (InputListError, OSError, pa.ArrowException) as exc:
                raise click.ClickException(f"list file {spec}: {exc}") from exc
        else:
            paths.append(spec)  # a media file; a missing one becomes an error row
    return paths


def embed_files(paths: list[str], model: SoundNet, layer: str, scene: bool, chunk_seconds: float) -> Iterator[Result]:
    """One :class:`Result` per path, in order; decoding failures are results with an ``error``.

    Files are decoded a window at a time (up to ``chunk_seconds`` of audio, or one longer file) and embedded
    together, so that clips of equal length share a batch.
    """
    from soundnet.audio import read_audio
    from soundnet.media import DecodeError

    budget = int(chunk_seconds * SAMPLE_RATE)
    window: list[Result] = []
    waveforms: list[np.ndarray] = []

    def flush() -> Iterator[Result]:
        outputs = iter(embed_many(model, waveforms, layer, chunk_seconds))
        for result in window:
            if result.error is None:
                result.embeddings, result.timestamps = next(outputs)
                if scene:
                    result.embeddings, result.timestamps = result.embeddings.mean(axis=0), None
            yield result
        window.clear()
        waveforms.clear()

    for path in paths:
        try:
            audio = read_audio(path)
        except DecodeError as exc:
            window.append(Result(path, error=f"{exc.reason}: {exc.message}"))
            continue
        if waveforms and sum(map(len, waveforms)) + len(audio.samples) > budget:
            yield from flush()
        window.append(Result(path, audio.seconds))
        waveforms.append(audio.as_float())
        del audio  # the int16 copy: a long file's waveform is the largest thing in memory
    yield from flush()


def _schema(width: int, scene: bool, metadata: dict) -> pa.Schema:
    vector = pa.list_(pa.float32(), width)
    fields = [pa.field("path", pa.string()), pa.field("seconds", pa.float64())]
    if scene:
        fields.append(pa.field("embedding", vector))
    else:
        fields += [pa.field("timestamps", pa.list_(pa.float64())), pa.field("embeddings", pa.list_(vector))]
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={"soundnet": json.dumps(metadata)})


def _table(results: list[Result], schema: pa.Schema, width: int, scene: bool) -> pa.Table:
    """Arrow columns built from whole numpy arrays (a ten-minute conv1 output is 100 M floats: no Python lists)."""
    ok = [r for r in results if r.error is None]
    missing = pa.array([r.error is not None for r in results])
    columns = {
        "path": pa.array([r.path for r in results], pa.string()),
        "seconds": pa.array([r.seconds for r in results], pa.float64()),
        "error": pa.array([r.error for r in results], pa.string()),
    }
    flat = np.concatenate([r.embeddings.reshape(-1) for r in ok]) if ok else np.zeros(0, np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    if scene:
        columns["embedding"] = _with_nulls(vectors, missing)
    else:
        counts = [0 if r.error else len(r.timestamps) for r in results]
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        times = np.concatenate([r.timestamps for r in ok]) if ok else np.zeros(0)
        columns["timestamps"] = pa.ListArray.from_arrays(offsets, pa.array(times, pa.float64()), mask=missing)
        columns["embeddings"] = pa.ListArray.from_arrays(offsets, vectors, mask=missing)
    return pa.table([columns[name] for name in schema.names], schema=schema)


def _with_nulls(vectors: pa.FixedSizeListArray, missing: pa.Array) -> pa.Array:
    """One vector per row, null where the row failed (``vectors`` holds the successful rows in order)."""
    is_missing = missing.to_numpy(zero_copy_only=False)
    index = np.cumsum(~is_missing) - 1
    return vectors.take(pa.array(np.where(is_missing, None, index), pa.int64(), from_pandas=True))


@click.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", required=True, help=MODEL_HELP)
@click.option("--layer", default=DEFAULT_LAYER, show_default=True, help="conv1..conv7, pool1/2/5 or a head.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Parquet file to write.")
@click.option("--scene", is_flag=True, help="One vector per file: the mean over time.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--chunk-seconds",
    type=click.FloatRange(min=1),
    default=CHUNK_SECONDS,
    show_default=True,
    help="Audio per forward pass.",
)
def embed_command(
    inputs: tuple[str, ...], checkpoint: str, layer: str, out: Path, scene: bool, device: str, chunk_seconds: float
) -> None:
    """Embed audio/video files (or folders, or list files) with a SoundNet layer into one parquet row per file.

    Rows: path, seconds, timestamps (receptive-field centres, s) and embeddings [T, D] (--scene: embedding [D]),
    error (null unless the file could not be read). Unreadable files are rows with an error, never fatal.
    """
    try:
        model_file = resolve(checkpoint)
        model = load_model(model_file, device)
        field = receptive_field(model, layer)
    except (ValueError, KeyError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    paths = list_inputs(inputs)
    width = layer_width(model, layer)
    metadata = {
        "checkpoint": os.path.abspath(checkpoint) if os.path.exists(checkpoint) else checkpoint,  # a path or a name
        "layer": layer,
        "arch": model.config.arch,
        "sample_rate": model.config.sample_rate,
        "hop_seconds": field.stride / model.config.sample_rate,
        "field_seconds": field.size / model.config.sample_rate,
        "scene": scene,
    }
    schema = _schema(width, scene, metadata)
    failures: list[Result] = []
    done = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        pending: list[Result] = []
        progress = tqdm(embed_files(paths, model, layer, scene, chunk_seconds), total=len(paths), unit="file")
        for result in progress:
            pending.append(result)
            if result.error:
                failures.append(result)
                progress.set_postfix(failed=len(failures))
            else:
                done += 1
            held = sum(r.embeddings.nbytes for r in pending if r.embeddings is not None)
            if len(pending) == ROWS_PER_GROUP or held >= BYTES_PER_GROUP:
                writer.write_table(_table(pending, schema, width, scene))
                pending = []
        if pending:
            writer.write_table(_table(pending, schema, width, scene))
    click.echo(f"embedded {done} of {len(paths)} files with {layer} ({width}-d) -> {out}")
    if failures:
        click.echo(f"{len(failures)} could not be read (rows with an error in {out}):")
        for result in failures:
            click.echo(f"  {result.path}: {result.error}")
