"""Seeded patients: `sample_params(seed)` draws one anatomy (organ sizes, positions, habitus,
lesions) from independent random streams, so asking for lesions never changes the anatomy."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from medct.errors import MedCTError
from medct.phantom.anatomy import _diaphragm_z, _torso
from medct.phantom.spec import Ellipsoid, Lesion, PhantomParams, _ell, _rng, _rotation, _vec3


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
    surroundings = _rng(seed, 7)  # own stream: adding these kept the anatomy of every seed
    params = replace(
        params,
        table="cradle" if surroundings.random() < 0.6 else "plate",
        table_gap_mm=float(surroundings.uniform(2.0, 40.0)),
        arms="down" if surroundings.random() < 0.35 else "up",
        arm_gap_mm=float(surroundings.uniform(5.0, 40.0)),
        lung_density_hu=float(surroundings.uniform(0.0, 130.0)),
        mattress=bool(surroundings.random() < 0.6),
        # drawn after the above, so adding them kept every seed's couch, arms and lungs
        couch_mm=float(surroundings.uniform(25.0, 45.0)),
        recon_fov_mm=float(surroundings.uniform(360.0, 520.0)),
        padding_hu=float(surroundings.choice([-1000.0, -1024.0, -2048.0, -3024.0], p=[0.3, 0.4, 0.15, 0.15])),
        air_floor_hu=[-1000.0, -1024.0, None][int(surroundings.choice(3, p=[0.35, 0.35, 0.3]))],
        ct_streaks=int(surroundings.integers(0, 5)),
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
