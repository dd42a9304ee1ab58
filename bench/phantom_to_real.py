"""Phantom -> real CT: how well does a model trained only on medct phantoms segment real scans?

Question: every later learning benchmark starts from phantoms, so phantom-trained models must
transfer to real CT. Measured here on every labelled real scan in ../shared/data:
  * the planning CT (512 x 512 x 134, 1.07 x 1.07 x 3 mm): left lung, right lung, stomach
    (+duodenum, manual contours);
  * the CBCT of a later day on the same grid (manual contours; not HU-calibrated; lungs mostly
    outside its circular field of view, which is set to -1000).
Model: medct's `unet` registry network (16-256, instance norm) at 3 mm, 80^3 patches, trained on
phantom cases only (`medct.phantom.make_phantom`, random fields of view, contrast phases, 1 in 4 a
CBCT-like variant) with MONAI augmentation (affine, intensity scale/shift, gamma, noise, blur),
Dice + cross-entropy, AdamW, bf16 autocast on CPU. Each seed trains its own model (cached under
~/.cache/medct/phantom_to_real/); inference is `medct.inference.Predictor`, i.e. `medct segment`.
Baseline (no learning): a plain HU-threshold lung mask: air (< -400 HU) inside the filled body,
components over 200 mL, split into left and right at the body's centre line.

Goal (core-seams issue): Dice >= 0.90 for each lung on the real planning CT and above the
threshold baseline. Stomach and CBCT numbers are reported, not goals.

Usage: python bench/phantom_to_real.py [--quick] [--seeds 0 1 2] [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, DATA, ROOT, write_result

RESULT = ROOT / "bench" / "results" / "phantom_to_real.json"
SPACING = (3.0, 3.0, 3.0)
PATCH = (80, 80, 80)  # 240 mm of context at 3 mm: both lungs and the mediastinum (left/right cues)
# -950 HU floor: air (about -1000 +- 15 HU, phantom or real) clips to exactly 0, so instance norm never
# blows air noise up into lung-like texture (see bench/segment.py)
HU_WINDOW = (-950.0, 1000.0)
NET_ARGS = {"channels": [16, 32, 64, 128, 256], "num_res_units": 2, "norm": "instance"}
# phantom label -> real label (pancreas_ct_cbct/label_map.json: 1 stomach+duodenum, 3 left lung, 4 right lung)
STRUCTURES = {"lung_left": (7, 3), "lung_right": (8, 4), "stomach": (5, 1)}
TARGET_LUNG_DICE = 0.90


# ----------------------------------------------------------------------------- training data


def phantom_cases(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n phantom cases at SPACING as ((X, Y, Z) float32 in [0, 1], (X, Y, Z) uint8 labels), RAS."""
    from medct.phantom import Appearance, GridSpec, make_phantom
    from medct.transforms import Preprocessing, scale_intensity

    pre = Preprocessing(spacing=SPACING, hu_min=HU_WINDOW[0], hu_max=HU_WINDOW[1])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        # varied fields of view: 330-555 mm wide, 300-420 mm long, centred anywhere from the lower chest
        # to the upper abdomen
        side = int(rng.integers(110, 185))
        length = int(rng.integers(100, 140))
        centre = (float(rng.normal(0, 15)), float(rng.normal(0, 15)), float(rng.uniform(-60, 60)))
        grid = GridSpec(shape=(side, side, length), spacing=SPACING, center_mm=centre)
        look = Appearance(
            variant="cbct" if rng.random() < 0.25 else "ct",
            phase=str(rng.choice(["native", "arterial", "venous"])),  # type: ignore[arg-type]
            noise_hu=float(rng.uniform(5, 30)),
        )
        case = make_phantom(int(seed * 1000 + i), grid, look)
        out.append((scale_intensity(case.image.array, pre), np.asarray(case.label.array, dtype=np.uint8)))
    return out


def _augment() -> object:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            RandAffined(
                keys=keys,
                prob=0.5,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.2, 0.2, 0.2),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.04, prob=0.3),  # +-80 HU calibration offsets
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.02),
        ]
    )


def train(seed: int, steps: int, n_cases: int, out_dir: Path) -> dict[str, object]:
    """Train one model on phantoms; export it as a medct model folder."""
    import torch
    from monai.losses import DiceCELoss

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_net
    from medct.phantom import LABELS
    from medct.transforms import Preprocessing

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    cases = phantom_cases(n_cases, seed)
    t_data = time.perf_counter() - t0
    aug = _augment()
    aug.set_random_state(seed=seed)  # type: ignore[attr-defined]
    net = create_net("unet", in_channels=1, out_channels=len(LABELS), **NET_ARGS)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    losses: list[float] = []
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _b in range(2):
            img, lab = cases[int(rng.integers(len(cases)))]
            if rng.random() < 0.67:  # centred on a labelled voxel
                fg = np.argwhere(lab[::3, ::3, ::3] > 0) * 3
                c = fg[rng.integers(len(fg))]
            else:
                c = np.array([rng.integers(s) for s in img.shape])
            lo = np.clip(c - np.asarray(PATCH) // 2, 0, np.maximum(np.asarray(img.shape) - PATCH, 0))
            sl = tuple(slice(a, a + p) for a, p in zip(lo, PATCH, strict=True))
            pad = [(0, p - len(range(*s.indices(n)))) for s, p, n in zip(sl, PATCH, img.shape, strict=True)]
            d = aug({"image": np.pad(img[sl], pad)[None], "label": np.pad(lab[sl], pad)[None]})
            xs.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
            ys.append(torch.as_tensor(np.asarray(d["label"])))
        x, y = torch.stack(xs), torch.stack(ys)  # (B, 1, *PATCH)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    card = ModelCard(
        net_name="unet",
        net_args=dict(net.net_config["args"]),  # type: ignore[attr-defined]
        labels=dict(LABELS),
        preprocessing=Preprocessing(spacing=SPACING, hu_min=HU_WINDOW[0], hu_max=HU_WINDOW[1]),
        patch_size=PATCH,
        inference={"overlap": 0.5, "sw_batch_size": 4},
        licence="Apache-2.0 (trained on synthetic phantoms)",
        extra={"trained_by": "bench/phantom_to_real.py", "seed": seed, "steps": steps, "phantoms": n_cases},
    )
    save_model_folder(net, card, out_dir)
    return {
        "seed": seed,
        "steps": steps,
        "phantoms": n_cases,
        "data_s": round(t_data, 1),
        "train_s": round(time.perf_counter() - t0 - t_data, 1),
        "loss_first_last": [round(statistics.mean(losses[:20]), 3), round(statistics.mean(losses[-20:]), 3)],
    }


def get_model(seed: int, steps: int, n_cases: int) -> tuple[Path, dict[str, object]]:
    from medct.phantom import spec

    # the cache key covers the recipe and the phantom code (a phantom change retrains)
    phantom_src = "".join(p.read_text() for p in sorted(Path(spec.__file__).parent.glob("*.py")))
    key = json.dumps(
        [seed, steps, n_cases, NET_ARGS, SPACING, PATCH, HU_WINDOW, Path(__file__).read_text(), phantom_src]
    )
    folder = CACHE / "phantom_to_real" / hashlib.sha1(key.encode()).hexdigest()[:12]
    info_file = folder / "bench_info.json"
    if not info_file.is_file():
        print(f"seed {seed}: training on {n_cases} phantoms for {steps} steps -> {folder}", flush=True)
        info = train(seed, steps, n_cases, folder)
        info_file.write_text(json.dumps(info, indent=2))
    return folder, json.loads(info_file.read_text())


# ----------------------------------------------------------------------------- evaluation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else float("nan")


def threshold_lungs(image: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The no-learning baseline: (X, Y, Z) uint8, 3 = left lung, 4 = right lung (real label numbers)."""
    from scipy import ndimage

    body = image > -500
    lab, n = ndimage.label(body)
    if n > 1:  # the patient is the largest connected piece (drops the couch where it is apart)
        body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    filled = np.zeros_like(body)
    for k in range(body.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    air = filled & (image < -400)
    lab, n = ndimage.label(air)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(lab.ravel()) * voxel_ml
    keep = np.isin(lab, [i for i in range(1, n + 1) if sizes[i] > 200.0])
    # world x (RAS: +x = patient right) of every voxel against the body's centre line
    xs = (
        np.arange(image.shape[0])[:, None, None] * affine[0, 0]
        + np.arange(image.shape[1])[None, :, None] * affine[0, 1]
    )
    xs = xs + np.arange(image.shape[2])[None, None, :] * affine[0, 2] + affine[0, 3]
    centre = float(xs[filled].mean()) if filled.any() else 0.0
    out = np.zeros(image.shape, np.uint8)
    out[keep & (xs < centre)] = 3
    out[keep & (xs >= centre)] = 4
    return out


def evaluate(model_dir: Path, scans: dict[str, tuple[Path, Path]]) -> dict[str, dict[str, float]]:
    from medct.inference import Predictor
    from medct.io import read_volume

    predictor = Predictor.from_folder(model_dir, device="cpu")
    out: dict[str, dict[str, float]] = {}
    for name, (image_path, label_path) in scans.items():
        image, truth = read_volume(image_path), read_volume(label_path)
        pred = predictor.predict(image).array
        t = np.asarray(truth.array)
        out[name] = {s: round(dice(pred == p, t == r), 4) for s, (p, r) in STRUCTURES.items()}
        out[name]["lungs_together"] = round(dice(np.isin(pred, (7, 8)), np.isin(t, (3, 4))), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a short training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per seed (default 1000, quick 300)")
    parser.add_argument("--cases", type=int, default=16, help="phantom cases per seed")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (300 if args.quick else 1000)
    pct = DATA / "pancreas_ct_cbct"
    if not pct.is_dir():
        print(f"real scans not found at {pct}", file=sys.stderr)
        return 1
    scans = {
        "planning_ct": (pct / "planct.nii.gz", pct / "planct_labels.nii.gz"),
        "cbct": (pct / "cbct_CB07_on_planct_grid.nii.gz", pct / "cbct_CB07_labels.nii.gz"),
    }

    from medct.io import read_volume

    baseline: dict[str, dict[str, float]] = {}
    for name, (image_path, label_path) in scans.items():
        image, truth = read_volume(image_path), read_volume(label_path)
        t = np.asarray(truth.array)
        pred = threshold_lungs(np.asarray(image.array), image.affine, image.spacing)
        baseline[name] = {
            "lung_left": round(dice(pred == 3, t == 3), 4),
            "lung_right": round(dice(pred == 4, t == 4), 4),
            "lungs_together": round(dice(pred > 0, np.isin(t, (3, 4))), 4),
        }

    rows, models = [], []
    for seed in seeds:
        folder, info = get_model(seed, steps, args.cases)
        models.append(info)
        scores = evaluate(folder, scans)
        for scan, per in scores.items():
            rows.append({"arm": "phantom model", "seed": seed, "scan": scan, **per})
    for scan, per in baseline.items():
        rows.append({"arm": "HU threshold", "seed": None, "scan": scan, **per})

    columns = ["lung_left", "lung_right", "lungs_together", "stomach"]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'arm':<15} {'scan':<12} " + " ".join(f"{c:>17}" for c in columns))
    for arm in ("phantom model", "HU threshold"):
        for scan in scans:
            sel = [r for r in rows if r["arm"] == arm and r["scan"] == scan]
            cells, stats = [], {}
            for c in columns:
                vals = [float(r[c]) for r in sel if c in r and r[c] == r[c]]
                if not vals:
                    cells.append(f"{'-':>17}")
                    continue
                m = statistics.mean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                stats[c] = {"mean": round(m, 4), "sd": round(sd, 4), "n": len(vals)}
                cells.append(f"{m:>9.3f} +- {sd:5.3f}")
            summary.setdefault(arm, {})[scan] = stats  # type: ignore[assignment]
            print(f"{arm:<15} {scan:<12} " + " ".join(cells))

    model_ct = summary["phantom model"]["planning_ct"]
    base_ct = summary["HU threshold"]["planning_ct"]
    met = all(
        model_ct[s]["mean"] >= TARGET_LUNG_DICE and model_ct[s]["mean"] > base_ct[s]["mean"]
        for s in ("lung_left", "lung_right")
    )
    write_result(
        args.out,
        "phantom_to_real",
        {
            "settings": {
                "seeds": seeds,
                "steps": steps,
                "phantoms_per_seed": args.cases,
                "net": {"name": "unet", **NET_ARGS},
                "spacing_mm": SPACING,
                "patch": PATCH,
                "hu_window": HU_WINDOW,
                "quick": args.quick,
            },
            "models": models,
            "rows": rows,
            "summary": summary,
            "goal": {
                "target": f"phantom-trained model: Dice >= {TARGET_LUNG_DICE} for each lung on the real planning CT, "
                "above the HU-threshold baseline (mean over seeds)",
                "measured": {s: model_ct[s] for s in ("lung_left", "lung_right")},
                "baseline": {s: base_ct[s] for s in ("lung_left", "lung_right")},
                "met": met,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
