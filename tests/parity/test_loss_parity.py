"""medct's pretraining and Turbolift losses against the reference code on the same inputs (the
references need their frameworks to import - nnssl its trainers and batchgenerators, Turbolift
its Lightning 1.x module - so the functions are ported here unchanged but for `.cuda()`).

References:
  NT-Xent        MIC-DKFZ/nnssl       src/nnssl/training/loss/contrastive_loss.py      7044864
  Volume Fusion  MIC-DKFZ/nnssl       src/nnssl/ssl_data/dataloading/volume_fusion_transform.py 7044864
  focal Tversky  soumickmj/Turbolift  Utils/seglosses.py                               b03e0cc
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medct.finetune.losses import FocalTverskyLoss
from medct.pretrain.contrastive import nt_xent
from medct.pretrain.volume_fusion import ALPHAS, fuse, fusion_boxes

# --------------------------------------------------------------------------------------- NT-Xent


class _RefNTXentLoss(nn.Module):
    """contrastive_loss.py NTXentLoss, cosine similarity."""

    def __init__(self, batch_size: int, temperature: float) -> None:
        super().__init__()
        self.batch_size, self.temperature = batch_size, temperature
        diag = np.eye(2 * batch_size)
        l1 = np.eye(2 * batch_size, 2 * batch_size, k=-batch_size)
        l2 = np.eye(2 * batch_size, 2 * batch_size, k=batch_size)
        self.mask = (1 - torch.from_numpy(diag + l1 + l2)).type(torch.bool)
        self._cosine_similarity = nn.CosineSimilarity(dim=-1)
        self.criterion = nn.CrossEntropyLoss(reduction="sum")

    def forward(self, zis: torch.Tensor, zjs: torch.Tensor) -> torch.Tensor:
        representations = torch.cat([zjs, zis], dim=0)
        sim = self._cosine_similarity(representations.unsqueeze(1), representations.unsqueeze(0))
        l_pos = torch.diag(sim, self.batch_size)
        r_pos = torch.diag(sim, -self.batch_size)
        positives = torch.cat([l_pos, r_pos]).view(2 * self.batch_size, 1)
        negatives = sim[self.mask].view(2 * self.batch_size, -1)
        logits = torch.cat((positives, negatives), dim=1) / self.temperature
        labels = torch.zeros(2 * self.batch_size).long()
        return self.criterion(logits, labels) / (2 * self.batch_size)


def test_nt_xent_equals_nnssl_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    for n, t in ((2, 0.5), (6, 0.1), (16, 0.5)):  # nnssl's SimCLR uses 0.5
        z1 = torch.randn(n, 32, generator=g, requires_grad=True)
        z2 = torch.randn(n, 32, generator=g, requires_grad=True)
        ours = nt_xent(z1, z2, t)
        (g1, g2) = torch.autograd.grad(ours, (z1, z2))
        ref = _RefNTXentLoss(n, t)(z1, z2)
        (r1, r2) = torch.autograd.grad(ref, (z1, z2))
        assert abs(float(ours) - float(ref)) <= 1e-5
        torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- Volume Fusion


def _ref_mix_image(fg: np.ndarray, bg: np.ndarray, coefficient: np.ndarray) -> np.ndarray:
    return coefficient * fg + (1 - coefficient) * bg


def _ref_bboxes(
    num_patches: int, patch_size: tuple[int, int, int], bounds: list[tuple[int, int]]
) -> tuple[np.ndarray, ...]:
    xs = np.random.randint(*bounds[0], size=num_patches)
    ys = np.random.randint(*bounds[1], size=num_patches)
    zs = np.random.randint(*bounds[2], size=num_patches)
    x_starts = np.random.randint(0, patch_size[0] - xs + 1, size=num_patches)
    y_starts = np.random.randint(0, patch_size[1] - ys + 1, size=num_patches)
    z_starts = np.random.randint(0, patch_size[2] - zs + 1, size=num_patches)
    return xs, ys, zs, x_starts, y_starts, z_starts


def _ref_overlay(image: np.ndarray, values: np.ndarray, xs, ys, zs, x_starts, y_starts, z_starts) -> np.ndarray:  # noqa: ANN001
    for i in range(len(xs)):
        image[
            :, x_starts[i] : x_starts[i] + xs[i], y_starts[i] : y_starts[i] + ys[i], z_starts[i] : z_starts[i] + zs[i]
        ] = values[i]
    return image


def _ref_mix_batch(
    images: np.ndarray, count: tuple[int, int], size: list[tuple[int, int]], coefficients: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    half = images.shape[0] // 2
    fg, bg = images[:half], images[half:]
    _, _, X, Y, Z = fg.shape
    alpha_images = np.zeros_like(fg)
    masks = np.zeros((half, 1, X, Y, Z), dtype=np.float32)
    for i in range(half):
        num = np.random.randint(*count)
        indices = np.random.randint(0, len(coefficients), size=num)
        boxes = _ref_bboxes(num, (X, Y, Z), size)
        alpha_images[i] = _ref_overlay(alpha_images[i], coefficients[indices], *boxes)
        masks[i] = _ref_overlay(masks[i], indices, *boxes)
    return _ref_mix_image(fg, bg, alpha_images), masks


def test_volume_fusion_fuse_equals_nnssl_mix_batch_on_its_boxes() -> None:
    """nnssl's boxes (its own draws), given to medct's `fuse` as the class map: the same mixed images;
    and nnssl's Mis-FM coefficients are medct's ALPHAS."""
    coefficients = np.linspace(0, 1, 5, endpoint=True)
    np.testing.assert_allclose(coefficients, ALPHAS)
    patch = (24, 20, 16)
    np.random.seed(3)
    images = np.random.rand(4, 1, *patch).astype(np.float32)
    mixed, masks = _ref_mix_batch(images, (10, 40), [(8, int(0.625 * s) + 1) for s in patch], coefficients)
    ours = fuse(torch.from_numpy(images[:2]), torch.from_numpy(images[2:]), torch.from_numpy(masks).long(), ALPHAS)
    np.testing.assert_allclose(ours.numpy(), mixed, rtol=0, atol=1e-6)


def test_volume_fusion_boxes_cover_the_patch_as_nnssl_s_do() -> None:
    """medct's `fusion_boxes` (torch draws, box by box) against nnssl's (numpy, per batch element):
    over 1000 draws each, the share of the patch that keeps label 0 (outside every box, or a box of
    alpha index 0) agrees within 0.015, and each other index within 0.025 - what the box count
    [10, 40), sides [8, 0.625 p], uniform starts and uniform alpha indices give (the last box drawn
    covers the others, so per-image shares vary a lot: hence many draws)."""
    patch = (32, 24, 16)
    n = 1000
    g = torch.Generator().manual_seed(0)
    ours = fusion_boxes(n, patch, len(ALPHAS), generator=g)
    np.random.seed(0)
    blank = np.zeros((2 * n, 1, *patch), np.float32)
    _, ref = _ref_mix_batch(blank, (10, 40), [(8, int(0.625 * s) + 1) for s in patch], np.linspace(0, 1, 5))
    share_ours = torch.bincount(ours.flatten(), minlength=5).double() / ours.numel()
    share_ref = torch.bincount(torch.from_numpy(ref).long().flatten(), minlength=5).double() / ref.size
    assert abs(float(share_ours[0] - share_ref[0])) <= 0.015, (share_ours, share_ref)
    assert float((share_ours[1:] - share_ref[1:]).abs().max()) <= 0.025, (share_ours, share_ref)
    assert 0.3 < float(share_ref[0]) < 0.6  # the boxes leave part of the patch uncovered: not a trivial match


# --------------------------------------------------------------------------------- focal Tversky


def _ref_focal_tversky_loss(
    pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, beta: float = 0.3, gamma: float = 4.0 / 3.0
) -> torch.Tensor:
    """seglosses.py focal_tversky_loss: pred / target (B, C, ...) probabilities / one-hot."""
    smooth = 1.0
    ftl = 0.0
    for c in range(pred.shape[1]):
        pflat = pred[:, c].contiguous().view(-1)
        gflat = target[:, c].contiguous().view(-1)
        intersection = (pflat * gflat).sum()
        non_p_g = ((1.0 - pflat) * gflat).sum()
        p_non_g = (pflat * (1.0 - gflat)).sum()
        ti = (intersection + smooth) / (intersection + alpha * non_p_g + beta * p_non_g + smooth)
        ftl += (1.0 - ti) ** (1.0 / gamma)
    return ftl


def test_focal_tversky_equals_turbolift_value_and_gradient() -> None:
    """The reference segments one structure (the liver: one sigmoid channel); medct's softmax over
    background + liver gives the same foreground probability, so value and gradient must agree.
    With several organs medct averages what the reference would sum."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 7, 5, generator=g, requires_grad=True)
    labels = (torch.rand(2, 1, 6, 7, 5, generator=g) > 0.7).long()
    ours = FocalTverskyLoss()(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    fg = torch.softmax(logits, dim=1)[:, 1:]
    ref = _ref_focal_tversky_loss(fg, labels.float())
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert abs(float(ours) - float(ref)) <= 1e-6
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    # three organs: the mean of the reference's per-channel terms
    logits3 = torch.randn(2, 4, 6, 7, 5, generator=g)
    labels3 = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    onehot = nn.functional.one_hot(labels3[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    ref3 = _ref_focal_tversky_loss(torch.softmax(logits3, 1)[:, 1:], onehot[:, 1:]) / 3
    assert abs(float(FocalTverskyLoss()(logits3, labels3)) - float(ref3)) <= 1e-6
