"""Respiratory 4D sequences over several irregular breaths, with hysteresis: `breathing_sequence`.

`make_breathing` renders one regular cycle of a phantom. Motion prediction needs more: breaths that
differ from one another (period and depth vary cycle to cycle, the baseline drifts), an inhale path
that differs from the exhale path (hysteresis) and the same motion applied to real CT volumes
("semi-real" sequences). So here a sequence is the reference volume (phase 0, end-exhale) warped by
a smooth breathing field of two components, each a fixed spatial profile times a surrogate signal:

  u_t(p) = s_SI(t) f(p) e_S - s_AP(t) g(p) e_A        (world RAS mm, pull-back: phase_t(p) = ref(p + u_t(p)))

* f (superior-inferior): 0 at the lung apex rising linearly to 1 at the lung base, then decaying
  below it (exp(-d / 150 mm): the abdominal organs follow the diaphragm, the pelvis hardly moves);
* g (anterior-posterior chest wall): 0 at the back rising to 1 at the front, over the thorax;
* both are zero outside the body (the couch does not breathe) and Gaussian-smoothed (sigma 20 mm), so
  |grad u| stays below ~0.5 at the largest amplitudes and the map is invertible.

Signals (Lujan et al., Med Phys 1999: z(t) = z0 - b cos^2n(pi t / tau - phase), the long pause at
end-exhale): in cycle c of period P_c and depth A_c (each varied by `irregularity`), at cycle phase
phi in [0, 1) from end-exhale,
  s_SI = A_c sin^2n(pi phi) + drift t,     s_AP = r A_c sin^2n(pi phi) (1 + h sin(2 pi phi)),
so for the same SI position the chest is further out on the inhale than on the exhale (h > 0): the
loop of the SI/AP trajectory is the hysteresis (Seppenwoolde et al., IJROBP 2002, report 1-5 mm loops
for lung tumours). Regions also move out of phase: the SI signal at p is s_SI(t - tau(p)), tau rising
linearly across the body in one axial direction from 0 to `regional_lag` periods, so the motion is
not one spatial pattern scaled in time. Time starts at end-exhale, so u_0 = 0 and phase 0 is the reference itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medct.errors import MedCTError
from medct.volume import Volume

PROFILE_SPACING_MM = 8.0  # the profiles are built on a coarse copy, then interpolated
PROFILE_SIGMA_MM = 20.0
BELOW_BASE_DECAY_MM = 150.0
LUNG_HU = -400.0
LAG_LEVELS = 8


@dataclass(frozen=True)
class BreathingPattern:
    """One patient's breathing (see the module docstring for the model)."""

    amplitude_mm: float = 12.0  # SI excursion at the lung base, end-exhale -> end-inhale
    ap_ratio: float = 0.3  # AP chest-wall excursion / SI excursion
    period_s: float = 4.0
    hysteresis: float = 0.3  # h: inhale/exhale asymmetry of the AP path
    shape_n: int = 2  # Lujan's n: larger = longer pause at end-exhale
    irregularity: float = 0.1  # relative sd of each cycle's period and depth
    drift_mm_per_s: float = 0.0  # baseline drift of the SI position
    regional_lag: float = 0.0  # the most lagging region's SI delay, fraction of a period
    lag_direction_deg: float = 0.0  # in the axial plane: where the lag grows (0 = towards patient left)
    seed: int = 0  # of the cycle-to-cycle variation


def sample_pattern(seed: int) -> BreathingPattern:
    """A seeded patient: amplitude 6-20 mm, period 3-5.5 s, AP ratio 0.15-0.45, hysteresis 0-0.6,
    n in {1, 2, 3}, irregularity 3-15 %, drift up to 0.15 mm/s either way, regional lag up to 15 %
    of a period in a random axial direction."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4040]))
    return BreathingPattern(
        amplitude_mm=float(rng.uniform(6.0, 20.0)),
        ap_ratio=float(rng.uniform(0.15, 0.45)),
        period_s=float(rng.uniform(3.0, 5.5)),
        hysteresis=float(rng.uniform(0.0, 0.6)),
        shape_n=int(rng.integers(1, 4)),
        irregularity=float(rng.uniform(0.03, 0.15)),
        drift_mm_per_s=float(rng.uniform(-0.15, 0.15)),
        regional_lag=float(rng.uniform(0.0, 0.15)),
        lag_direction_deg=float(rng.uniform(0.0, 360.0)),
        seed=int(seed),
    )


def breathing_signal(pattern: BreathingPattern, times_s: np.ndarray) -> np.ndarray:
    """(T, 2) surrogate signals [s_SI, s_AP] in mm at `times_s` (>= 0, from end-exhale)."""
    t = np.asarray(times_s, dtype=np.float64)
    if (t < 0).any():
        raise MedCTError("Breathing times must be >= 0 s (time 0 is end-exhale).")
    rng = np.random.default_rng(np.random.SeedSequence([int(pattern.seed), 4041]))
    starts, periods, depths = [0.0], [], []
    while starts[-1] <= float(t.max(initial=0.0)):
        periods.append(pattern.period_s * max(0.5, 1.0 + pattern.irregularity * rng.standard_normal()))
        depths.append(pattern.amplitude_mm * max(0.3, 1.0 + pattern.irregularity * rng.standard_normal()))
        starts.append(starts[-1] + periods[-1])
    c = np.searchsorted(np.asarray(starts), t, side="right") - 1  # the cycle of each time
    phi = (t - np.asarray(starts)[c]) / np.asarray(periods)[c]
    a = np.asarray(depths)[c]
    base = np.sin(np.pi * phi) ** (2 * pattern.shape_n)
    si = a * base + pattern.drift_mm_per_s * t
    ap = pattern.ap_ratio * a * base * (1.0 + pattern.hysteresis * np.sin(2 * np.pi * phi))
    return np.stack([si, ap], axis=1).astype(np.float32)


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, X, Y, Z) world RAS mm of every voxel."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape[:3]], indexing="ij"))
    return np.einsum("ab,bxyz->axyz", affine[:3, :3], idx) + affine[:3, 3, None, None, None]


def motion_profiles(image: Volume, lungs: np.ndarray | None = None) -> np.ndarray:
    """(2, X, Y, Z) float32 [f, g] on `image`'s grid (see the module docstring).

    lungs: a boolean lung mask on the image grid; None = air (< -400 HU) inside the body. A
    MedCTError when the volume holds no lung (no breathing to model)."""
    from scipy import ndimage

    from medct.body import BODY_HU, body_mask
    from medct.geometry import Grid, network_grid, resample_volume

    coarse = network_grid(image.affine, image.shape, (PROFILE_SPACING_MM,) * 3)  # RAS-ordered
    img_c = resample_volume(image.with_array(np.asarray(image.array, np.float32)), coarse, padding=-1024.0).array
    bm = body_mask(img_c, (PROFILE_SPACING_MM,) * 3, BODY_HU)
    body = np.repeat(np.repeat(np.repeat(bm.mask, bm.stride[0], 0), bm.stride[1], 1), bm.stride[2], 2)
    body = body[: coarse.shape[0], : coarse.shape[1], : coarse.shape[2]]
    if lungs is None:
        lung_c = (img_c < LUNG_HU) & body
    else:
        m = Volume(np.asarray(lungs, np.float32), image.affine)
        lung_c = resample_volume(m, coarse, padding=0.0).array > 0.5
    lung_c = ndimage.binary_opening(lung_c, iterations=1) if lung_c.sum() > 50 else lung_c
    if lung_c.sum() * PROFILE_SPACING_MM**3 < 20_000.0:  # < 20 ml
        raise MedCTError(
            f"{image.meta.get('path', 'The volume')} shows no lung (under 20 ml of air inside the body), "
            "so it has no breathing motion to model."
        )
    w = _world(coarse.affine, coarse.shape)  # RAS-ordered coarse grid: w[2] = S, w[1] = A
    z, y = w[2], w[1]
    z_top, z_base = float(z[lung_c].max()), float(z[lung_c].min())
    ramp = np.clip((z_top - z) / max(z_top - z_base, 1.0), 0.0, 1.0)
    below = np.exp(-np.maximum(z_base - z, 0.0) / BELOW_BASE_DECAY_MM)
    f = np.where(z >= z_base, ramp, below)
    y_post, y_ant = float(y[body].min()), float(y[body].max())
    thorax = ((z >= z_base - 30.0) & (z <= z_top)).astype(np.float64)
    g = np.clip((y - y_post) / max(y_ant - y_post, 1.0), 0.0, 1.0) * thorax
    sigma = PROFILE_SIGMA_MM / PROFILE_SPACING_MM
    prof = np.stack([ndimage.gaussian_filter(p * body, sigma, mode="nearest") for p in (f, g)], axis=-1)
    out = resample_volume(Volume(prof.astype(np.float32), coarse.affine), Grid(image.shape, image.affine))
    return np.moveaxis(np.asarray(out.array, np.float32), -1, 0)


def breathing_field(profiles: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """(T, X, Y, Z, 3) RAS mm pull-back fields from (2, X, Y, Z) profiles and (T, 2) signals."""
    f, g = profiles
    out = np.zeros((len(signal), *f.shape, 3), np.float32)
    for t, (s_si, s_ap) in enumerate(np.asarray(signal, np.float32)):
        out[t, ..., 2] = s_si * f
        out[t, ..., 1] = -s_ap * g
    return out


def warp(vol: Volume, displacement: np.ndarray, order: int, fill: float) -> np.ndarray:
    """vol(p + u(p)) for (X, Y, Z, 3) RAS-mm `displacement` on vol's grid (order 1 linear, 0 nearest)."""
    from scipy import ndimage

    lin_inv = np.linalg.inv(vol.affine[:3, :3])
    du = np.einsum("ab,xyzb->axyz", lin_inv, displacement.astype(np.float64))  # voxel offsets
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in vol.shape], indexing="ij")) + du
    src = np.asarray(vol.array, np.float32 if order else vol.array.dtype)
    return ndimage.map_coordinates(src, idx, order=order, mode="constant", cval=fill)


@dataclass
class MotionSequence:
    """A 4D sequence with its truth: phases[t] = reference warped by displacements[t] (+ noise)."""

    phases: list[Volume]  # (X, Y, Z) each, phase 0 = the reference
    displacements: np.ndarray  # (T, X, Y, Z, 3) RAS mm, pull-back from each phase to phase 0
    labels: list[Volume] | None  # the reference labels carried along, or None
    times_s: np.ndarray  # (T,)
    signal: np.ndarray  # (T, 2) [s_SI, s_AP] mm
    pattern: BreathingPattern


def breathing_sequence(
    reference: Volume,
    pattern: BreathingPattern,
    n_phases: int = 24,
    phases_per_cycle: int = 8,
    labels: Volume | None = None,
    lung_labels: tuple[int, ...] = (),
    noise_hu: float = 5.0,
) -> MotionSequence:
    """`n_phases` images sampled every period / phases_per_cycle seconds from end-exhale.

    labels: a label map on the reference grid, warped with each phase (nearest); with `lung_labels`
    its lungs define the motion profile (else air inside the body). noise_hu: fresh Gaussian noise
    per phase (not for phase 0, the reference itself), so that phases are not exact warps.
    """
    if n_phases < 1 or phases_per_cycle < 2:
        raise MedCTError(f"Need n_phases >= 1 and phases_per_cycle >= 2, got {n_phases}, {phases_per_cycle}.")
    lungs = np.isin(np.asarray(labels.array), lung_labels) if labels is not None and lung_labels else None
    prof = motion_profiles(reference, lungs)
    times = np.arange(n_phases) * pattern.period_s / phases_per_cycle
    sig = breathing_signal(pattern, times)
    fields = breathing_field(prof, sig)
    if pattern.regional_lag > 0:  # the SI component with each region's delay, in LAG_LEVELS steps
        w = _world(reference.affine, reference.shape)
        a = np.deg2rad(pattern.lag_direction_deg)
        proj = -np.cos(a) * w[0] + np.sin(a) * w[1]  # RAS: patient left is -x
        level = np.rint((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6) * (LAG_LEVELS - 1)).astype(int)
        for lv in range(1, LAG_LEVELS):
            tau = pattern.regional_lag * pattern.period_s * lv / (LAG_LEVELS - 1)
            s_si = breathing_signal(pattern, np.maximum(times - tau, 0.0))[:, 0]
            sel = level == lv
            fields[:, sel, 2] = s_si[:, None] * prof[0][sel][None]
    rng = np.random.default_rng(np.random.SeedSequence([int(pattern.seed), 4042]))
    fill = float(np.asarray(reference.array).min())
    phases, labs = [], []
    dtype = np.asarray(reference.array).dtype
    for t in range(n_phases):
        if t == 0 and not np.any(fields[0]):
            arr = np.asarray(reference.array, np.float32)
        else:
            arr = warp(reference, fields[t], 1, fill) + np.float32(noise_hu) * rng.standard_normal(
                reference.shape
            ).astype(np.float32)
        if np.issubdtype(dtype, np.integer):
            arr = np.clip(np.rint(arr), np.iinfo(dtype).min, np.iinfo(dtype).max)
        meta = {**reference.meta, "respiratory_time_s": float(times[t]), "phase_index": t}
        phases.append(Volume(arr.astype(dtype), reference.affine.copy(), meta))
        if labels is not None:
            labs.append(labels.with_array(warp(labels, fields[t], 0, 0).astype(np.asarray(labels.array).dtype)))
    return MotionSequence(phases, fields, labs if labels is not None else None, times, sig, pattern)


def phantom_sequence(
    seed: int,
    n_phases: int = 24,
    phases_per_cycle: int = 8,
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    center_mm: tuple[float, float, float] = (0.0, 0.0, 40.0),
) -> MotionSequence:
    """A phantom patient (`make_phantom(seed)`, no lesions outside liver/kidney) breathing with
    `sample_pattern(seed)`; its lungs (labels 7, 8) set the motion profile."""
    from medct.phantom.render import make_phantom
    from medct.phantom.spec import LABEL_IDS, Appearance, GridSpec

    grid = GridSpec(shape=shape, spacing=spacing, center_mm=center_mm)
    case = make_phantom(int(seed), grid, Appearance(dtype="int16"))
    lungs = (LABEL_IDS["lung_left"], LABEL_IDS["lung_right"])
    return breathing_sequence(case.image, sample_pattern(seed), n_phases, phases_per_cycle, case.label, lungs)


__all__ = [
    "BreathingPattern",
    "MotionSequence",
    "breathing_field",
    "breathing_sequence",
    "breathing_signal",
    "motion_profiles",
    "phantom_sequence",
    "sample_pattern",
    "warp",
]
