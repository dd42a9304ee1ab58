"""(volume, report) pairs for text-to-CT (`TextCTDataModule`): the data of the VAE, CLIP and diffusion recipes.

Every volume is put on one fixed grid, the grid the models generate on: oriented to RAS, resampled
to `spacing`, windowed to [0, 1] (hu_min..hu_max) and padded/cropped about its centre to `size`
(air outside). No body crop and no geometric augmentation: the text states organ sizes and sides,
which a crop, zoom or flip would falsify. Training takes random `patch_size` crops of that grid when
the patch is smaller (the VAE trains on patches); the CLIP and diffusion recipes use the whole grid
(patch_size = size). Entries keep only "image", "text" and "case" (the image path, the key of the
diffusion task's latent cache), so datalist attributes of other shapes never reach the collate.

Real reports plug in by datalist: an MSD-style dataset.json whose entries have "image" and
"text" (a string, or a .txt path relative to the JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medct.data import PhantomCohort, VolumeDataModule
from medct.errors import ConfigError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing, _deterministic


def text_ct_transforms(
    pre: Preprocessing, size: Sequence[int], patch_size: Sequence[int], train: bool, num_samples: int = 1
) -> Any:
    """load -> RAS -> spacing -> [0, 1] window -> pad/crop to `size` [-> random `patch_size` crops]."""
    import torch
    from monai.transforms import Compose, EnsureTyped, RandSpatialCropSamplesd, ResizeWithPadOrCropd

    size_t, patch_t = tuple(int(s) for s in size), tuple(int(p) for p in patch_size)
    xs: list[Any] = [
        *_deterministic(pre, ["image"], crop=False),
        ResizeWithPadOrCropd(keys="image", spatial_size=size_t, mode="constant"),  # 0 = hu_min (air)
    ]
    if train and patch_t != size_t:
        xs.append(RandSpatialCropSamplesd(keys="image", roi_size=patch_t, num_samples=num_samples, random_size=False))
    xs.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(xs)


class TextCTDataModule(VolumeDataModule):
    """`VolumeDataModule` with keys ("image", "text") on one fixed generation grid.

    Args:
        size: the grid (X, Y, Z) in voxels at the preprocessing spacing, every volume padded/cropped
            to it. Defaults to (96, 96, 48).
        (the other arguments as `VolumeDataModule`; sampling.patch_size = size for the CLIP and
        diffusion recipes; the modality is CT and there is no augmentation.)
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datalist: str | None = None,
        size: tuple[int, int, int] = (96, 96, 48),
        preprocessing: Preprocessing = Preprocessing(spacing=(4.0, 4.0, 4.0)),
        sampling: Sampling = Sampling(patch_size=(96, 96, 48), num_samples=1),
        split: Split = Split(),
        num_workers: int = 2,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        if preprocessing.modality not in (None, "CT"):
            raise ConfigError(
                f"Text-to-CT trains on CT, but data.preprocessing.modality is '{preprocessing.modality}'."
            )
        ct = preprocessing.resolved("CT")
        super().__init__(
            ("image", "text"),
            data_dir,
            datalist,
            ct,
            sampling,
            split,
            False,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        self.size = [int(s) for s in size]
        if len(self.size) != 3 or min(self.size) < 1:
            raise ConfigError(f"data.size must be three positive voxel counts, got {list(size)}.")
        if any(p > s for p, s in zip(self.patch_size, self.size, strict=True)):
            raise ConfigError(f"data.sampling.patch_size {self.patch_size} must fit in data.size {self.size}.")

    def _split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train, val = super()._split()

        def keep(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{"image": x["image"], "text": str(x["text"]), "case": str(x["image"])} for x in items]

        return keep(train), keep(val)

    def cache_fingerprint(self) -> str:
        return super().cache_fingerprint() + "-text" + "x".join(str(s) for s in self.size)

    def transforms(self, split: str) -> Any:
        return text_ct_transforms(self.pre, self.size, self.patch_size, split == "train", self.num_samples)

    def texts(self, split: str = "train") -> list[str]:
        """The reports of a split (the tokenizer's training corpus)."""
        if not self.train_items:
            self.setup("fit")
        return [x["text"] for x in (self.train_items if split == "train" else self.val_items)]
