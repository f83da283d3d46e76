"""The distillation loss: KL(teacher || student) per output step and posterior head, as in the SoundNet reference
code, and the cosine distance per step for embedding heads.

The reference (``main_train.lua``) applies ``nn.DistKLDivCriterion`` per step and head, which averages over
batch x classes, then averages the terms and multiplies by lambda = 250. Averaging the per-step terms equals one
``kl_div(..., reduction='mean')`` over ``[B, C, steps]``, which is what is computed here. An embedding head (an image
tower's feature, as Wav2CLIP distils CLIP's) is trained on 1 - cos(student, teacher), averaged over batch x steps.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from soundnet.shards.schema import EMBEDDING

KL_WEIGHT = 250.0
"""The paper's lambda: it offsets the 1/C of averaging over classes, so gradients are not tiny."""

COSINE_WEIGHT = 1.0
"""The weight of the mean cosine distance over embedding heads. 1 - cos lies in [0, 2] and starts at about 1 for a
fresh head, the size of the paper's 250 x mean KL at the start (about 1.5 with the two real teachers); at weight 1
the gradient it sends into the shared layers is of the same order as the KL heads' (measured at initialisation on
four real clips: 10 against 21, tests/test_timm.py), so neither kind of teacher drowns the other."""

KL_NORMS = ("mean", "sample")
"""``mean``: average over batch x classes x steps (the paper). ``sample``: sum over classes, average over batch x
steps, i.e. the KL of each clip's step distribution, independent of the class count."""


def kl_terms(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    norm: str = "mean",
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """KL(teacher || student) per head, each a scalar.

    ``logits[name]`` are the student's ``[B, C, steps]`` head outputs, ``targets[name]`` the teacher's log-probs of
    the same shape. With ``temperature`` T != 1 both distributions are softened (teacher log-probs are divided by T
    and renormalised) and the KL is multiplied by T^2, so gradient sizes do not depend on T (Hinton et al.).
    """
    if norm not in KL_NORMS:
        raise ValueError(f"KL normalisation {norm!r} is not one of {KL_NORMS}")
    terms = {}
    for name, z in logits.items():
        log_q = F.log_softmax(z.float() / temperature, dim=1)
        log_p = targets[name].float()
        if temperature != 1.0:
            log_p = F.log_softmax(log_p / temperature, dim=1)
        count = z.numel() if norm == "mean" else z.shape[0] * z.shape[2]
        terms[name] = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / count * temperature**2
    return terms


def cosine_terms(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1 - cos(student, teacher) per head, averaged over batch x steps; ``[B, D, steps]`` each."""
    return {
        name: 1 - F.cosine_similarity(z.float(), targets[name].float(), dim=1).mean() for name, z in outputs.items()
    }


def distill_loss(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    kinds: dict[str, str] | None = None,
    weight: float = KL_WEIGHT,
    cosine_weight: float = COSINE_WEIGHT,
    norm: str = "mean",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss ``weight x mean KL over posterior heads + cosine_weight x mean (1 - cos) over embedding
    heads`` and the unweighted per-head terms, in head order. ``kinds`` names the embedding heads; by default
    every head is a posterior."""
    kinds = kinds or {}
    embedding = {name for name in outputs if kinds.get(name) == EMBEDDING}
    kl = kl_terms({n: z for n, z in outputs.items() if n not in embedding}, targets, norm=norm, temperature=temperature)
    cos = cosine_terms({n: outputs[n] for n in embedding}, targets)
    loss = sum(w * torch.stack(list(t.values())).mean() for w, t in ((weight, kl), (cosine_weight, cos)) if t)
    return loss, {name: kl[name] if name in kl else cos[name] for name in outputs}


def top1_agreement(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many (clip, step) pairs the student's top class equals the teacher's (a count, for summing over ranks)."""
    return (logits.argmax(dim=1) == targets.argmax(dim=1)).sum()


def cosine_agreement(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cos(student, teacher) summed over (clip, step) pairs (a sum, for summing over ranks)."""
    return F.cosine_similarity(outputs.float(), targets.float(), dim=1).sum()
