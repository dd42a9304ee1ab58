"""Registration benchmark: real planning CT <-> CBCT, and a real CT with a known deformation.

    python bench/registration.py            # ~26 min on 2 CPU cores (measured)
    python bench/registration.py --quick    # smoke run: rigid and affine, one seed

Setting (fixed before any run):
  * Real pair: ../shared/data/pancreas_ct_cbct/crop_cbct_fov, the CBCT's field of view (250 x 248
    x 64 at 1.07 x 1.07 x 3 mm). Fixed = the CBCT, moving = the planning CT of another day with its
    manual contours; the contours are warped (nearest) and compared with the CBCT's own manual
    contours: Dice of stomach+duodenum (1) and small bowel (2). Fixed mask: the CBCT's field of view
    (voxels above -1000). Presets rigid, affine (rigid -> affine), bspline (rigid -> affine ->
    bspline, 10 mm grid) and ct-cbct (rigid -> the SynthRAD2025 CBCT map), and the deformable
    stage alone from the clinic's rigid alignment ("bspline,", "ct-cbct,"); 3 elastix seeds.
  * Known deformation: the planning CT crop warped by a smooth synthetic field u (sine waves of
    150 mm, 2.5-4 mm amplitude); fixed(x) = CT(x + u(x)), moving = CT, so the true T(x) = x + u(x).
    Target registration error (mm) at 300 body voxels with tissue contrast (|grad| high), seed 0.
  * Folding: fraction of fixed voxels with Jacobian determinant <= 0 (elastix's spatial Jacobian).
  * Wall time of the registration alone, one pair at a time, all threads of this machine. The
    process warms itk up first (one tiny registration, not timed): a cold first call costs ~20 s.
  * IMPACT: "impact" starts from the clinic's alignment, "impact+affine" from the Elastix affine
    (the issue's setting); features of a phantom-trained medct ResEnc U-Net (`_features`), Jacobian
    mode, L1, control spacing 40 -> 20 -> 10 mm, 60/60/40 Adam steps; deterministic, so one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, all_met, mean_sd, paired_goal, write_result  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "registration.json"
# "bspline," and "ct-cbct," are the deformable stage alone, starting from the clinic's own rigid
# alignment of the pair (the CBCT was delivered resampled onto the planning-CT grid).
PRESETS = ["rigid", "affine", "bspline", "ct-cbct", "bspline,", "ct-cbct,"]
ALL_PRESETS = [*PRESETS, "impact", "impact+affine"]
ORGANS = {1: "stomach_duodenum", 2: "small_bowel"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def _organ_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {name: round(_dice(pred == k, ref == k), 4) for k, name in ORGANS.items()}


def _warm_up() -> None:
    """itk loads its elastix wrappers on the first call (~20 s): pay that before any timing."""
    from medct.registration import elastix
    from medct.volume import Volume

    rng = np.random.default_rng(0)
    img = Volume(rng.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4))
    elastix.register(img, img, preset="rigid", seed=0)


IMPACT_PRESETS = {"impact": "none", "impact+affine": "affine"}  # IMPACT arm -> its Elastix start
_FEATURES: dict[str, Any] = {}


def _features() -> Any:
    """The IMPACT feature network: bench/tta.py's phantom-CT source model (ResEnc U-Net, 600 steps
    on 16 phantom CTs at 4 mm; trained on first use, cached), encoder stages 0 and 1 (the paper's
    early layers for CT/CBCT). Trained on phantoms only: it has never seen this patient. It is a
    weak segmenter (phantom Dice 0.22, bench/results/tta.json), so this tests the machinery more
    than the method's ceiling."""
    if "src" not in _FEATURES:
        from _common import CACHE
        from tta import SPACING, _train_source

        from medct.registration import impact

        model_dir = _train_source(CACHE / "tta" / "source_600", None, 600, SPACING, [32, 32, 32])
        _FEATURES["src"] = impact.load_feature_model(model_dir, layers=(0, 1))
        _FEATURES["dir"] = str(model_dir)
    return _FEATURES["src"]


def _register(preset: str, fixed: Any, moving: Any, mask: Any, seed: int) -> Any:
    from medct.registration import elastix, impact

    if preset in IMPACT_PRESETS:
        start = IMPACT_PRESETS[preset]
        initial = None if start == "none" else elastix.register(fixed, moving, preset=start, fixed_mask=mask, seed=seed)
        settings = impact.ImpactSettings(seed=seed)
        return impact.register_impact(fixed, moving, _features(), settings, initial, fixed_mask=mask)
    return elastix.register(fixed, moving, preset=preset, fixed_mask=mask, seed=seed)


def real_pair(presets: list[str], seeds: list[int]) -> dict[str, Any]:
    from medct.io import read_volume

    src = DATA / "pancreas_ct_cbct" / "crop_cbct_fov"
    cbct = read_volume(src / "cbct_CB07_on_planct_grid_crop.nii.gz")
    cbct_lab = read_volume(src / "cbct_CB07_labels_crop.nii.gz").array
    ct = read_volume(src / "planct_crop.nii.gz")
    ct_lab = read_volume(src / "planct_labels_crop.nii.gz")
    _warm_up()
    fov = cbct.with_array((np.asarray(cbct.array) > -1000).astype(np.uint8))
    before = _organ_dice(np.asarray(ct_lab.array), np.asarray(cbct_lab))
    print(f"real pair before registration: {before}")
    rows = []
    for preset in presets:
        # IMPACT's optimisation has no random sampling: one run stands for every seed
        for seed in seeds if preset not in IMPACT_PRESETS else seeds[:1]:
            t0 = time.perf_counter()
            tr = _register(preset, cbct, ct, fov, seed)
            seconds = time.perf_counter() - t0
            warped = tr.warp(ct_lab, kind="labels").array
            dice = _organ_dice(np.asarray(warped), np.asarray(cbct_lab))
            fold = tr.folding_fraction()
            rows.append({"preset": preset, "seed": seed, "seconds": round(seconds, 1), "folding": fold, **dice})
            print(f"  {preset:<8} seed {seed}: {dice}  folding {100 * fold:.3f} %  {seconds:.1f} s")
    return {"before": before, "rows": rows}


def _known_field(vol_shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 3) RAS mm displacement u on the grid: a smooth field over the whole field of view,
    u_a = A_a sin(2 pi k_a . x / 150 mm + phi_a), amplitudes 4 / 3 / 2.5 mm (gradient <= 0.17, no
    folding), so every target point moves by millimetres."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in vol_shape], indexing="ij"), -1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    world = world - world.reshape(-1, 3).mean(0)
    waves = [([0.8, 0.5, 0.3], 4.0, 0.3), ([-0.4, 0.9, 0.2], 3.0, 1.1), ([0.3, -0.2, 0.9], 2.5, 2.0)]
    u = np.zeros_like(world)
    for axis, (k, amp, phase) in enumerate(waves):
        kk = np.asarray(k) / np.linalg.norm(k)
        u[..., axis] = amp * np.sin(2 * np.pi * (world @ kk) / 150.0 + phase)
    return u


def known_deformation(presets: list[str], n_points: int = 300) -> dict[str, Any]:
    from scipy.ndimage import map_coordinates

    from medct.io import read_volume

    ct = read_volume(DATA / "pancreas_ct_cbct" / "crop_cbct_fov" / "planct_crop.nii.gz")
    arr = np.asarray(ct.array, dtype=np.float32)
    u = _known_field(ct.shape, ct.affine)
    # fixed(x) = CT(x + u(x)): sample the CT at the voxel index of x + u(x)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in ct.shape], indexing="ij"), -1).astype(np.float64)
    lin_inv = np.linalg.inv(ct.affine[:3, :3])
    src_idx = idx + u @ lin_inv.T
    fixed = ct.with_array(map_coordinates(arr, np.moveaxis(src_idx, -1, 0), order=1, mode="nearest").astype(np.float32))
    # target points: body voxels with tissue contrast, away from the border (seed 0)
    grad = np.linalg.norm(np.stack(np.gradient(np.asarray(fixed.array)), -1), axis=-1)
    core = np.zeros(ct.shape, bool)
    core[10:-10, 10:-10, 6:-6] = True
    cand = np.argwhere(core & (np.asarray(fixed.array) > -500) & (grad > np.percentile(grad[core], 80)))
    pick = cand[np.random.default_rng(0).choice(len(cand), size=min(n_points, len(cand)), replace=False)]
    pts = pick @ ct.affine[:3, :3].T + ct.affine[:3, 3]
    truth = pts + u[pick[:, 0], pick[:, 1], pick[:, 2]]
    tre0 = np.linalg.norm(truth - pts, axis=1)
    print(f"known deformation: TRE before {tre0.mean():.2f} mm (max |u| {np.linalg.norm(u, axis=-1).max():.1f} mm)")
    rows = []
    for preset in presets:
        t0 = time.perf_counter()
        tr = _register(preset, fixed, ct, None, 0)
        seconds = time.perf_counter() - t0
        tre = np.linalg.norm(tr.points_fixed_to_moving(pts) - truth, axis=1)
        fold = tr.folding_fraction()
        rows.append(
            {
                "preset": preset,
                "tre_mean_mm": round(float(tre.mean()), 3),
                "tre_p90_mm": round(float(np.percentile(tre, 90)), 3),
                "folding": fold,
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"  {preset:<8} TRE {tre.mean():.2f} mm (p90 {np.percentile(tre, 90):.2f})  folding {100 * fold:.3f} %  {seconds:.1f} s"
        )
    return {"tre_before_mm": round(float(tre0.mean()), 3), "rows": rows}


def _summary(real: dict[str, Any], presets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print(f"\n{'preset':<10}{'stomach+duodenum':>20}{'small bowel':>18}{'folding %':>12}{'seconds':>16}")
    b = real["before"]
    print(f"{'none':<10}{b['stomach_duodenum']:>20.3f}{b['small_bowel']:>18.3f}")
    for p in presets:
        rows = [r for r in real["rows"] if r["preset"] == p]
        entry = {}
        for key in ("stomach_duodenum", "small_bowel", "folding", "seconds"):
            m, sd = mean_sd([float(r[key]) for r in rows])
            entry[key] = {"mean": round(m, 4 if key != "folding" else 6), "sd": round(sd, 4 if key != "folding" else 6)}
        out[p] = entry
        e = entry
        print(
            f"{p:<10}{e['stomach_duodenum']['mean']:>13.3f} ± {e['stomach_duodenum']['sd']:.3f}"
            f"{e['small_bowel']['mean']:>11.3f} ± {e['small_bowel']['sd']:.3f}"
            f"{100 * e['folding']['mean']:>12.3f}{e['seconds']['mean']:>10.1f} ± {e['seconds']['sd']:.1f}"
        )
    return out


def judge(real: dict[str, Any]) -> dict[str, Any]:
    """Deformable registration raises both Dice clearly (by >= 0.05 over the unregistered pair) with
    < 1 % folding; B-spline under 60 s on CPU. Per seed of each preset (`_common.paired_goal`)
    against the deterministic "before"."""
    b, rows = real["before"], real["rows"]
    deform = {}
    for p in ("bspline", "ct-cbct", "bspline,", "ct-cbct,", "impact", "impact+affine"):
        sel = sorted((r for r in rows if r["preset"] == p), key=lambda r: r["seed"])
        if not sel:
            continue
        checks = {
            f"raises_{o}_by_0.05": paired_goal(
                f"{p} raises {o} Dice by >= 0.05", [r[o] for r in sel], b[o], margin=0.05
            )
            for o in ORGANS.values()
        }
        checks["folding_below_1pct"] = paired_goal(f"{p} folds < 1 %", [0.01] * len(sel), [r["folding"] for r in sel])
        deform[p] = {"checks": checks, "met": all_met(list(checks.values()))}
    bspline = [r["seconds"] for r in rows if r["preset"] == "bspline"]
    fast = paired_goal("bspline < 60 s per pair", [60.0] * len(bspline), bspline) if bspline else None
    ok = [p for p, v in deform.items() if v["met"]]
    return {
        "target": "a deformable preset raises both Dice by >= 0.05 with < 1% folding; bspline < 60 s per pair on CPU",
        "deformable": deform,
        "bspline_seconds": fast,
        "met_by": ok,
        "met": (bool(ok) and bool(fast and fast["met"])) if deform else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: rigid and affine, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--presets", nargs="+", default=None, help=f"default: {' '.join(ALL_PRESETS)}")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other presets' rows of the existing --out file (rerun only these)",
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    presets = ["rigid", "affine"] if args.quick else (args.presets or ALL_PRESETS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    t0 = time.perf_counter()
    real = real_pair(presets, seeds)
    known = known_deformation(presets)
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        real["rows"] = [r for r in old["real"]["rows"] if r["preset"] not in presets] + real["rows"]
        known["rows"] = [r for r in old["known_deformation"]["rows"] if r["preset"] not in presets] + known["rows"]
        presets = [p for p in ALL_PRESETS if any(r["preset"] == p for r in real["rows"])]
    summary = _summary(real, presets)
    goal = judge(real)
    print("\ngoal:", goal)
    body = {
        "settings": {
            "presets": presets,
            "seeds": seeds,
            "fixed_mask": "CBCT field of view",
            "impact_features": _FEATURES.get("dir", "bench/phantom_to_real.py model, seed 0, 1000 steps"),
        },
        "real": {**real, "summary": summary},
        "known_deformation": known,
        "goal": goal if not args.quick else {"target": "quick smoke run: no goal", "met": None},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, "registration", body, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
