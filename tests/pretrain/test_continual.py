"""Continual pretraining: replay batches, the data module, lineage of the encoder card."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from medct.errors import ConfigError, InputPathError
from medct.nets import create_net
from medct.phantom import write_cohort
from medct.pretrain.base import Optimisation
from medct.pretrain.continual import ContinualDataModule, ReplayBatchSampler
from medct.pretrain.spark import SparKTask
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing
from tests.pretrain.conftest import quiet_trainer


@pytest.mark.parametrize("fraction,batch", [(0.0, 2), (0.1, 2), (0.25, 4), (0.5, 2), (0.3, 3)])
def test_replay_fraction_is_exact_on_average(fraction, batch):
    sampler = ReplayBatchSampler(n_new=100, n_old=7, batch_size=batch, replay_fraction=fraction, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50 if batch == 2 else True
    assert all(len(b) == batch for b in batches)
    old = sum(i >= 100 for b in batches for i in b)
    total = sum(len(b) for b in batches)
    assert abs(old / total - fraction) <= batch / total  # within one crop of the asked share
    assert all(i < 107 for b in batches for i in b)


def test_batches_reshuffle_per_epoch():
    sampler = ReplayBatchSampler(n_new=10, n_old=4, batch_size=2, replay_fraction=0.5, seed=0)
    first, second = list(sampler), list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="replay_fraction"):
        ContinualDataModule(data_dir=str(tmp_path), replay_data_dir=str(tmp_path), replay_fraction=1.0)
    with pytest.raises(InputPathError, match="exactly one of data.replay_data_dir"):
        ContinualDataModule(data_dir=str(tmp_path), replay_fraction=0.25)


def test_continual_phase_from_an_exported_encoder(tmp_path):
    from medct.checkpoint import export_lightning_checkpoint, read_model_card
    from medct.data import VolumeDataModule

    write_cohort(tmp_path / "ct", n=3, seed=0, shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    write_cohort(tmp_path / "cbct", n=3, seed=9, variant="cbct", shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    common = dict(
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)),
        sampling=Sampling(patch_size=(32, 32, 32), batch_size=2, num_samples=1),
        split=Split(val_fraction=0.34),
        num_workers=0,
    )

    lrs: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def trainer(steps):
        return quiet_trainer(tmp_path, steps, [RecordLR()])

    def task(**kw):
        return SparKTask(
            create_net("resenc_unet", filters=[4, 8, 16]),
            patch_size=(32, 32, 32),
            mask_stride=8,
            **kw,
            preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)),
        )

    torch.manual_seed(0)
    t1 = trainer(1)
    t1.fit(task(), datamodule=VolumeDataModule(keys=["image"], data_dir=str(tmp_path / "ct"), **common))
    t1.save_checkpoint(tmp_path / "ct.ckpt")
    enc = export_lightning_checkpoint(tmp_path / "ct.ckpt", tmp_path / "enc_ct")

    dm = ContinualDataModule(
        data_dir=str(tmp_path / "cbct"), replay_data_dir=str(tmp_path / "ct"), replay_fraction=0.5, **common
    )
    phase2 = task(pretrained_encoder=str(enc), optim=Optimisation(scheduler="wsd", warmup_steps=0))
    t2 = trainer(2)
    lrs.clear()
    t2.fit(phase2, datamodule=dm)
    assert t2.global_step == 2
    assert lrs[0] == pytest.approx(phase2.optim.lr)  # the stable rate from the first step: no re-warming
    t2.save_checkpoint(tmp_path / "cbct.ckpt")
    card = read_model_card(export_lightning_checkpoint(tmp_path / "cbct.ckpt", tmp_path / "enc_cbct"))
    phases = card.extra["pretraining"]["earlier_phases"]
    assert len(phases) == 1 and phases[0]["method"] == "spark" and phases[0]["source"] == str(enc)
    assert card.extra["pretraining"]["data"]["data_dir"] == str(tmp_path / "cbct")
