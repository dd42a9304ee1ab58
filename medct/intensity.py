"""Intensity scales of medct, in one place: the CT window, the synthetic-CT ranges, the CBCT and
MR normalisations, and where the body is in intensity terms.

- `scale_intensity` / `scale_window`: HU clipped to a window and mapped to [0, 1], what every CT
  network of medct sees (the numpy twin of MONAI's `ScaleIntensityRange(a_min, a_max, 0, 1,
  clip=True)`, which the training pipelines use; written out here because importing MONAI costs
  ~3 s on the CPU inference path).
- `BODY_HU` and `body_threshold`: the one body threshold: CT/CBCT voxels above -500 HU are tissue,
  below it air; `body_threshold` is that value on the [0, 1] scale of a window (the training
  crops' foreground, the sampler's negatives, the Predictor's skipped tiles and label constraint
  all use it). `TISSUE_HU` (-250 HU): what the body mask takes back at its edge must exceed it, so
  that the couch top does not join the body.
- Synthetic CT (`synthesis/sct.py`): the CT target in SynthRAD2025's range [CT_MIN, CT_MAX] mapped
  to [-1, 1] (`ct_to_unit` / `unit_to_ct`); the source normalised by its modality
  (`normalise_source`: CBCT [min, p99.5] -> [-1, 1], MR z-scored inside its support, CT as the
  target). CBCT and MR are not HU-calibrated, so their support (`source_support`) is a fraction of
  their own range, not BODY_HU; the CT's body (`ct_body`) is BODY_HU.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from medct.errors import ConfigError, InvalidVolumeError

TensorOrArray = TypeVar("TensorOrArray")  # a torch Tensor or a numpy array (no torch import here)

BODY_HU = -500.0  # air < -500 HU < every tissue
# What the body mask takes back at its edge (skin, thin chest walls) must be tissue (fat is about
# -100 HU): a couch top, a foam/carbon sandwich panel, lies at -300 to -500 HU under the patient
# (the shared planning CT) and would otherwise join the body where it touches the back.
TISSUE_HU = -250.0
CT_MIN, CT_MAX = -1024.0, 3071.0  # SynthRAD2025's CT range
SOURCE_PERCENTILE = 99.5  # CBCT: [min, p99.5] -> [-1, 1]
SUPPORT_FRACTION = {"CT": 0.25, "CBCT": 0.25, "MR": 0.1}  # source support: above this fraction of [min, p99.5]


def ct_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1024, 3071] -> [-1, 1] (float32)."""
    x = np.clip(np.asarray(hu, np.float32), CT_MIN, CT_MAX)
    return (x - CT_MIN) * np.float32(2.0 / (CT_MAX - CT_MIN)) - np.float32(1.0)


def unit_to_ct(x: TensorOrArray) -> TensorOrArray:
    """[-1, 1] -> HU (the inverse of `ct_to_unit` on its range)."""
    return (x + 1.0) * ((CT_MAX - CT_MIN) / 2.0) + CT_MIN


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every axial slice (axis 2): lungs, bowel gas and airways belong to the body."""
    from scipy import ndimage

    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[2]):
        out[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return out


def source_support(array: np.ndarray, modality: str) -> np.ndarray:
    """Where the source image holds the patient: above a fraction of its [min, p99.5] range (CBCT,
    CT: soft tissue, not air or the -1000 outside a CBCT's field of view; MR: signal, not
    background), holes filled per axial slice. (X, Y, Z) bool."""
    a = np.asarray(array, np.float32)
    lo, hi = float(a.min()), float(np.percentile(a, SOURCE_PERCENTILE))
    frac = SUPPORT_FRACTION.get(modality.upper(), 0.25)
    return fill_slices(a > lo + frac * (hi - lo))


def ct_body(hu: np.ndarray) -> np.ndarray:
    """The CT's body: above BODY_HU (-500 HU), holes filled per axial slice."""
    return fill_slices(np.asarray(hu) > BODY_HU)


def pair_mask(source: np.ndarray, ct_hu: np.ndarray, modality: str) -> np.ndarray:
    """Training and scoring mask of a pair on one grid: the CT's body inside the source's support."""
    return ct_body(ct_hu) & source_support(source, modality)


def normalise_source(array: np.ndarray, modality: str) -> np.ndarray:
    """The network's input scale (float32): CBCT [min, p99.5] -> [-1, 1] (clipped above); MR z-scored
    inside `source_support`; CT as `ct_to_unit`."""
    a = np.asarray(array, np.float32)
    m = modality.upper()
    if m == "CT":
        return ct_to_unit(a)
    if m == "CBCT":
        lo, hi = float(a.min()), float(np.percentile(a, SOURCE_PERCENTILE))
        if not hi > lo:
            raise InvalidVolumeError("The CBCT is constant below its 99.5th percentile; it holds no image.")
        return np.minimum((a - lo) * np.float32(2.0 / (hi - lo)) - np.float32(1.0), np.float32(1.0))
    if m == "MR":
        body = source_support(a, "MR")
        if body.sum() < 2:
            raise InvalidVolumeError("The MR has no signal above its background; it holds no image.")
        mean, sd = float(a[body].mean()), float(a[body].std())
        return (a - np.float32(mean)) / np.float32(max(sd, 1e-6))
    raise ConfigError(f"Synthetic CT takes CBCT or MR (or CT) input, not '{modality}'.")


def scale_window(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and map to [0, 1] as float32."""
    out = (np.asarray(hu, np.float32) - np.float32(hu_min)) / np.float32(hu_max - hu_min)
    return np.clip(out, 0.0, 1.0)


def body_threshold(hu_min: float, hu_max: float, hu: float = BODY_HU) -> float:
    """`hu` (default BODY_HU) on the [0, 1] scale of the HU window [hu_min, hu_max]; never below a
    hair above 0 (the value clipped air takes when the window starts above it)."""
    return max((hu - hu_min) / (hu_max - hu_min), 1e-3)
