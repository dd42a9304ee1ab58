"""`Volume`: a 3D (or vector-valued 3D) array with its voxel -> RAS affine and source metadata.

Kept apart from `medct.io` so that every module that only passes volumes around (dicom, geometry,
inference, phantoms) imports this small module and not the readers and writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# RAS <-> LPS: the two conventions differ by a sign flip of the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image and its geometry.

    array:  (X, Y, Z) voxels in the file's own index order (i, j, k), any dtype; (X, Y, Z, C) for
            vector-valued volumes such as displacement fields or class probabilities.
    affine: (4, 4) float64, voxel index (i, j, k, 1) -> RAS+ world millimetres; the nibabel and
            MONAI convention. ITK/DICOM quantities (LPS origin/direction) are derived from it.
    meta:   free-form facts about the source: path, format, modality, series UID, ...
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine's linear part)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def direction_lps(self) -> np.ndarray:
        """(3, 3) ITK direction cosines (columns are the i, j, k axes in LPS world)."""
        lps = LPS_TO_RAS @ self.affine  # LPS_TO_RAS is its own inverse
        return lps[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin_lps(self) -> np.ndarray:
        """(3,) ITK origin: world position of voxel (0, 0, 0) in LPS millimetres."""
        return (LPS_TO_RAS @ self.affine)[:3, 3].copy()

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume on the same grid (same affine, copied meta) holding `array`."""
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape}")
        return Volume(array=array, affine=self.affine.copy(), meta=dict(self.meta))
