"""Losses for the three QAT stages: segmentation (Dice + focal/BCE on mask logits) and the stage-1
embedding distillation weighted by how well the fp32 teacher segments the batch.

All functions take logits N×1×H×W (the mask decoder's low-res output, H = W = 256) and binary
targets of the same shape; they return a scalar (``reduction="mean"``) or one value per sample
(``reduction="none"``, shape N). Per-pixel terms are averaged within a sample first, so the "mean"
of a batch equals the mean of its per-sample values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # keeps Dice finite for empty target and prediction (MONAI's default smoothing)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an N-vector: "mean" → scalar, "sum" → scalar, "none" → unchanged."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape or logits.dim() < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must share a "
                         "shape N×1×H×W")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities: 1 − (2Σpt + s) / (Σp + Σt + s) per sample.

    logits, target: N×1×H×W (target in {0, 1}). Returns a scalar or N values.
    """
    _check_pair(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.to(prob.dtype).flatten(1)
    intersection = (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return _reduce(1.0 - (2.0 * intersection + smooth) / (denominator + smooth), reduction)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over pixels per sample. N×1×H×W → scalar or N."""
    _check_pair(logits, target)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return _reduce(per_pixel.flatten(1).mean(1), reduction)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017): α_t (1 − p_t)^γ · BCE, averaged over pixels per sample.

    p_t is the probability of the true class; α_t = α for foreground and 1 − α for background, or 1
    when `alpha` is None. γ = 0, α = None gives plain BCE. N×1×H×W → scalar or N.
    """
    _check_pair(logits, target)
    target = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    per_pixel = ce * (1.0 - p_t) ** gamma
    if alpha is not None:
        per_pixel = per_pixel * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return _reduce(per_pixel.flatten(1).mean(1), reduction)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      focal_weight: float = 1.0, bce_weight: float = 0.0, focal_gamma: float = 2.0,
                      focal_alpha: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Weighted sum dice_weight·Dice + focal_weight·focal + bce_weight·BCE on mask logits.

    logits, target: N×1×H×W. Terms with weight 0 are not computed. Returns a scalar or N values.
    `focal_alpha` defaults to None (no class weighting): inside a box prompt the foreground is not
    the rare class that RetinaNet's α = 0.25 was tuned for.
    """
    _check_pair(logits, target)
    total = logits.new_zeros(logits.shape[0])
    if dice_weight:
        total = total + dice_weight * dice_loss(logits, target, reduction="none")
    if focal_weight:
        total = total + focal_weight * focal_loss(logits, target, focal_gamma, focal_alpha, reduction="none")
    if bce_weight:
        total = total + bce_weight * bce_loss(logits, target, reduction="none")
    return _reduce(total, reduction)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with a binary target per sample: N×1×H×W → N (1 when both are empty)."""
    _check_pair(logits, target)
    pred = (logits > 0).flatten(1)
    target = target.flatten(1) > 0.5
    intersection = (pred & target).sum(1).to(torch.float32)
    union = (pred | target).sum(1).to(torch.float32)
    # both empty: the teacher agrees with the ground truth, so its embedding is fully trusted
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))


def distillation_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                      teacher_logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Stage-1 distillation: mean_n IoU(teacher_logits[n] > 0, gt_mask[n]) × MSE(student, teacher).

    student_embedding, teacher_embedding: B×256×64×64 image embeddings; teacher_logits, gt_mask:
    N×1×H×W (N boxes, possibly several per image, so N may differ from B). The IoU is computed per
    box, averaged over the N boxes to one scalar weight, and multiplies the MSE averaged over every
    embedding element; the weight and the teacher embedding carry no gradient. Returns a scalar.
    """
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(f"student embedding {tuple(student_embedding.shape)} and teacher embedding "
                         f"{tuple(teacher_embedding.shape)} differ in shape")
    weight = mask_iou(teacher_logits.detach(), gt_mask).mean()
    mse = F.mse_loss(student_embedding, teacher_embedding.detach().to(student_embedding.dtype))
    return weight.to(mse.dtype) * mse
