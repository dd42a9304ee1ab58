"""BM-MAE: Dirichlet masking over modalities, any subset of modalities, export, reconstruction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medct.nets import create_net, encoder_state_dict
from medct.pretrain.bm_mae import BMMAETask, dirichlet_visible, patchify, unpatchify
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing
from tests.pretrain.conftest import quiet_trainer, train_steps

PHASES = ["native", "arterial", "venous"]
TINY = {"hidden_size": 48, "depth": 4, "num_heads": 4, "mlp_dim": 96, "feature_size": 8}


def _net(**kw):
    return create_net("mm_unetr", modalities=PHASES, **{**TINY, **kw})


def _task(net=None, **kw):
    return BMMAETask(
        net or _net(),
        patch_size=(32, 32, 32),
        decoder_dim=36,
        decoder_depth=1,
        decoder_heads=4,
        **kw,
        preprocessing=Preprocessing(spacing=(8.0, 8.0, 8.0)),
    )


def test_visible_budget_split_by_dirichlet():
    g = torch.Generator().manual_seed(0)
    m, n = 3, 64
    visible = round(0.25 * m * n)  # 75 % of all tokens masked
    idx = dirichlet_visible(500, m, n, visible, g)
    assert idx.shape == (500, visible)
    assert all(len(set(row.tolist())) == visible for row in idx)  # no token twice
    counts = torch.stack([((idx >= k * n) & (idx < (k + 1) * n)).sum(1) for k in range(m)], dim=1)  # (B, M)
    assert (counts <= n).all() and (counts.sum(1) == visible).all()
    share = counts.float() / visible
    assert torch.allclose(share.mean(0), torch.full((m,), 1 / m), atol=0.04)  # Dirichlet(1): equal on average
    assert (share.max(1).values > 0.8).float().mean() > 0.05  # often nearly one modality only
    assert share.std(0).min() > 0.15  # the split varies a lot from sample to sample


def test_patchify_round_trip():
    x = torch.rand(2, 3, 32, 48, 16)
    assert torch.equal(unpatchify(patchify(x, 16), 3, (2, 3, 1), 16), x)


def test_loss_is_finite_and_decreases():
    torch.manual_seed(0)
    task = _task()
    x = torch.rand(2, 3, 32, 32, 32)
    losses = train_steps(task, lambda: task.loss(x, torch.Generator().manual_seed(0)), steps=10, lr=1e-3)
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("subset", [list(s) for k in (1, 2, 3) for s in itertools.combinations(PHASES, k)])
def test_every_subset_of_modalities_runs(subset):
    torch.manual_seed(0)
    net = _net(out_channels=4).eval()
    task = _task(net)
    x = torch.rand(1, 3, 32, 32, 32)
    with torch.no_grad():
        y = net(x, present=subset)
        absent = [PHASES.index(p) for p in PHASES if p not in subset]
        changed = x.clone()
        changed[:, absent] = torch.rand_like(changed[:, absent])
        assert y.shape == (1, 4, 32, 32, 32)
        assert torch.equal(net(changed, present=subset), y)  # an absent modality's channel is never read
        rec = task.reconstruct(x, subset)
    assert rec.shape == (1, 3, 32, 32, 32) and torch.isfinite(rec).all()


def test_export_finetune_and_reconstruct_a_missing_phase(tmp_path):
    from medct.api import reconstruct_modality
    from medct.checkpoint import export_lightning_checkpoint
    from medct.data import VolumeDataModule
    from medct.finetune.segmentation import SegmentationTask
    from medct.io import Volume
    from medct.phantom import write_cohort

    write_cohort(tmp_path / "ph", n=3, seed=0, shape=(32, 32, 32), spacing=(8.0, 8.0, 8.0), phases=tuple(PHASES))
    dm = VolumeDataModule(
        keys=["phases"],
        data_dir=str(tmp_path / "ph"),
        num_workers=0,
        preprocessing=Preprocessing(spacing=(8.0, 8.0, 8.0)),
        sampling=Sampling(patch_size=(32, 32, 32), batch_size=1, num_samples=1),
        split=Split(val_fraction=0.34),
    )
    torch.manual_seed(0)
    task = _task()
    trainer = quiet_trainer(tmp_path, 2)
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "bm.ckpt")
    enc = export_lightning_checkpoint(tmp_path / "bm.ckpt", tmp_path / "enc")
    assert (enc / "mae_decoder.safetensors").is_file()

    seg = _net(out_channels=12)
    SegmentationTask(
        seg, labels=[f"c{i}" for i in range(12)], pretrained_encoder=str(enc), input_key="phases", present=["venous"]
    )
    for k, v in encoder_state_dict(task.net).items():
        assert torch.equal(encoder_state_dict(seg)[k], v)

    # an anisotropic LPS grid: the reconstruction comes back on it
    affine = np.array([[-6.0, 0, 0, 90], [0, -7.0, 0, 80], [0, 0, 9.0, -40], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    native = Volume(rng.normal(0, 200, (30, 28, 20)).astype(np.float32), affine)
    venous = Volume(rng.normal(50, 200, (30, 28, 20)).astype(np.float32), affine)
    out = reconstruct_modality(enc, {"native": native, "venous": venous}, device="cpu")
    assert set(out) == set(PHASES)
    for vol in out.values():
        assert vol.shape == native.shape and np.allclose(vol.affine, affine)
        assert np.isfinite(vol.array).all() and -1000.0 <= vol.array.min() and vol.array.max() <= 1000.0
