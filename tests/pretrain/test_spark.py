"""SparK: mask statistics, the sparse-convolution emulation, loss behaviour (tiny phantom crops)."""

from __future__ import annotations

import pytest
import torch

from medct.errors import ConfigError
from medct.nets import create_net
from medct.pretrain.spark import SparKTask, masked_instance_norm, patch_normalised, random_cell_mask, upsample_mask
from tests.pretrain.conftest import train_steps


def test_mask_masks_exactly_the_ratio_of_cells_per_sample():
    g = torch.Generator().manual_seed(0)
    mask = random_cell_mask(6, (10, 10, 10), 0.75, g)  # 160^3 patches at stride 16
    assert mask.shape == (6, 1, 10, 10, 10)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.view(6, -1).sum(dim=1) == 250).all()  # 1000 cells, round(750) masked in every sample
    assert not torch.equal(mask[0], mask[1])  # drawn per sample


def test_task_grid_follows_patch_and_stride():
    task = SparKTask(create_net("resenc_unet", filters=[4, 8, 16]), patch_size=(160, 160, 160), mask_stride=16)
    assert task.grid == [10, 10, 10]
    with pytest.raises(ConfigError, match="divisible by mask_stride"):
        SparKTask(create_net("resenc_unet", filters=[4, 8, 16]), patch_size=(40, 40, 40), mask_stride=16)


@pytest.mark.parametrize(
    "name,args", [("resenc_unet", {"filters": [4, 8, 16, 32, 32]}), ("unet", {"channels": [4, 8, 16, 32]})]
)
def test_masked_voxels_never_reach_visible_features(name, args):
    torch.manual_seed(0)
    task = SparKTask(create_net(name, **args), patch_size=(32, 32, 32), mask_stride=8)
    x = torch.rand(2, 1, 32, 32, 32)
    visible = random_cell_mask(2, task.grid, 0.75)
    full = upsample_mask(visible, x.shape[2:])
    changed = x + (1 - full) * 10 * torch.randn_like(x)  # only voxels inside masked cells change
    a, b = task.encode(x, visible), task.encode(changed, visible)
    masked_stages = 0
    for fa, fb in zip(a, b, strict=True):
        m = upsample_mask(visible, fa.shape[2:])
        if m is None:  # a stage coarser than the mask grid is dense
            continue
        masked_stages += 1
        assert torch.equal(fa * m, fb * m)  # every visible feature unchanged, bit for bit
        assert (fa * (1 - m)).abs().max() == 0  # masked positions stay empty at every stage
    assert masked_stages >= 3
    assert not torch.equal(
        task.net.encoder_features(x)[0], task.net.encoder_features(changed)[0]
    )  # dense run sees them


def test_deeper_stages_coarser_than_the_mask_are_dense():
    task = SparKTask(create_net("resenc_unet", filters=[4, 8, 16, 16]), patch_size=(32, 32, 32), mask_stride=16)
    visible = random_cell_mask(1, task.grid, 0.75)  # grid 2^3; the stride-8 stage is 4^3, finer: masked
    feats = task.encode(torch.rand(1, 1, 32, 32, 32), visible)
    assert upsample_mask(visible, feats[-1].shape[2:]) is not None
    assert upsample_mask(visible, (1, 1, 1)) is None


def test_masked_norm_uses_visible_statistics_only():
    x = torch.randn(2, 3, 8, 8, 8)
    vis = (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    y = masked_instance_norm(x, vis, None, None, 1e-5)
    for b in range(2):
        for c in range(3):
            values = y[b, c][vis[b, 0] > 0]
            assert abs(float(values.mean())) < 1e-5 and abs(float(values.var(unbiased=False)) - 1) < 1e-3
    assert (y * (1 - vis)).abs().max() == 0


def test_group_norm_networks_are_refused():
    with pytest.raises(ConfigError, match="GroupNorm"):
        SparKTask(create_net("segresnet", init_filters=8), patch_size=(32, 32, 32), mask_stride=8)


def test_norm_target_is_per_cell_standardised():
    x = torch.rand(1, 1, 16, 16, 16) * 5 + 2
    t = patch_normalised(x, (8, 8, 8))
    cell = t[0, 0, :8, :8, :8]
    assert abs(float(cell.mean())) < 1e-4 and abs(float(cell.std(unbiased=False)) - 1) < 1e-3


@pytest.mark.parametrize("norm_target", [False, True])
def test_loss_is_finite_and_decreases(phantom_crops, norm_target):
    torch.manual_seed(0)
    task = SparKTask(
        create_net("resenc_unet", filters=[8, 16, 32]), patch_size=(32, 32, 32), mask_stride=8, norm_target=norm_target
    )
    losses = train_steps(task, lambda: task.loss(phantom_crops, torch.Generator().manual_seed(0)), steps=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
