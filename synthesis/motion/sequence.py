"""Reading a 4D scan, the coarse motion grid, and registering phases to the reference (Lai et al. 2025: every phase is its displacement field from phase 0)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from medct.errors import ConfigError, InputPathError, InvalidVolumeError
from medct.geometry import Grid
from medct.intensity import scale_window
from medct.volume import Volume

Registration = Literal["intensity", "elastix"]
Method = Literal["ar", "copy-last", "linear", "pca"]
MIN_PHASES = 3
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def order_phase_files(folder: str | Path) -> list[Path]:
    """The phase volumes of a folder in phase order: by the last number in each file name
    (phase_2 before phase_10). One clear error for a folder without volumes, a file name without a
    number, or two files with the same number."""
    root = Path(folder)
    files = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.lower().endswith(_VOLUME_SUFFIXES)]
    if not files:
        raise InputPathError(f"{root} holds no phase volumes (.nii.gz, .nii, .mha, .mhd, .nrrd).")
    numbers: dict[int, Path] = {}
    for p in files:
        found = re.findall(r"\d+", p.name.split(".")[0])
        if not found:
            raise InvalidVolumeError(
                f"{p.name} has no phase number in its name; name the phases e.g. phase_00.nii.gz, phase_10.nii.gz."
            )
        n = int(found[-1])
        if n in numbers:
            raise InvalidVolumeError(f"{numbers[n].name} and {p.name} have the same phase number {n}.")
        numbers[n] = p
    return [numbers[n] for n in sorted(numbers)]


def read_sequence(source: str | Path | Sequence[str | Path]) -> list[Volume]:
    """The phases of a 4D scan: a 4D NIfTI, a folder of phase volumes (`order_phase_files`) or a
    list of paths in order. All on one grid, at least MIN_PHASES, finite."""
    from medct.io import read_phases, validate_for_inference

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        source = [str(p) for p in order_phase_files(source)]
    vols = read_phases(source)  # checks existence, grids (GeometryMismatchError) and >= 2 phases
    if len(vols) < MIN_PHASES:
        raise InvalidVolumeError(
            f"A 4D scan for motion prediction needs at least {MIN_PHASES} phases (motion is learnt from "
            f"the changes between them), got {len(vols)}."
        )
    for v in vols:
        validate_for_inference(v)
    return vols


# --------------------------------------------------------------------------- the motion grid


def motion_grid(reference: Volume, spacing: Sequence[float]) -> Grid:
    """The RAS grid at `spacing` (mm) that covers the reference (as MONAI's Orientation + Spacing)."""
    from medct.geometry import network_grid

    return network_grid(reference.affine, reference.shape, tuple(float(s) for s in spacing))


def to_motion_grid(fields: np.ndarray, reference: Volume, grid: Grid) -> np.ndarray:
    """(T, X, Y, Z, 3) RAS-mm fields on the reference grid -> (T, 3, x, y, z) on `grid`."""
    from medct.geometry import resample_volume

    out = [resample_volume(Volume(np.asarray(u, np.float32), reference.affine), grid).array for u in fields]
    return np.stack([np.moveaxis(o, -1, 0) for o in out]).astype(np.float32)


def from_motion_grid(fields: np.ndarray, grid: Grid, reference: Volume) -> np.ndarray:
    """(T, 3, x, y, z) on `grid` -> (T, X, Y, Z, 3) RAS mm on the reference grid (trilinear; the
    edge value beyond the motion grid, which covers the reference)."""
    from medct.geometry import resample_volume

    target = Grid(reference.shape, reference.affine)
    out = [resample_volume(Volume(np.moveaxis(u, 0, -1), grid.affine), target).array for u in fields]
    return np.stack(out).astype(np.float32)


def read_displacement(path: str | Path, reference: Volume) -> np.ndarray:
    """An (X, Y, Z, 3) RAS-mm displacement field from a NIfTI file (as `medct motion` writes them;
    X, Y, Z, 1, 3 vector NIfTIs too), which must lie on the reference's grid. (`read_volume` reads
    scalar images only.)"""
    import nibabel as nib

    from medct.io import check_same_grid

    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"Displacement field {p} does not exist.")
    try:
        img = nib.load(p)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for broken files
        raise InvalidVolumeError(f"{p} is not a readable NIfTI displacement field ({type(e).__name__}).") from e
    arr = arr.reshape(*arr.shape[:3], -1) if arr.ndim == 5 else arr
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidVolumeError(f"{p} has shape {arr.shape}; a displacement field is (X, Y, Z, 3) in mm.")
    if not np.isfinite(arr).all():
        raise InvalidVolumeError(f"Displacement field {p} holds NaN or infinite values.")
    field_vol = Volume(np.zeros(arr.shape[:3], np.float32), np.asarray(img.affine, np.float64))
    check_same_grid(reference, field_vol, what=f"reference phase and displacement field {p.name}")
    return arr


def reference_channel(reference: Volume, grid: Grid, hu_min: float, hu_max: float) -> np.ndarray:
    """(1, x, y, z) the reference image on the motion grid, HU window -> [0, 1] (the anatomy input)."""
    from medct.geometry import resample_volume

    ref = reference.with_array(np.asarray(reference.array, np.float32))
    img = resample_volume(ref, grid, padding=float(hu_min)).array
    return scale_window(img, hu_min, hu_max)[None]


def register_phases(
    phases: Sequence[Volume],
    method: Registration = "intensity",
    spacing_mm: float = 6.0,
    device: str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """(T, X, Y, Z, 3) pull-back fields from every phase to phase 0 (u_0 = 0), RAS mm on the grid.

    "intensity": `register_impact` with `intensity_source` (a coarse-to-fine dense field on a
    `spacing_mm` working grid, 48 -> 24 -> 16 mm control points; ~4 s a phase on 2 CPU cores for a
    trunk at 6 mm); "elastix": Elastix's B-spline stage alone (no rigid/affine stage: the couch and
    spine do not move between phases), slower.
    """
    from medct.registration.impact import ImpactSettings, intensity_source, register_impact

    ref = phases[0]
    out = np.zeros((len(phases), *ref.shape, 3), np.float32)
    settings = ImpactSettings(
        metric="l2",
        control_spacing_mm=(48.0, 24.0, 16.0),
        iterations=(50, 50, 50),
        lr_mm=1.0,
        smoothness=0.1,
        seed=seed,
    )
    src = intensity_source(spacing_mm) if method == "intensity" else None
    for t, ph in enumerate(phases[1:], start=1):
        if method == "intensity":
            assert src is not None
            out[t] = register_impact(ph, ref, src, settings, device=device, precision="fp32").displacement.array
        elif method == "elastix":
            from medct.registration.elastix import register

            out[t] = register(ph, ref, preset="bspline,", seed=seed).displacement().array
        else:
            raise ConfigError(f"Unknown registration {method!r}; use intensity or elastix.")
    return out


def warp_reference(reference: Volume, fields: np.ndarray, kind: Literal["image", "labels"] = "image") -> list[Volume]:
    """The reference warped by each (X, Y, Z, 3) field: phase_t(p) = reference(p + u_t(p))."""
    from medct.registration.impact import ImpactTransform

    fill = -1024.0 if kind == "image" else 0.0
    dtype = np.asarray(reference.array).dtype
    out = []
    for u in fields:
        v = ImpactTransform(Volume(np.asarray(u, np.float32), reference.affine.copy())).warp(reference, kind, fill)
        if np.issubdtype(dtype, np.integer):  # int16 HU in, int16 HU out (the resampling works in float)
            info = np.iinfo(dtype)
            v = v.with_array(np.clip(np.rint(np.asarray(v.array)), info.min, info.max).astype(dtype))
        out.append(v)
    return out
