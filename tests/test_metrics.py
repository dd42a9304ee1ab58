"""medct.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medct import metrics


def test_dice_hand_values_and_empty_convention() -> None:
    pred = np.array([[[1, 1, 0, 2, 0, 0]]])
    ref = np.array([[[1, 0, 0, 2, 2, 3]]])
    d = metrics.dice_per_label(pred, ref)
    assert d[1] == pytest.approx(2 * 1 / (2 + 1))
    assert d[2] == pytest.approx(2 * 1 / (1 + 2))
    assert d[3] == 0.0  # only in the reference
    # a label absent from both: NaN by default, or the chosen score
    assert math.isnan(metrics.dice_per_label(pred, ref, labels=[4])[4])
    assert metrics.dice_per_label(pred, ref, labels=[4], empty_score=1.0)[4] == 1.0
    assert metrics.dice_per_label(ref, ref) == {2: 1.0, 1: 1.0, 3: 1.0}


def test_hd95_uses_spacing() -> None:
    pred = np.zeros((6, 6, 8), np.uint8)
    ref = np.zeros_like(pred)
    pred[2, 2, 2] = 1
    ref[2, 2, 5] = 1  # 3 voxels apart along k at 2 mm
    hd = metrics.hd95_per_label(pred, ref, spacing=(1.0, 1.0, 2.0))
    assert hd[1] == pytest.approx(6.0)
    only_pred = metrics.hd95_per_label(pred, np.zeros_like(pred), labels=[1, 2])
    assert only_pred[1] == math.inf and math.isnan(only_pred[2])


def test_mae_psnr_masked() -> None:
    ref = np.linspace(-1000, 1000, 4 * 5 * 6).reshape(4, 5, 6)
    pred = ref + 10.0
    mask = np.zeros(ref.shape, bool)
    mask[1:3] = True
    pred[0] += 500.0  # outside the mask: must not count
    assert metrics.mae(pred, ref, mask) == pytest.approx(10.0)
    assert metrics.psnr(pred, ref, data_range=2000.0, mask=mask) == pytest.approx(10 * math.log10(2000.0**2 / 100.0))
    assert metrics.psnr(ref, ref, data_range=1.0) == math.inf
    with pytest.raises(ValueError):
        metrics.mae(pred, ref, np.zeros(ref.shape, bool))


def test_ssim_identical_and_masked() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (32, 12, 12)).astype(np.float32)
    assert metrics.ssim(ref, ref, data_range=1.0) == pytest.approx(1.0, abs=1e-5)
    noisy = ref.copy()
    noisy[:16] = rng.uniform(0, 1, (16, 12, 12))  # corrupt one half only
    mask_clean = np.zeros(ref.shape, bool)
    mask_clean[21:] = True  # 11-voxel windows centred at i >= 21 only see the clean half (i >= 16)
    assert metrics.ssim(noisy, ref, data_range=1.0, mask=mask_clean) == pytest.approx(1.0, abs=1e-5)
    assert metrics.ssim(noisy, ref, data_range=1.0) < 0.9


def test_synthrad_scores_hand_values() -> None:
    """SynthRAD2025: MAE unclipped inside the mask, PSNR clipped to [-1024, 3071] (range 4095)."""
    rng = np.random.default_rng(0)
    ct = rng.uniform(-900, 1500, (20, 20, 20))
    ct[5, 5, 5] = 3071.0
    mask = np.zeros(ct.shape, bool)
    mask[2:18, 2:18, 2:18] = True
    sct = ct + 10.0
    sct[~mask] = 5000.0  # outside the mask: never counts
    sct[5, 5, 5] = 3071.0 + 4096 * 10.0  # clipped to 3071 for PSNR (error 0 there), counted in full by MAE
    n = mask.sum()
    scores = metrics.synthrad_scores(sct, ct, mask)
    assert scores["mae"] == pytest.approx((10.0 * (n - 1) + 4096 * 10.0) / n)
    assert scores["psnr"] == pytest.approx(10 * math.log10(4095.0**2 / (100.0 * (n - 1) / n)))


def test_ms_ssim_masked() -> None:
    rng = np.random.default_rng(1)
    ct = rng.uniform(-500, 500, (40, 36, 30))
    mask = np.zeros(ct.shape, bool)
    mask[5:35, 5:31, 5:25] = True
    assert metrics.ms_ssim_masked(ct, ct, mask) == pytest.approx(1.0)
    # the luminance term has weight 0 at every scale (as in the challenge code): an offset is seen
    # only where the zero-padded 2x2x2 smoothing meets the volume's border
    whole = np.ones(ct.shape, bool)
    assert 0.99 < metrics.ms_ssim_masked(ct + 200.0, ct, whole) < 1.0
    noisy = ct + rng.normal(0, 300, ct.shape)
    worse = ct + rng.normal(0, 900, ct.shape)
    a, b = metrics.ms_ssim_masked(noisy, ct, mask), metrics.ms_ssim_masked(worse, ct, mask)
    assert 0.0 < b < a < 1.0
    outside = ct.copy()
    outside[~mask] = 3000.0  # set to -1024 before scoring: no effect
    assert metrics.ms_ssim_masked(outside, ct, mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        metrics.ms_ssim_masked(ct, ct, np.zeros(ct.shape, bool))


def test_tre() -> None:
    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    b = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]])
    np.testing.assert_allclose(metrics.tre(a, b), [5.0, 0.0])


def test_jacobian_and_folding() -> None:
    spacing = (2.0, 1.0, 3.0)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip((5, 6, 7), spacing, strict=True)], indexing="ij")  # mm
    # u = (0.5 x, 0.2 y, 0) -> J = diag(1.5, 1.2, 1) -> det 1.8 everywhere
    u = np.stack([0.5 * grid[0], 0.2 * grid[1], np.zeros_like(grid[2])])
    np.testing.assert_allclose(metrics.jacobian_determinant(u, spacing), 1.8)
    assert metrics.folding_fraction(u, spacing) == 0.0
    # u_x = -2 x -> det = -1: every voxel folds
    fold = np.stack([-2.0 * grid[0], np.zeros_like(grid[1]), np.zeros_like(grid[2])])
    assert metrics.folding_fraction(fold, spacing) == 1.0
    mask = np.zeros(grid[0].shape, bool)
    mask[0, 0, 0] = True
    assert metrics.folding_fraction(fold, spacing, mask) == 1.0
