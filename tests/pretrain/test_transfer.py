"""Encoder transfer: pretrain -> `medct export` -> pretrained_encoder of a segmentation task, and
resuming a pretraining run continues its learning-rate schedule."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from medct.checkpoint import ENCODER_TASK, export_lightning_checkpoint, load_model_folder
from medct.data import VolumeDataModule
from medct.errors import ConfigError, ModelFolderError
from medct.nets import create_net, encoder_state_dict, load_encoder, load_encoder_folder
from medct.phantom import write_cohort
from medct.pretrain.base import Optimisation, WarmupSchedule
from medct.pretrain.spark import SparKTask
from medct.settings import Sampling
from medct.transforms import Preprocessing
from tests.pretrain.conftest import quiet_trainer


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    write_cohort(folder, n=3, seed=0, shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    return folder


def _data(cohort) -> VolumeDataModule:
    return VolumeDataModule(
        keys=["image"],
        data_dir=str(cohort),
        num_workers=0,
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)),
        sampling=Sampling(patch_size=(32, 32, 32), batch_size=1, num_samples=1),
    )


def _trainer(root, max_steps: int, callbacks=None) -> pl.Trainer:
    return quiet_trainer(root, max_steps, callbacks, checkpoints=bool(callbacks))


def _spark(**kw) -> SparKTask:
    return SparKTask(
        create_net("resenc_unet", filters=[4, 8, 16]),
        patch_size=(32, 32, 32),
        mask_stride=8,
        **kw,
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)),
    )


@pytest.fixture(scope="module")
def encoder_dir(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    task = _spark(optim=Optimisation(lr=1e-2))
    trainer = _trainer(root, 2)
    trainer.fit(task, datamodule=_data(cohort))
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_lightning_checkpoint(ckpt, root / "enc")
    return out, encoder_state_dict(task.net)


def test_export_writes_an_encoder_folder(encoder_dir):
    from safetensors.torch import load_file

    folder, pretrained = encoder_dir
    card = json.loads((folder / "medct.json").read_text())
    assert card["task"] == ENCODER_TASK and card["net"]["name"] == "resenc_unet"
    assert card["extra"]["pretraining"]["method"] == "spark"
    assert (
        card["extra"]["pretraining"]["data"]["train_volumes"] == 2
        and card["extra"]["pretraining"]["data"]["steps"] == 2
    )
    assert card["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    tensors = load_file(str(folder / "model.safetensors"))
    assert set(tensors) == set(pretrained)  # the encoder only: no untrained decoder is shipped
    with pytest.raises(ModelFolderError, match="pretrained encoder, not a whole network"):
        load_model_folder(folder)


def test_segmentation_task_loads_the_encoder_exactly(encoder_dir):
    from medct.finetune.segmentation import SegmentationTask

    folder, pretrained = encoder_dir
    torch.manual_seed(1)
    net = create_net("resenc_unet", filters=[4, 8, 16], out_channels=4)
    fresh_decoder = {k: v.clone() for k, v in net.state_dict().items() if k not in pretrained}
    SegmentationTask(net, labels=["bg", "a", "b", "c"], pretrained_encoder=str(folder))
    for k, v in encoder_state_dict(net).items():
        assert torch.equal(v, pretrained[k]), k
    for k, v in net.state_dict().items():  # decoder and head start fresh
        if k in fresh_decoder:
            assert torch.equal(v, fresh_decoder[k]), k


def test_mismatched_backbone_is_an_error_unless_relaxed(encoder_dir):
    from medct.finetune.segmentation import SegmentationTask

    folder, _ = encoder_dir
    with pytest.raises(ModelFolderError, match="shape-mismatched"):
        SegmentationTask(create_net("resenc_unet", filters=[4, 8, 32]), pretrained_encoder=str(folder))
    with pytest.warns(UserWarning, match="loaded partially"):
        SegmentationTask(
            create_net("resenc_unet", filters=[4, 8, 32]), pretrained_encoder=str(folder), encoder_strict=False
        )


def test_more_input_channels_repeat_the_stem(encoder_dir):
    folder, _ = encoder_dir
    one, _ = load_encoder_folder(folder)
    two = create_net("resenc_unet", filters=[4, 8, 16], in_channels=2)
    report = load_encoder(two, folder)
    assert report.ok and report.adapted  # the stem convolutions, repeated and divided by 2
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        a = one.encoder_features(x)[-1]
        b = two.eval().encoder_features(torch.cat([x, x], dim=1))[-1]
    assert torch.allclose(a, b, atol=1e-5)  # equal channels: the same response as the 1-channel encoder


def test_schedules():
    cos = WarmupSchedule("cosine", total=100, warmup=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0)
    wsd = WarmupSchedule("wsd", total=100, warmup=10, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    poly = WarmupSchedule("poly", total=110, warmup=10)  # nnssl's PolyLRScheduler after the warmup
    assert poly(10) == 1.0 and poly(60) == pytest.approx(0.5**0.9) and poly(110) == 0.0


def test_sgd_is_nnssl_optimiser():
    opt = _spark(optim=Optimisation(optimizer="sgd", lr=1e-2, weight_decay=3e-5)).configure_optimizers()
    group = opt.param_groups[0]  # no trainer attached: the optimiser alone
    assert isinstance(opt, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.99
    assert group["lr"] == 1e-2 and group["weight_decay"] == 3e-5
    with pytest.raises(ConfigError, match="optimizer"):
        Optimisation(optimizer="adam")
    with pytest.raises(ConfigError, match="momentum"):
        Optimisation(optimizer="sgd", momentum=0.0)


def test_resume_continues_the_schedule(cohort, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def lr_after(trainer):
        return trainer.optimizers[0].param_groups[0]["lr"]

    torch.manual_seed(0)
    straight = _trainer(tmp_path / "a", 6)
    straight.fit(_spark(optim=Optimisation(warmup_steps=4, scheduler="cosine")), datamodule=_data(cohort))

    torch.manual_seed(0)
    every2 = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    killed = _trainer(tmp_path / "b", 2, callbacks=[every2])  # stops after step 2, as a killed run would
    killed.fit(_spark(optim=Optimisation(warmup_steps=4, scheduler="cosine")), datamodule=_data(cohort))
    ckpt = tmp_path / "ck" / "step=2.ckpt"
    assert ckpt.is_file()
    resumed = _trainer(tmp_path / "c", 6)
    resumed.fit(
        _spark(optim=Optimisation(warmup_steps=4, scheduler="cosine")), datamodule=_data(cohort), ckpt_path=str(ckpt)
    )
    assert resumed.global_step == 6
    assert lr_after(resumed) == pytest.approx(lr_after(straight))  # not re-warmed: the same point of the schedule
