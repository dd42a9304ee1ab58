"""medct's own MONAI dictionary transforms: the loaders of every data pipeline (`medct.transforms`).

They live here, at module level, so that a pipeline pickles: DataLoader workers started with spawn
(macOS, Windows), forkserver (Linux from Python 3.14) and Lightning's `ddp_spawn` receive the
pipeline by pickle, which cannot find a class defined inside a function. This module imports MONAI
(~3 s); `medct.transforms` imports it only when a pipeline is built, so readers of `Preprocessing`
(model cards, the CLI) stay cheap.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medct.io import MAX_LABEL, check_label_values  # noqa: F401  (MAX_LABEL: labels are cached as uint8)


def volume_to_metatensor(vol: Any, dtype: Any = None) -> Any:
    """`medct.io.Volume` -> MONAI MetaTensor (1, X, Y, Z) with the affine (RAS) in its meta.

    The meta mirrors what MONAI's LoadImage with NibabelReader records, so every MONAI spatial
    transform (Orientation, Spacing, Invert) reads the same geometry.
    """
    from monai.utils import SpaceKeys

    array = np.ascontiguousarray(vol.array if dtype is None else vol.array.astype(dtype, copy=False))
    affine = torch.as_tensor(vol.affine, dtype=torch.float64)
    meta = {  # "affine" itself is set by MetaTensor(affine=...)
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(vol.shape),
        "original_channel_dim": "no_channel",
        "filename_or_obj": str(vol.meta.get("path", "")),
        "space": SpaceKeys.RAS,
    }
    return MetaTensor(torch.from_numpy(array)[None], affine=affine, meta=meta)  # (1, X, Y, Z)


def _check_label_values(array: np.ndarray, where: str) -> None:
    check_label_values(array, where)  # medct.io's one check of a label map (training and registration)


class LoadVolumed(MapTransform):
    """Read each key's path with `medct.io.read_volume` into a MetaTensor (1, X, Y, Z).

    Written by hand because MONAI's LoadImaged has its own readers: reading through medct.io
    gives training the exact geometry (and DICOM handling, and error messages) of inference.
    Images become float32 HU; `label_keys` become uint8 after checking they are class indices.
    All loaded keys must share the first key's voxel grid (GeometryMismatchError otherwise).
    A value that is already a `Volume` is used as is.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        label_keys: Sequence[str] = ("label",),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = tuple(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medct.io import Volume, check_finite, check_same_grid, read_volume

        d = dict(data)
        ref: tuple[Hashable, Volume] | None = None
        for key in self.key_iterator(d):
            vol = d[key] if isinstance(d[key], Volume) else read_volume(d[key])
            if ref is None:
                ref = (key, vol)
            else:
                case = ref[1].meta.get("path", "case")
                check_same_grid(ref[1], vol, what=f"{key} and {ref[0]} of {case}")
            if key in self.label_keys:
                _check_label_values(vol.array, str(vol.meta.get("path", key)))
                d[key] = volume_to_metatensor(vol, np.uint8)
            else:
                check_finite(vol.array, str(vol.meta.get("path", key)))  # NaN would train silently
                d[key] = volume_to_metatensor(vol, np.float32)
        return d


class LoadPhasesd(MapTransform):
    """Read a 4D scan's phases (`medct.io.read_phases`: a list of paths or one 4D NIfTI) into
    one MetaTensor (T, X, Y, Z) float32: phases as channels, so every spatial transform moves
    them together. Written by hand: MONAI has no reader for an ordered list of phase files."""

    def __init__(self, keys: Sequence[str] = ("phases",)) -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medct.io import check_finite, read_phases

        d = dict(data)
        for key in self.key_iterator(d):
            vols = read_phases(d[key])
            for v in vols:
                check_finite(np.asarray(v.array), str(v.meta.get("path", key)))
            first = volume_to_metatensor(vols[0], np.float32)  # (1, X, Y, Z) with the grid's meta
            stacked = torch.stack([torch.from_numpy(np.asarray(v.array, dtype=np.float32)) for v in vols])
            d[key] = _with_meta(stacked, first)
        return d


def _with_meta(array: Any, like: Any) -> Any:
    """A MetaTensor holding `array` (T, X, Y, Z) with the affine and meta of `like`."""
    meta = {k: v for k, v in like.meta.items() if k != "affine"}  # the affine is given on its own
    return MetaTensor(array, affine=like.affine, meta=meta)


class KeptSlicesd(MapTransform):
    """Add "kept": a uint8 map (1, X, Y, Z) on the image's grid that is 1 on the axial slices an
    entry's "slices" list keeps (`medct.pretrain.reduction`), so that crop centres can be drawn
    from them after every spatial step. "slices" index the stored voxel axis nearest to S-I
    (`medct.pretrain.reduction.axial_axis`); an entry without "slices" keeps every slice.
    Written by hand: MONAI has no transform from slice indices to a sampling map."""

    def __init__(self, image_key: str = "image") -> None:
        super().__init__([image_key])
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]  # MetaTensor (1, X, Y, Z) as loaded, before orientation
        affine = np.asarray(image.affine, dtype=np.float64)
        direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0, keepdims=True)
        axis = int(np.argmax(np.abs(direction[2])))
        slices = d.pop("slices", None)
        kept = (
            torch.zeros(image.shape, dtype=torch.uint8)
            if slices is not None
            else torch.ones(image.shape, dtype=torch.uint8)
        )
        if slices is not None:
            index = [slice(None)] * 4
            index[axis + 1] = [int(k) for k in slices if 0 <= int(k) < image.shape[axis + 1]]
            kept[tuple(index)] = 1
        d["kept"] = _with_meta(kept, image)
        return d
