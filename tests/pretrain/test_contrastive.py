"""SimCLR / MoCo v2: view overlap, NT-Xent, the MoCo queue, loss behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medct.errors import ConfigError
from medct.nets import create_net
from medct.pretrain.contrastive import ContrastiveTask, nt_xent, overlapping_offsets
from tests.pretrain.conftest import train_steps


def test_views_overlap_by_half_along_every_axis():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        a, b = overlapping_offsets((96, 96, 80), (64, 64, 64), 0.5, g)
        for s, t, p in zip(a, b, (96, 96, 80), strict=True):
            assert 0 <= s <= p - 64 and 0 <= t <= p - 64
            assert 64 - abs(s - t) >= 32  # overlap along the axis >= 50 %


def test_nt_xent_matches_its_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    t = 0.5
    expected = 0.0
    for i in range(6):
        j = (i + 3) % 6
        others = [k for k in range(6) if k != i]
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in others)
        expected += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    assert abs(float(nt_xent(z1, z2, t)) - expected / 6) < 1e-5


def _task(method: str) -> ContrastiveTask:
    return ContrastiveTask(
        create_net("resenc_unet", filters=[8, 16, 32]),
        method=method,
        patch_size=(32, 32, 32),
        crop_size=(24, 24, 24),
        queue_size=16,
        proj_hidden=64,
        proj_dim=32,
        temperature=0.5 if method == "simclr" else 0.2,
    )


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_loss_is_finite_and_decreases(phantom_crops, method):
    torch.manual_seed(0)
    task = _task(method)
    v1, v2 = task.views(phantom_crops, augment=False, generator=torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (4, 1, 24, 24, 24)

    def loss():
        if method == "moco":
            task._momentum_update()
            return task.moco_loss(v1, v2, update=False)
        return task.simclr_loss(v1, v2)

    losses = train_steps(task, loss, steps=10, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_augmented_views_differ_and_keep_the_window():
    task = _task("simclr")
    task.augment.set_random_state(seed=0)
    x = torch.rand(2, 1, 32, 32, 32)
    v1, v2 = task.views(x, augment=True)
    assert type(v1) is torch.Tensor and not torch.equal(v1, v2)


def test_moco_queue_wraps_and_key_encoder_follows_slowly():
    task = _task("moco")
    keys = F.normalize(torch.randn(10, 32), dim=1)
    task._enqueue(keys)
    task._enqueue(keys)  # 20 keys into a queue of 16
    assert int(task.queue_ptr) == 4
    assert torch.allclose(task.queue[:, :4], keys[6:].T)
    before = next(task.key_net.parameters()).clone()
    with torch.no_grad():
        for p in task.net.parameters():
            p.add_(1.0)
    task._momentum_update()
    after = next(task.key_net.parameters())
    assert torch.allclose(after - before, torch.full_like(before, 1 - 0.999), atol=1e-6)
    assert not any(p.requires_grad for p in task.key_net.parameters())


def test_bad_settings_are_one_sentence():
    with pytest.raises(ConfigError, match="crop_size"):
        ContrastiveTask(create_net("resenc_unet", filters=[4, 8, 16]), patch_size=(32, 32, 32), crop_size=(48, 48, 48))
    with pytest.raises(ConfigError, match="method"):
        ContrastiveTask(
            create_net("resenc_unet", filters=[4, 8, 16]),
            method="byol",
            patch_size=(32, 32, 32),
            crop_size=(16, 16, 16),
        )
