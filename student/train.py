"""Stage two: distil the teachers' posteriors stored in the shards into a SoundNet, from the shards alone.

Read it top to bottom: :func:`_train` sets up (run folder, shards, model, resume point, loader) in named helpers,
then runs one loop of three paragraphs: the step; the report (loss averaged over the steps since the last report
and over ranks, checked to be finite, logged) and held-out validation; the save. Every rank takes the same steps,
each on its own part of every step's global batch, so no rank waits for another that ran out of data; rank 0
alone writes.

``--out`` holds ``metrics.jsonl`` (one object per report), ``loss.png`` (the loss curves and any ``--probe``
accuracy, redrawn at every checkpoint and probe), ``checkpoints/last.pt`` and the newest ``--keep-checkpoints``
``checkpoints/step-N.pt`` (the checkpoint format of :mod:`student.checkpoint`, plus optimiser, step, RNG state and
the broken samples met) and, at the end, ``summary.json``. It must be on a file system that every rank sees.

Resuming is exact: the batch of every step is a function of the seed and the step (:mod:`student.data`), so a run
stopped or killed at step k and resumed to n ends with the weights of an uninterrupted run to n, bit for bit, on
the same shards, seed, device and number of ranks (the number of loader workers does not matter). Options that
differ from the checkpoint's are refused, applied or warned about as :data:`RESUME_RULES` says.
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
from soundnet.shards.schema import EMBEDDING
from soundnet.student.checkpoint import OutputError, read_checkpoint, save_checkpoint, writing
from soundnet.student.data import Clips, HeldOut, ShardSet, make_loader, model_alignment, scan_shards, to_device
from soundnet.student.distributed import (
    Dist,
    all_sum,
    broadcast_from_main,
    gather_digests,
    gather_objects,
    init_distributed,
    shutdown,
    waiting_group,
)
from soundnet.student.loss import COSINE_WEIGHT, KL_WEIGHT, cosine_agreement, distill_loss, kl_terms, top1_agreement
from soundnet.student.model import ModelConfig, SoundNet, build_model
from soundnet.student.plots import write_loss_curves

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLoss", "OutputError", "TrainConfig", "train", "train_step"]


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
    cosine_weight: float = COSINE_WEIGHT  # of the mean cosine distance over embedding heads
    kl_norm: str = "mean"  # "mean" (the paper) or "sample" (see student.loss.KL_NORMS)
    temperature: float = 1.0
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
    exclude_mismatched: bool = False  # leave out shards with another teacher set instead of refusing
    verify_digests: bool = True  # check each sample against the sha256 its run's index records
    allow_unfinished: bool = False  # train on a run whose ledgers were never merged instead of refusing
    read_order: str = "sample"  # "sample" (one ranged read per clip) or "shard" (see student.data.pass_order)
    open_shards: int = 8  # with read_order "shard": shards read at once
    keep_checkpoints: int = 3  # newest step-N.pt files kept besides last.pt; 0: none written
    probe: list[str] = field(default_factory=list)  # DATASET:DIR sets scored with the evaluator's protocol
    probe_layer: str = "pool5"


RESUME_RULES: dict[str, str] = {
    # refused: the run would go on minimising another loss on another network (its loss curve would jump)
    "arch": "refused", "kl_weight": "refused", "cosine_weight": "refused", "kl_norm": "refused",
    "temperature": "refused",
    # applied to the optimiser's param groups after its state is loaded, and logged
    "lr": "optimiser", "beta1": "optimiser",
    # applied, with a warning that the run no longer equals an uninterrupted one (other batches or numerics)
    "batch_size": "not exact", "seed": "not exact", "amp": "not exact", "compile": "not exact",
    "read_order": "not exact", "open_shards": "not exact",
    # applied: what is read, run, logged, saved or probed, not how the weights move
    "shards": "applied", "out": "applied", "steps": "applied", "workers": "applied", "device": "applied",
    "log_every": "applied", "checkpoint_every": "applied", "val_shards": "applied", "val_every": "applied",
    "resume": "applied", "exclude_mismatched": "applied", "keep_checkpoints": "applied", "probe": "applied",
    "probe_layer": "applied", "verify_digests": "applied", "allow_unfinished": "applied",
}  # fmt: skip
"""What ``--resume`` does with each option that differs from the checkpoint's (README, "Exact resumption")."""


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
    out = Path(cfg.out)
    say = log.info if where.is_main else log.debug  # rank 0 alone reports
    if where.is_main:
        _prepare_out(out)
    shards, held_out_shards = _scan(cfg, log.warning if where.is_main else log.debug)
    model, clips, held_out = _build(cfg, shards, held_out_shards, where)
    probes, probe_group = _load_probes(cfg, model, where, say)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    start, broken = _resume(cfg, out, model, optimizer, shards, where)
    net, amp = _wrap(model, cfg, where)
    loader = make_loader(
        clips, cfg.batch_size, seed=cfg.seed, start=start, steps=cfg.steps, workers=cfg.workers,
        rank=where.rank, world_size=where.world_size, pin_memory=where.device.type == "cuda",
        read_order=cfg.read_order, open_shards=cfg.open_shards,
    )  # fmt: skip
    window = Window(cfg, where, shards.kinds, broken, last_saved=start if start else None, data=_data_id(cfg, shards))
    metrics = _open_metrics(out / "metrics.jsonl", keep_until=start) if where.is_main else None
    _announce(cfg, model, shards, where, amp, start, say)

    loss_fn = dict(
        kinds=shards.kinds, weight=cfg.kl_weight, cosine_weight=cfg.cosine_weight, norm=cfg.kl_norm,
        temperature=cfg.temperature,
    )  # fmt: skip
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (where.is_main and sys.stderr.isatty()))
    with bar, logging_redirect_tqdm():
        for step in range(start + 1, cfg.steps + 1):
            # ---- step: this rank's part of the step's batch, one optimiser step -----------------------------
            t = time.perf_counter()
            batch = next(batches)
            x, targets = to_device(batch, where.device)
            window.waited(time.perf_counter() - t)
            window.add(train_step(net, optimizer, x, targets, amp, **loss_fn), batch["broken"])
            bar.update()

            # ---- report and validate: means over the window and the ranks; a non-finite loss stops the run -
            final = step == cfg.steps
            save = step % cfg.checkpoint_every == 0 or final
            validate = held_out is not None and (step % cfg.val_every == 0 or final)
            probe = bool(cfg.probe) and (step % cfg.val_every == 0 or final)
            if not (step % cfg.log_every == 0 or save or validate or probe):
                continue
            record = window.report(step, out)
            if validate:
                record.update(_evaluate(model, held_out, loss_fn, amp, where))
            if probe:
                window.probe = _probe(probes, model, cfg, where, probe_group)
                record.update(window.probe)
            window.start = time.perf_counter()  # steps/s counts steps: not validation, probes or the report
            if metrics is not None:
                with writing(metrics.name):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                say(_progress_line(record, cfg.steps))
                bar.set_postfix(loss=f"{record['loss']:.3f}", clips_s=f"{record['clips_per_s']:.1f}")

            # ---- save: checkpoints and the loss curves (rank 0), after checking the weights are finite --------
            if save:
                _save(cfg, out, step, model, optimizer, window, where)
            elif probe and where.is_main:
                _draw(out)
    if metrics is not None:
        metrics.close()
    return _finish(cfg, out, model, shards, start, window, where, say)


# ---- setup ---------------------------------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    """Make the run folder and sweep temporary files a killed run left (``.*.tmp``: partial checkpoints)."""
    with writing(out):
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        stale = sorted(out.glob(".*.tmp")) + sorted((out / "checkpoints").glob(".*.tmp"))
        for path in stale:
            path.unlink()
    if stale:
        log.info("removed %d temporary file(s) left by a killed run: %s", len(stale), ", ".join(p.name for p in stale))


def _scan(cfg: TrainConfig, warn) -> tuple[ShardSet, ShardSet | None]:
    """Index the training (and held-out) shards, checking they share one teacher set and clip layout."""
    options = dict(exclude_mismatched=cfg.exclude_mismatched, allow_unfinished=cfg.allow_unfinished)
    shards = scan_shards(expand_shards(cfg.shards), **options)
    held_out = None
    if cfg.val_shards:
        held_out = scan_shards(
            expand_shards(cfg.val_shards), heads=shards.heads, layout=shards.layout, kinds=shards.kinds, **options
        )
    for found in (shards, held_out):
        for url, why in (found.excluded if found else {}).items():
            warn("left out %s (--exclude-mismatched): %s, not the run's teachers %s", url, why, shards.heads)
        for url, damage in (found.damaged if found else {}).items():
            warn("damaged shard %s: %s; its complete samples are used", url, damage)
        for url, which in (found.duplicates if found else {}).items():
            warn("shard %s: %s", url, which)
        for what in found.warnings if found else []:
            warn("%s", what)
        for note in found.notes if found else []:
            warn("note: %s", note)
    if not cfg.verify_digests:
        warn("note: --no-verify-digests: samples are not checked against their recorded sha256 digests")
    return shards, held_out


def _build(
    cfg: TrainConfig, shards: ShardSet, held_out_shards: ShardSet | None, where: Dist
) -> tuple[SoundNet, Clips, HeldOut | None]:
    """The model (the same initial weights on every rank: seeded) and its clips, aligned to its output steps."""
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(cfg.arch, shards.heads, head_kinds=shards.kinds))
    alignment = model_alignment(model, shards.layout, shards.urls[0])
    if alignment.pool > 1 or alignment.repeat > 1:
        log.info(
            "clip layout %s s slots: %s", shards.layout.slot_seconds,
            f"{alignment.pool} frames averaged per output step" if alignment.pool > 1
            else f"each frame's row repeated for {alignment.repeat} steps; clips over 20 s train on the first 20 s",
        )  # fmt: skip
    held_out = None
    if held_out_shards is not None:
        held_out_clips = Clips(held_out_shards, alignment, cfg.verify_digests)
        held_out = HeldOut(held_out_clips, cfg.batch_size, where.rank, where.world_size)
    return model.to(where.device), Clips(shards, alignment, cfg.verify_digests), held_out


def _resume(
    cfg: TrainConfig, out: Path, model: SoundNet, optimizer: torch.optim.Optimizer, shards: ShardSet, where: Dist
) -> tuple[int, list[str]]:
    """Load the newest intact checkpoint when resuming: returns the step it is at and the broken samples met."""
    say, warn = (log.info, log.warning) if where.is_main else (log.debug, log.debug)
    found = _find_checkpoint(cfg, out / "checkpoints")
    damage = [f"{url}: {what}" for url, what in shards.damaged.items()]  # counted once, with the run's earlier finds
    if found is None:
        return 0, damage
    path, state = found
    saved = ModelConfig(**state["config"])
    if (saved.arch, saved.heads, saved.head_kinds) != (cfg.arch, shards.heads, model.config.head_kinds):
        raise ValueError(
            f"{path} is a {saved.arch} with heads {saved.heads} of kinds {saved.head_kinds}; this run asks for "
            f"{cfg.arch} and the shards give heads {shards.heads} of kinds {model.config.head_kinds}"
        )
    changed = _changed_options(cfg, state, path)
    if state.get("data", {}).get("shards") != _data_id(cfg, shards)["shards"]:
        warn("%s was trained on other shards: the data order differs from its run; resumption is not exact", path)
    if state.get("world_size", where.world_size) != where.world_size:
        warn("%d rank(s) now, %d when %s was saved: other batches from step %d on; resumption is not exact",
             where.world_size, state["world_size"], path, state["step"])  # fmt: skip
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    say("resuming from %s at step %d", path, state["step"])
    for name, (before, now) in changed.items():
        rule = RESUME_RULES[name]
        if rule == "optimiser":  # the loaded state holds the old value: the new one replaces it
            for group in optimizer.param_groups:
                if name == "lr":
                    group["lr"] = now
                else:
                    group["betas"] = (now, group["betas"][1])
            warn("%s changed %s -> %s at step %d", name, before, now, state["step"])
        elif rule == "not exact":
            warn("%s %s differs from the checkpoint's %s: applied from step %d; resumption is not exact (the "
                 "run no longer equals one uninterrupted run)", _option(name), now, before, state["step"])  # fmt: skip
        elif name not in ("resume", "steps"):
            say("%s changed %s -> %s at step %d", _option(name), before, now, state["step"])
    return state["step"], list(dict.fromkeys([*state.get("broken", []), *damage]))


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _changed_options(cfg: TrainConfig, state: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
    """The options that differ from the checkpoint's run, ``{name: (then, now)}``; a ValueError names every refused
    one (:data:`RESUME_RULES`). Options a checkpoint of an older release lacks count as unchanged."""
    saved = state.get("train_config", {})
    now = dataclasses.asdict(cfg)
    changed = {name: (saved[name], value) for name, value in now.items() if name in saved and saved[name] != value}
    refused = [f"{_option(n)} {v} differs from the checkpoint's {b}" for n, (b, v) in changed.items()
               if RESUME_RULES[n] == "refused"]  # fmt: skip
    if refused:
        raise ValueError(
            f"{'; '.join(refused)}: {path} was trained on another loss, which the run would go on minimising "
            "under the same name; resume with the checkpoint's value, or start a new run in another --out"
        )
    return changed


def _find_checkpoint(cfg: TrainConfig, folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """``last.pt``, else the newest readable ``step-N.pt``, with its state; None to start at step 0."""
    steps = [path for _, path in _step_checkpoints(folder)]
    candidates = [p for p in [folder / "last.pt", *reversed(steps)] if p.exists()]
    if not candidates:
        if cfg.resume:
            log.warning("--resume: no checkpoint in %s yet, starting at step 0", folder)
        return None
    if not cfg.resume:
        raise FileExistsError(f"{candidates[0]} exists: pass --resume to continue that run, or choose another --out")
    for path in candidates:
        try:
            state = read_checkpoint(path)
            if "optimizer" in state and "step" in state:
                return path, state
            log.warning("%s holds weights but no training state (optimizer, step): trying an older one", path)
        except ValueError as exn:
            log.warning("%s; trying an older checkpoint", exn)
    raise ValueError(f"none of the checkpoints in {folder} can be resumed (see above): move them away to start over")


def _step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The ``step-N.pt`` files of a run folder with their steps, oldest first."""
    found = [(int(p.stem[5:]), p) for p in folder.glob("step-*.pt") if p.stem[5:].isdigit()]
    return sorted(found)


def _load_probes(cfg: TrainConfig, model: SoundNet, where: Dist, say) -> tuple[list[Any], Any]:
    """Each ``--probe`` set decoded once, on rank 0 (the others check the options and wait for its scores), and
    the group the other ranks wait in. PyAV comes in through the evaluator only when a probe is asked for."""
    if not cfg.probe:
        return [], None
    from soundnet.evaluate.probe import Probe, probe_names

    model.output_length(cfg.probe_layer, 0)  # an unknown --probe-layer fails here, on every rank
    names = probe_names(cfg.probe)
    probes = []
    for spec, name in zip(cfg.probe, names) if where.is_main else ():
        start = time.perf_counter()
        probes.append(Probe.load(spec, name, cfg.probe_layer, workers=max(1, cfg.workers)))
        data = probes[-1].data
        say("probe %s: %d clips, %d classes, folds %s, decoded in %.1f s; scored on %s at every --val-every "
            "step and at the end", name, len(data.clips), len(data.classes), data.folds,
            time.perf_counter() - start, cfg.probe_layer)  # fmt: skip
    return probes, waiting_group(where)


def _wrap(model: SoundNet, cfg: TrainConfig, where: Dist) -> tuple[torch.nn.Module, bool]:
    """The network the step runs (compiled, DDP across ranks) and whether bf16 autocast is on."""
    device = where.device
    net = torch.compile(model) if cfg.compile else model
    if where.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
    return net, cfg.amp and device.type == "cuda"


def _announce(cfg: TrainConfig, model: SoundNet, shards: ShardSet, where: Dist, amp: bool, start: int, say) -> None:
    say(
        "%s (%.1fM parameters, heads %s) on %d clips in %d shard(s); batch %d x %d rank(s) on %s%s; steps %d -> %d",
        cfg.arch, sum(p.numel() for p in model.parameters()) / 1e6,
        ", ".join(f"{n} {c}" for n, c in shards.heads.items()), len(shards), len(shards.urls), cfg.batch_size,
        where.world_size, where.device, " (bf16 autocast)" if amp else "", start, cfg.steps,
    )  # fmt: skip
    if start >= cfg.steps:
        say("the checkpoint is at step %d already; nothing to do for --steps %d", start, cfg.steps)


def _data_id(cfg: TrainConfig, shards: ShardSet) -> dict[str, Any]:
    """What fixes the data order: the seed, the shards and their sample counts, and a read order other than the
    default."""
    found = {"seed": cfg.seed, "shards": [[Path(u).name, len(s)] for u, s in zip(shards.urls, shards.spans)]}
    if cfg.read_order != "sample":
        found["read_order"] = [cfg.read_order, cfg.open_shards]
    return found


# ---- the loop's helpers --------------------------------------------------------------------------------------
def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    targets: dict[str, torch.Tensor],
    amp: bool,
    **loss_options: Any,
) -> torch.Tensor:
    """One optimiser step; returns ``[loss, term per head]`` detached on the device, without waiting for it."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(x)
    loss, terms = distill_loss(logits, targets, **loss_options)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, *terms.values()]).detach()


class Window:
    """The steps since the last report (loss sums, time waiting for data) and what the run carries across reports
    and checkpoints: every broken sample, counted once; the last loss and checkpoint step; what fixes the data."""

    def __init__(
        self,
        cfg: TrainConfig,
        where: Dist,
        kinds: dict[str, str],
        broken: list[str],
        last_saved: int | None,
        data: dict[str, Any],
    ) -> None:
        self.cfg, self.where, self.kinds, self.data = cfg, where, kinds, data
        self.broken = dict.fromkeys(broken)  # all ranks, since the run began (kept in checkpoints)
        self.new_broken: list[str] = []  # this rank, since the last report
        self.sums = torch.zeros(1 + len(kinds), dtype=torch.float64, device=where.device)
        self.last_saved = last_saved
        self.probe: dict[str, float] = {}  # the last probe's scores
        self.loss: float | None = None
        self.run_start = self.start = time.perf_counter()
        self.first_step, self.steps, self.data_s = last_saved or 0, 0, 0.0

    def waited(self, seconds: float) -> None:
        self.data_s += seconds

    def add(self, losses: torch.Tensor, broken: list[str]) -> None:
        self.sums += losses.double()
        self.new_broken += broken
        self.steps += 1

    def report(self, step: int, out: Path) -> dict[str, Any]:
        """The window's record, reduced over ranks; raises NonFiniteLoss (naming the kept checkpoint) for NaN/inf."""
        n, world = self.steps, self.where.world_size
        means = all_sum(self.sums / n, self.where).tolist()
        for what in gather_objects(self.new_broken, self.where):
            if what not in self.broken:
                self.broken[what] = None
                if self.where.is_main:
                    log.warning("skipped %s", what)
        elapsed = time.perf_counter() - self.start
        self.loss = means[0] / world
        if not math.isfinite(self.loss):
            span = f"step {step}" if n == 1 else f"steps {step - n + 1}-{step}"
            raise NonFiniteLoss(self.stopped(f"the loss is {self.loss} at {span}", out))
        record = {
            "step": step,
            "loss": self.loss,
            **{term_key(name, kind): v / world for (name, kind), v in zip(self.kinds.items(), means[1:])},
            "steps_per_s": n / elapsed,
            "clips_per_s": n * self.cfg.batch_size * world / elapsed,
            "data_wait": self.data_s / elapsed,
            "skipped": len(self.broken),
            "lr": self.cfg.lr,
            "elapsed_s": time.perf_counter() - self.run_start,
        }
        self.sums.zero_()
        self.new_broken, self.steps, self.data_s, self.start = [], 0, 0.0, time.perf_counter()
        return record

    def stopped(self, what: str, out: Path) -> str:
        if self.last_saved is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = f"the last good checkpoint, {out / 'checkpoints' / 'last.pt'} (step {self.last_saved}), is kept"
        return f"{what}: training stopped; {kept}. Try a lower --lr, or other --kl-norm / --temperature settings."


def term_key(head: str, kind: str) -> str:
    """The metrics key of a head's loss term: ``kl_<head>``, or ``cos_dist_<head>`` (1 - cos) for an embedding."""
    return f"cos_dist_{head}" if kind == EMBEDDING else f"kl_{head}"


def _save(
    cfg: TrainConfig,
    out: Path,
    step: int,
    model: SoundNet,
    optimizer: torch.optim.Optimizer,
    window: Window,
    where: Dist,
) -> None:
    """``step-N.pt`` every ``checkpoint_every`` steps (the newest ``keep_checkpoints`` are kept) and ``last.pt``
    (rank 0, atomically), then ``loss.png``."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteLoss(window.stopped(f"the weights are not finite at step {step}", out))
    if where.is_main:
        last = out / "checkpoints" / "last.pt"
        extra = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "train_config": dataclasses.asdict(cfg),
            "world_size": where.world_size,
            "loss": window.loss,
            "broken": list(window.broken),
            "data": window.data,
        }
        if step % cfg.checkpoint_every == 0 and cfg.keep_checkpoints:
            save_checkpoint(last.with_name(f"step-{step:07d}.pt"), model, **extra)
        save_checkpoint(last, model, **extra)
        _prune_checkpoints(last.parent, step, cfg.keep_checkpoints)
        _draw(out)
    window.last_saved = step


def _draw(out: Path) -> None:
    """``loss.png`` from ``metrics.jsonl``: at every checkpoint and after every probe."""
    with writing(out / "loss.png"):
        write_loss_curves(out / "metrics.jsonl", out / "loss.png")


def _prune_checkpoints(folder: Path, step: int, keep: int) -> None:
    """Remove all but the newest ``keep`` ``step-N.pt`` up to ``step``, after ``last.pt`` holds ``step``: a kill
    at any point leaves ``last.pt`` and at least ``keep`` of them (files after ``step``, from a run that
    continued past the checkpoint it resumed from, are replaced when this run gets there)."""
    done = [path for n, path in _step_checkpoints(folder) if n <= step]
    for path in done[: max(0, len(done) - keep)]:
        with writing(path):
            path.unlink(missing_ok=True)


def _open_metrics(path: Path, keep_until: int):
    """Open ``metrics.jsonl`` for appending, first dropping records after step ``keep_until`` (a resumed run
    repeats no step: records written after the checkpoint it continues from belong to steps done again)."""
    with writing(path):
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _probe(probes: list[Any], model: SoundNet, cfg: TrainConfig, where: Dist, group: Any) -> dict[str, float]:
    """``probe/<name>`` accuracies and ``probe_s``: rank 0 scores the bare model, the others wait for its result,
    so that every rank records the same and all go on together."""
    scores: dict[str, float] = {}
    if where.is_main:
        start = time.perf_counter()
        for probe in probes:
            scores[f"probe/{probe.name}"] = probe.score(model, where.device, cfg.batch_size)
        scores["probe_s"] = time.perf_counter() - start
    return broadcast_from_main(scores, where, group)


@torch.no_grad()
def _evaluate(model: SoundNet, held_out: HeldOut, loss_fn: dict[str, Any], amp: bool, where: Dist) -> dict[str, float]:
    """Held-out loss, and per teacher over all ranks: KL (nats per clip and step) and top-1 agreement for a
    posterior head, mean cosine similarity for an embedding head.

    Runs the bare model, not the DDP wrapper: ranks may hold different numbers of batches, and DDP's forward
    would wait for the others.
    """
    kinds = model.config.head_kinds
    heads = list(kinds)
    device = where.device
    sums = torch.zeros(3 + 2 * len(heads), dtype=torch.float64, device=device)  # loss, KL, agreement, clips, steps
    model.eval()
    for batch in held_out:
        x, targets = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss, _ = distill_loss(logits, targets, **loss_fn)
        posteriors = [name for name in heads if kinds[name] != EMBEDDING]
        kl = kl_terms({name: logits[name] for name in posteriors}, targets, norm="sample")
        agree = [
            (cosine_agreement if kinds[name] == EMBEDDING else top1_agreement)(logits[name], targets[name])
            for name in heads
        ]
        b, steps = x.shape[0], next(iter(targets.values())).shape[2]
        kls = [kl[name] * b if name in kl else sums.new_tensor(0.0) for name in heads]
        values = [loss * b, *kls, *agree, sums.new_tensor(b), sums.new_tensor(b * steps)]
        sums += torch.stack([v.double() for v in values])
    model.train()
    values = all_sum(torch.cat([sums, sums.new_tensor([held_out.skipped])]), where).tolist()
    clips, clip_steps, skipped = int(values[-3]), values[-2], int(values[-1])
    result: dict[str, float] = {"val_clips": clips, "val_skipped": skipped}
    if clips:
        result["val_loss"] = values[0] / clips
        for i, name in enumerate(heads):
            if kinds[name] == EMBEDDING:
                result[f"val_cos_sim_{name}"] = values[1 + len(heads) + i] / clip_steps
            else:
                result[f"val_kl_{name}"] = values[1 + i] / clips
                result[f"val_top1_{name}"] = values[1 + len(heads) + i] / clip_steps
    return result


def _progress_line(record: dict[str, Any], steps: int) -> str:
    kls = ", ".join(f"{k[3:]} {v:.4f}" for k, v in record.items() if k.startswith("kl_"))
    cosines = ", ".join(f"{k[9:]} {v:.4f}" for k, v in record.items() if k.startswith("cos_dist_"))
    kls += f"; 1-cos {cosines}" if cosines else ""
    line = (
        f"step {record['step']}/{steps}  loss {record['loss']:.4f} (KL {kls})  {record['steps_per_s']:.2f} steps/s  "
        f"{record['clips_per_s']:.1f} clips/s  data wait {100 * record['data_wait']:.0f}%  skipped {record['skipped']}"
    )
    if "val_loss" in record:
        tops = ", ".join(f"{k[9:]} {v:.3f}" for k, v in record.items() if k.startswith("val_top1_"))
        similar = ", ".join(f"{k[12:]} {v:.3f}" for k, v in record.items() if k.startswith("val_cos_sim_"))
        line += f"  | val loss {record['val_loss']:.4f}, top-1 agreement {tops or '-'}"
        line += f", cosine {similar}" if similar else ""
    if "probe_s" in record:
        scores = ", ".join(f"{k[6:]} {v:.3f}" for k, v in record.items() if k.startswith("probe/"))
        line += f"  | probe {scores} ({record['probe_s']:.1f} s)"
    return line


# ---- the end -------------------------------------------------------------------------------------------------
def _finish(
    cfg: TrainConfig, out: Path, model: SoundNet, shards: ShardSet, start: int, window: Window, where: Dist, say
) -> dict[str, Any]:
    """Check every rank holds the same weights; write ``summary.json`` (rank 0)."""
    digests = gather_digests(model, where)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights (sha256 per rank: {digests})")
    trained = max(0, cfg.steps - start)
    summary = {
        "arch": cfg.arch,
        "heads": shards.heads,
        "head_kinds": model.config.head_kinds,
        "clip_layout": shards.layout.to_json(),
        "clips": len(shards),
        "shards": len(shards.urls),
        "damaged_shards": shards.damaged,
        "excluded_shards": shards.excluded,
        "start_step": start,
        "steps": max(cfg.steps, start),
        "world_size": where.world_size,
        "loss": window.loss,
        "clips_per_s": trained * cfg.batch_size * where.world_size / (time.perf_counter() - window.run_start),
        "skipped": len(window.broken),
        "checkpoint": str(out / "checkpoints" / "last.pt") if window.last_saved is not None else None,
        "weights_sha256": digests[0],
        "rank_weights_sha256": digests,
        **window.probe,
    }
    if where.is_main:
        with writing(out / "summary.json"), atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if trained:
        say("step %d, loss %.4f; checkpoint %s", summary["steps"], summary["loss"], summary["checkpoint"])
    return summary


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
