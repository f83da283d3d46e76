"""`student`: the sound network side: import released weights, train from shards."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from soundnet.student.data import READ_ORDERS
from soundnet.student.loss import KL_NORMS
from soundnet.student.model import ARCHITECTURES, SoundNet
from soundnet.student.train import NonFiniteLoss, OutputError, TrainConfig, train


@click.group()
def main() -> None:
    """SoundNet student networks: import released weights, train from shards."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


@main.command("import-soundnet")
@click.argument("released", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
def import_soundnet(released: str, out: Path) -> None:
    """Convert the released SoundNet8 weights (soundnet8.npz, or the sound8.npy the public ports publish) into a
    checkpoint, checking every tensor's shape. sound8.npy is a pickle: only numpy arrays are let out of it."""
    from soundnet.student.checkpoint import save_checkpoint
    from soundnet.student.soundnet_import import import_soundnet8

    try:
        model = import_soundnet8(released)
        save_checkpoint(out, model, source=str(released))
    except (ValueError, OSError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out}: {_describe(model)}")


@main.command("export")
@click.argument("model")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FILE.safetensors to write; its config goes into its metadata and FILE.json beside it.",
)
def export(model: str, out: Path) -> None:
    """Write MODEL as .safetensors with a JSON config (the format model hubs use). MODEL: a released model's name
    (soundnet8) or a model file: a checkpoint (student train, import-soundnet), soundnet8.npz, sound8.npy."""
    from soundnet.student.checkpoint import load_checkpoint, save_safetensors
    from soundnet.weights import resolve

    try:
        source = resolve(model)
        net = load_checkpoint(source)
        config = save_safetensors(out, net, soundnet_source=Path(source).name)
    except (ValueError, OSError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out} and {config}: {_describe(net)}")


def _describe(model: SoundNet) -> str:
    params = sum(p.numel() for p in model.parameters())
    heads = ", ".join(f"{name} ({n})" for name, n in model.config.heads.items())
    return f"{model.config.arch}, {params:,} parameters, heads {heads}"


_TRAIN = TrainConfig(shards=[], out="")  # the defaults of `student train`


@main.command("train")
@click.option(
    "--shards",
    required=True,
    multiple=True,
    help="Training shards: a brace pattern, glob, directory or path, or the same as a URL (https://, s3://, any "
    "fsspec URL; a run folder URL is read through its index.parquet); repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES)), default=_TRAIN.arch, show_default=True)
@click.option(
    "--steps", type=click.IntRange(min=1), default=_TRAIN.steps, show_default=True, help="Total optimiser steps."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_TRAIN.batch_size,
    show_default=True,
    help="Clips per step per rank.",
)
@click.option("--lr", type=float, default=_TRAIN.lr, show_default=True, help="Adam learning rate.")
@click.option("--beta1", type=float, default=_TRAIN.beta1, show_default=True, help="Adam beta1.")
@click.option(
    "--kl-weight", type=float, default=_TRAIN.kl_weight, show_default=True, help="Loss = weight x mean KL (lambda)."
)
@click.option(
    "--cosine-weight",
    type=click.FloatRange(min=0),
    default=_TRAIN.cosine_weight,
    show_default=True,
    help="Loss += weight x mean (1 - cos) over embedding teachers' heads (timm-embed teachers).",
)
@click.option(
    "--kl-norm",
    type=click.Choice(KL_NORMS),
    default=_TRAIN.kl_norm,
    show_default=True,
    help="mean: KL averaged over batch x classes x steps (the paper); sample: summed over classes, per clip-step.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0, min_open=True), default=_TRAIN.temperature, show_default=True
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=_TRAIN.workers,
    show_default=True,
    help="Loader processes per rank.",
)
@click.option("--device", default=_TRAIN.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp/--no-amp", default=_TRAIN.amp, show_default=True, help="bf16 autocast (CUDA only).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the network.")
@click.option("--log-every", type=click.IntRange(min=1), default=_TRAIN.log_every, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=_TRAIN.checkpoint_every, show_default=True)
@click.option(
    "--keep-checkpoints",
    type=click.IntRange(min=0),
    default=_TRAIN.keep_checkpoints,
    show_default=True,
    help="Keep the newest N step-N.pt besides last.pt (0: write none).",
)
@click.option("--val-shards", multiple=True, help="Held-out shards: KL and top-1 agreement with each teacher.")
@click.option(
    "--val-every",
    type=click.IntRange(min=1),
    default=_TRAIN.val_every,
    show_default=True,
    help="Steps between held-out validations and probes.",
)
@click.option(
    "--probe",
    multiple=True,
    metavar="DATASET:DIR",
    help="Score the student on a labelled set with `evaluate svm`'s protocol at every --val-every step and at "
    "the end (DATASET: esc10, esc50, dcase, folder, urbansound8k); repeatable.",
)
@click.option("--probe-layer", default=_TRAIN.probe_layer, show_default=True, help="The layer the probe's SVM reads.")
@click.option("--seed", type=int, default=_TRAIN.seed, show_default=True)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue up to --steps from OUT/checkpoints/last.pt, else the newest intact step-N.pt; exact (see README).",
)
@click.option(
    "--exclude-mismatched",
    is_flag=True,
    help="Leave out shards whose teachers differ from the set most shards have, instead of refusing the run.",
)
@click.option(
    "--verify-digests/--no-verify-digests",
    default=_TRAIN.verify_digests,
    show_default=True,
    help="Check every sample against the sha256 its run's index records; a changed one is skipped and counted.",
)
@click.option(
    "--allow-unfinished",
    is_flag=True,
    help="Train on a run that was never finished (no index.parquet: `ingest run --resume` finishes it).",
)
@click.option(
    "--read-order",
    type=click.Choice(READ_ORDERS),
    default=_TRAIN.read_order,
    show_default=True,
    help="sample: each clip read on its own (any order); shard: a few shards at a time, clips read in runs "
    "(far fewer requests to object storage). Both are exact on resume.",
)
@click.option(
    "--open-shards",
    type=click.IntRange(min=1),
    default=_TRAIN.open_shards,
    show_default=True,
    help="With --read-order shard: shards mixed at once; each batch takes runs of batch/N clips.",
)
def train_command(
    shards: tuple[str, ...], out: Path, val_shards: tuple[str, ...], probe: tuple[str, ...], compile_: bool, **options
) -> None:
    """Distil the teachers stored in the shards into a SoundNet; runs under torchrun for several GPUs or machines."""
    config = TrainConfig(
        shards=list(shards), out=str(out), val_shards=list(val_shards), probe=list(probe), compile=compile_, **options
    )
    try:
        train(config)
    except (NonFiniteLoss, OutputError, FileNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


from soundnet.student.embed import embed_command  # noqa: E402

main.add_command(embed_command)
