"""Paired cohorts for synthetic CT (`write_pair_cohort`): a CBCT or MR of each patient and its CT.

The same seed renders the same anatomy in every variant, so the CBCT/MR image and the CT of a case
are voxel-aligned by construction. To reproduce what makes real training pairs hard (the CT is
taken on another day: the anatomy has moved, SynthRAD2025; Boussot et al.), the CT that training
sees (`target`) is warped by a known smooth deformation: a random rigid shift plus a smooth
random displacement field of peak `misalign_mm`. The unwarped CT is kept as `truth`: the
exact CT of the image's anatomy, which a benchmark can score a synthetic CT against without any
registration in the way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medct.errors import MedCTError
from medct.io import write_volume
from medct.paths import write_text_atomic
from medct.phantom.render import make_phantom
from medct.phantom.spec import LABELS, Appearance, GridSpec
from medct.volume import Volume

PAIR_SOURCES = ("cbct", "cbct_tst", "mr")


def smooth_displacement(
    shape: tuple[int, int, int], spacing: np.ndarray, peak_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """(3, X, Y, Z) displacement in mm along the voxel axes: a random shift of up to peak/2 per axis
    plus Gaussian-smoothed noise (~40 mm correlation) scaled so its largest magnitude is peak/2."""
    out = np.empty((3, *shape), np.float32)
    sigma = [40.0 / float(s) for s in spacing]
    for a in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        field *= np.float32(0.5 * peak_mm / max(float(np.abs(field).max()), 1e-6))
        out[a] = field + np.float32(rng.uniform(-0.5, 0.5) * peak_mm)
    return out


def warp_image(array: np.ndarray, displacement_mm: np.ndarray, spacing: np.ndarray, order: int) -> np.ndarray:
    """array sampled at x + u(x) (u in mm along the voxel axes), linear (order 1) or nearest (0)."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in array.shape], indexing="ij")
    coords = [g + displacement_mm[a] / np.float32(spacing[a]) for a, g in enumerate(grid)]
    return ndimage.map_coordinates(array.astype(np.float32), coords, order=order, mode="nearest")


def write_pair_cohort(
    out_dir: str | os.PathLike[str],
    n: int = 12,
    source: str = "cbct",
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] | None = None,
    misalign_mm: float = 8.0,
) -> Path:
    """Write n pairs as imagesTr/case_XXXX_0000.nii.gz (the `source` image: cbct, cbct_tst or mr),
    targetsTr/case_XXXX.nii.gz (its CT, warped by the case's known deformation), truthTr/ (the
    unwarped CT) and labelsTr/ (labels on the image's grid), with a dataset.json whose "training"
    entries hold "image", "target", "truth" and "label". Returns the dataset.json path."""
    if source not in PAIR_SOURCES:
        raise MedCTError(f"A paired cohort's source must be one of {', '.join(PAIR_SOURCES)}, got {source!r}.")
    if n < 1:
        raise MedCTError(f"A cohort needs at least one case, got n={n}.")
    if not (misalign_mm >= 0 and np.isfinite(misalign_mm)):
        raise MedCTError(f"misalign_mm must be a finite value >= 0, got {misalign_mm}.")
    grid = GridSpec(shape=tuple(shape), spacing=None if spacing is None else tuple(spacing))  # type: ignore[arg-type]
    root = Path(out_dir).expanduser()
    for folder in ("imagesTr", "targetsTr", "truthTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    look_src = Appearance(variant=source, dtype="float32" if source == "mr" else "int16")  # type: ignore[arg-type]
    look_ct = Appearance(variant="ct", dtype="int16")
    training = []
    for i in range(n):
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        src = make_phantom(case_seed, grid, look_src, False)
        ct = make_phantom(case_seed, grid, look_ct, False)
        sp = np.linalg.norm(ct.image.affine[:3, :3], axis=0)
        rng = np.random.default_rng([int(seed), i, 7])
        u = smooth_displacement(tuple(ct.image.shape), sp, misalign_mm, rng)  # type: ignore[arg-type]
        moved = warp_image(ct.image.array, u, sp, order=1)
        names = {
            "image": f"imagesTr/case_{i:04d}_0000.nii.gz",
            "target": f"targetsTr/case_{i:04d}.nii.gz",
            "truth": f"truthTr/case_{i:04d}.nii.gz",
            "label": f"labelsTr/case_{i:04d}.nii.gz",
        }
        write_volume(src.image, root / names["image"])
        write_volume(Volume(np.rint(moved).astype(np.int16), ct.image.affine, {}), root / names["target"])
        write_volume(ct.image, root / names["truth"])
        write_volume(src.label, root / names["label"])
        training.append({**names, "seed": case_seed, "misalign_mm": float(misalign_mm)})
    dataset = {
        "name": f"medct_phantom_pairs_{source}",
        "description": f"medct synthetic {source}->CT pairs, CT moved by a known deformation (peak {misalign_mm} mm)",
        "reference": "medct.phantom.pairs",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": look_src.modality},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n,
        "training": training,
    }
    path = root / "dataset.json"
    write_text_atomic(path, json.dumps(dataset, indent=2))
    return path
