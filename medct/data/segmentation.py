"""`SegmentationDataModule`: volumes and label maps, foreground-balanced crops (nnU-Net's oversampling)."""

from __future__ import annotations

from typing import Any

from medct.data.datalists import _phantom_label_names, read_label_names
from medct.data.module import PhantomCohort, VolumeDataModule
from medct.errors import ConfigError, InputPathError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing, train_transforms, val_transforms


class SegmentationDataModule(VolumeDataModule):
    """`VolumeDataModule` with keys ("image", "label"), class names, and foreground-balanced crops.

    `labels` names the classes by index (0 = background); by default they come from dataset.json
    (or the phantom's label table). One training step sees batch_size * num_samples patches,
    pos:neg of them centred on a voxel of a class drawn uniformly from those the case holds, or on
    the body (nnU-Net's foreground oversampling);
    validation yields one whole preprocessed volume per batch, (1, 1, X, Y, Z).

    Args (besides VolumeDataModule's):
        labels: class names by index, background first. Defaults to None (from the dataset).
        flip_axes: RAS axes to mirror in augmentation; none by default (laterality). Defaults to ().
        (sampling.pos / sampling.neg: the ratio of label-centred to body-centred crops.)
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datalist: str | None = None,
        labels: list[str] | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        sampling: Sampling = Sampling(),
        split: Split = Split(),
        augment: bool = True,
        flip_axes: tuple[int, ...] = (),
        num_workers: int = 4,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        super().__init__(
            ("image", "label"),
            data_dir,
            datalist,
            preprocessing,
            sampling,
            split,
            augment,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        if any(a not in (0, 1, 2) for a in flip_axes):
            raise ConfigError(f"data.flip_axes holds RAS axes 0, 1 or 2, got {list(flip_axes)}.")
        self.pos, self.neg = sampling.pos, sampling.neg
        self.flip_axes = tuple(flip_axes)
        self.labels: list[str] = list(labels) if labels is not None else self._default_labels()
        if len(self.labels) < 2:
            raise InputPathError(f"Segmentation needs background plus at least one class; labels are {self.labels}.")

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background + classes."""
        return len(self.labels)

    def _default_labels(self) -> list[str]:
        if self.phantom is None and not self._json_path().parent.is_dir():
            raise InputPathError(f"Dataset folder {self._json_path().parent} does not exist.")
        names = read_label_names(self._json_path())
        if names is None and self.phantom is not None:
            from medct.phantom import LABELS

            names = _phantom_label_names(LABELS)
        if names is None:
            raise InputPathError(f"{self._json_path()} names no labels; set data.labels (background first).")
        return names

    def transforms(self, split: str) -> Any:
        if split == "train":
            return train_transforms(
                self.pre, self.patch_size, self.num_samples, self.pos, self.neg, self.augment, self.flip_axes,
                self.num_classes,
            )  # fmt: skip
        return val_transforms(self.pre)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels}
