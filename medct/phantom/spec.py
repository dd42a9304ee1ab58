"""Phantom vocabulary: the label set, tissue table, patient/case dataclasses, and the grid spec.

`GridSpec` (where the voxels are) and `Appearance` (how tissue becomes intensity) are the two
frozen specs every render takes, instead of the same nine arguments in every signature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from medct.errors import MedCTError
from medct.volume import Volume

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
    ("lesion_hypo", 35, 50, 55, 260, 6),
    ("lesion_hyper", 55, 190, 150, 380, 6),
    ("cyst", 5, 5, 5, 50, 2),
    ("lesion_solid", 38, 120, 100, 300, 6),
    ("lung_vessel", 40, 220, 150, 40, 0),
    ("cartilage", 110, 110, 110, 250, 5),
    ("foam", -820, -820, -820, 0, 40),  # couch mattress / cushions (polyurethane foam; textured)
)
_T: dict[str, int] = {row[0]: i for i, row in enumerate(_TISSUES)}
_LESION_TISSUE = {"hypo": "lesion_hypo", "hyper": "lesion_hyper", "cyst": "cyst", "solid": "lesion_solid"}


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
    # What real scans have around and in the patient (drawn from their own random stream, so the
    # anatomy above does not change with them):
    table: Literal["plate", "cradle"] = "plate"  # flat couch plate, or a curved carbon cradle + base
    table_gap_mm: float = 2.0  # between the back and the couch top: air, or a foam mattress
    mattress: bool = False  # the gap holds a foam mattress (about -820 HU: lung-like, not lung)
    arms: Literal["up", "down"] = "up"  # raised out of the field, or down beside the trunk
    arm_gap_mm: float = 15.0  # air between trunk and arm when the arms are down
    lung_density_hu: float = 0.0  # added to the lung parenchyma (real lungs: about -870 to -700 HU)
    # The scanner (CT variant; see medct.phantom.appearance): the circular reconstruction field,
    # the value written outside it, the floor some scanners clip air to, streaks from dense bone.
    couch_mm: float = 33.0  # thickness of the flat couch top (carbon skins around foam cores)
    recon_fov_mm: float = 500.0  # diameter of the reconstructed circle, centred on the grid
    padding_hu: float = -1024.0  # outside the circle: -1000, -1024, -2048 or -3024 by vendor
    air_floor_hu: float | None = -1024.0  # values below are clipped to it (None: not clipped)
    ct_streaks: int = 2  # beam-hardening / photon-starvation streaks through the spine

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
    findings: Any = None  # medct.phantom.reports.Findings: what `text` states, as attributes


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


@dataclass(frozen=True)
class GridSpec:
    """Where a phantom's voxels are (see `grid_affine`).

    shape:       voxels along the array axes.
    spacing:     mm per voxel; None = FOV_MM / shape (the whole torso, whatever the shape).
    axcodes:     where each array axis points, nibabel letters ("RAS", "LPS", "PIR", ...).
    oblique_deg: one angle tilts the grid about the patient's left-right axis (gantry tilt);
                 three rotate about R, A, S.
    center_mm:   world RAS point at the centre of the grid.
    """

    shape: tuple[int, int, int] = (96, 96, 96)
    spacing: tuple[float, float, float] | None = None
    axcodes: str = "RAS"
    oblique_deg: float | tuple[float, float, float] = 0.0
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS mm; MedCTError for an invalid spec."""
        return grid_affine(self.shape, self.spacing, self.axcodes, self.oblique_deg, self.center_mm)


@dataclass(frozen=True)
class Appearance:
    """How tissue becomes intensity: the variant ("ct", "cbct", "cbct_tst", "mr"), the contrast
    phase, the noise level (HU sd for CT) and the stored dtype ("float32" or "int16")."""

    variant: Variant = "ct"
    phase: ContrastPhase = "venous"
    noise_hu: float = 12.0
    dtype: Literal["float32", "int16"] = "float32"

    @property
    def modality(self) -> str:
        return MODALITY_OF_VARIANT[self.variant]


MODALITY_OF_VARIANT: dict[str, str] = {"ct": "CT", "cbct": "CBCT", "cbct_tst": "CBCT", "mr": "MR"}

# Module-level defaults (frozen, so safe to share) for the specs' function-argument defaults.
DEFAULT_GRID = GridSpec()
DEFAULT_LOOK = Appearance()
