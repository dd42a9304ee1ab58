"""CT preprocessing: the one place that defines orientation, spacing and intensity windows.

CONTRACT (final): `Preprocessing` and `scale_intensity`. The nets/data helper adds MONAI Compose
builders below (train/val/infer) that must apply exactly these semantics:
  1. orient to RAS, 2. resample to `spacing` (mm, trilinear for images, nearest for labels),
  3. clip HU to [hu_min, hu_max] and map linearly to [0, 1] (`scale_intensity`).
Models never guess intensity ranges: they see what `Preprocessing` produced.

Builders (MONAI dictionary transforms on keys "image"/"label"; Cardoso et al., "MONAI: An
open-source framework for deep learning in healthcare", 2022):
  `LoadVolumed`       reads through `medct.io.read_volume` (NIfTI, MHA/NRRD, DICOM series), so training
                      sees exactly the geometry inference sees, and checks image/label share one grid;
  `val_transforms`    load -> RAS -> spacing -> HU window -> crop to the body (deterministic);
  `train_transforms`  the same, then pad to the patch, positive/negative-balanced patch sampling
                      (nnU-Net's foreground oversampling, Isensee et al., Nat. Methods 2021) and
                      intensity/affine augmentation;
  `infer_transforms`  load -> RAS -> spacing -> HU window, MetaTensor kept so the result can be
                      inverted back onto the input grid.
Everything before the first random transform is deterministic, which is what MONAI's
PersistentDataset caches to disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input; stored in every exported model's medct.json.

    spacing:  target voxel size (mm) along R, A, S after orientation to RAS.
    hu_min, hu_max: HU window; values are clipped to it and mapped to [0, 1].
    modality: "CT", "CBCT" or "MR": what the model was trained on (checked against DICOM headers).
              None (a data module's default): from the data - the phantom variant, else the
              dataset.json "modality", else CT (`resolved`); a model card always names it.

    Checks itself when made (a data module's `preprocessing:` group in YAML, or a card read back).
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    modality: str | None = None

    def __post_init__(self) -> None:
        from medct.errors import ConfigError

        try:
            mm = tuple(float(s) for s in self.spacing)
        except (TypeError, ValueError):
            raise ConfigError(f"preprocessing.spacing must be three positive numbers, got {self.spacing!r}.") from None
        if len(mm) != 3 or not all(s > 0 and math.isfinite(s) for s in mm):
            raise ConfigError(f"preprocessing.spacing must be three positive numbers, got {list(self.spacing)}.")
        if not (math.isfinite(self.hu_min) and math.isfinite(self.hu_max) and float(self.hu_max) > float(self.hu_min)):
            raise ConfigError(f"preprocessing.hu_min must be below hu_max, got {self.hu_min} and {self.hu_max}.")
        # frozen: normalised once, here (YAML gives lists and ints)
        object.__setattr__(self, "spacing", mm)
        object.__setattr__(self, "hu_min", float(self.hu_min))
        object.__setattr__(self, "hu_max", float(self.hu_max))
        if self.modality is not None:
            object.__setattr__(self, "modality", str(self.modality).upper())

    def resolved(self, modality: str = "CT") -> Preprocessing:
        """This preprocessing with its modality named (`modality` where it is None)."""
        return self if self.modality is not None else replace(self, modality=modality)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self.resolved())
        d["spacing"] = list(self.spacing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
            hu_min=float(d["hu_min"]),
            hu_max=float(d["hu_max"]),
            modality=str(d.get("modality") or "CT"),
        )

    @classmethod
    def of(cls, value: Preprocessing | dict[str, Any]) -> Preprocessing:
        """A task's `preprocessing` argument as given: the dataclass (Python, or the CLI's link) or its
        mapping (a checkpoint's hyperparameters fed back on --ckpt_path); modality resolved."""
        return (value if isinstance(value, cls) else cls.from_dict(dict(value))).resolved()


def scale_intensity(hu: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Clip HU to `pre`'s window and map to [0, 1] as float32 (`medct.intensity.scale_window`)."""
    from medct.intensity import scale_window

    return scale_window(hu, pre.hu_min, pre.hu_max)


# ----------------------------------------------------------------------------- MONAI builders
# MONAI is imported inside the functions below so that `Preprocessing` (read by the CLI and by
# model cards) stays importable without torch.

BODY_MARGIN_VOXELS = 8  # margin kept around the body after resampling


def body_threshold(pre: Preprocessing) -> float:
    """The body threshold on `pre`'s [0, 1] scale (CropForegroundd's and the sampler's body mask):
    `medct.intensity.body_threshold` of its window."""
    from medct.intensity import body_threshold as on_window

    return on_window(pre.hu_min, pre.hu_max)


class AboveThreshold:
    """Picklable `x > threshold` (DataLoader workers may be spawned, which cannot pickle lambdas)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: Any) -> Any:
        return x > self.threshold


_LOADERS = ("LoadVolumed", "LoadPhasesd", "KeptSlicesd")


def __getattr__(name: str) -> Any:  # PEP 562: `from medct.transforms import LoadVolumed` imports MONAI then
    if name in _LOADERS:
        from medct import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'medct.transforms' has no attribute {name!r}")


def _deterministic(pre: Preprocessing, keys: Sequence[str], crop: bool) -> list[Any]:
    """Load -> RAS -> spacing -> HU window [-> crop to body]: the cacheable head of every pipeline."""
    import torch
    from monai.transforms import CastToTyped, CropForegroundd, Orientationd, ScaleIntensityRanged, Spacingd

    from medct.loaders import LoadVolumed

    keys = list(keys)
    has_label = "label" in keys
    modes = ["nearest" if k == "label" else "bilinear" for k in keys]
    xs: list[Any] = [
        LoadVolumed(keys=keys, label_keys=("label",)),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=tuple(pre.spacing), mode=modes, padding_mode="border"),
        ScaleIntensityRanged(keys="image", a_min=pre.hu_min, a_max=pre.hu_max, b_min=0.0, b_max=1.0, clip=True),
    ]
    if crop:
        xs.append(
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=AboveThreshold(body_threshold(pre)),
                margin=BODY_MARGIN_VOXELS,
                allow_smaller=True,
            )
        )
    if has_label:  # Spacingd computes in float; labels are small class indices
        xs.append(CastToTyped(keys="label", dtype=torch.uint8))
    return xs


def val_transforms(pre: Preprocessing, keys: Sequence[str] = ("image", "label")) -> Any:
    """Whole preprocessed volumes for validation: (1, X', Y', Z') float32 in [0, 1] + labels."""
    import torch
    from monai.transforms import Compose, EnsureTyped

    return Compose([*_deterministic(pre, keys, crop=True), EnsureTyped(keys=list(keys), dtype=torch.float32)])


def _label_crop(
    keys: list[str], patch: tuple[int, ...], pos: float, neg: float, n: int, body: float, num_classes: int | None
) -> Any:
    """pos:neg crops centred on a label / on the body (voxels above `body`, not air); per class with
    `num_classes` (see `train_transforms`)."""
    from monai.transforms import RandCropByLabelClassesd, RandCropByPosNegLabeld

    if num_classes is None or num_classes <= 2:
        return RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=neg, num_samples=n,
            image_key="image", image_threshold=body,
        )  # fmt: skip
    fg = pos / (pos + neg) if pos + neg > 0 else 0.0
    ratios = [1.0 - fg] + [fg / (num_classes - 1)] * (num_classes - 1)  # classes a case lacks: ratio 0
    return RandCropByLabelClassesd(
        keys=keys, label_key="label", spatial_size=patch, ratios=ratios, num_classes=num_classes,
        num_samples=n, image_key="image", image_threshold=body, warn=False,
    )  # fmt: skip


def train_transforms(
    pre: Preprocessing,
    patch_size: Sequence[int],
    num_samples: int = 2,
    pos: float = 1.0,
    neg: float = 1.0,
    augment: bool = True,
    flip_axes: Sequence[int] = (),
    num_classes: int | None = None,
) -> Any:
    """Training patches: `num_samples` crops (1, *patch_size) per volume, pos:neg centred on labels.

    With `num_classes` (background included) a label-centred crop first draws a class, each class
    the case holds equally likely, then a voxel of it (nnU-Net's foreground oversampling: small
    organs are seen as often as the liver); without it, any labelled voxel (MONAI's pos/neg crop).

    Augmentation (`augment`): small rotations/scaling, intensity scale/shift, contrast (gamma) and
    noise. No mirroring by default: flipping axis 0 (R-L in RAS) swaps left and right organs, so
    `flip_axes` is opt-in (e.g. (1, 2) for the A-P and S-I axes when labels have no laterality issue).
    """
    import torch
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    patch = tuple(int(p) for p in patch_size)
    xs: list[Any] = [
        *_deterministic(pre, keys, crop=True),
        SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),  # 0 = below hu_min (air) after scaling
        _label_crop(keys, patch, pos, neg, num_samples, body_threshold(pre), num_classes),
    ]
    if augment:
        xs += [
            RandAffined(
                keys=keys,
                prob=0.2,
                rotate_range=(0.26, 0.26, 0.26),  # +-15 degrees
                scale_range=(0.15, 0.15, 0.15),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *[RandFlipd(keys=keys, prob=0.5, spatial_axis=int(ax)) for ax in flip_axes],
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.2),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.2),
            RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.7, 1.5)),
            RandGaussianNoised(keys="image", prob=0.15, std=0.01),
        ]
    xs.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return Compose(xs)


def infer_transforms(pre: Preprocessing) -> Any:
    """Image only, no crop: (1, X', Y', Z') MetaTensor in RAS at `pre.spacing`, invertible with Invertd."""
    import torch
    from monai.transforms import Compose, EnsureTyped

    return Compose([*_deterministic(pre, ["image"], crop=False), EnsureTyped(keys="image", dtype=torch.float32)])


def generic_transforms(
    pre: Preprocessing,
    keys: Sequence[str],
    patch_size: Sequence[int],
    train: bool,
    num_samples: int = 1,
    augment: bool = True,
    kept_slices: bool = False,
) -> Any:
    """The pipeline of `medct.data.VolumeDataModule` for any of its key sets.

    Volumes (image, target, fixed, moving, label, phases) are loaded, oriented to RAS, resampled to
    `pre.spacing` (labels nearest), intensity-windowed (all but labels) and cropped to the body
    (`medct.body`). Keys on one grid share every spatial step; "fixed" and "moving" may lie on
    different grids, so each is cropped on its own and, in training, padded/cropped to the patch
    at its centre (registration aligns them; random crops of each would not overlap). "text" is
    passed through. Training adds `num_samples` random patches per volume (same place for keys
    on one grid) and, with `augment`, small affine and intensity changes of the "image"/"phases".
    `kept_slices` (key set ("image",), a reduced datalist from `medct reduce`): every training patch
    is centred on an axial slice the entry's "slices" keep.
    """
    import torch
    from monai.transforms import (
        CastToTyped,
        Compose,
        CropForegroundd,
        DeleteItemsd,
        EnsureTyped,
        Orientationd,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropSamplesd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    from medct.loaders import KeptSlicesd, LoadPhasesd, LoadVolumed

    keys = list(keys)
    vols = [k for k in keys if k != "text"]
    separate = set(vols) == {"fixed", "moving"}  # the one key set whose grids may differ
    patch = tuple(int(p) for p in patch_size)
    threshold = AboveThreshold(body_threshold(pre))
    xs: list[Any] = []
    if "phases" in vols:
        xs.append(LoadPhasesd(keys=["phases"]))
        if "label" in vols:
            xs.append(LoadVolumed(keys=["label"], label_keys=("label",)))
    elif separate:
        xs += [LoadVolumed(keys=[k], label_keys=()) for k in vols]
    else:
        xs.append(LoadVolumed(keys=vols, label_keys=("label",)))
    kept = kept_slices and train and vols == ["image"]
    if kept:  # a sampling map that follows the image through every spatial step (nearest)
        xs.append(KeptSlicesd("image"))
        vols = ["image", "kept"]
    xs += [
        Orientationd(keys=vols, axcodes="RAS", labels=None),
        Spacingd(
            keys=vols,
            pixdim=tuple(pre.spacing),
            mode=["nearest" if k in ("label", "kept") else "bilinear" for k in vols],
            padding_mode="border",
        ),
        ScaleIntensityRanged(
            keys=[k for k in vols if k not in ("label", "kept")],
            a_min=pre.hu_min,
            a_max=pre.hu_max,
            b_min=0.0,
            b_max=1.0,
            clip=True,
        ),
    ]
    groups = [[k] for k in vols] if separate else [vols]
    for group in groups:
        xs.append(
            CropForegroundd(
                keys=group,
                source_key=group[0],
                select_fn=threshold,
                margin=BODY_MARGIN_VOXELS,
                allow_smaller=True,
                start_coord_key=None,  # not carried into batches (two crops would overwrite each other's)
                end_coord_key=None,
            )
        )
    if "label" in vols:
        xs.append(CastToTyped(keys="label", dtype=torch.uint8))
    if train:
        if separate:
            xs.append(ResizeWithPadOrCropd(keys=vols, spatial_size=patch, mode="constant"))
        else:
            xs.append(SpatialPadd(keys=vols, spatial_size=patch, mode="constant"))  # 0 = below the window (air)
            if kept:
                xs += [
                    RandCropByPosNegLabeld(
                        keys=vols, label_key="kept", spatial_size=patch, pos=1.0, neg=0.0, num_samples=num_samples
                    ),
                    DeleteItemsd(keys="kept"),
                ]
                vols = ["image"]
            else:
                xs.append(
                    RandSpatialCropSamplesd(keys=vols, roi_size=patch, num_samples=num_samples, random_size=False)
                )
        intensity = [k for k in vols if k in ("image", "phases")]
        if augment and intensity:
            if not separate:
                xs.append(
                    RandAffined(
                        keys=vols,
                        prob=0.2,
                        rotate_range=(0.26, 0.26, 0.26),  # +-15 degrees
                        scale_range=(0.15, 0.15, 0.15),
                        mode=["nearest" if k == "label" else "bilinear" for k in vols],
                        padding_mode="zeros",
                    )
                )
            xs += [
                RandScaleIntensityd(keys=intensity, factors=0.1, prob=0.2),
                RandShiftIntensityd(keys=intensity, offsets=0.05, prob=0.2),
                RandAdjustContrastd(keys=intensity, prob=0.15, gamma=(0.7, 1.5)),
                RandGaussianNoised(keys=intensity, prob=0.15, std=0.01),
            ]
    xs.append(EnsureTyped(keys=vols, dtype=torch.float32, track_meta=not train))
    return Compose(xs)


def classification_transforms(pre: Preprocessing, patch_size: Sequence[int], train: bool, augment: bool = True) -> Any:
    """Whole volumes for volume-level labels: load -> RAS -> spacing -> HU window -> body crop, then
    padded / centre-cropped to `patch_size` (every item the same shape, so they batch). Training adds
    small affine and intensity changes. Non-image keys (the class index) pass through."""
    import torch
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ResizeWithPadOrCropd,
    )

    xs: list[Any] = [
        *_deterministic(pre, ["image"], crop=True),
        ResizeWithPadOrCropd(keys="image", spatial_size=tuple(int(p) for p in patch_size), mode="constant"),
    ]
    if train and augment:
        xs += [
            RandAffined(
                keys="image",
                prob=0.3,
                rotate_range=(0.26, 0.26, 0.26),  # +-15 degrees
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(8, 8, 8),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.2),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.2),
            RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.7, 1.5)),
            RandGaussianNoised(keys="image", prob=0.15, std=0.01),
        ]
    xs.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(xs)
