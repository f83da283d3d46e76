"""`evaluate`: features from a named layer of a SoundNet checkpoint, scored with the paper's SVM protocol."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from soundnet.evaluate.datasets import LOADERS, DatasetError
from soundnet.evaluate.protocol import C_GRID, DEFAULT_C, SVMConfig


@click.group()
def main() -> None:
    """Evaluate SoundNet features on labelled sound datasets."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


@main.command()
@click.option("--layer", default="pool5", show_default=True, help="Named output: conv1..conv7, pool1/2/5, heads.")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A checkpoint from `student train` or `student import-soundnet`.",
)
@click.option("--dataset", required=True, type=click.Choice(sorted(LOADERS)), help="Dataset layout and fold rule.")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the summary here.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Confusion-matrix PNG [default: beside --json as <name>.confusion.png].",
)
@click.option("--C", "c", type=float, default=DEFAULT_C, show_default=True, help="SVM regularisation.")
@click.option("--cv-c", is_flag=True, help=f"Choose C from {C_GRID} by leave-one-fold-out on the training folds.")
@click.option("--no-standardize", is_flag=True, help="Feed raw features to the SVM (default: z-score per dim).")
@click.option("--clip-seconds", type=float, help="Tile/cut clips to this length [default: 10 s, DCASE 30 s].")
@click.option("--window-seconds", type=float, default=1.0, show_default=True, help="Feature window length.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", type=int, default=4, show_default=True, help="Decoding threads.")
def svm(
    layer,
    checkpoint,
    dataset,
    data_dir,
    json_out,
    plot,
    c,
    cv_c,
    no_standardize,
    clip_seconds,
    window_seconds,
    batch_size,
    device,
    workers,
) -> None:
    """Linear SVM on windowed layer features, leave-one-fold-out; prints per-fold and mean accuracy."""
    from soundnet.evaluate.report import plot_confusion, write_json
    from soundnet.evaluate.svm import evaluate_svm

    config = SVMConfig(C=c, cv_c=cv_c, standardize=not no_standardize)
    try:
        document = evaluate_svm(
            checkpoint,
            dataset,
            data_dir,
            layer,
            config,
            clip_seconds,
            window_seconds,
            batch_size,
            device,
            workers,
        )
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    for fold, acc in zip(document["fold_ids"], document["folds"]):
        click.echo(f"fold {fold}: {acc:.4f}")
    click.echo(
        f"{document['dataset']} {layer}: mean accuracy {document['accuracy']:.4f} "
        f"({document['timings_s']['total_s']:.0f} s)"
    )
    width = max(len(name) for name in document["per_class_accuracy"])
    for name, acc in document["per_class_accuracy"].items():
        click.echo(f"  {name:<{width}}  {acc:.3f}")
    if json_out:
        write_json(json_out, document)
        click.echo(f"wrote {json_out}")
    plot = plot or (json_out.with_suffix(".confusion.png") if json_out else None)
    if plot:
        plot_confusion(plot, document)
        click.echo(f"wrote {plot}")
