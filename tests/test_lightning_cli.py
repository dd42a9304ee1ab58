"""MedCTCLI's data -> model links (`DATA_LINKS`) with a task that lacks some of the linked names.

A pretraining-like task takes only `patch_size` and a network without `out_channels`; the data
module has no `labels` / `num_classes`. The recipe must run, and the names it has must arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from medct.lightning_cli import DATA_LINKS, run_lightning
from medct.phantom import write_cohort
from medct.transforms import Preprocessing

SEEN: dict[str, object] = {}


class TinyEncoder(nn.Module):
    """A network with no out_channels argument (nothing to link into it)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.out = nn.Conv3d(width, 1, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, X, Y, Z) -> (B, 1, X, Y, Z)
        return self.out(torch.relu(self.conv(x)))


class ReconstructionTask(pl.LightningModule):
    """Learns to reproduce its input: takes patch_size (linked) but no labels, spacing or modality."""

    def __init__(self, net: nn.Module, patch_size: Sequence[int] = (8, 8, 8), lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.patch_size = [int(p) for p in patch_size]
        SEEN["patch_size"] = self.patch_size

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]
        SEEN["batch_keys"] = sorted(batch)
        SEEN["shape"] = tuple(x.shape)
        return nn.functional.mse_loss(self.net(x), x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PreprocessingProbe(ReconstructionTask):
    """Takes the data's preprocessing (linked on instantiation) besides patch_size; records what arrives."""

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing = Preprocessing(),
        patch_size: Sequence[int] = (8, 8, 8),
    ) -> None:
        super().__init__(net, patch_size)
        SEEN["preprocessing"] = preprocessing


def _fit_one_step(tmp_path: Path, task: str, data_lines: str) -> None:
    """`medct fit` one step of `task` (a class of this file, with TinyEncoder) on a VolumeDataModule of image keys."""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, limit_val_batches: 0, enable_progress_bar: false,
          logger: false, enable_checkpointing: false, default_root_dir: {tmp_path / "runs"}}}
model:
  class_path: tests.test_lightning_cli.{task}
  init_args:
    net: {{class_path: tests.test_lightning_cli.TinyEncoder}}
data:
  class_path: medct.data.VolumeDataModule
  init_args:
    keys: [image]
    num_workers: 0
{data_lines}"""
    )
    SEEN.clear()
    run_lightning(["fit", "--config", str(cfg)])


def test_data_preprocessing_reaches_the_task_with_its_modality_resolved(tmp_path: Path) -> None:
    """The recipe states the window and spacing once, under data.preprocessing, and no modality:
    the data module resolves it from its phantom variant (CBCT) and the task receives all of it,
    with sampling.patch_size, through DATA_LINKS."""
    assert ("data.resolved_preprocessing", "model.init_args.preprocessing", "instantiate") in DATA_LINKS
    data = f"""    data_dir: {tmp_path / "cbct"}
    phantom: {{n: 2, variant: cbct, seed: 0, shape: [24, 24, 24], spacing: [8.0, 8.0, 8.0]}}
    preprocessing: {{spacing: [8.0, 8.0, 8.0], hu_min: -500, hu_max: 700}}
    sampling: {{patch_size: [16, 16, 8], batch_size: 1, num_samples: 1}}
    split: {{val_fraction: 0.5}}
"""
    _fit_one_step(tmp_path, "PreprocessingProbe", data)
    assert SEEN["preprocessing"] == Preprocessing(spacing=(8.0, 8.0, 8.0), hu_min=-500.0, hu_max=700.0, modality="CBCT")
    assert SEEN["patch_size"] == [16, 16, 8]


def test_task_without_labels_spacing_or_out_channels_runs(tmp_path: Path) -> None:
    write_cohort(tmp_path / "scans", n=3, seed=0, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
    data = f"""    data_dir: {tmp_path / "scans" / "imagesTr"}
    preprocessing: {{spacing: [8.0, 8.0, 8.0]}}
    sampling: {{patch_size: [16, 16, 16], batch_size: 1, num_samples: 1}}
"""
    _fit_one_step(tmp_path, "ReconstructionTask", data)
    assert SEEN["patch_size"] == [16, 16, 16]  # linked from data.sampling.patch_size
    assert SEEN["batch_keys"] == ["image"] and SEEN["shape"] == (1, 1, 16, 16, 16)


def test_network_argument_error_is_one_sentence(tmp_path: Path) -> None:
    """A network's own argument check (here mm_unetr's hidden_size rule) reaches the user as a
    ConfigError naming the rule, not jsonargparse's listing of Union members."""
    import pytest

    from medct.errors import ConfigError

    write_cohort(tmp_path / "scans", n=2, seed=0, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, logger: false, default_root_dir: {tmp_path / "runs"}}}
model:
  class_path: medct.finetune.segmentation.SegmentationTask
  init_args:
    net: {{class_path: medct.nets.MultiModalUNETR, init_args: {{modalities: [ct], hidden_size: 100, num_heads: 4}}}}
data:
  class_path: medct.data.SegmentationDataModule
  init_args:
    data_dir: {tmp_path / "scans"}
    preprocessing: {{spacing: [8.0, 8.0, 8.0]}}
    sampling: {{patch_size: [16, 16, 16]}}
    num_workers: 0
"""
    )
    with pytest.raises(ConfigError) as info:
        run_lightning(["fit", "--config", str(cfg)])
    message = str(info.value)
    assert "hidden_size must be divisible by 6" in message and "Given value" not in message
    assert message.count("\n") == 0


def test_fits_started_together_in_one_root_take_their_own_version_and_clean_dead_temps(tmp_path: Path) -> None:
    """Lightning picks version_N lazily, so two fits started at once in one default_root_dir would
    write the same checkpoints/last.ckpt: each trainer claims its version folder when it is made.
    A half-written checkpoint that a killed run left in a version's checkpoints/ is removed."""
    import subprocess

    from medct.lightning_cli import MedCTCLI
    from medct.paths import TEMP_PREFIX

    write_cohort(tmp_path / "scans", n=2, seed=0, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, enable_progress_bar: false, default_root_dir: {tmp_path / "runs"}}}
model:
  class_path: tests.test_lightning_cli.ReconstructionTask
  init_args:
    net: {{class_path: tests.test_lightning_cli.TinyEncoder}}
data:
  class_path: medct.data.VolumeDataModule
  init_args:
    data_dir: {tmp_path / "scans" / "imagesTr"}
    keys: [image]
    num_workers: 0
    sampling: {{patch_size: [16, 16, 16], batch_size: 1, num_samples: 1}}
"""
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / "runs" / "lightning_logs" / "version_7" / "checkpoints"
    killed.mkdir(parents=True)
    (killed / f"{TEMP_PREFIX}{dead.pid}-last.ckpt.k9.ckpt").write_bytes(b"half")
    first = MedCTCLI(["--config", str(cfg)], run=False)  # made, not yet logging: the race window
    second = MedCTCLI(["--config", str(cfg)], run=False)
    assert (first.trainer.logger.version, second.trainer.logger.version) == (8, 9)
    assert first.trainer.log_dir != second.trainer.log_dir
    assert list(killed.iterdir()) == []


def test_a_medct_error_raised_in_a_dataloader_worker_is_its_one_sentence() -> None:
    """A worker's exception reaches the main process as its traceback text only."""
    from medct.errors import MedCTError
    from medct.lightning_cli import medct_cause

    text = (
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmedct.errors.InvalidVolumeError: /d/a.nii.gz contains 3 NaN or infinite voxels; '
        "fix or mask them first.\n\nThe above exception was the direct cause of the following exception:\n"
        "RuntimeError: applying transform <medct.loaders.LoadVolumed object at 0x7f>\n"
    )
    found = medct_cause(RuntimeError(text))
    assert isinstance(found, MedCTError)
    assert str(found) == "/d/a.nii.gz contains 3 NaN or infinite voxels; fix or mask them first."
    assert medct_cause(RuntimeError("medct.errors.InvalidVolumeError: not from a worker")) is None
