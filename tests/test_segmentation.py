"""SegmentationTask: it learns, validates with per-class Dice, checkpoints safely and exports."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from medct.checkpoint import export_lightning_checkpoint, load_model_folder
from medct.data import SegmentationDataModule
from medct.errors import InputPathError, ModelFolderError
from medct.finetune.segmentation import SegmentationTask
from medct.lightning_cli import run_lightning
from medct.nets import create_net
from medct.phantom import write_cohort
from medct.precision import cpu_has_bf16
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

SPACING = (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, n=2, seed=2, shape=(32, 32, 32), spacing=SPACING)
    return root


def _dm(cohort, **kw):
    args = dict(
        data_dir=str(cohort),
        preprocessing=Preprocessing(spacing=SPACING),
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=1, num_samples=2),
        split=Split(val_fraction=0.5),
        num_workers=0,
        augment=False,
    )
    args.update(kw)
    return SegmentationDataModule(**args)


def _task(dm, **kw):
    net = create_net("resenc_unet", out_channels=dm.num_classes, filters=[8, 16, 32])
    args = dict(labels=dm.labels, preprocessing=dm.pre, patch_size=dm.patch_size, lr=1e-2, scheduler="constant")
    args.update(kw)
    return SegmentationTask(net, **args)


def _trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    args.update(kw)
    return pl.Trainer(**args)


class _Losses(pl.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_overfits_one_case_then_exports_identical_model(cohort, tmp_path):
    pl.seed_everything(0)
    dm = _dm(cohort)
    task = _task(dm)
    losses = _Losses()
    trainer = _trainer(tmp_path, max_steps=24, limit_val_batches=0, callbacks=[losses])
    trainer.fit(task, datamodule=dm)
    first, last = sum(losses.values[:4]) / 4, sum(losses.values[-4:]) / 4
    assert all(torch.isfinite(torch.tensor(losses.values)))
    assert last < 0.8 * first, f"loss did not drop: {first:.3f} -> {last:.3f}"

    ckpt = tmp_path / "task.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled objects inside
    assert raw["medct"]["card"]["net"]["name"] == "resenc_unet" and raw["medct"]["net_prefix"] == "net."
    assert raw["hyper_parameters"]["labels"] == dm.labels

    out = export_lightning_checkpoint(ckpt, tmp_path / "model", licence="CC0-1.0", intended_use="for testing")
    net, card = load_model_folder(out)
    assert card.net_name == "resenc_unet" and card.labels == dict(enumerate(dm.labels))
    assert card.preprocessing.spacing == SPACING and card.patch_size == (16, 16, 16)
    assert card.licence == "CC0-1.0" and card.intended_use == "for testing"
    assert card.inference["body_only"] is True  # labels stay inside the body unless the task says otherwise
    x = torch.rand(1, 1, 32, 32, 32)
    task.net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), task.net(x))


def test_validation_logs_per_class_dice(cohort, tmp_path):
    dm = _dm(cohort)
    task = _task(dm)
    metrics = _trainer(tmp_path).validate(task, datamodule=dm, verbose=False)[0]
    names = {f"val/dice_{n}" for n in dm.labels[1:]}
    assert names <= set(metrics) and "val/dice_mean" in metrics and "val/loss" in metrics
    present = [metrics[n] for n in names if metrics[n] == metrics[n]]  # absent classes are NaN
    assert present and all(0.0 <= v <= 1.0 for v in present)


def test_deep_supervision_and_schedulers(cohort, tmp_path):
    dm = _dm(cohort)
    net = create_net("resenc_unet", out_channels=dm.num_classes, filters=[8, 16, 32], deep_supervision=True)
    task = SegmentationTask(
        net, labels=dm.labels, patch_size=(16, 16, 16), scheduler="poly", preprocessing=Preprocessing(spacing=SPACING)
    )
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert sched.lr_lambdas[0](1) == pytest.approx((1 - 1 / 3) ** 0.9)  # nnU-Net's poly over the 3 steps
    assert trainer.optimizers[0].param_groups[0]["lr"] < task.hparams.lr
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_hparams_are_primitive_and_head_must_match_labels(cohort):
    net = create_net("resenc_unet", out_channels=3, filters=[8, 16, 32])
    task = SegmentationTask(
        net, labels=("bg", "a", "b"), patch_size=(16, 16, 16), preprocessing=Preprocessing(spacing=(2, 2, 2))
    )
    assert task.hparams.preprocessing["spacing"] == [2.0, 2.0, 2.0] and task.hparams.labels == ["bg", "a", "b"]
    assert task.preprocessing.spacing == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="3 output channels but there are 2 labels"):
        SegmentationTask(net, labels=["bg", "a"])


def test_export_errors(tmp_path):
    with pytest.raises(InputPathError):
        export_lightning_checkpoint(tmp_path / "missing.ckpt", tmp_path / "m")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ModelFolderError, match="not a loadable Lightning checkpoint"):
        export_lightning_checkpoint(tmp_path / "junk.ckpt", tmp_path / "m")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ModelFolderError, match="holds no medct model card"):
        export_lightning_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "m")
    torch.save({"state_dict": {}, "medct": {"card": {"net": {}}}}, tmp_path / "bad_card.ckpt")
    with pytest.raises(ModelFolderError, match="invalid medct model card"):
        export_lightning_checkpoint(tmp_path / "bad_card.ckpt", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli_fit_resume_validate_export(cohort, tmp_path):
    """run_lightning: links fill labels/out_channels; --ckpt_path resumes; the checkpoint exports."""
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  limit_val_batches: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path / "runs"}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
model:
  class_path: medct.finetune.segmentation.SegmentationTask
  init_args:
    net:
      class_path: medct.nets.ResEncUNet
      init_args: {{filters: [4, 8, 16]}}
    sw_overlap: 0.5
    sw_batch_size: 3
    keep_largest: [lung_left, lung_right]
data:
  class_path: medct.data.SegmentationDataModule
  init_args:
    data_dir: {cohort}
    preprocessing:
      modality: CBCT
      spacing: [6.0, 6.0, 6.0]
      hu_min: -200.0
      hu_max: 300.0
    sampling:
      patch_size: [16, 16, 16]
      batch_size: 1
      num_samples: 1
    num_workers: 0
    split:
      val_fraction: 0.5
"""
    )
    run_lightning(["fit", "--config", str(cfg)])
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    raw = torch.load(last, map_location="cpu", weights_only=True)
    hp = raw["hyper_parameters"]
    assert raw["medct"]["card"]["net"]["args"]["out_channels"] == len(hp["labels"]) == 12  # linked from the data
    pre = hp["preprocessing"]  # JSON primitives, linked from the data
    assert pre["hu_min"] == -200.0 and pre["spacing"] == [6.0, 6.0, 6.0] and pre["modality"] == "CBCT"
    assert hp["patch_size"] == [16, 16, 16]

    run_lightning(["fit", "--config", str(cfg), "--trainer.max_steps=4", "--ckpt_path", str(last)])
    resumed_ckpt = tmp_path / "runs" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    resumed = torch.load(resumed_ckpt, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4  # continued from step 2, not restarted
    run_lightning(["validate", "--config", str(cfg), "--ckpt_path", str(resumed_ckpt)])

    net, card = load_model_folder(export_lightning_checkpoint(resumed_ckpt, tmp_path / "model"))
    assert card.preprocessing.hu_min == -200.0 and len(card.labels) == 12
    # the recipe's sliding-window settings, the data's modality and the precision the run trained
    # and validated at (medct.precision's default: bf16 on a CPU with AMX / AVX-512 BF16) reach the card
    assert card.inference == {
        "overlap": 0.5,
        "sw_batch_size": 3,
        "keep_largest": ["lung_left", "lung_right"],
        "body_only": True,
        "precision": "bf16" if cpu_has_bf16() else "fp32",
    }
    assert card.modality == "CBCT"
    assert card.task == "segmentation" and card.extra["global_step"] == 4
    assert net(torch.rand(1, 1, 16, 16, 16)).shape == (1, 12, 16, 16, 16)


def test_lr_factor_freeze_then_warmup_then_poly():
    from medct.finetune.schedule import lr_factor

    f = [lr_factor(s, 10, "poly", freeze=2, warmup=4) for s in range(10)]
    assert f[:2] == [0.5, 1.0]  # the decoder's warm-up while the encoder is frozen
    assert f[2:6] == [0.25, 0.5, 0.75, 1.0]  # the whole network's (nnssl: lr x (1 + s) / steps)
    assert f[6] == 1.0 and f[7] == pytest.approx(0.75**0.9) and f[9] == pytest.approx(0.25**0.9)
    assert lr_factor(3, 10, "cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.3)))
    assert lr_factor(0, 10, "constant", warmup=5) == 0.2 and lr_factor(7, 10, "constant", warmup=5) == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_encoder_does_not_move_until_its_steps_are_done(cohort, tmp_path, optimizer):
    dm = _dm(cohort)
    torch.manual_seed(0)
    net = create_net("resenc_unet", out_channels=dm.num_classes, filters=[8, 16, 32])
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    prefixes = tuple(net.encoder_prefixes)

    def moved(task: SegmentationTask) -> tuple[bool, bool]:
        enc = any(not torch.equal(p, start[n]) for n, p in task.net.named_parameters() if n.startswith(prefixes))
        rest = any(not torch.equal(p, start[n]) for n, p in task.net.named_parameters() if not n.startswith(prefixes))
        return enc, rest

    task = SegmentationTask(
        net, labels=dm.labels, patch_size=(16, 16, 16), preprocessing=Preprocessing(spacing=SPACING),
        optimizer=optimizer, freeze_encoder_steps=2, warmup_steps=1, lr=1e-2,
    )  # fmt: skip
    _trainer(tmp_path / "a", max_steps=2, limit_val_batches=0).fit(task, datamodule=dm)
    assert moved(task) == (False, True)  # decoder only
    _trainer(tmp_path / "b", max_steps=3, limit_val_batches=0).fit(task, datamodule=dm)
    assert moved(task)[0]  # a new run counts from step 0 again: frozen 2 steps, then the encoder moves
