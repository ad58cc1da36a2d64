import math

import pytest
import torch
import torch.nn.functional as F

import losses


def _t(rows: list[list[float]]) -> torch.Tensor:
    """A 2×2 (or any) grid as a 1×1×H×W tensor."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_dice_loss_by_hand():
    # logits 0 → p = 0.5 everywhere; target one pixel of four: Σpt = 0.5, Σp = 2, Σt = 1
    # Dice = (2·0.5 + s) / (2 + 1 + s) → loss ≈ 1 − 1/3 = 2/3
    s = losses.DICE_SMOOTH
    got = losses.dice_loss(_t([[0, 0], [0, 0]]), _t([[1, 0], [0, 0]]))
    assert got.item() == pytest.approx(1 - (1 + s) / (3 + s), rel=1e-6)
    # p = 0.75 (logit ln 3) on target [[1,1],[0,0]]: Σpt = 1.5, Σp = 3, Σt = 2 → loss = 1 − 3/5
    got = losses.dice_loss(torch.full((1, 1, 2, 2), math.log(3)), _t([[1, 1], [0, 0]]))
    assert got.item() == pytest.approx(1 - (3 + s) / (5 + s), rel=1e-6)


def test_bce_and_focal_by_hand():
    target = _t([[1, 1], [0, 0]])
    logits = torch.full((1, 1, 2, 2), math.log(3))  # p = 0.75
    # BCE: foreground −ln 0.75, background −ln 0.25, two of each
    assert losses.bce_loss(logits, target).item() == pytest.approx(
        (math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
    # focal γ=2: foreground p_t = .75 → (.25)²·ln(4/3); background p_t = .25 → (.75)²·ln 4
    expected = (0.0625 * math.log(4 / 3) + 0.5625 * math.log(4)) / 2
    assert losses.focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    # α = 0.25 weighs foreground by .25 and background by .75
    expected_alpha = (0.25 * 0.0625 * math.log(4 / 3) + 0.75 * 0.5625 * math.log(4)) / 2
    assert losses.focal_loss(logits, target, gamma=2.0, alpha=0.25).item() == pytest.approx(
        expected_alpha, rel=1e-6)


def test_focal_gamma0_is_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    ref = F.binary_cross_entropy_with_logits(logits, target)
    assert losses.focal_loss(logits, target, gamma=0.0).item() == pytest.approx(ref.item(), rel=1e-6)
    assert losses.bce_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (1.0, 20.0, 0.0), (0.5, 0.0, 1.0), (1.0, 2.0, 3.0)])
def test_segmentation_loss_is_weighted_sum(weights):
    dice_w, focal_w, bce_w = weights
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1, 16, 16, generator=g)
    target = (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
    got = losses.segmentation_loss(logits, target, dice_weight=dice_w, focal_weight=focal_w,
                                   bce_weight=bce_w, focal_gamma=2.0, focal_alpha=0.3)
    expected = (dice_w * losses.dice_loss(logits, target)
                + focal_w * losses.focal_loss(logits, target, 2.0, 0.3)
                + bce_w * losses.bce_loss(logits, target))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_reductions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 1, 6, 6, generator=g)
    target = (torch.rand(5, 1, 6, 6, generator=g) > 0.5).float()
    per_sample = losses.segmentation_loss(logits, target, bce_weight=1.0, reduction="none")
    assert per_sample.shape == (5,)
    assert losses.segmentation_loss(logits, target, bce_weight=1.0).item() == pytest.approx(
        per_sample.mean().item(), rel=1e-6)
    assert losses.segmentation_loss(logits, target, bce_weight=1.0, reduction="sum").item() == pytest.approx(
        per_sample.sum().item(), rel=1e-6)
    # the per-sample value of sample 2 is the loss of sample 2 alone
    alone = losses.segmentation_loss(logits[2:3], target[2:3], bce_weight=1.0)
    assert per_sample[2].item() == pytest.approx(alone.item(), rel=1e-6)
    with pytest.raises(ValueError):
        losses.dice_loss(logits, target, reduction="max")
    with pytest.raises(ValueError):
        losses.dice_loss(logits, target[:, :, :3])


def test_gradients_flow_and_empty_masks():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = torch.zeros(3, 1, 8, 8)
    target[1, 0, 2:5, 2:5] = 1  # samples 0 and 2 have empty targets
    loss = losses.segmentation_loss(logits, target, dice_weight=1.0, focal_weight=1.0, bce_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    assert torch.isfinite(logits.grad).all() and (logits.grad.abs().flatten(1).sum(1) > 0).all()
    # empty target: confident background costs ~0, confident foreground costs ~1 in Dice
    empty = torch.zeros(1, 1, 4, 4)
    assert losses.dice_loss(torch.full((1, 1, 4, 4), -30.0), empty).item() < 1e-3
    assert losses.dice_loss(torch.full((1, 1, 4, 4), 30.0), empty).item() > 0.99


def test_mask_iou_by_hand():
    # teacher mask {(0,0),(1,0)} vs gt {(0,0),(0,1)}: intersection 1, union 3 → 1/3
    teacher = torch.cat([_t([[1, -1], [1, -1]]), _t([[-1, -1], [-1, -1]])])
    gt = torch.cat([_t([[1, 1], [0, 0]]), _t([[0, 0], [0, 0]])])
    iou = losses.mask_iou(teacher, gt)
    assert iou[0].item() == pytest.approx(1 / 3, rel=1e-6)
    assert iou[1].item() == 1.0  # both empty: full agreement


def test_distillation_loss_by_hand_and_gradient():
    student = torch.zeros(2, 4, 3, 3, requires_grad=True)
    teacher = torch.ones(2, 4, 3, 3, requires_grad=True)
    teacher_logits = torch.cat([_t([[1, -1], [1, -1]]), _t([[1, 1], [-1, -1]])])
    gt = torch.cat([_t([[1, 1], [0, 0]]), _t([[1, 1], [0, 0]])])
    # IoUs 1/3 and 1 → weight 2/3; MSE((0), (1)) = 1 → loss 2/3
    loss = losses.distillation_loss(student, teacher, teacher_logits, gt)
    assert loss.item() == pytest.approx(2 / 3, rel=1e-6)
    loss.backward()
    # d/ds of w·mean((s−t)²) = w·2(s−t)/numel, and nothing reaches the teacher
    assert torch.allclose(student.grad, torch.full_like(student, (2 / 3) * 2 * (0 - 1) / student.numel()))
    assert teacher.grad is None
    # a teacher that misses every box contributes nothing
    miss = losses.distillation_loss(student, teacher, -teacher_logits.abs() - 1, gt)
    assert miss.item() == 0.0
    with pytest.raises(ValueError):
        losses.distillation_loss(student, teacher[:1], teacher_logits, gt)
