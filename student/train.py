"""Stage two: distil the teachers' posteriors stored in the shards into a SoundNet, from the shards alone.

One loop, readable top to bottom: set up (ranks, data, model, optimiser, resume), then step; every ``log_every``
steps (and at checkpoint, validation and the last step) the loss is averaged over the steps since the last report
and over ranks, checked to be finite, logged, and the held-out shards and checkpoints are done. Every rank takes
the same steps from an endless stream, so no rank waits for another that ran out of data; rank 0 alone writes.

``--out`` holds ``metrics.jsonl`` (one object per report), ``checkpoints/last.pt`` and ``checkpoints/step-N.pt``
(the checkpoint format of :mod:`student.checkpoint`, plus optimiser, step and RNG state) and, at the end,
``summary.json``. It must be on a file system that every rank sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from soundnet.shards.atomic import atomic_path
from soundnet.shards.reader import expand_shards
from soundnet.student.checkpoint import read_checkpoint, save_checkpoint
from soundnet.student.data import CLIP_SAMPLES, SLOTS, HeldOut, discover_heads, make_loader, to_device
from soundnet.student.distributed import Dist, all_sum, gather_digests, init_distributed, shutdown
from soundnet.student.loss import KL_WEIGHT, distill_loss, kl_terms, top1_agreement
from soundnet.student.model import ModelConfig, SoundNet, build_model

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every option of a run; defaults follow the paper (DESIGN.md). Stored in each checkpoint."""

    shards: list[str]
    out: str
    arch: str = "soundnet8"
    steps: int = 100_000
    batch_size: int = 64  # per rank
    lr: float = 1e-3
    beta1: float = 0.9
    kl_weight: float = KL_WEIGHT
    kl_norm: str = "mean"  # "mean" (the paper) or "sample" (see student.loss.KL_NORMS)
    temperature: float = 1.0
    shuffle: int = 500  # shuffle buffer, in clips, per DataLoader worker
    workers: int = 4  # DataLoader workers per rank
    device: str = "auto"
    amp: bool = True  # bf16 autocast; CUDA only
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    val_shards: list[str] = field(default_factory=list)
    val_every: int = 1000
    seed: int = 0
    resume: bool = False


class NonFiniteLoss(RuntimeError):
    """The loss or the weights stopped being finite; training stopped and the last good checkpoint was kept."""


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or continue) as ``cfg`` says; returns the run summary (also written to ``summary.json``)."""
    where = init_distributed(cfg.device)
    try:
        return _train(cfg, where)
    finally:
        shutdown()


def _train(cfg: TrainConfig, where: Dist) -> dict[str, Any]:
    device = where.device
    say = log.info if where.is_main else log.debug  # rank 0 alone reports
    out = Path(cfg.out)
    last_path = out / "checkpoints" / "last.pt"
    urls = expand_shards(cfg.shards)
    val_urls = expand_shards(cfg.val_shards) if cfg.val_shards else []
    heads = discover_heads(urls)
    state = _resume_state(cfg, last_path, heads)

    # ---- model and optimiser (the same initial weights on every rank; DDP also broadcasts rank 0's) ----------
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(cfg.arch, heads))
    steps_per_clip = model.output_length(model.head_names[0], CLIP_SAMPLES)
    if steps_per_clip != SLOTS:
        raise ValueError(f"{cfg.arch} gives {steps_per_clip} output steps for a training clip, the data has {SLOTS}")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        start = state["step"]
        say("resuming from %s at step %d", last_path, start)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    net = torch.compile(model) if cfg.compile else model
    if where.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    cuda = device.type == "cuda"
    amp = cfg.amp and cuda
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once

    # ---- data ----------------------------------------------------------------------------------------------
    loader = make_loader(
        urls,
        heads,
        cfg.batch_size,
        workers=cfg.workers,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        stream=start,
        rank=where.rank,
        world_size=where.world_size,
        pin_memory=cuda,
    )
    held_out = HeldOut(val_urls, heads, cfg.batch_size, where.rank, where.world_size) if val_urls else None
    metrics = _open_metrics(out / "metrics.jsonl", keep_until=start) if where.is_main else None
    params = sum(p.numel() for p in model.parameters())
    say(
        "%s (%.1fM parameters, heads %s) on %d shard(s); batch %d x %d rank(s) on %s%s; steps %d -> %d",
        cfg.arch,
        params / 1e6,
        ", ".join(f"{n} {c}" for n, c in heads.items()),
        len(urls),
        cfg.batch_size,
        where.world_size,
        device,
        " (bf16 autocast)" if amp else "",
        start,
        cfg.steps,
    )

    # ---- the loop ------------------------------------------------------------------------------------------
    if start >= cfg.steps:
        say("the checkpoint is at step %d already; nothing to do for --steps %d", start, cfg.steps)
    loss_fn = dict(weight=cfg.kl_weight, norm=cfg.kl_norm, temperature=cfg.temperature)
    batches = iter(loader)
    sums = torch.zeros(1 + len(heads), dtype=torch.float64, device=device)  # loss, KL per head; since last report
    skipped = 0  # broken samples met since the last report, this rank
    skipped_total = 0  # all ranks, since this run started
    last_saved = start if state is not None else None
    record: dict[str, Any] = {}
    run_start = window_start = time.perf_counter()
    window_step, data_s = start, 0.0
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (where.is_main and sys.stderr.isatty()))
    with bar, logging_redirect_tqdm():
        for step in range(start + 1, cfg.steps + 1):
            t = time.perf_counter()
            batch = next(batches)
            x, targets = to_device(batch, device)
            data_s += time.perf_counter() - t
            sums += train_step(net, optimizer, x, targets, amp, **loss_fn).double()
            skipped += int(batch["skipped"].sum())
            bar.update()

            final = step == cfg.steps
            save = step % cfg.checkpoint_every == 0 or final
            validate = held_out is not None and (step % cfg.val_every == 0 or final)
            if not (step % cfg.log_every == 0 or save or validate):
                continue

            # ---- report: means over the window's steps and over ranks; a non-finite loss stops the run ----
            n = step - window_step
            reduced = all_sum(torch.cat([sums / n, sums.new_tensor([skipped])]), where).tolist()
            elapsed = time.perf_counter() - window_start
            skipped_total += int(reduced[-1])
            loss_value = reduced[0] / where.world_size
            if not math.isfinite(loss_value):
                span = f"step {step}" if n == 1 else f"steps {window_step + 1}-{step}"
                raise NonFiniteLoss(_stopped(f"the loss is {loss_value} at {span}", last_saved, last_path))
            record = {
                "step": step,
                "loss": loss_value,
                **{f"kl_{name}": v / where.world_size for name, v in zip(heads, reduced[1:-1])},
                "steps_per_s": n / elapsed,
                "clips_per_s": n * cfg.batch_size * where.world_size / elapsed,
                "data_wait": data_s / elapsed,
                "skipped": skipped_total,
                "lr": cfg.lr,
                "elapsed_s": time.perf_counter() - run_start,
            }
            if validate:
                record.update(_evaluate(model, held_out, loss_fn, amp, where))
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                say(_progress_line(record, cfg.steps))
                bar.set_postfix(loss=f"{loss_value:.3f}", clips_s=f"{record['clips_per_s']:.1f}")
            if save:
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise NonFiniteLoss(_stopped(f"the weights are not finite at step {step}", last_saved, last_path))
                if where.is_main:
                    extra = {
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "rng": _rng_state(),
                        "train_config": dataclasses.asdict(cfg),
                        "loss": loss_value,
                    }
                    if step % cfg.checkpoint_every == 0:
                        save_checkpoint(last_path.with_name(f"step-{step:07d}.pt"), model, **extra)
                    save_checkpoint(last_path, model, **extra)
                last_saved = step
            sums.zero_()
            skipped, data_s = 0, 0.0
            window_start, window_step = time.perf_counter(), step

    # ---- the end: every rank must hold the same weights ----------------------------------------------------
    digests = gather_digests(model, where)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights (sha256 per rank: {digests})")
    trained = max(0, cfg.steps - start)
    summary = {
        "arch": cfg.arch,
        "heads": heads,
        "start_step": start,
        "steps": max(cfg.steps, start),
        "world_size": where.world_size,
        "loss": record.get("loss"),
        "clips_per_s": trained * cfg.batch_size * where.world_size / (time.perf_counter() - run_start),
        "skipped": skipped_total,
        "checkpoint": str(last_path) if last_saved is not None else None,
        "weights_sha256": digests[0],
        "rank_weights_sha256": digests,
    }
    if where.is_main:
        metrics.close()
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if trained:
        say("step %d, loss %.4f; checkpoint %s", summary["steps"], summary["loss"], last_path)
    return summary


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    targets: dict[str, torch.Tensor],
    amp: bool,
    **loss_options: Any,
) -> torch.Tensor:
    """One optimiser step; returns ``[loss, KL per head]`` detached on the device, without waiting for it."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(x)
    loss, terms = distill_loss(logits, targets, **loss_options)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, *terms.values()]).detach()


def _resume_state(cfg: TrainConfig, last_path: Path, heads: dict[str, int]) -> dict[str, Any] | None:
    """The checkpoint to continue from, checked against this run, or None to start at step 0."""
    if not last_path.exists():
        if cfg.resume:
            log.warning("--resume: %s does not exist yet, starting at step 0", last_path)
        return None
    if not cfg.resume:
        raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or choose another --out")
    state = read_checkpoint(last_path)
    if "optimizer" not in state or "step" not in state:
        raise ValueError(f"{last_path} holds weights but no training state (optimizer, step): it cannot be resumed")
    saved = state["config"]
    if saved["arch"] != cfg.arch or saved["heads"] != heads:
        raise ValueError(
            f"{last_path} is a {saved['arch']} with heads {saved['heads']}; this run asks for {cfg.arch} "
            f"and the shards give heads {heads}"
        )
    return state


def _open_metrics(path: Path, keep_until: int):
    """Open ``metrics.jsonl`` for appending, first dropping records after step ``keep_until`` (a resumed run
    repeats no step: records written after the checkpoint it continues from belong to steps done again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


@torch.no_grad()
def _evaluate(model: SoundNet, held_out: HeldOut, loss_fn: dict[str, Any], amp: bool, where: Dist) -> dict[str, float]:
    """Held-out loss, KL (nats per clip and step) and top-1 agreement with each teacher, over all ranks.

    Runs the bare model, not the DDP wrapper: ranks may hold different numbers of batches, and DDP's forward
    would wait for the others.
    """
    heads = list(model.config.heads)
    device = where.device
    sums = torch.zeros(2 + 2 * len(heads), dtype=torch.float64, device=device)  # loss, KL, top-1 per head, clips
    model.eval()
    for batch in held_out:
        x, targets = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss, _ = distill_loss(logits, targets, **loss_fn)
        kl = kl_terms(logits, targets, norm="sample")
        agree = [top1_agreement(logits[name], targets[name]) for name in heads]
        b = x.shape[0]
        values = [loss * b, *(kl[name] * b for name in heads), *agree, sums.new_tensor(b)]
        sums += torch.stack([v.double() for v in values])
    model.train()
    values = all_sum(torch.cat([sums, sums.new_tensor([held_out.skipped])]), where).tolist()
    clips, skipped = int(values[-2]), int(values[-1])
    result: dict[str, float] = {"val_clips": clips, "val_skipped": skipped}
    if clips:
        result["val_loss"] = values[0] / clips
        for i, name in enumerate(heads):
            result[f"val_kl_{name}"] = values[1 + i] / clips
            result[f"val_top1_{name}"] = values[1 + len(heads) + i] / (clips * SLOTS)
    return result


def _progress_line(record: dict[str, Any], steps: int) -> str:
    kls = ", ".join(f"{k[3:]} {v:.4f}" for k, v in record.items() if k.startswith("kl_"))
    line = (
        f"step {record['step']}/{steps}  loss {record['loss']:.4f} (KL {kls})  {record['steps_per_s']:.2f} steps/s  "
        f"{record['clips_per_s']:.1f} clips/s  data wait {100 * record['data_wait']:.0f}%  skipped {record['skipped']}"
    )
    if "val_loss" in record:
        tops = ", ".join(f"{k[9:]} {v:.3f}" for k, v in record.items() if k.startswith("val_top1_"))
        line += f"  | val loss {record['val_loss']:.4f}, top-1 agreement {tops}"
    return line


def _stopped(what: str, last_saved: int | None, last_path: Path) -> str:
    if last_saved is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint, {last_path} (step {last_saved}), is kept"
    return f"{what}: training stopped; {kept}. Try a lower --lr, or other --kl-norm / --temperature settings."


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
