"""`student embed`: embeddings of any layer for audio and video files, one parquet row per input file.

Inputs are files, folders (searched recursively for audio and video files) and list files (``.txt``/``.lst``: one
path per line; ``.csv``/``.parquet``: a ``path`` column). A file that cannot be read becomes a row with an
``error`` and is named in the summary; it never stops the run.

Decoding runs in worker processes (:mod:`soundnet.student.embed_decode`) a few files ahead of the network, which
runs here: short files of equal length share a batch, a long file streams through the chunked pass
(:func:`soundnet.api.embed_stream`) as it decodes, so memory does not grow with its length. Rows go to one file or
to a folder of parts that ``--resume`` completes (:mod:`soundnet.student.embed_parts`).

PyAV (:mod:`soundnet.audio`) is imported only when files are read, so that importing the ``student`` command line
(for training) keeps decoding code out of the process.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from soundnet.api import (
    CHUNK_SECONDS,
    DEFAULT_LAYER,
    embed_many,
    embed_stream,
    layer_width,
    load_model,
    receptive_field,
    step_times,
)
from soundnet.shards.contract import AUDIO_SCALE, SAMPLE_RATE
from soundnet.student.embed_decode import Block, Decoders, End, Failed, Message
from soundnet.student.embed_parts import (
    PART_ROWS,
    Result,
    Slice,
    failures,
    is_folder_output,
    manifest,
    open_folder,
    part_path,
    schema,
    write_rows,
)
from soundnet.student.model import SoundNet
from soundnet.weights import MODEL_HELP

AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".aifc", ".au",
    ".snd", ".caf", ".mka", ".ac3", ".amr", ".ape", ".wv",
)  # fmt: skip
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv", ".parquet", ".pq")
DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


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


def _float(samples: np.ndarray) -> np.ndarray:
    """int16 samples in [-1, 1) as float32, the shard convention (:meth:`soundnet.audio.DecodedAudio.as_float`)."""
    return samples.astype(np.float32) / AUDIO_SCALE


def embed_files(
    files: Iterable[tuple[str, Iterator[Message]]], model: SoundNet, layer: str, scene: bool, chunk_seconds: float
) -> Iterator[Result]:
    """One :class:`Result` per file, in order, from each file's decoded messages; failures are results with an
    ``error``.

    Files of up to ``chunk_seconds`` are gathered a window at a time (up to ``chunk_seconds`` of audio) and embedded
    together, so that clips of equal length share a batch; a longer file streams through the chunked pass.
    """
    budget = int(chunk_seconds * SAMPLE_RATE)
    long = max(budget, model.min_input_samples(layer))  # longer files stream (shorter ones may need tiling)
    window: list[Result] = []
    waveforms: list[np.ndarray] = []

    def flush() -> Iterator[Result]:
        outputs = iter(embed_many(model, waveforms, layer, chunk_seconds))
        for result in window:
            if result.error is None:
                result.embeddings, result.timestamps = next(outputs)
                if scene:
                    result.embeddings = result.embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)
                    result.timestamps = None
            yield result
        window.clear()
        waveforms.clear()

    for path, messages in files:
        head: list[np.ndarray] = []
        have = 0
        for message in messages:  # up to the file's end, or until it is known to be long
            if not isinstance(message, Block):
                break
            head.append(message.samples)
            have += len(message.samples)
            if have > long:
                break
        if isinstance(message, Failed):
            window.append(Result(path, error=message.error))
        elif isinstance(message, End):
            if waveforms and sum(map(len, waveforms)) + have > budget:
                yield from flush()
            window.append(Result(path, message.seconds))
            waveforms.append(_float(np.concatenate(head)))
        else:
            yield from flush()
            yield _embed_long(path, itertools.chain(map(Block, head), messages), model, layer, scene, chunk_seconds)
    yield from flush()


class _FileFailed(Exception):
    pass


def _embed_long(
    path: str, messages: Iterator[Message], model: SoundNet, layer: str, scene: bool, chunk_seconds: float
) -> Result:
    """A long file through :func:`embed_stream` as it decodes: its pieces, or with ``scene`` their running sum."""
    end: list[End] = []

    def blocks() -> Iterator[np.ndarray]:
        for message in messages:
            if isinstance(message, Block):
                yield _float(message.samples)
            elif isinstance(message, Failed):
                raise _FileFailed(message.error)
            else:
                end.append(message)

    pieces: list[np.ndarray] = []
    total: np.ndarray | float = 0.0
    steps = 0
    try:
        for piece in embed_stream(model, blocks(), layer, chunk_seconds):
            steps += len(piece)
            if scene:
                total = total + piece.sum(axis=0, dtype=np.float64)
            else:
                pieces.append(piece)
    except _FileFailed as exc:
        return Result(path, error=str(exc))
    if scene:
        return Result(path, end[0].seconds, (total / steps).astype(np.float32))
    return Result(path, end[0].seconds, np.concatenate(pieces), step_times(model, layer, steps))


@click.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", required=True, help=MODEL_HELP)
@click.option("--layer", default=DEFAULT_LAYER, show_default=True, help="conv1..conv7, pool1/2/5 or a head.")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="A .parquet file, or a folder of parts (part-NNNNNN.parquet and _manifest.json) that --resume completes.",
)
@click.option("--scene", is_flag=True, help="One vector per file: the mean over time.")
@click.option("--resume", is_flag=True, help="Finish the run in the folder --out: write only the missing parts.")
@click.option("--part", default="1/1", show_default=True, help="I/N: write slice I of N only (parts k = I-1 mod N).")
@click.option("--part-rows", type=click.IntRange(min=1), default=PART_ROWS, show_default=True, help="Files per part.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Decoding processes (0: decode in this process).",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda when present, else cpu]")
@click.option("--bf16", is_flag=True, help="Run the network in bfloat16 autocast (GPUs; about 3 significant digits).")
@click.option(
    "--chunk-seconds",
    type=click.FloatRange(min=1),
    default=CHUNK_SECONDS,
    show_default=True,
    help="Audio per forward pass (larger batches of short clips; more memory).",
)
def embed_command(
    inputs: tuple[str, ...],
    checkpoint: str,
    layer: str,
    out: Path,
    scene: bool,
    resume: bool,
    part: str,
    part_rows: int,
    workers: int,
    device: str | None,
    bf16: bool,
    chunk_seconds: float,
) -> None:
    """Embed audio/video files (or folders, or list files) with a SoundNet layer into one parquet row per file.

    Rows: path, seconds, timestamps (receptive-field centres, s) and embeddings [T, D] (--scene: embedding [D]),
    error (null unless the file could not be read). Unreadable files are rows with an error, never fatal; the exit
    status is 1 when no file could be embedded.
    """
    from soundnet.student.distributed import weights_digest

    slice_ = Slice.parse(part)
    folder = is_folder_output(out)
    if not folder and (resume or slice_.count > 1):
        raise click.ClickException(f"--resume and --part need --out DIR (a folder of parts), not the file {out}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = list_inputs(inputs)
    if not paths:
        raise click.ClickException(f"no inputs: {' '.join(inputs)} list no files")
    with Decoders(min(workers, len(paths))) as decoders:  # the workers start up while the model loads
        try:
            model = load_model(checkpoint, device)
            field = receptive_field(model, layer)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from exc
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
        options = {**metadata, "bf16": bf16, "weights_sha256": weights_digest(model)}
        plan, written = _plan(out, paths, part_rows, options, slice_, resume)
        todo_paths = [paths[i] for _, rows in plan for i in rows]
        waited = [0.0]
        decoded = zip(todo_paths, (_timed(messages, waited) for messages in decoders.files(todo_paths)))
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
        start = time.perf_counter()
        with autocast, tqdm(total=len(todo_paths), unit="file") as progress:
            for target, rows in plan:
                results = embed_files(itertools.islice(decoded, len(rows)), model, layer, scene, chunk_seconds)
                write_rows(target, _counted(results, progress), schema(width, scene, metadata), resumable=folder)
    if todo_paths:
        took = time.perf_counter() - start
        click.echo(
            f"{len(todo_paths)} files in {took:.1f} s ({len(todo_paths) / took:.1f} files/s): waiting for decoded "
            f"audio {waited[0]:.1f} s{' (decoding here, --workers 0)' if not workers else ''}, network and writing "
            f"{took - waited[0]:.1f} s"
        )
    _summarise(written, len(plan), layer, width, out, folder and resume)


def _plan(
    out: Path, paths: list[str], part_rows: int, options: dict, slice_: Slice, resume: bool
) -> tuple[list[tuple[Path, range]], list[Path]]:
    """The files this run writes, each with the rows of ``paths`` it holds, and all the files of its output."""
    if not is_folder_output(out):
        return [(out, range(len(paths)))], [out]
    mine, todo = open_folder(out, manifest(paths, part_rows, options), slice_, resume)
    plan = [(part_path(out, k), range(k * part_rows, min((k + 1) * part_rows, len(paths)))) for k in todo]
    return plan, [part_path(out, k) for k in mine]


def _timed(messages: Iterator[Message], waited: list[float]) -> Iterator[Message]:
    """``messages``, adding the time spent waiting for each to ``waited[0]``: decoding that keeps the network
    waiting (more --workers help), or with --workers 0 the decoding itself."""
    while True:
        start = time.perf_counter()
        message = next(messages, None)
        waited[0] += time.perf_counter() - start
        if message is None:
            return
        yield message


def _counted(results: Iterator[Result], progress: tqdm) -> Iterator[Result]:
    failed = 0
    for result in results:
        failed += result.error is not None
        progress.update()
        if failed:
            progress.set_postfix(failed=failed, refresh=False)
        yield result


def _summarise(files: list[Path], new: int, layer: str, width: int, out: Path, resumed: bool) -> None:
    """What the output holds now (read back: a resumed run counts the parts written before it too)."""
    rows, failed = failures(files)
    if resumed:
        click.echo(f"resumed: {len(files) - new} of {len(files)} parts were there already; wrote {new}")
    click.echo(f"embedded {rows - len(failed)} of {rows} files with {layer} ({width}-d) -> {out}")
    if failed:
        click.echo(f"{len(failed)} could not be read (rows with an error in {out}):")
        for path, error in failed:
            click.echo(f"  {path}: {error}")
    if rows and len(failed) == rows:
        raise click.ClickException(f"no input could be embedded: all {rows} files failed (errors above)")
