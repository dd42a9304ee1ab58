"""Where the patient's body is: the one body-mask helper of medct.

CT/CBCT voxels above BODY_HU (-500 HU) are tissue, below it air. Used by the training pipelines
(crop to the body, negatives sampled inside it: `body_threshold`) and by the Predictor (the
network runs on the body's box plus the training crop's margin, tiles in it that touch no body voxel
are not run, and no label is written outside the body: `body_mask`, which also drops the couch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medct.intensity import BODY_HU, TISSUE_HU, body_threshold  # noqa: F401  (re-exported: the body's intensity rules)

BODY_COARSE_MM = 3.0  # voxel size of the coarse copy the body mask is found on
BODY_OPEN_MM = 10.0  # opening radius: removes couch plates/rails thinner than ~2 cm
BODY_MIN_ML = 10.0  # pieces of the opened mask kept as body (arms, ...); couch remnants are smaller


@dataclass(frozen=True)
class BodyMask:
    """Coarse mask of the patient's body on a grid: `mask[c]` stands for voxels c * stride ... (c + 1) * stride - 1."""

    mask: np.ndarray  # (x, y, z) bool on the coarse grid, one coarse voxel wider than the body
    stride: np.ndarray  # (3,) grid voxels per coarse voxel
    tight: np.ndarray | None = None  # (x, y, z) the body itself, not widened (labels are kept inside it)
    # (x, y, z) cells of `tight` that may hold both body and not (its outline's layer, and what no
    # tissue encloses): there a voxel is body only if it is tissue itself (medct.inference)
    fringe: np.ndarray | None = None

    @property
    def inside(self) -> np.ndarray:
        """The body without the one-voxel margin `mask` adds (where labels may be written)."""
        return self.mask if self.tight is None else self.tight

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def crop_box(self, shape: Sequence[int], margin: int, min_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The grid index box [lo, hi) holding the body plus `margin` voxels (the margin training
        crops keep, medct.transforms.BODY_MARGIN_VOXELS), widened to at least `min_size` (a patch)
        and clipped to the grid `shape`; lo is a multiple of `stride`, so `shifted(lo)` is exact."""
        grid, size = np.asarray(shape, int), np.minimum(np.asarray(min_size, int), np.asarray(shape, int))
        idx = np.argwhere(self.mask)
        lo = idx.min(axis=0) * self.stride - margin
        hi = (idx.max(axis=0) + 1) * self.stride + margin
        short = np.maximum(size - (hi - lo), 0)  # widen about the body's centre to a whole patch
        lo, hi = lo - short // 2, hi + (short - short // 2)
        lo = np.clip(np.minimum(lo, grid - size), 0, None)  # inside the grid, still a whole patch
        hi = np.minimum(np.maximum(hi, lo + size), grid)
        lo = (lo // self.stride) * self.stride
        return lo, hi

    def shifted(self, lo: np.ndarray) -> BodyMask:
        """The same mask for the grid cropped to start at index `lo` (a multiple of `stride`)."""
        c = np.asarray(lo) // self.stride
        sl = tuple(slice(int(v), None) for v in c)
        tight, fringe = (None if a is None else a[sl] for a in (self.tight, self.fringe))
        return BodyMask(self.mask[sl], self.stride, tight, fringe)

    def touches(self, lo: np.ndarray, hi: np.ndarray) -> bool:
        """Whether the inclusive index box lo..hi of the grid contains any body voxel."""
        c_lo = np.maximum(np.asarray(lo) // self.stride, 0)
        c_hi = np.minimum(np.asarray(hi) // self.stride, np.asarray(self.mask.shape) - 1)
        if (c_lo > c_hi).any():
            return False
        return bool(self.mask[c_lo[0] : c_hi[0] + 1, c_lo[1] : c_hi[1] + 1, c_lo[2] : c_hi[2] + 1].any())


def fill_truncated_slices(body: np.ndarray) -> np.ndarray:
    """(x, y, z) bool: each axial slice's body with its holes filled, also where the field of view
    cuts the body: along each image edge, the stretch between the first and the last body pixel on
    it is closed first, so lungs or bowel gas that reach a cut edge still count as enclosed (scipy's
    hole filling alone takes them for outside air, since they touch the border).

    All slices at once, by labelling: the background pieces (4-connected within a slice, as scipy's
    binary_fill_holes connects them; the in-plane structure never joins slices) that touch no image
    edge are holes. Same result as binary_fill_holes slice by slice, ~2.5x faster (0.04 instead of
    0.10 s for a 171x171x134 CT mask here, measured).
    """
    from scipy import ndimage

    closed = body.copy()
    for edge in (closed[0], closed[-1], closed[:, 0], closed[:, -1]):  # (n, z) views into `closed`
        n = edge.shape[0]
        first = np.argmax(edge, axis=0)  # (z,) first body pixel on this edge of each slice
        last = n - 1 - np.argmax(edge[::-1], axis=0)
        pos = np.arange(n)[:, None]
        edge |= (pos >= first) & (pos <= last) & edge.any(axis=0)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # 4-neighbours within the slice only
    pieces, n = ndimage.label(~closed, structure=in_plane)  # (x, y, z) background pieces of each slice
    hole = np.ones(n + 1, bool)  # piece id -> whether it is a hole
    hole[0] = False  # the body itself
    hole[pieces[[0, -1]]] = False  # pieces on an image edge are outside air
    hole[pieces[:, [0, -1]]] = False
    return closed | hole[pieces]


def body_mask(image: np.ndarray, spacing: Sequence[float], threshold: float, tissue: float | None = None) -> BodyMask:
    """Where the patient's body is in a RAS-ordered image (axis 2 is the head-foot axis), on a ~3 mm
    coarse grid; empty (`.empty`) when no voxel is above `threshold` (an all-air volume).
    `tissue` (default `threshold`): the value a voxel taken back after the opening must exceed
    (TISSUE_HU on the image's scale keeps the couch top out, see medct.intensity).

    Voxels above `threshold`, holes filled in every axial slice (lungs, airways and bowel gas belong
    to the body; also where the field of view cuts the body, `fill_truncated_slices`), so the body is
    one solid piece; a binary opening with a box of ~BODY_OPEN_MM radius (cuts off what is thinner:
    the couch plate and rails, a mattress); its pieces of >= BODY_MIN_ML (the opening can part arms
    from the trunk); plus the voxels above `tissue` within one opening radius of them that touch
    them through such voxels (the corners the opening rounded off), holes filled again - that is
    `.inside`; `.mask` is it dilated by one coarse voxel (a coarse sample stands for `stride`
    voxels, so the body's edge can lie up to one coarse voxel beyond it: a tile that touches it must
    run). `.fringe`: the cells of `.inside` on its outline and those no tissue encloses, where a
    label needs a tissue voxel of its own (`medct.inference.outside_body`). Falls back to the
    filled threshold when the opening removes everything (tiny phantoms).
    """
    from scipy import ndimage

    sp = np.asarray(spacing, dtype=np.float64)
    stride = np.maximum(1, np.round(BODY_COARSE_MM / sp)).astype(int)
    coarse = np.asarray(image[:: stride[0], :: stride[1], :: stride[2]]) > threshold  # (x, y, z)
    if not coarse.any():
        return BodyMask(coarse, stride)
    size = 2 * np.ceil(BODY_OPEN_MM / (sp * stride)).astype(int) + 1
    # Holes filled first (lungs, bowel gas: also where the field of view cuts the body), so that
    # the body is one solid piece whose chest wall the opening cannot break.
    filled = fill_truncated_slices(coarse)
    # minimum then maximum filter = binary opening with a box; separable in scipy, so fast. It cuts
    # off what is thinner than the box: the couch plate and rails, a mattress.
    opened = ndimage.maximum_filter(ndimage.minimum_filter(filled.view(np.uint8), size=size), size=size) > 0
    mask = opened if opened.any() else filled
    labels, n = ndimage.label(mask)
    if n > 1:  # keep every sizeable piece: the opening may part arms from the trunk
        sizes_ml = np.bincount(labels.ravel())[1:] * float(np.prod(sp * stride)) / 1000.0
        keep = np.flatnonzero((sizes_ml >= BODY_MIN_ML) | (sizes_ml == sizes_ml.max())) + 1
        mask = np.isin(labels, keep)
    # The opening rounds the body's corners off (at most one box radius deep): take back the tissue
    # within one radius of what it kept, then fill what that encloses in each axial slice.
    near = ndimage.maximum_filter(mask.view(np.uint8), size=size) > 0
    dense = coarse if tissue is None else np.asarray(image[:: stride[0], :: stride[1], :: stride[2]]) > tissue
    # only tissue that touches the kept body through tissue: a couch top's carbon skin within a
    # radius of the back, parted from it by a pad or air, stays out
    pieces, _ = ndimage.label(mask | (dense & near & filled))
    mask = np.isin(pieces, np.unique(pieces[mask]))
    mask = fill_truncated_slices(mask)
    # Where a cell may hold both body and not: the outline's layer, and what tissue does not enclose
    # (a couch pad and core filled in between the back and a couch top, which at a coarse grid reads
    # above `threshold` and which no opening can cut off a flat back); lungs and gas are enclosed.
    # binary erosion/dilation with a 3x3x3 box as separable min/max filters (~2x faster here, the same voxels)
    inner = ndimage.minimum_filter(mask.view(np.uint8), size=3, mode="constant", cval=1) > 0
    enclosed = fill_truncated_slices(dense)
    fringe = mask & (~inner | ~enclosed)
    widened = ndimage.maximum_filter(mask.view(np.uint8), size=3, mode="constant", cval=0) > 0
    return BodyMask(widened, stride, mask, fringe)
