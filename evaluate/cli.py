"""`evaluate`: features from a named layer of a SoundNet checkpoint, scored with the paper's SVM protocol."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from soundnet.evaluate.datasets import LOADERS, DatasetError
from soundnet.evaluate.protocol import C_GRID, DEFAULT_C, SVMConfig
from soundnet.weights import MODEL_HELP, resolve

POSITIVE = click.FloatRange(min=0, min_open=True)


def _data_options(command):
    """Options every command that embeds a dataset takes: what to run, on which clips, where, with which cache."""
    options = [
        click.option("--checkpoint", required=True, help=MODEL_HELP),
        click.option(
            "--dataset",
            required=True,
            type=click.Choice(sorted(LOADERS)),
            help="Dataset layout and fold rule (folder: one sub-folder per class, or UrbanSound8K's metadata).",
        ),
        click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False)),
        click.option(
            "--clip-seconds",
            type=POSITIVE,
            help="Tile/cut clips to this length [default: ESC 10 s, DCASE 30 s, UrbanSound8K 4 s, folder 10 s].",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Decoding threads."),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Feature cache folder [default: ~/.cache/soundnet/features, or $SOUNDNET_CACHE/features].",
        ),
        click.option("--no-cache", is_flag=True, help="Neither read nor write cached features."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _cache(cache_dir: Path | None, no_cache: bool):
    from soundnet.evaluate.cache import FeatureCache, default_cache_dir

    return FeatureCache(None if no_cache else cache_dir or default_cache_dir())


@click.group()
def main() -> None:
    """Evaluate SoundNet features on labelled sound datasets."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


@main.command()
@_data_options
@click.option("--layer", default="pool5", show_default=True, help="Named output: conv1..conv7, pool1/2/5, heads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the summary here.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Confusion-matrix PNG [default: beside --json as <name>.confusion.png].",
)
@click.option("--C", "c", type=POSITIVE, default=DEFAULT_C, show_default=True, help="SVM regularisation.")
@click.option("--cv-c", is_flag=True, help=f"Choose C from {C_GRID} by leave-one-fold-out on the training folds.")
@click.option(
    "--standardize/--no-standardize",
    default=False,
    show_default=True,
    help="z-score each feature dimension on the training folds before the SVM (slower; no better on ESC-10).",
)
@click.option("--window-seconds", type=POSITIVE, default=1.0, show_default=True, help="Feature window length.")
def svm(
    layer,
    checkpoint,
    dataset,
    data_dir,
    json_out,
    plot,
    c,
    cv_c,
    standardize,
    clip_seconds,
    window_seconds,
    batch_size,
    device,
    workers,
    cache_dir,
    no_cache,
) -> None:
    """Linear SVM on windowed layer features, leave-one-fold-out; prints per-fold and mean accuracy."""
    from soundnet.evaluate.report import plot_confusion, write_json
    from soundnet.evaluate.svm import evaluate_svm

    config = SVMConfig(C=c, cv_c=cv_c, standardize=standardize)
    try:
        document = evaluate_svm(
            resolve(checkpoint),
            dataset,
            data_dir,
            layer,
            config,
            clip_seconds,
            window_seconds,
            batch_size,
            device,
            workers,
            _cache(cache_dir, no_cache),
        )
    except (DatasetError, ValueError, OSError) as exc:  # user errors: bad data, settings or paths
        raise click.ClickException(str(exc)) from exc
    for fold, acc in zip(document["fold_ids"], document["folds"]):
        click.echo(f"fold {fold}: {acc:.4f}")
    click.echo(
        f"{document['dataset']} {layer}: mean accuracy {document['accuracy']:.4f} "
        f"({document['timings_s']['total_s']:.0f} s)"
    )
    width = max(len(name) for name in document["per_class_accuracy"])
    for name, acc in document["per_class_accuracy"].items():
        click.echo(f"  {name:<{width}}  {'n/a (untestable)' if acc is None else f'{acc:.3f}'}")
    if document["untestable_clips"]:
        click.echo(f"{len(document['untestable_clips'])} clip(s) left out: their class was in no training fold")
    plot = plot or (json_out.with_suffix(".confusion.png") if json_out else None)
    for path, write in ((json_out, write_json), (plot, plot_confusion)):
        if path:
            try:
                write(path, document)
            except OSError as exc:
                raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from exc
            click.echo(f"wrote {path}")


@main.command()
@_data_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the pictures.")
@click.option("--tsne-layer", default="pool5", show_default=True, help="Layer whose clip features the t-SNE maps.")
@click.option("--units-layer", default="conv7", show_default=True, help="Layer whose units the HTML page shows.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Clips per unit.")
@click.option(
    "--units",
    type=click.IntRange(min=1),
    default=24,
    show_default=True,
    help="Units on the page (most class-selective).",
)
@click.option(
    "--copy-audio/--link-audio",
    default=True,
    show_default=True,
    help="Copy the shown clips into OUT/audio (a portable page) or link to the dataset files (relative links).",
)
def visualize(
    checkpoint,
    dataset,
    data_dir,
    out,
    tsne_layer,
    units_layer,
    top,
    units,
    copy_audio,
    clip_seconds,
    batch_size,
    device,
    workers,
    cache_dir,
    no_cache,
) -> None:
    """The paper's pictures: conv1 filters, a t-SNE of clip features by class, the top clips of deep units."""
    from soundnet.evaluate.datasets import load_dataset
    from soundnet.evaluate.visualize import make_pictures
    from soundnet.student.checkpoint import OutputError

    try:
        data = load_dataset(dataset, data_dir)
        written = make_pictures(
            resolve(checkpoint),
            data,
            out,
            tsne_layer,
            units_layer,
            clip_seconds,
            top,
            units,
            copy_audio,
            batch_size,
            device,
            workers,
            _cache(cache_dir, no_cache),
        )
    except (DatasetError, OutputError, ValueError, OSError) as exc:  # user errors: bad data, settings or paths
        raise click.ClickException(str(exc)) from exc
    for path in written:
        click.echo(f"wrote {path}")
