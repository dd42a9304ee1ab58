"""Tissue classes -> intensities per variant (CT HU, CBCT artefacts, MR T1-like) and contrast
phase, then partial-volume blur and correlated noise, then the scanner around the patient (CT:
streaks, air floor, reconstruction circle; CBCT: its artefacts and truncated field). See the package
docstring for sources."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from medct.errors import MedCTError
from medct.phantom.anatomy import _Canvas, _upsample, _world
from medct.phantom.spec import _TISSUES, PHASES, VARIANTS, PhantomParams


def _values(variant: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
    col = 4 if variant == "mr" else 1 + PHASES.index(phase)
    table = np.array([row[col] for row in _TISSUES], np.float32)
    tex = np.array([row[5] for row in _TISSUES], np.float32)
    if variant == "mr":
        tex = tex * 2.0
    return table, tex


def _blur_with_noise(
    clean: np.ndarray, spacing: np.ndarray, extra_vox: float, noise_sd: float, rng: np.random.Generator
) -> np.ndarray:
    """Partial-volume blur (voxel box ~0.4 voxel sd combined with a ~0.8 mm sd scanner PSF) of the clean
    image plus white noise: the noise comes out correlated like reconstructed CT noise, with standard
    deviation `noise_sd` (the blur's noise gain is divided out exactly)."""
    sigma = np.sqrt(0.4**2 + (0.8 / spacing) ** 2 + extra_vox**2)
    gain = 1.0
    for sd in sigma:  # discrete kernel of scipy.ndimage.gaussian_filter1d (radius = int(truncate * sd + 0.5))
        x = np.arange(-int(3.0 * sd + 0.5), int(3.0 * sd + 0.5) + 1)
        w = np.exp(-0.5 * (x / sd) ** 2)
        gain *= math.sqrt(float((w / w.sum()) @ (w / w.sum())))
    img = clean
    if noise_sd > 0:
        img = clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(noise_sd / gain)
    return ndimage.gaussian_filter(img, sigma, truncate=3.0)


def _streaks(
    x, y, z, p: PhantomParams, n: int, amp: float, spacing: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """n straight streaks through the spine region (beam hardening and photon starvation behind dense
    bone), each of +-0.5..1 x `amp` HU, fading in and out along z. (X, Y, Z) float32."""
    out = np.zeros(x.shape, np.float32)
    for _ in range(n):
        px, py = rng.normal(0, 25), p.spine_y + rng.normal(0, 25)
        th = rng.uniform(0, math.pi)
        d = np.abs((x - px) * math.sin(th) - (y - py) * math.cos(th))
        width = max(1.5, 0.6 * float(spacing.min()))
        mod = np.cos(z * np.float32(2 * math.pi / rng.uniform(40, 120)) + rng.uniform(0, 2 * math.pi))
        out += (
            np.float32(rng.choice([-1, 1]) * amp * rng.uniform(0.5, 1.0))
            * np.exp(-0.5 * (d / width) ** 2)
            * (0.5 + 0.5 * mod)
        )
    return out


def _grid_xy(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[list[np.ndarray], float, float]:
    """World coordinates of every voxel and the world (x, y) of the grid centre."""
    pos = [np.arange(n, dtype=np.float64) for n in shape]
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    return _world(affine, pos), float(centre[0]), float(centre[1])


# CT streak amplitude (HU): the shared planning CT's air beside the body reads sd ~28 HU within
# 100-200 mm of the grid centre against ~4 HU further out, mostly such streaks.
CT_STREAK_HU = 30.0


def _ct_scanner(img: np.ndarray, p: PhantomParams, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a CT scanner does around the patient: streaks from dense bone, air clipped to the
    scanner's floor (the shared planning CT clips at -1000 HU, the TotalSegmentator example does
    not), and the value outside the circular reconstruction field (-1000/-1024/-2048/-3024 by
    vendor), where the grid reaches beyond it."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    (x, y, z), cx, cy = _grid_xy(affine, img.shape)
    if p.ct_streaks:
        img = img + _streaks(x, y, z, p, p.ct_streaks, CT_STREAK_HU, spacing, rng)
    if p.air_floor_hu is not None:
        img = np.maximum(img, np.float32(p.air_floor_hu))
    outside = (x - cx) ** 2 + (y - cy) ** 2 > np.float32((p.recon_fov_mm / 2) ** 2)
    img[outside] = np.float32(p.padding_hu)
    return img


# scatter fraction, cupping depth, number of streaks, streak amplitude (HU), field-of-view radius (mm)
_CBCT_MILD = (0.3, 0.08, 6, 45.0, 150.0)
_CBCT_STRONG = (0.45, 0.18, 12, 90.0, 125.0)


def _cbct(img: np.ndarray, p: PhantomParams, affine: np.ndarray, strong: bool, rng: np.random.Generator) -> np.ndarray:
    """Degrade a blurred HU image into CBCT-like uncalibrated intensities (see module docstring)."""
    shape = img.shape
    s_frac, cup, n_streak, streak_amp, fov_r = _CBCT_STRONG if strong else _CBCT_MILD
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    mu = np.maximum(img + 1000.0, 0.0) * np.float32(1e-3)  # attenuation relative to water
    # scatter: a low-pass copy (~50 mm) mixed in -> loss of soft-tissue contrast
    steps = [max(1, int(round(12.0 / s))) for s in spacing]
    cpos = [np.arange(0, n, st).astype(np.float64) for n, st in zip(shape, steps, strict=True)]
    low = ndimage.gaussian_filter(
        mu[:: steps[0], :: steps[1], :: steps[2]],
        [50.0 / (st * s) for st, s in zip(steps, spacing, strict=True)],
        mode="nearest",
    )
    low = _upsample(low[None], cpos, shape)[0]
    mu = (1.0 - s_frac) * mu + s_frac * low
    (x, y, z), cx, cy = _grid_xy(affine, shape)
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) * np.float32(1.0 / fov_r**2)
    mu *= 1.0 - cup * np.clip(1.0 - r2, 0.0, 1.0)  # cupping: darker centre
    out = mu * 1000.0 - 1000.0
    out += _streaks(x, y, z, p, n_streak, streak_amp, spacing, rng)
    rr = np.sqrt(r2) * fov_r
    for _ in range(3 if strong else 1):  # ring artefacts around the rotation axis
        out += np.float32(rng.normal(0, 25 if strong else 10)) * np.exp(
            -0.5 * ((rr - rng.uniform(10, fov_r)) / 2.0) ** 2
        )
    if strong:  # slow banding along the axis (cone-beam / motion)
        out += np.float32(20.0) * np.sin(z * np.float32(2 * math.pi / 23.0) + np.float32(rng.uniform(0, 6.3)))
    # uncalibrated intensities: gain about the air level plus an offset (the real CBCT in shared/data
    # reads ~1.5x the CT's HU + 1000 in soft tissue/bone)
    gain = rng.uniform(0.7, 1.7) if strong else rng.uniform(0.9, 1.5)
    offset = rng.uniform(-150, 150) if strong else rng.uniform(-60, 60)
    out = (out + 1000.0) * np.float32(gain) - np.float32(1000.0 - offset)
    out[r2 > 1.0] = -1000.0  # truncated circular field of view
    return out


def _image(
    cv: _Canvas,
    tex: np.ndarray,
    bias: np.ndarray | None,
    extra: np.ndarray,
    p: PhantomParams,
    affine: np.ndarray,
    variant: str,
    phase: str,
    noise_hu: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy image, clean unblurred image), both (X, Y, Z) float32."""
    table, tex_amp = _values(variant, phase)
    clean = table[cv.tissue] + tex_amp[cv.tissue] * tex
    if variant != "mr":
        clean += extra
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if variant == "ct":
        img = _ct_scanner(_blur_with_noise(clean, spacing, 0.0, noise_hu, rng), p, affine, rng)
    elif variant in ("cbct", "cbct_tst"):
        # 2.5x / 4x the CT noise after the scatter mix (which scales the noise by 1 - scatter fraction)
        strong = variant == "cbct_tst"
        mult, s_frac = (4.0, _CBCT_STRONG[0]) if strong else (2.5, _CBCT_MILD[0])
        img = _cbct(
            _blur_with_noise(clean, spacing, 0.9 if strong else 0.5, noise_hu * mult / (1 - s_frac), rng),
            p,
            affine,
            strong,
            rng,
        )
    else:  # mr: smooth multiplicative bias field, Rician magnitude noise
        assert bias is not None
        s = _blur_with_noise(clean, spacing, 0.0, 0.0, rng) * np.exp(np.float32(0.3) * bias)
        n1 = rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(noise_hu)
        n2 = rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(noise_hu)
        img = np.sqrt((s + n1) ** 2 + n2 * n2)
    return img.astype(np.float32, copy=False), clean


def _check(variant: str, phase: str, noise_hu: float, dtype: str) -> None:
    if variant not in VARIANTS:
        raise MedCTError(f"Unknown phantom variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if phase not in PHASES:
        raise MedCTError(f"Unknown contrast phase {phase!r}; choose one of {', '.join(PHASES)}.")
    if not (noise_hu >= 0 and math.isfinite(noise_hu)):
        raise MedCTError(f"noise_hu must be a finite value >= 0, got {noise_hu}.")
    if dtype not in ("float32", "int16"):
        raise MedCTError(f"dtype must be 'float32' or 'int16', got {dtype!r}.")
