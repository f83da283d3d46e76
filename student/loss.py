"""The distillation loss: KL(teacher || student) per output step and head, as in the SoundNet reference code.

The reference (``main_train.lua``) applies ``nn.DistKLDivCriterion`` per step and head, which averages over
batch x classes, then averages the terms and multiplies by lambda = 250. Averaging the per-step terms equals one
``kl_div(..., reduction='mean')`` over ``[B, C, steps]``, which is what is computed here.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

KL_WEIGHT = 250.0
"""The paper's lambda: it offsets the 1/C of averaging over classes, so gradients are not tiny."""

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


def distill_loss(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    weight: float = KL_WEIGHT,
    norm: str = "mean",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss ``weight x mean over heads of KL`` and the unweighted per-head KL terms."""
    terms = kl_terms(logits, targets, norm=norm, temperature=temperature)
    return weight * torch.stack(list(terms.values())).mean(), terms


def top1_agreement(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many (clip, step) pairs the student's top class equals the teacher's (a count, for summing over ranks)."""
    return (logits.argmax(dim=1) == targets.argmax(dim=1)).sum()
