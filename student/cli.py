"""`student`: the sound network side: import released weights, train from shards."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.group()
def main() -> None:
    """SoundNet student networks: import released weights, train from shards."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


@main.command("import-soundnet")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
def import_soundnet(npz: str, out: Path) -> None:
    """Convert the released SoundNet8 weights (soundnet8.npz) into a checkpoint, checking every tensor's shape."""
    from student.checkpoint import save_checkpoint
    from student.soundnet_import import import_soundnet8

    try:
        model = import_soundnet8(npz)
    except (KeyError, ValueError, OSError) as exc:
        raise click.ClickException(f"{npz}: {exc}") from exc
    save_checkpoint(out, model, source=str(npz))
    params = sum(p.numel() for p in model.parameters())
    heads = ", ".join(f"{name} ({n})" for name, n in model.config.heads.items())
    click.echo(f"wrote {out}: {model.config.arch}, {params:,} parameters, heads {heads}")
