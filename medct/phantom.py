"""Synthetic labelled CT phantoms: seeded, fast, in physical millimetres.

A phantom is a torso (skin, subcutaneous fat, muscle wall, ribs, spine, sternum, table) holding
lungs with vessel and airway trees, heart, aorta, IVC, liver with portal/hepatic veins and
gallbladder, spleen, stomach with an air-fluid level, kidneys (cortex, medulla, sinus), bowel and
optional liver/kidney lesions. Every structure is an implicit function of world RAS millimetres
(ellipsoids, tapered tubes, planes), evaluated on whatever voxel grid is asked for, so one seed is
one patient at any size, spacing, axis order (RAS, LPS, ...) or oblique rotation. Per-case anatomy
varies through seeded parameters (organ sizes, positions, rotations, body habitus) and a smooth
random deformation of the coordinates. The image is a table lookup of tissue class -> intensity
(per variant and contrast phase), then partial-volume blur and correlated noise.

Variants (parameters, not copies): "ct" (HU), "cbct" / "cbct_tst" (scatter-like contrast loss and
cupping, streaks, rings, more noise, truncated circular field of view set to -1000, uncalibrated
gain/offset), "mr" (T1-like contrast in arbitrary units, bone and air dark, multiplicative bias
field, Rician noise). Contrast phases: native / arterial / venous. `make_breathing` adds a
diaphragm-driven respiratory deformation. Each case gets a radiology-style text computed from its
own label map.

Sources of the numbers and models:
- Unenhanced HU of abdominal tissues: Lamba et al., "CT Hounsfield numbers of soft tissues on
  unenhanced abdominal CT scans", Abdom Imaging 2014; contrast-phase enhancement: Bae,
  "Intravenous contrast medium administration and scan timing at CT", Radiology 2010.
- Breathing: Lujan et al., Med Phys 1999 (z(t) = z0 - b cos^2n(pi t / tau), here n = 1 as
  sin^2 from end-exhale); diaphragm-driven motion decaying upwards in the lung as in the XCAT
  phantom (Segars et al., Med Phys 2010), which also inspired building anatomy from analytic shapes.
- CBCT degradations: Siewerdsen & Jaffray, Med Phys 2001 (scatter -> cupping, contrast loss);
  Schulze et al., Dentomaxillofac Radiol 2011 (streaks, rings, truncation).
- MR bias field as a smooth multiplicative field: Sled et al., IEEE TMI 1998 (N3); Rician
  magnitude noise: Gudbjartsson & Patz, MRM 1995.

Coordinates: world = RAS+ millimetres (nibabel/NIfTI/MONAI): +x points to the patient's Right,
+y Anterior, +z Superior (nibabel.aff2axcodes(eye(4)) == ("R", "A", "S")). So organs on the
patient's LEFT (spleen, left kidney, left lung, most of the stomach, heart apex) sit at world
x < 0, and the liver at x > 0. Gravity (supine patient on the table) points to -y.

Why hand-written rather than a library: MONAI/TorchIO synthesise only blobs (monai.data.
synthetic.create_test_image_3d) or augment existing images; XCAT is closed and heavy. Nothing
offline provides labelled multi-organ CT with CBCT/MR/4D variants.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from medct.errors import MedCTError
from medct.io import Volume, write_volume
from medct.paths import write_text_atomic

Variant = Literal["ct", "cbct", "cbct_tst", "mr"]
ContrastPhase = Literal["native", "arterial", "venous"]

# The label set of all of medct (fixed order). Lesions are 11 wherever they sit.
LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "stomach",
    6: "aorta",
    7: "lung_left",
    8: "lung_right",
    9: "spine",
    10: "ribs",
    11: "lesion",
}
LABEL_IDS: dict[str, int] = {name: i for i, name in LABELS.items()}

# With spacing=None the grid spans this cube (mm): the whole torso from lung apices to lower kidneys.
FOV_MM = 384.0

VARIANTS: tuple[str, ...] = ("ct", "cbct", "cbct_tst", "mr")
PHASES: tuple[str, ...] = ("native", "arterial", "venous")

# Tissue classes: name, HU native / arterial / venous, MR (T1-like, a.u.), texture amplitude.
_TISSUES: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("air", -1000, -1000, -1000, 0, 0),
    ("lung", -860, -860, -860, 25, 25),
    ("fat", -100, -100, -100, 850, 10),
    ("muscle", 45, 55, 60, 300, 6),
    ("liver", 60, 75, 110, 520, 6),
    ("spleen", 48, 120, 115, 340, 6),
    ("kidney_cortex", 32, 190, 165, 420, 8),
    ("kidney_medulla", 30, 60, 150, 260, 8),
    ("blood_arterial", 42, 300, 165, 80, 4),
    ("blood_venous", 42, 110, 170, 140, 4),
    ("myocardium", 45, 100, 90, 280, 5),
    ("bone_cortical", 950, 950, 950, 25, 60),
    ("bone_cancellous", 230, 235, 240, 200, 40),
    ("disc", 90, 90, 95, 180, 5),
    ("csf", 10, 10, 10, 60, 3),
    ("gi_wall", 40, 80, 95, 280, 6),
    ("fluid", 8, 8, 8, 60, 3),
    ("bowel", 30, 70, 85, 250, 15),
    ("table", 150, 150, 150, 0, 0),
    ("lesion_hypo", 35, 50, 55, 260, 6),
    ("lesion_hyper", 55, 190, 150, 380, 6),
    ("cyst", 5, 5, 5, 50, 2),
    ("lesion_solid", 38, 120, 100, 300, 6),
    ("lung_vessel", 40, 220, 150, 40, 0),
    ("cartilage", 110, 110, 110, 250, 5),
)
_T: dict[str, int] = {row[0]: i for i, row in enumerate(_TISSUES)}
_LESION_TISSUE = {"hypo": "lesion_hypo", "hyper": "lesion_hyper", "cyst": "cyst", "solid": "lesion_solid"}


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in world RAS mm: centre, semi-axes along its own axes, rotation (deg) about R, A, S."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Lesion:
    """A focal lesion: a slightly irregular ellipsoid clipped to its organ."""

    organ: Literal["liver", "kidney_left", "kidney_right"]
    center: tuple[float, float, float]
    radius_mm: float
    kind: Literal["hypo", "hyper", "cyst", "solid"]
    elongation: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class PhantomParams:
    """One synthetic patient, in world RAS mm (see the module docstring). Sampled by `sample_params`."""

    seed: int
    body_half_width: float  # half of the left-right skin-to-skin width
    body_anterior: float  # skin at y = +body_anterior
    body_posterior: float  # skin at y = -body_posterior
    fat_mm: float  # subcutaneous fat thickness
    muscle_mm: float  # abdominal/thoracic wall muscle thickness
    dome_right: tuple[float, float, float]  # top of the right hemidiaphragm
    dome_left: tuple[float, float, float]
    dome_radius: float  # curvature radius of the domes (mm)
    liver_right: Ellipsoid
    liver_left: Ellipsoid
    gallbladder: Ellipsoid
    spleen: Ellipsoid
    stomach: Ellipsoid
    stomach_air_fraction: float  # fraction of the stomach's AP extent filled with air (non-dependent part)
    kidney_left: Ellipsoid
    kidney_right: Ellipsoid
    heart: Ellipsoid
    aorta_radius: float
    spine_y: float  # centre of the vertebral bodies (AP)
    vertebra_z0: float  # centre height of one vertebral body; others every `vertebra_pitch`
    vertebra_pitch: float
    rib_z0: float  # posterior height of the first rib; next ribs every `rib_pitch` below
    rib_pitch: float
    rib_drop: float  # how much lower a rib ends anteriorly than it starts posteriorly
    deform_mm: float  # amplitude of the smooth random deformation of all coordinates
    lesions: tuple[Lesion, ...] = ()
    breathing_amplitude_mm: float = 12.0  # cranio-caudal diaphragm excursion, end-exhale -> end-inhale
    breathing_period_s: float = 4.0

    def to_dict(self) -> dict:
        """JSON-ready dictionary of all parameters."""
        return asdict(self)


@dataclass
class PhantomCase:
    """One generated case. `displacement` (breathing only): (X, Y, Z, 3) float32 RAS mm on the image
    grid such that this phase at world point p equals the end-exhale reference at p + displacement(p)."""

    image: Volume
    label: Volume
    text: str
    params: PhantomParams
    displacement: Volume | None = None


def _vec3(v) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Independent streams per purpose, so e.g. asking for lesions does not change the anatomy.
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, stream])


def _jit(rng: np.random.Generator, v: tuple[float, ...], sd: float) -> tuple[float, ...]:
    return tuple(float(x + rng.normal(0.0, sd)) for x in v)


def _ell(rng: np.random.Generator, c, r, a, c_sd: float, r_scale: float, a_sd: float) -> Ellipsoid:
    s = r_scale * rng.uniform(0.93, 1.07, size=3)
    return Ellipsoid(
        center=_vec3(_jit(rng, c, c_sd)),
        radii=_vec3([x * y for x, y in zip(r, s, strict=True)]),
        angles_deg=_vec3(_jit(rng, a, a_sd)),
    )


def sample_params(seed: int, lesions: bool | int | None = None) -> PhantomParams:
    """Draw one patient from `seed`. lesions: None = random 0-3, True = 1-3, False/0 = none, n = exactly n."""
    rng = _rng(seed, 0)
    body_scale = rng.uniform(0.92, 1.06)
    fat = rng.uniform(10.0, 32.0)
    half_w = 165.0 * body_scale + 0.6 * (fat - 20.0)
    ant = 105.0 * body_scale + 0.8 * (fat - 20.0)
    post = 122.0 * body_scale + 0.3 * (fat - 20.0)
    muscle = rng.uniform(8.0, 13.0)
    dome_r = (70.0 + rng.normal(0, 5), -5.0 + rng.normal(0, 5), 42.0 + rng.normal(0, 6))
    dome_l = (-70.0 + rng.normal(0, 5), -10.0 + rng.normal(0, 5), dome_r[2] - rng.uniform(5, 15))
    # Organ size scales: occasional hepato-/splenomegaly so that the texts vary.
    liver_s = rng.uniform(1.18, 1.3) if rng.random() < 0.12 else rng.uniform(0.9, 1.08)
    spleen_s = rng.uniform(1.35, 1.6) if rng.random() < 0.12 else rng.uniform(0.88, 1.1)
    kid_s = rng.uniform(0.9, 1.08)
    dz = dome_r[2] - 42.0  # organs under the diaphragm follow its height
    spine_y = -52.0 * body_scale
    params = PhantomParams(
        seed=int(seed),
        body_half_width=float(half_w),
        body_anterior=float(ant),
        body_posterior=float(post),
        fat_mm=float(fat),
        muscle_mm=float(muscle),
        dome_right=_vec3(dome_r),
        dome_left=_vec3(dome_l),
        dome_radius=float(rng.uniform(110.0, 135.0)),
        liver_right=_ell(rng, (66.0, 0.0, -2.0 + dz), (80.0, 84.0, 74.0), (0, 18, -8), 5, liver_s, 6),
        liver_left=_ell(rng, (-5.0, 38.0, 8.0 + dz), (68.0, 38.0, 45.0), (0, 12, -22), 5, liver_s, 6),
        gallbladder=_ell(rng, (38.0, 38.0, -58.0 + dz), (15.0, 14.0, 34.0), (20, -15, 30), 4, 1.0, 8),
        spleen=_ell(rng, (-92.0, -42.0, 0.0 + dz), (24.0, 50.0, 52.0), (0, 10, 45), 5, spleen_s, 8),
        stomach=_ell(rng, (-48.0, 25.0, -12.0 + dz), (38.0, 32.0, 60.0), (15, -25, -20), 5, rng.uniform(0.85, 1.1), 8),
        stomach_air_fraction=float(rng.uniform(0.1, 0.45)),
        kidney_left=_ell(rng, (-72.0, -50.0, -78.0 + dz), (30.0, 24.0, 56.0), (-10, -12, 35), 5, kid_s, 6),
        kidney_right=_ell(rng, (72.0, -50.0, -95.0 + dz), (30.0, 24.0, 56.0), (-10, 12, -35), 5, kid_s, 6),
        heart=_ell(rng, (-22.0, 30.0, 66.0 + dz), (62.0, 45.0, 52.0), (10, 0, -30), 5, rng.uniform(0.92, 1.08), 6),
        aorta_radius=float(rng.uniform(10.5, 14.0)),
        spine_y=float(spine_y),
        vertebra_z0=float(rng.uniform(0.0, 32.0)),
        vertebra_pitch=float(rng.uniform(29.0, 34.0)),
        rib_z0=float(rng.uniform(165.0, 180.0)),
        rib_pitch=float(rng.uniform(20.0, 23.0)),
        rib_drop=float(rng.uniform(50.0, 75.0)),
        deform_mm=float(rng.uniform(4.0, 9.0)),
        breathing_amplitude_mm=float(rng.uniform(5.0, 20.0)),
        breathing_period_s=float(rng.uniform(3.0, 6.0)),
    )
    return replace(params, lesions=_sample_lesions(params, lesions))


def _sample_lesions(p: PhantomParams, lesions: bool | int | None) -> tuple[Lesion, ...]:
    rng = _rng(p.seed, 1)
    if lesions is None:
        n = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.3, 0.15, 0.1]))
    elif lesions is True:
        n = int(rng.integers(1, 4))
    else:
        n = int(lesions)  # False -> 0
    if n < 0:
        raise MedCTError(f"The number of lesions must be >= 0, got {n}.")
    out: list[Lesion] = []
    for _ in range(n):
        organ = "liver" if rng.random() < 0.75 else ("kidney_left" if rng.random() < 0.5 else "kidney_right")
        if organ == "liver":
            radius = float(rng.uniform(5.0, 16.0))
            kind = "hypo" if rng.random() < 0.7 else "hyper"
        else:
            radius = float(rng.uniform(5.0, 11.0))
            kind = "cyst" if rng.random() < 0.6 else "solid"
        center = None
        for _try in range(500):
            if organ == "liver":
                lobe = p.liver_right if rng.random() < 0.75 else p.liver_left
                frac_max = 0.6 if lobe is p.liver_right else 0.45
            else:
                lobe, frac_max = getattr(p, organ), 0.5
            d = rng.normal(size=3)
            local = d / np.linalg.norm(d) * frac_max * rng.random() ** (1 / 3) * np.asarray(lobe.radii)
            if organ != "liver":
                # keep kidney lesions in the lateral half, away from the sinus at the hilum
                medial = 1.0 if organ == "kidney_left" else -1.0
                local[0] = -medial * abs(local[0]) - medial * 0.2 * lobe.radii[0]
            c = np.asarray(lobe.center) + _rotation(lobe.angles_deg) @ local
            zd = float(_diaphragm_z(p, np.float64(c[0]), np.float64(c[1])))
            _s, depth, fat = _torso(p, c[0], c[1], c[2])
            inside_wall = float(depth) > float(fat) + p.muscle_mm + radius + 8.0
            # separate lesions stay separate components (elongation up to 1.15, voxels up to ~8 mm)
            clear = all(np.linalg.norm(c - np.asarray(o.center)) > 1.15 * (radius + o.radius_mm) + 16.0 for o in out)
            if organ == "liver":  # not where later-painted structures would cover the lesion
                others = (p.stomach, p.gallbladder, p.kidney_right, p.spleen)
                free = not any(_near(e, c, radius + 4.0) for e in others)
                free &= (
                    min(
                        math.hypot(c[0] - 22.0, c[1] - p.spine_y - 35.0),
                        math.hypot(c[0] + 16.0, c[1] - p.spine_y - 33.0),
                    )
                    > radius + 18.0
                )
                ok = free and inside_wall and c[2] < zd - radius - 12.0
            else:
                ok = True
            if clear and ok:
                center = c
                break
        if center is None:
            continue
        out.append(
            Lesion(
                organ=organ,  # type: ignore[arg-type]
                center=_vec3(center),
                radius_mm=radius,
                kind=kind,  # type: ignore[arg-type]
                elongation=_vec3(rng.uniform(0.85, 1.15, size=3)),
            )
        )
    return tuple(out)


def _near(e: Ellipsoid, point: np.ndarray, margin: float) -> bool:
    """Whether `point` lies inside ellipsoid `e` grown by `margin` mm along each of its axes."""
    local = _rotation(e.angles_deg).T @ (np.asarray(point, float) - np.asarray(e.center))
    return float(np.sum((local / (np.asarray(e.radii) + margin)) ** 2)) <= 1.0


# ----------------------------------------------------------------------------- geometry


def _rotation(angles_deg: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Rotation (world <- local) by angles about R (x), A (y), S (z), applied in that order."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_AXIS_OF = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def grid_affine(
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    axcodes: str = "RAS",
    oblique_deg: float | tuple[float, float, float] = 0.0,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The voxel -> RAS mm affine of a phantom grid.

    axcodes: where each array axis points, nibabel letters ("RAS", "LPS", "PIR", ...).
    oblique_deg: a float tilts the grid about the patient's left-right axis (gantry tilt); three
    floats rotate about R, A, S. center_mm: world point at the centre of the grid.
    spacing None: FOV_MM / shape along each axis (the whole torso, whatever the shape).
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 2:
        raise MedCTError(f"A phantom shape must be three sizes of at least 2 voxels, got {tuple(shape)}.")
    if spacing is None:
        sp = np.array([FOV_MM / n for n in shape_t])
    else:
        sp = np.asarray(spacing, dtype=np.float64)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise MedCTError(f"A phantom spacing must be three positive millimetre values, got {spacing}.")
    codes = str(axcodes).upper()
    if len(codes) != 3 or any(c not in _AXIS_OF for c in codes) or len({_AXIS_OF[c][0] for c in codes}) != 3:
        raise MedCTError(f"axcodes must name each of R/L, A/P, S/I once (e.g. 'RAS' or 'LPS'), got {axcodes!r}.")
    direction = np.zeros((3, 3))
    for col, c in enumerate(codes):
        row, sign = _AXIS_OF[c]
        direction[row, col] = sign
    angles = (float(oblique_deg), 0.0, 0.0) if np.isscalar(oblique_deg) else tuple(oblique_deg)  # type: ignore[arg-type]
    if len(angles) != 3:
        raise MedCTError(f"oblique_deg must be one angle or three (about R, A, S), got {oblique_deg}.")
    lin = _rotation(angles) @ direction @ np.diag(sp)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(center_mm, dtype=np.float64) - lin @ ((np.asarray(shape_t) - 1) / 2.0)
    return aff


def _world(affine: np.ndarray, pos: list[np.ndarray]) -> list[np.ndarray]:
    """World coordinates (3 arrays, float32) of the voxel positions pos[0] x pos[1] x pos[2]."""
    i = pos[0].astype(np.float32)[:, None, None]
    j = pos[1].astype(np.float32)[None, :, None]
    k = pos[2].astype(np.float32)[None, None, :]
    out = []
    for r in range(3):
        m = affine[r].astype(np.float32)
        out.append(
            np.ascontiguousarray(
                np.broadcast_to(m[0] * i + m[1] * j + (m[2] * k + m[3]), (len(pos[0]), len(pos[1]), len(pos[2])))
            )
        )
    return out


def _lerp_axis(a: np.ndarray, n: int, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along `axis` from samples at `positions` (sorted voxel indices) to 0..n-1."""
    x = np.arange(n, dtype=np.float64)
    if len(positions) == 1:
        return np.repeat(a, n, axis=axis)
    hi = np.clip(np.searchsorted(positions, x, side="right"), 1, len(positions) - 1)
    lo = hi - 1
    w = np.clip((x - positions[lo]) / (positions[hi] - positions[lo]), 0.0, 1.0).astype(np.float32)
    shp = [1] * a.ndim
    shp[axis] = n
    out = np.take(a, lo, axis=axis)
    out += (np.take(a, hi, axis=axis) - out) * w.reshape(shp)
    return out


def _upsample(coarse: np.ndarray, positions: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear upsampling (C, m0, m1, m2) -> (C, n0, n1, n2).

    Hand-written because scipy.ndimage.zoom has no batch dimension and cannot take the exact sample
    positions; a gather + lerp per axis also avoids BLAS threads, which stall on busy machines."""
    out = coarse
    for ax in (2, 1, 0):
        out = _lerp_axis(out, shape[ax], positions[ax], ax + 1)
    return out


class _Lattice:
    """Smooth random field(s) on a fixed world lattice (independent of the image grid), sampled
    trilinearly at world points: the same patient looks the same on every grid."""

    ORIGIN = -264.0
    EXTENT = 528.0

    def __init__(self, rng: np.random.Generator, channels: int, step: float, sigma: float, peak: float | None) -> None:
        n = int(self.EXTENT / step) + 1
        v = rng.standard_normal((channels, n, n, n)).astype(np.float32)
        for c in range(channels):
            v[c] = ndimage.gaussian_filter(v[c], sigma, mode="wrap")
            # unit std, or a fixed peak amplitude (deformations): trilinear sampling keeps the bound
            v[c] *= (peak / np.abs(v[c]).max()) if peak is not None else (1.0 / v[c].std())
        self.values, self.step = v, step

    def sample(self, pts: list[np.ndarray]) -> np.ndarray:
        """(C, *pts[0].shape) field values at world points pts = [x, y, z]."""
        idx = np.stack([((p - self.ORIGIN) / self.step).ravel() for p in pts])  # (3, N)
        out = [ndimage.map_coordinates(ch, idx, order=1, mode="nearest") for ch in self.values]
        return np.stack(out).reshape((len(out), *pts[0].shape))


@functools.lru_cache(maxsize=16)
def _lattice(seed: int, stream: int, channels: int, step: float, sigma: float, peak: float | None) -> _Lattice:
    # cached: the phases of a breathing series and repeated renders of a patient share their fields
    return _Lattice(_rng(seed, stream), channels, step, sigma, peak)


# ----------------------------------------------------------------------------- anatomy helpers


def _torso(p: PhantomParams, x, y, z):
    """Torso cross-section at world points: (s, depth, fat) with s the normalised radius (<= 1 inside
    the skin), depth the distance (mm) inwards from the skin along the ray from the body axis, and fat
    the local subcutaneous fat thickness (thinner on the back). The outline is an ellipse with a
    flatter back and a slight barrel shape along z. Works on arrays and on scalars."""
    a = p.body_half_width * (1.0 - 0.05 * ((z + 20.0) / 200.0) ** 2)
    ant = y > 0
    y2 = y * y
    yb2 = y2 * np.where(ant, 1.0 / p.body_anterior**2, 1.0 / p.body_posterior**2)
    x2 = x * x
    s = np.sqrt(x2 / (a * a) + np.where(ant, yb2, yb2 * (0.55 + 0.45 * yb2)))
    r = np.sqrt(x2 + y2)
    depth = r / np.maximum(s, 1e-3) - r
    fat = p.fat_mm * (0.775 + 0.225 * np.clip(y * (1.0 / 40.0), -1.0, 1.0))
    return s, depth, fat


def _diaphragm_z(p: PhantomParams, x, y):
    """Height (mm) of the diaphragm surface above (x, y): two paraboloid domes."""
    k = 1.0 / (2.0 * p.dome_radius)
    zr = p.dome_right[2] - k * ((x - p.dome_right[0]) ** 2 + 0.8 * (y - p.dome_right[1]) ** 2)
    zl = p.dome_left[2] - k * ((x - p.dome_left[0]) ** 2 + 0.8 * (y - p.dome_left[1]) ** 2)
    return np.maximum(zr, zl)


def _ell_rho2(q: list[np.ndarray], e: Ellipsoid) -> np.ndarray:
    """Normalised squared radius of points q in ellipsoid e (<= 1: inside)."""
    r = _rotation(e.angles_deg)
    d = [q[i] - np.float32(e.center[i]) for i in range(3)]
    out = None
    for ax in range(3):
        loc = (d[0] * np.float32(r[0, ax]) + d[1] * np.float32(r[1, ax]) + d[2] * np.float32(r[2, ax])) * np.float32(
            1.0 / e.radii[ax]
        )
        out = loc * loc if out is None else out + loc * loc
    return out  # type: ignore[return-value]


def _ell_bbox(e: Ellipsoid, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    r = _rotation(e.angles_deg)
    half = np.sqrt(((r * (np.asarray(e.radii) * scale)[None, :]) ** 2).sum(axis=1))
    return np.asarray(e.center) - half, np.asarray(e.center) + half


def _trees(
    rng: np.random.Generator, root, directions, length: float, radius: float, depth: int, spread_deg: float
) -> np.ndarray:
    """Random binary vessel trees, one per direction, grown level by level (vectorised).

    Returns (N, 8) segments (ax, ay, az, bx, by, bz, r_a, r_b); children turn by ~spread_deg and are
    shorter (x0.65-0.85) and thinner (x0.72) than their parent (Murray-like tapering)."""
    d = np.asarray(directions, float)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.broadcast_to(np.asarray(root, float), d.shape).copy()
    ln = np.full(len(d), float(length))
    r = float(radius)
    out = []
    for level in range(depth + 1):
        q = p + d * ln[:, None]
        out.append(np.column_stack([p, q, np.full(len(d), r), np.full(len(d), 0.82 * r)]))
        if level == depth:
            break
        nd = np.repeat(d, 2, axis=0) + math.radians(spread_deg) * rng.normal(size=(2 * len(d), 3))
        d = nd / np.linalg.norm(nd, axis=1, keepdims=True)
        p = np.repeat(q, 2, axis=0)
        ln = np.repeat(ln, 2) * rng.uniform(0.65, 0.85, size=2 * len(ln))
        r *= 0.72
    return np.concatenate(out)


def _polyline(points: list[tuple[float, float, float]], radius: float) -> list[tuple]:
    return [(*a, *b, radius, radius) for a, b in itertools.pairwise(points)]


# ----------------------------------------------------------------------------- rendering


# main pulmonary vessel directions from the hilum (x mirrored per side), spread over all lobes
_LUNG_TRUNKS = (
    (0.2, 0.0, 1.0),
    (0.8, 0.2, 0.6),
    (1.0, 0.1, -0.1),
    (0.4, 1.0, 0.1),
    (0.4, -1.0, 0.2),
    (0.6, 0.0, -1.0),
    (0.3, 0.8, -0.8),
    (0.3, -0.8, -0.9),
    (0.9, 0.6, -0.4),
    (0.9, -0.6, -0.4),
    (0.6, 0.5, 0.8),
    (0.6, -0.6, 0.7),
)
_CUBE = np.array(list(itertools.product((0.0, 1.0), repeat=3)))  # (8, 3) unit-cube corners


class _Canvas:
    """Tissue and label maps being painted, plus the two coordinate sets: `qs` for structures fixed to
    the skeleton/body wall, `qi` for the internal organs that breathing moves."""

    def __init__(
        self,
        p: PhantomParams,
        affine: np.ndarray,
        shape: tuple[int, int, int],
        qs: list[np.ndarray],
        qi: list[np.ndarray],
        deform: _Lattice,
        shift_mm: float,
    ) -> None:
        margin_s, margin_i = p.deform_mm + 1.0, p.deform_mm + abs(shift_mm) + 1.0
        self.params, self.deform, self.shift_mm = p, deform, shift_mm
        self.spacing = np.linalg.norm(affine[:3, :3], axis=0)
        self.shape, self.inv = shape, np.linalg.inv(affine)
        self.qs, self.qi, self.margin_s, self.margin_i = qs, qi, margin_s, margin_i
        self.tissue = np.zeros(shape, np.uint8)  # (X, Y, Z) all air
        self.label = np.zeros(shape, np.uint8)
        self.moving = np.zeros(shape, bool)  # voxels whose content moves with breathing
        # torso: normalised radius, depth below the skin and local fat thickness (mm), static coordinates
        self.s_out, self.depth, self.fat = _torso(p, qs[0], qs[1], qs[2])  # (X, Y, Z) each

    def block(self, lo, hi, internal: bool) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
        """Index sub-block holding the world box [lo, hi] (+ deformation margin) and its coordinates."""
        m = self.margin_i if internal else self.margin_s
        lo = np.asarray(lo, float) - m
        corners = lo + _CUBE * (np.asarray(hi, float) + m - lo)  # (8, 3)
        idx = corners @ self.inv[:3, :3].T + self.inv[:3, 3]
        a = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, self.shape)
        b = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, self.shape)
        if np.any(a >= b):
            return None
        sl = tuple(slice(int(u), int(v)) for u, v in zip(a, b, strict=True))
        q = self.qi if internal else self.qs
        return sl, [c[sl] for c in q]

    def paint(self, sl, mask: np.ndarray, tissue: str, label: int | None, static: bool = False) -> None:
        np.copyto(self.tissue[sl], _T[tissue], where=mask)  # faster than boolean setitem
        if label is not None:
            np.copyto(self.label[sl], label, where=mask)
        if static:
            np.copyto(self.moving[sl], False, where=mask)

    def to_grid(self, pts: np.ndarray) -> np.ndarray:
        """Approximate inverse of the internal coordinate map: world positions (M, 3) on the grid of
        anatomy points `pts` (M, 3). First order in the smooth deformation (error << 1 mm)."""
        u = self.deform.sample([pts[:, 0], pts[:, 1], pts[:, 2]]).T  # (M, 3)
        w = pts - u
        if self.shift_mm != 0.0:
            z = w[:, 2].copy()
            for _ in range(3):  # fixed point of z + shift(x, y, z) = target
                z = w[:, 2] - _breathing_shift(self.params, w[:, 0], w[:, 1], z, self.shift_mm)
            w[:, 2] = z
        return w

    def thin_tubes(self, segs: np.ndarray, tissue: str, within: int) -> None:
        """Paint many thin tapered tubes inside voxels labelled `within` (label unchanged) by splatting
        spheres along each segment: one vectorised pass instead of one block per segment."""
        if len(segs) == 0:
            return
        sp = self.spacing
        a, b, ra, rb = segs[:, :3], segs[:, 3:6], segs[:, 6], segs[:, 7]
        seg_len = np.linalg.norm(b - a, axis=1)
        step = np.minimum(np.minimum(ra, rb), 0.5 * sp.min())  # sphere spacing <= radius: ripple < 15 %
        n = np.ceil(seg_len / step).astype(int) + 1
        sid = np.repeat(np.arange(len(segs)), n)
        t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
        pts = a[sid] + (b - a)[sid] * t[:, None]  # (M, 3) anatomy mm
        rad = ra[sid] + (rb - ra)[sid] * t
        ijk = self.to_grid(pts) @ self.inv[:3, :3].T + self.inv[:3, 3]  # (M, 3) fractional voxel index
        base = np.rint(ijk).astype(np.int64)
        frac = (ijk - base) * sp  # mm offset of the point from its nearest voxel centre, per axis
        flat: list[np.ndarray] = []
        half = np.ceil(rad / sp.min()).astype(int)
        for h in np.unique(half):  # group by stencil size
            off = np.stack(np.meshgrid(*[np.arange(-h, h + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (S, 3)
            group = np.flatnonzero(half == h)
            for start in range(0, len(group), max(1, 2_000_000 // len(off))):  # bound the (G, S) temporaries
                g = group[start : start + max(1, 2_000_000 // len(off))]
                d2 = (((off[None, :, :] * sp) - frac[g][:, None, :]) ** 2).sum(-1)  # (G, S) mm^2, orthogonal axes
                hit = d2 <= (rad[g] ** 2)[:, None]
                vox = (base[g][:, None, :] + off[None, :, :])[hit]  # (H, 3)
                ok = np.all((vox >= 0) & (vox < np.asarray(self.shape)), axis=1)
                flat.append(np.ravel_multi_index(vox[ok].T, self.shape))
        idx = np.unique(np.concatenate(flat))
        idx = idx[self.label.ravel()[idx] == within]
        self.tissue.ravel()[idx] = _T[tissue]

    def tubes(
        self,
        segs: list[tuple],
        tissue: str,
        label: int | None,
        internal: bool,
        within: int | None = None,
        static: bool = False,
    ) -> None:
        """Paint tapered tubes; `within` restricts them to voxels currently carrying that label."""
        for s in segs:
            a, b = np.array(s[:3]), np.array(s[3:6])
            r = max(s[6], s[7])
            blk = self.block(np.minimum(a, b) - r, np.maximum(a, b) + r, internal)
            if blk is None:
                continue
            sl, q = blk
            ab = b - a
            inv_len2 = 1.0 / max(float(ab @ ab), 1e-9)
            d = [q[i] - np.float32(a[i]) for i in range(3)]
            t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) * np.float32(inv_len2), 0.0, 1.0)
            dist2 = sum((d[i] - t * np.float32(ab[i])) ** 2 for i in range(3))
            rad = np.float32(s[6]) + t * np.float32(s[7] - s[6])
            mask = dist2 <= rad * rad
            if within is not None:
                mask &= self.label[sl] == within
            self.paint(sl, mask, tissue, label, static)


def _breathing_shift(p: PhantomParams, x, y, z, shift_mm: float):
    """Pull-back z displacement: content at (x, y, z) in a phase whose diaphragm is `shift_mm` lower
    came from (x, y, z + shift). Full shift below the diaphragm (abdominal organs translate), decaying
    exponentially upwards through the lung (length 70 mm > any shift, so the map stays invertible)."""
    s = z - _diaphragm_z(p, x, y)
    return np.float32(shift_mm) * np.exp(np.minimum(-s / 70.0, 0.0)).astype(np.float32)


def _render(p: PhantomParams, affine: np.ndarray, shape: tuple[int, int, int], shift_mm: float, need_bias: bool):
    """Paint one patient on a grid. Returns the canvas (tissue, label and moving masks), the texture field,
    the MR bias field (or None), extra HU (lung density gradient) and the pull-back z shift (or None),
    all (X, Y, Z). shift_mm > 0 lowers the diaphragm (inspiration)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    full = [np.arange(n, dtype=np.float64) for n in shape]
    w = _world(affine, full)  # 3 x (X, Y, Z) world mm
    # Smooth fields are computed on a coarse copy of the grid (~12 mm) and upsampled.
    steps = [max(1, int(round(12.0 / s))) for s in spacing]
    cpos = [np.unique(np.r_[np.arange(0, n, st), n - 1]).astype(np.float64) for n, st in zip(shape, steps, strict=True)]
    wc = _world(affine, cpos)  # 3 x coarse
    deform = _lattice(p.seed, 3, 3, 24.0, 2.0, p.deform_mm)
    fields = _lattice(p.seed, 4, 3, 10.0, 1.3, None)  # texture, bowel, gas
    chans = [deform.sample(wc)]  # (3, m0, m1, m2) static deformation
    vz = None
    if shift_mm != 0.0:
        vz = _breathing_shift(p, w[0], w[1], w[2], shift_mm)
        pc = [wc[0], wc[1], wc[2] + _breathing_shift(p, wc[0], wc[1], wc[2], shift_mm)]
        chans += [deform.sample(pc), fields.sample(pc)]
    else:
        chans += [fields.sample(wc)]
    if need_bias:
        chans.append(_lattice(p.seed, 6, 1, 40.0, 2.0, None).sample(wc))  # MR bias field, ~200 mm wavelength
    up = _upsample(np.concatenate(chans), cpos, shape)  # (C, X, Y, Z)
    qs = [w[i] + up[i] for i in range(3)]
    if vz is not None:
        qi = [w[0] + up[3], w[1] + up[4], w[2] + vz + up[5]]
        tex, bowel, gas = up[6], up[7], up[8]
    else:
        qi = qs
        tex, bowel, gas = up[3], up[4], up[5]
    bias = up[-1] if need_bias else None
    cv = _Canvas(p, affine, shape, qs, qi, deform, shift_mm)
    rng = _rng(p.seed, 5)
    extra = np.zeros(shape, np.float32)

    # --- table under the back, body wall: static
    blk = cv.block((-260, -p.body_posterior - 40, -400), (260, -p.body_posterior - 2, 400), False)
    if blk is not None:
        sl, (x, y, z) = blk
        top = -p.body_posterior - 8.0 + x * x / 4000.0
        cv.paint(sl, (y < top) & (y > top - 10.0) & (np.abs(x) < 230), "table", 0)
    x, y, z = qs
    s_out, depth, fat = cv.s_out, cv.depth, cv.fat
    cv.paint(np.s_[:], depth >= 0.0, "fat", 0)
    wall = depth >= fat
    cv.paint(np.s_[:], wall, "muscle", 0)
    cavity = depth >= fat + np.float32(p.muscle_mm)
    cv.paint(np.s_[:], cavity, "fat", 0)
    cv.moving |= cavity

    # --- thorax / abdomen split by the (moving) diaphragm
    xi, yi, zi = qi
    zd = _diaphragm_z(p, xi, yi)
    thorax = cavity & (zi > zd)
    abdomen = cavity & (zi < zd - 5.0)
    cv.paint(np.s_[:], cavity & ~thorax & ~abdomen, "muscle", 0)  # diaphragm muscle sheet
    # lungs: thoracic cavity minus the mediastinum, narrowing towards the apices (rib cage: static)
    za = np.maximum(z - np.float32(80.0), 0.0) * np.float32(1.0 / 130.0)
    lung = thorax & (np.abs(xi + 8.0) > 24.0) & (s_out <= 1.0 - 0.5 * za * za)
    cv.paint(np.s_[:], lung & (xi < 0), "lung", LABEL_IDS["lung_left"])
    cv.paint(np.s_[:], lung & (xi >= 0), "lung", LABEL_IDS["lung_right"])
    extra[lung] = -0.35 * yi[lung]  # dependent (posterior) lung is denser: +35 HU per 100 mm
    # bowel loops and gas in the abdominal cavity below the upper-abdominal organs
    lower = abdomen & (zi < p.dome_right[2] - 60.0 + 0.25 * yi)
    bow = lower & (bowel > 0.1)
    cv.paint(np.s_[:], bow, "bowel", 0)
    cv.paint(np.s_[:], bow & (gas > 1.6), "air", 0)

    # --- mediastinum: heart, airways, oesophagus
    h = p.heart
    blk = cv.block(*_ell_bbox(h), True)
    if blk is not None:
        sl, q = blk
        r2 = _ell_rho2(q, h)
        inside = (r2 <= 1.0) & cavity[sl] & (zi[sl] > zd[sl] - 5.0)
        cv.paint(sl, inside, "myocardium", 0)
        hx = q[0] - np.float32(h.center[0])
        cv.paint(sl, inside & (r2 < 0.55) & (hx < 0), "blood_arterial", 0)  # left ventricle / atrium
        cv.paint(sl, inside & (r2 < 0.55) & (hx >= 0), "blood_venous", 0)  # right heart
    carina = (0.0, 2.0, h.center[2] + 45.0)
    cv.tubes(_polyline([(0.0, 4.0, 260.0), carina], 9.0), "air", 0, True)
    hilum = {s: (s * 48.0, -8.0, h.center[2] + 25.0) for s in (-1.0, 1.0)}
    for s in (-1.0, 1.0):
        cv.tubes([(*carina, *hilum[s], 6.5, 5.5)], "air", None, True)
        dirs = [(0.3 * s, 0.1, 1.0), (s, 0.0, -0.4), (0.4 * s, 0.9, -0.3), (0.5 * s, -0.8, -0.8)]
        cv.thin_tubes(
            _trees(rng, hilum[s], dirs, 30.0, 4.5, 3, 25.0), "air", LABEL_IDS["lung_left" if s < 0 else "lung_right"]
        )
    esophagus = [
        (-6.0, p.spine_y + 28.0, 260.0),
        (-8.0, p.spine_y + 30.0, h.center[2] - 30.0),
        (p.stomach.center[0] + 15.0, p.stomach.center[1] - 15.0, p.stomach.center[2] + 45.0),
    ]
    cv.tubes(_polyline(esophagus, 7.0), "muscle", 0, True, within=0)
    # pulmonary vessel trees from each hilum, kept inside the lung
    for s in (-1.0, 1.0):
        dirs = [(d[0] * s, d[1], d[2]) for d in _LUNG_TRUNKS]
        vessels = _trees(rng, (hilum[s][0], hilum[s][1] + 6.0, hilum[s][2]), dirs, 32.0, 5.0, 5, 30.0)
        cv.thin_tubes(vessels, "lung_vessel", LABEL_IDS["lung_left" if s < 0 else "lung_right"])

    # --- liver (two lobes under the right dome) with gallbladder and vessels
    lo1, hi1 = _ell_bbox(p.liver_right)
    lo2, hi2 = _ell_bbox(p.liver_left)
    blk = cv.block(np.minimum(lo1, lo2), np.maximum(hi1, hi2), True)
    if blk is not None:
        sl, q = blk
        liver = ((_ell_rho2(q, p.liver_right) <= 1.0) | (_ell_rho2(q, p.liver_left) <= 1.0)) & abdomen[sl]
        cv.paint(sl, liver, "liver", LABEL_IDS["liver"])
    porta = (p.liver_right.center[0] - 35.0, p.liver_right.center[1] + 5.0, p.liver_right.center[2] - 15.0)
    confluence = (5.0, p.spine_y + 55.0, porta[2] - 25.0)
    ivc_top = (22.0, p.spine_y + 35.0, p.dome_right[2] - 12.0)
    portal = _trees(
        rng, porta, [(1.0, -0.2, 0.3), (-1.0, 0.5, 0.2), (0.4, 0.8, 0.3), (0.6, -0.4, -0.5)], 36.0, 5.5, 3, 30.0
    )
    hepatic = _trees(rng, ivc_top, [(1.0, 0.2, -0.3), (0.3, 1.0, -0.3), (-0.7, 0.9, -0.2)], 45.0, 5.0, 2, 25.0)
    cv.thin_tubes(np.concatenate([portal, hepatic]), "blood_venous", LABEL_IDS["liver"])
    blk = cv.block(*_ell_bbox(p.gallbladder), True)
    if blk is not None:
        sl, q = blk
        cv.paint(sl, (_ell_rho2(q, p.gallbladder) <= 1.0) & abdomen[sl], "fluid", 0)

    # --- stomach: wall, fluid, air above the air-fluid level (gravity is -y)
    st = p.stomach
    blk = cv.block(*_ell_bbox(st), True)
    if blk is not None:
        sl, q = blk
        r2 = _ell_rho2(q, st)
        inside = (r2 <= 1.0) & abdomen[sl]
        cv.paint(sl, inside, "gi_wall", LABEL_IDS["stomach"])
        lumen = inside & (r2 < 0.8)
        cv.paint(sl, lumen, "fluid", LABEL_IDS["stomach"])
        ylo, yhi = _ell_bbox(st)[0][1], _ell_bbox(st)[1][1]
        level = yhi - p.stomach_air_fraction * (yhi - ylo)
        cv.paint(sl, lumen & (q[1] > level), "air", LABEL_IDS["stomach"])

    # --- spleen: ellipsoid with a concave hilum facing the stomach
    sp_ = p.spleen
    blk = cv.block(*_ell_bbox(sp_), True)
    if blk is not None:
        sl, q = blk
        hil = Ellipsoid(
            center=_vec3(np.asarray(sp_.center) + _rotation(sp_.angles_deg) @ np.array([1.3 * sp_.radii[0], 0, 0])),
            radii=(0.75 * sp_.radii[0], 0.6 * sp_.radii[1], 0.6 * sp_.radii[2]),
            angles_deg=sp_.angles_deg,
        )
        spl = (_ell_rho2(q, sp_) <= 1.0) & (_ell_rho2(q, hil) > 1.0) & abdomen[sl]
        cv.paint(sl, spl, "spleen", LABEL_IDS["spleen"])

    # --- kidneys: cortex, medulla, sinus fat + pelvis opening medially at the hilum
    for name, medial in (("kidney_left", 1.0), ("kidney_right", -1.0)):
        k: Ellipsoid = getattr(p, name)
        blk = cv.block(*_ell_bbox(k), True)
        if blk is None:
            continue
        sl, q = blk
        r2 = _ell_rho2(q, k)
        kid = (r2 <= 1.0) & cavity[sl]
        rot = _rotation(k.angles_deg)
        sinus = Ellipsoid(
            center=_vec3(np.asarray(k.center) + rot @ np.array([medial * 0.55 * k.radii[0], 0, 0])),
            radii=(0.55 * k.radii[0], 0.42 * k.radii[1], 0.55 * k.radii[2]),
            angles_deg=k.angles_deg,
        )
        s2 = _ell_rho2(q, sinus)
        cv.paint(sl, kid, "kidney_cortex", LABEL_IDS[name])
        cv.paint(sl, kid & (r2 < 0.62) & (r2 > 0.2), "kidney_medulla", LABEL_IDS[name])
        cv.paint(sl, kid & (s2 <= 1.0), "fat", 0)
        cv.paint(sl, kid & (s2 <= 0.35), "fluid", 0)  # renal pelvis
        hil = _vec3(np.asarray(k.center) + rot @ np.array([medial * 1.05 * k.radii[0], 0, 0]))
        aorta_pt = (-15.0, p.spine_y + 32.0, hil[2] + 5.0)
        ivc_pt = (22.0, p.spine_y + 35.0, hil[2] + 5.0)
        cv.tubes([(*aorta_pt, *hil, 3.5, 3.0)], "blood_arterial", 0, True, within=0)
        cv.tubes([(*ivc_pt, *hil, 4.5, 4.0)], "blood_venous", 0, True, within=0)

    # portal and splenic veins outside the liver (only through unlabelled tissue)
    splenic_hilum = _vec3(np.asarray(sp_.center) + _rotation(sp_.angles_deg) @ np.array([0.9 * sp_.radii[0], 0, 0]))
    cv.tubes(
        _polyline([confluence, porta], 7.0) + _polyline([confluence, splenic_hilum], 4.5),
        "blood_venous",
        0,
        True,
        within=0,
    )

    # --- lesions, clipped to their organ
    for les in p.lesions:
        e = Ellipsoid(
            center=les.center,
            radii=_vec3([les.radius_mm * f for f in les.elongation]),
            angles_deg=(les.center[0] % 90, les.center[1] % 90, 0.0),
        )
        blk = cv.block(*_ell_bbox(e), True)
        if blk is None:
            continue
        sl, q = blk
        m = (_ell_rho2(q, e) <= 1.0) & ((cv.label[sl] == LABEL_IDS[les.organ]) | (cv.label[sl] == LABEL_IDS["lesion"]))
        cv.paint(sl, m, _LESION_TISSUE[les.kind], LABEL_IDS["lesion"])

    # --- static structures on top: back muscles, great vessels, spine, ribs, sternum
    sy = p.spine_y
    blk = cv.block((-80, sy - 80, -400), (80, sy + 60, 400), False)
    if blk is not None:
        sl, (x, y, z) = blk
        under_fat = cv.depth[sl] >= cv.fat[sl]
        for s in (-1.0, 1.0):
            para = ((x - s * 36.0) / 27.0) ** 2 + ((y - sy + 42.0) / 22.0) ** 2 <= 1.0  # erector spinae
            cv.paint(sl, para & under_fat, "muscle", 0, static=True)
            grow = np.clip(-40.0 - z, 0.0, 140.0)
            psoas = ((x - s * (30.0 + 0.12 * grow)) ** 2 + (y - sy - 8.0) ** 2) <= (6.0 + 0.13 * grow) ** 2
            cv.paint(sl, psoas & (grow > 0), "muscle", 0, static=True)
    aorta_line = [
        (-12.0, sy + 32.0, -260.0),
        (-16.0, sy + 33.0, 40.0),
        (-20.0, sy + 30.0, h.center[2] + 50.0),
        (-8.0, sy + 50.0, h.center[2] + 75.0),
        (8.0, h.center[1] + 5.0, h.center[2] + 60.0),
        (8.0, h.center[1], h.center[2] + 10.0),
    ]
    cv.tubes(_polyline(aorta_line, p.aorta_radius), "blood_arterial", LABEL_IDS["aorta"], False, static=True)
    cv.tubes(
        _polyline(
            [
                (22.0, sy + 35.0, -260.0),
                (22.0, sy + 36.0, p.dome_right[2] - 15.0),
                (12.0, h.center[1] - 15.0, h.center[2] - 35.0),
            ],
            11.0,
        ),
        "blood_venous",
        0,
        False,
        static=True,
    )
    _spine(cv, p)
    _ribs(cv, p)
    return cv, tex, bias, extra, vz


def _spine(cv: _Canvas, p: PhantomParams) -> None:
    """Vertebral bodies (cortex + cancellous core), discs, canal and posterior elements."""
    sy = p.spine_y
    blk = cv.block((-50, sy - 75, -400), (50, sy + 25, 400), False)
    if blk is None:
        return
    sl, (x, y, z) = blk
    pitch = p.vertebra_pitch
    dz = z - np.float32(p.vertebra_z0)
    dz = dz - np.float32(pitch) * np.round(dz / np.float32(pitch))  # height relative to the nearest body centre
    half = 0.5 * pitch - 4.0  # body half height (discs ~8 mm)
    r2 = (x / 22.0) ** 2 + ((y - sy) / 17.0) ** 2
    disc = (r2 <= 1.0) & (np.abs(dz) > half)
    body = (r2 <= 1.0) & ~disc
    cv.paint(sl, disc, "disc", 0, static=True)
    cv.paint(sl, body, "bone_cortical", LABEL_IDS["spine"], static=True)
    cv.paint(sl, body & (r2 < 0.8) & (np.abs(dz) < half - 1.5), "bone_cancellous", LABEL_IDS["spine"], static=True)
    yc = sy - 28.0  # spinal canal centre
    rc = np.sqrt(x * x + (y - yc) ** 2)
    arch_z = np.abs(dz + 3.0) < 0.3 * pitch
    arch = arch_z & (rc >= 9.0) & (rc <= 15.0) & (y < yc + 6.0)
    spinous = (np.abs(x) < 4.5) & (y < yc - 12.0) & (y > yc - 34.0) & (np.abs(dz + 6.0 + 0.35 * (yc - 12.0 - y)) < 6.0)
    transverse = (np.abs(x) > 12.0) & (np.abs(x) < 38.0) & (np.abs(y - yc - 2.0) < 5.5) & (np.abs(dz + 3.0) < 6.0)
    post = (arch | spinous | transverse) & (cv.depth[sl] >= cv.fat[sl])
    cv.paint(sl, post, "bone_cortical", LABEL_IDS["spine"], static=True)
    cv.paint(
        sl,
        post & ((rc > 10.5) & (rc < 13.5) | spinous & (np.abs(x) < 2.5)),
        "bone_cancellous",
        LABEL_IDS["spine"],
        static=True,
    )
    cv.paint(sl, rc < 9.0, "csf", 0, static=True)


def _ribs(cv: _Canvas, p: PhantomParams) -> None:
    """12 rib pairs running in the wall muscle from the spine round to the costal cartilages, each
    sloping down anteriorly by `rib_drop`; plus the sternum."""
    z_lo = p.rib_z0 - 11 * p.rib_pitch - p.rib_drop - 20.0
    blk = cv.block((-260, -260, z_lo), (260, 260, 400), False)
    if blk is None:
        return
    sl, (x, y, z) = blk
    # rib track: the middle of the wall muscle; radial = mm inwards from it
    track = cv.depth[sl] - cv.fat[sl]
    radial = track - np.float32(0.5 * p.muscle_mm)
    band = np.abs(radial) < 4.0
    idx = np.nonzero(band)
    xb, yb, zb, rb = x[idx], y[idx], z[idx], radial[idx]
    theta = np.abs(np.arctan2(xb, -yb))  # 0 at the spine, pi at the sternum
    zfront = zb + np.float32(0.5 * p.rib_drop) * (1.0 - np.cos(theta))  # undo the anterior slope
    k = np.round((p.rib_z0 - zfront) / p.rib_pitch)
    dz = zfront - (p.rib_z0 - k * p.rib_pitch)
    ends = np.array([0.82, 0.82, 0.8, 0.8, 0.78, 0.76, 0.74, 0.7, 0.66, 0.6, 0.48, 0.4]) * math.pi
    valid = (k >= 0) & (k <= 11)
    kk = np.clip(k, 0, 11).astype(int)
    e2 = (rb / 3.8) ** 2 + (dz / 6.0) ** 2
    rib = valid & (e2 <= 1.0) & (theta > 0.1 * math.pi) & (theta < ends[kk])
    cart = valid & (kk <= 9) & (e2 <= 0.8) & (theta >= ends[kk]) & (theta < 0.93 * math.pi)
    t = cv.tissue[sl]
    lab = cv.label[sl]
    mov = cv.moving[sl]
    for m, tis, lb in (
        (rib, "bone_cortical", LABEL_IDS["ribs"]),
        (rib & (e2 < 0.35), "bone_cancellous", LABEL_IDS["ribs"]),
        (cart, "cartilage", 0),
    ):
        sel = tuple(i[m] for i in idx)
        t[sel] = _T[tis]
        lab[sel] = lb
        mov[sel] = False
    # sternum: anterior midline plate in the thorax
    st = (np.abs(x) < 16.0) & (y > 0) & (np.abs(radial) < 6.0) & (z > p.rib_z0 - 7 * p.rib_pitch - p.rib_drop + 10.0)
    cv.paint(sl, st, "bone_cortical", 0, static=True)
    cv.paint(sl, st & (np.abs(x) < 12.0) & (np.abs(radial) < 3.0), "bone_cancellous", 0, static=True)


# ----------------------------------------------------------------------------- intensities


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
    pos = [np.arange(n, dtype=np.float64) for n in shape]
    x, y, z = _world(affine, pos)
    cx, cy = (
        float(affine[0, :3] @ ((np.asarray(shape) - 1) / 2) + affine[0, 3]),
        float(affine[1, :3] @ ((np.asarray(shape) - 1) / 2) + affine[1, 3]),
    )
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) * np.float32(1.0 / fov_r**2)
    mu *= 1.0 - cup * np.clip(1.0 - r2, 0.0, 1.0)  # cupping: darker centre
    out = mu * 1000.0 - 1000.0
    # streaks through the spine region, varying along z
    for _ in range(n_streak):
        px, py = rng.normal(0, 25), p.spine_y + rng.normal(0, 25)
        th = rng.uniform(0, math.pi)
        d = np.abs((x - px) * math.sin(th) - (y - py) * math.cos(th))
        width = max(1.5, 0.6 * float(spacing.min()))
        mod = np.cos(z * np.float32(2 * math.pi / rng.uniform(40, 120)) + rng.uniform(0, 2 * math.pi))
        out += (
            np.float32(rng.choice([-1, 1]) * streak_amp * rng.uniform(0.5, 1.0))
            * np.exp(-0.5 * (d / width) ** 2)
            * (0.5 + 0.5 * mod)
        )
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
        img = _blur_with_noise(clean, spacing, 0.0, noise_hu, rng)
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


# ----------------------------------------------------------------------------- text


_NUM = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _find_lesions(
    lab: np.ndarray, affine: np.ndarray, clean: np.ndarray | None
) -> list[tuple[float, str, np.ndarray, float | None]]:
    """Connected lesion components: (equivalent diameter mm, host organ, world centre, mean contrast
    to the host organ in `clean` or None), host = the most frequent organ label around the component."""
    les = LABEL_IDS["lesion"]
    vox_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    where = np.nonzero(lab == les)
    if len(where[0]) == 0:
        return []
    box = tuple(slice(max(int(ix.min()) - 3, 0), int(ix.max()) + 4) for ix in where)  # label only this box
    comps, _n = ndimage.label(lab[box] == les, structure=np.ones((3, 3, 3)))
    out = []
    for i, obj in enumerate(ndimage.find_objects(comps), start=1):
        local = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(obj, comps.shape, strict=True))
        comp = comps[local] == i  # (x, y, z) crop around component i
        full = tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(local, box, strict=True))
        ring = ndimage.binary_dilation(comp, iterations=2) & ~comp
        neigh = lab[full][ring]
        neigh = neigh[(neigh != 0) & (neigh != les)]
        organ = LABELS[int(np.bincount(neigh).argmax())] if neigh.size else "abdomen"
        diam = (6.0 * float(comp.sum()) * vox_mm3 / math.pi) ** (1.0 / 3.0)
        centre = np.array([np.mean(ix) + s.start for ix, s in zip(np.nonzero(comp), full, strict=True)])
        contrast = None
        if clean is not None and organ in LABEL_IDS:
            contrast = float(clean[full][comp].mean()) - float(clean[lab == LABEL_IDS[organ]].mean())
        out.append((diam, organ, affine[:3, :3] @ centre + affine[:3, 3], contrast))
    return out


def describe(
    label: Volume, clean: np.ndarray | None, variant: str = "ct", phase: str = "venous", liver_split_x: float = 20.0
) -> str:
    """Radiology-style text computed from a label map: organ volumes in mL (including the lesions they
    hold), lesion count, size (equivalent-sphere diameter), site and density.

    clean: the noise-free image on the same grid, used to call lesions hypo-/hyperdense; None skips it.
    liver_split_x: world x (RAS mm) of the plane separating right (x > split) and left liver lobes.
    """
    lab = np.asarray(label.array)
    vox_ml = float(abs(np.linalg.det(label.affine[:3, :3]))) / 1000.0
    vol = np.bincount(lab.ravel(), minlength=len(LABELS)) * vox_ml
    header = {
        ("ct", "native"): "Non-contrast abdominal CT.",
        ("ct", "arterial"): "Contrast-enhanced abdominal CT, arterial phase.",
        ("ct", "venous"): "Contrast-enhanced abdominal CT, portal venous phase.",
    }.get((variant, phase))
    if header is None:
        header = {
            "cbct": "Cone-beam CT of the abdomen, limited field of view, intensities not calibrated to HU.",
            "cbct_tst": "Low-quality cone-beam CT of the abdomen with strong artefacts, limited field of view.",
            "mr": "T1-weighted MR of the abdomen (arbitrary units).",
        }[variant]
    dens = ("hypointense", "hyperintense", "isointense") if variant == "mr" else ("hypodense", "hyperdense", "isodense")
    lesions = _find_lesions(lab, label.affine, clean)
    found: list[str] = []
    for diam, organ, centre, contrast in lesions:
        if organ in LABEL_IDS:  # an organ's volume includes its lesions
            vol[LABEL_IDS[organ]] += math.pi / 6.0 * diam**3 / 1000.0
        if organ == "liver":
            site = "the right liver lobe" if centre[0] > liver_split_x else "the left liver lobe"
        elif organ.startswith("kidney_"):
            site = "the " + organ.removeprefix("kidney_") + " kidney"
        else:
            site = "the " + organ.replace("_", " ")
        word = "" if contrast is None else (dens[0] if contrast < -10 else dens[1] if contrast > 10 else dens[2])
        found.append(f"{diam:.0f} mm {word + ' ' if word else ''}lesion in {site}")
    liver = vol[LABEL_IDS["liver"]]
    if liver > 0:
        size = "enlarged (hepatomegaly)" if liver > 2000 else ("small" if liver < 900 else "normal size")
        parts = [header, f"Liver {liver:.0f} mL, {size}."]
    else:
        parts = [header, "Liver not in the field of view."]
    if len(found) == 1:
        parts.append(f"One {found[0]}.")
    elif found:
        parts.append(f"{_NUM.get(len(found), str(len(found)))} focal lesions: " + "; ".join(found) + ".")
    else:
        parts.append("No focal liver or renal lesion.")
    spleen = vol[LABEL_IDS["spleen"]]
    if spleen > 0:
        parts.append(f"Spleen {spleen:.0f} mL" + (", enlarged (splenomegaly)." if spleen > 400 else ", normal size."))
    kl, kr = vol[LABEL_IDS["kidney_left"]], vol[LABEL_IDS["kidney_right"]]
    if kl > 0 and kr > 0:
        kid_word = "normal in size" if min(kl, kr) > 80 and max(kl, kr) < 260 else "of abnormal size"
        parts.append(f"Kidneys {kid_word} (left {kl:.0f} mL, right {kr:.0f} mL).")
    if vol[LABEL_IDS["lung_left"]] > 0 and vol[LABEL_IDS["lung_right"]] > 0:
        parts.append("Lung bases clear.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- public API


def _check(variant: str, phase: str, noise_hu: float, dtype: str) -> None:
    if variant not in VARIANTS:
        raise MedCTError(f"Unknown phantom variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if phase not in PHASES:
        raise MedCTError(f"Unknown contrast phase {phase!r}; choose one of {', '.join(PHASES)}.")
    if not (noise_hu >= 0 and math.isfinite(noise_hu)):
        raise MedCTError(f"noise_hu must be a finite value >= 0, got {noise_hu}.")
    if dtype not in ("float32", "int16"):
        raise MedCTError(f"dtype must be 'float32' or 'int16', got {dtype!r}.")


def render_phantom(
    params: PhantomParams,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    axcodes: str = "RAS",
    oblique_deg: float | tuple[float, float, float] = 0.0,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    variant: Variant = "ct",
    phase: ContrastPhase = "venous",
    noise_hu: float = 12.0,
    dtype: Literal["float32", "int16"] = "float32",
    diaphragm_shift_mm: float = 0.0,
    noise_stream: int = 0,
) -> PhantomCase:
    """Render `params` on a grid (see `grid_affine`). diaphragm_shift_mm > 0 moves the diaphragm and the
    organs under it caudally (inspiration); noise_stream picks an independent noise realisation."""
    _check(variant, phase, noise_hu, dtype)
    affine = grid_affine(shape, spacing, axcodes, oblique_deg, center_mm)
    shape_t = tuple(int(s) for s in shape)
    cv, tex, bias, extra, vz = _render(params, affine, shape_t, float(diaphragm_shift_mm), variant == "mr")  # type: ignore[arg-type]
    rng = _rng(params.seed, 100 + int(noise_stream))
    img, clean = _image(cv, tex, bias, extra, params, affine, variant, phase, noise_hu, rng)
    if dtype == "int16":
        img = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
    modality = {"ct": "CT", "cbct": "CBCT", "cbct_tst": "CBCT", "mr": "MR"}[variant]
    meta = {"modality": modality, "variant": variant, "phase": phase, "seed": params.seed, "source": "medct.phantom"}
    label = Volume(array=cv.label, affine=affine.copy(), meta=dict(meta))
    text = describe(label, clean, variant, phase, liver_split_x=params.liver_right.center[0] - 50.0)
    image = Volume(array=img, affine=affine.copy(), meta={**meta, "text": text})
    disp = None
    if vz is not None:
        d = np.zeros((*shape_t, 3), np.float32)  # (X, Y, Z, 3) RAS mm, pull-back to end-exhale
        d[..., 2] = np.where(cv.moving, vz, 0.0)
        disp = Volume(array=d, affine=affine.copy(), meta={**meta, "kind": "displacement_ras_mm"})
    return PhantomCase(image=image, label=label, text=text, params=params, displacement=disp)


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    axcodes: str = "RAS",
    oblique_deg: float | tuple[float, float, float] = 0.0,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    variant: Variant = "ct",
    phase: ContrastPhase = "venous",
    lesions: bool | int | None = None,
    noise_hu: float = 12.0,
    dtype: Literal["float32", "int16"] = "float32",
) -> PhantomCase:
    """One synthetic labelled case: the patient of `seed` on the requested grid and appearance.

    spacing None: the grid spans FOV_MM (384 mm) along each axis, i.e. the whole torso.
    lesions: None random (0-3), True 1-3, False none, int exactly that many (liver or kidney).
    """
    return render_phantom(
        sample_params(seed, lesions), shape, spacing, axcodes, oblique_deg, center_mm, variant, phase, noise_hu, dtype
    )


def make_breathing(
    case: PhantomParams | int,
    n_phases: int = 10,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    axcodes: str = "RAS",
    oblique_deg: float | tuple[float, float, float] = 0.0,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    variant: Variant = "ct",
    phase: ContrastPhase = "venous",
    noise_hu: float = 12.0,
    amplitude_mm: float | None = None,
    period_s: float | None = None,
    dtype: Literal["float32", "int16"] = "float32",
) -> list[PhantomCase]:
    """A respiratory 4D series: n_phases equally spaced over one breathing cycle, phase 0 = end-exhale
    (identical to `make_phantom`'s anatomy), diaphragm shift d_k = A sin^2(pi k / n) caudally.

    Each case's image.meta holds respiratory_phase, time_s, diaphragm_shift_mm, amplitude_mm,
    period_s; case.displacement maps each phase to the end-exhale reference (see PhantomCase).
    """
    params = sample_params(case) if isinstance(case, int | np.integer) else case
    amp = params.breathing_amplitude_mm if amplitude_mm is None else float(amplitude_mm)
    period = params.breathing_period_s if period_s is None else float(period_s)
    if n_phases < 1:
        raise MedCTError(f"n_phases must be at least 1, got {n_phases}.")
    if not (0.0 <= amp <= 40.0):
        raise MedCTError(f"The breathing amplitude must be between 0 and 40 mm, got {amp}.")
    out = []
    for k in range(n_phases):
        shift = amp * math.sin(math.pi * k / n_phases) ** 2
        c = render_phantom(
            params,
            shape,
            spacing,
            axcodes,
            oblique_deg,
            center_mm,
            variant,
            phase,
            noise_hu,
            dtype,
            diaphragm_shift_mm=shift if k else 0.0,
            noise_stream=k,
        )
        extra = {
            "respiratory_phase": k,
            "n_phases": n_phases,
            "time_s": period * k / n_phases,
            "diaphragm_shift_mm": shift,
            "amplitude_mm": amp,
            "period_s": period,
        }
        for v in (c.image, c.label):
            v.meta.update(extra)
        if c.displacement is None:  # end-exhale: the identity map
            c.displacement = Volume(
                array=np.zeros((*c.label.shape, 3), np.float32),
                affine=c.label.affine.copy(),
                meta={**c.label.meta, "kind": "displacement_ras_mm"},
            )
        else:
            c.displacement.meta.update(extra)
        pct = 100.0 * shift / amp if amp > 0 else 0.0
        c.text = (
            c.text
            + f" Respiratory phase {k + 1} of {n_phases} ({pct:.0f}% inspiration, diaphragm {shift:.1f} mm caudal of end-exhale)."
        )
        c.image.meta["text"] = c.text
        out.append(c)
    return out


def write_cohort(
    out_dir: str | os.PathLike[str],
    n: int = 20,
    variant: Variant = "ct",
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    phase: ContrastPhase = "venous",
    lesions: bool | int | None = None,
    axcodes: str = "RAS",
    noise_hu: float = 12.0,
) -> Path:
    """Write n cases as imagesTr/case_XXXX_0000.nii.gz + labelsTr/case_XXXX.nii.gz and an MSD-style
    dataset.json (labels, modality, training list with per-case text and seed). Returns the
    dataset.json path. Images are int16 (CT/CBCT) or float32 (MR); labels uint8."""
    if n < 1:
        raise MedCTError(f"A cohort needs at least one case, got n={n}.")
    _check(variant, phase, noise_hu, "float32")
    root = Path(out_dir).expanduser()
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        c = make_phantom(
            case_seed,
            shape,
            spacing,
            axcodes,
            0.0,
            (0.0, 0.0, 0.0),
            variant,
            phase,
            lesions,
            noise_hu,
            "float32" if variant == "mr" else "int16",
        )
        img_rel, lab_rel = f"imagesTr/case_{i:04d}_0000.nii.gz", f"labelsTr/case_{i:04d}.nii.gz"
        write_volume(c.image, root / img_rel)
        write_volume(c.label, root / lab_rel)
        training.append({"image": img_rel, "label": lab_rel, "text": c.text, "seed": case_seed})
    modality = {"ct": "CT", "cbct": "CBCT", "cbct_tst": "CBCT", "mr": "MR"}[variant]
    dataset = {
        "name": f"medct_phantom_{variant}",
        "description": f"medct synthetic phantom cohort ({variant}, {phase} phase), cohort seed {seed}",
        "reference": "medct.phantom",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path = root / "dataset.json"
    write_text_atomic(path, json.dumps(dataset, indent=2))  # never a half-written dataset.json
    return path


__all__ = [
    "LABELS",
    "LABEL_IDS",
    "FOV_MM",
    "Ellipsoid",
    "Lesion",
    "PhantomParams",
    "PhantomCase",
    "sample_params",
    "grid_affine",
    "render_phantom",
    "make_phantom",
    "make_breathing",
    "write_cohort",
    "describe",
]
