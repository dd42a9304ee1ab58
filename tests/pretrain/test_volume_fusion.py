"""Volume Fusion: box statistics, the fusion formula, pairing across volumes, loss behaviour."""

from __future__ import annotations

import pytest
import torch

from medct.errors import ConfigError
from medct.nets import create_net
from medct.pretrain.volume_fusion import ALPHAS, VolumeFusionTask, fuse, fusion_boxes
from tests.pretrain.conftest import train_steps


def test_boxes_follow_the_papers_settings():
    """10-39 boxes with sides in [8, 0.625 x patch]: check through the label map they leave."""
    g = torch.Generator().manual_seed(0)
    labels = fusion_boxes(64, (48, 48, 48), len(ALPHAS), generator=g)
    assert labels.shape == (64, 1, 48, 48, 48) and labels.dtype == torch.long
    assert set(labels.unique().tolist()) <= set(range(len(ALPHAS)))
    # every class occurs over the batch, and a good part of each sample is covered by boxes
    assert set(labels.unique().tolist()) == set(range(len(ALPHAS)))
    nonzero = (labels > 0).float().mean(dim=(1, 2, 3, 4))
    assert 0.05 < float(nonzero.mean()) < 0.95


def test_box_count_and_sides(monkeypatch):
    import medct.pretrain.volume_fusion as vf

    drawn: list[tuple[int, int]] = []
    real = torch.randint

    def spy(lo, hi, size, generator=None):
        drawn.append((int(lo), int(hi)))
        return real(lo, hi, size, generator=generator)

    monkeypatch.setattr(vf.torch, "randint", spy)
    fusion_boxes(1, (48, 48, 48), 5, generator=torch.Generator().manual_seed(1))
    assert drawn[0] == (10, 40)  # number of boxes: 10..39
    assert (8, 31) in drawn  # sides: 8..int(0.625 * 48) = 30


def test_fusion_is_alpha_blend_and_later_boxes_overwrite():
    fg, bg = torch.full((1, 1, 8, 8, 8), 1.0), torch.zeros(1, 1, 8, 8, 8)
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[..., :4, :, :] = 2  # alpha 0.5
    labels[..., 2:4, :, :] = 4  # a later box over part of it: alpha 1
    fused = fuse(fg, bg, labels, ALPHAS)
    assert torch.equal(fused[0, 0, :2], torch.full((2, 8, 8), 0.5))
    assert torch.equal(fused[0, 0, 2:4], torch.ones(2, 8, 8))
    assert torch.equal(fused[0, 0, 4:], torch.zeros(4, 8, 8))  # outside every box: the background


def test_foreground_and_background_come_from_different_volumes():
    task = VolumeFusionTask(create_net("resenc_unet", filters=[4, 8, 16], out_channels=5), patch_size=(16, 16, 16))
    # two volumes x two crops each, as list_data_collate orders them: crop i over crop i + 2
    x = torch.stack([torch.full((1, 16, 16, 16), float(v)) for v in (1, 1, 3, 3)])
    fused, labels = task.fused_batch(x, shift=2, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor(ALPHAS)[labels]
    assert torch.allclose(fused[0], alpha[0] * 1 + (1 - alpha[0]) * 3)
    assert torch.allclose(fused[2], alpha[2] * 3 + (1 - alpha[2]) * 1)


def test_output_channels_must_match_alphas():
    with pytest.raises(ConfigError, match="out_channels to 5"):
        VolumeFusionTask(create_net("resenc_unet", filters=[4, 8, 16], out_channels=2), patch_size=(16, 16, 16))


def test_loss_is_finite_and_decreases(phantom_crops):
    torch.manual_seed(0)
    task = VolumeFusionTask(
        create_net("resenc_unet", filters=[8, 16, 32], out_channels=5),
        patch_size=(32, 32, 32),
        num_boxes=(3, 8),
        min_side=6,
    )
    fused, labels = task.fused_batch(phantom_crops, shift=1, generator=torch.Generator().manual_seed(0))
    losses = train_steps(task, lambda: task.loss_fn(task.net(fused), labels), steps=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
