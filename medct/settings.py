"""The typed groups of a data module: how training crops are drawn and how the cases are split.

With `medct.transforms.Preprocessing` (spacing, HU window, modality) these are the three groups
every data module takes, read by the Lightning CLI from YAML as nested mappings:

    data:
      class_path: medct.data.SegmentationDataModule
      init_args:
        data_dir: data/my_dataset
        preprocessing: {spacing: [1.5, 1.5, 1.5], hu_min: -1000, hu_max: 1000}
        sampling: {patch_size: [96, 96, 96], batch_size: 2, num_samples: 2}
        split: {val_fraction: 0.2, seed: 0}

Each group checks itself when it is made, so a bad value is one sentence naming its key
whichever data module it belongs to. A data module documents which fields it reads (a
classification module takes whole volumes, so `num_samples`, `pos` and `neg` do not apply to it).
Plain dataclasses, no torch: importable by the CLI and by model cards.
"""

from __future__ import annotations

from dataclasses import dataclass

from medct.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How training crops are drawn.

    patch_size: training crop in voxels (X, Y, Z) on the preprocessed grid.
    batch_size: volumes per training step; each gives `num_samples` crops.
    num_samples: crops per volume and step.
    pos, neg: ratio of label-centred to body-centred crops (segmentation; nnU-Net's foreground
        oversampling).
    """

    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    num_samples: int = 2
    pos: float = 1.0
    neg: float = 1.0

    def __post_init__(self) -> None:
        try:
            sides = [int(p) for p in self.patch_size]
        except (TypeError, ValueError):
            raise ConfigError(f"sampling.patch_size must be three positive numbers, got {self.patch_size!r}.") from None
        if len(sides) != 3 or min(sides) < 1:
            raise ConfigError(f"sampling.patch_size must be three positive numbers, got {list(self.patch_size)}.")
        object.__setattr__(self, "patch_size", tuple(sides))  # frozen: normalised once, here
        for name in ("batch_size", "num_samples"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"sampling.{name} must be at least 1, got {getattr(self, name)}.")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ConfigError(f"sampling.pos and sampling.neg must be >= 0 and not both 0, got {self.pos}, {self.neg}.")


@dataclass(frozen=True)
class Split:
    """Which cases train and which validate, when the datalist has no validation list.

    val_fraction: share of the cases held out (a seeded shuffle), unless `fold` is set.
    fold, num_folds: hold out fold `fold` of `num_folds` instead (nnU-Net's 5-fold cross-validation).
    seed: the shuffle's seed.
    num_train: train on only this many of the training cases (a seeded choice, the same for every
        task on one split; the few-label settings of the transfer benchmarks); None = all.
    """

    val_fraction: float = 0.2
    fold: int | None = None
    num_folds: int = 5
    seed: int = 0
    num_train: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"split.val_fraction must lie strictly between 0 and 1, got {self.val_fraction}.")
        if int(self.num_folds) < 2:
            raise ConfigError(f"split.num_folds must be at least 2, got {self.num_folds}.")
        if self.fold is not None and not 0 <= int(self.fold) < int(self.num_folds):
            raise ConfigError(f"split.fold must lie in 0..{int(self.num_folds) - 1}, got {self.fold}.")
        if self.num_train is not None and int(self.num_train) < 1:
            raise ConfigError(f"split.num_train must be at least 1 (or null for all), got {self.num_train}.")
