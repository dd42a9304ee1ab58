"""Segmenting a real CT: `medct segment` vs nnU-Net v2's predictor vs the MONAI tutorial pipeline,
one network and one set of weights.

Question: how much faster is medct's inference path end to end (process start -> label map on disk)
than what an nnU-Net or MONAI user runs, and do the label maps agree?

Input: ../shared/data/pancreas_ct_cbct/planct.nii.gz (512 x 512 x 134, 1.074 x 1.074 x 3 mm, LPS),
given to every arm as a copy stored in RAS voxel order: nnU-Net feeds the network the file's array
order as it is, medct and MONAI reorient to RAS (a no-op on this copy).
Model: nnU-Net's PlainConvUNet (dynamic-network-architectures, medct registry "nnunet_plain", see
RECIPE), 3 mm, 80^3 patches, trained here on medct phantoms only (bench/_phantom_train.py; cached
under ~/.cache/medct/bench_segment/) and exported with medct.checkpoint.save_model_folder; or
--model DIR. bench/_nnunet_folder.py writes the nnU-Net model folder (plans.json, dataset.json,
fold_0/checkpoint_final.pth) with the same weights and the same HU window (as CTNormalization).

Arms, each in its own subprocess (wall time and peak RSS via os.wait4), interleaved A B C D A B C D:
  medct:  `.venv/bin/medct segment -m MODEL -i planct.nii.gz -o OUT --overlap 0.5 --sw-batch-size 4
          --precision bf16` (what `--precision auto` runs on a CPU with AMX / AVX-512 BF16; given
          explicitly because the bench's model card records no validated precision, so auto would
          also run its one-time bf16-vs-fp32 check on the first case)
  medct_fp32: the same with `--precision fp32` (medct before issue 31)
  nnunet: `nnUNetv2_predict_from_modelfolder -i IN -o OUT -m NNMODEL -f 0 -device cpu --disable_tta`:
          nnU-Net's own preprocessing (crop to non-zero, cubic-spline resampling, CTNormalization),
          tiling (tile step 0.5, its Gaussian), export (linear resampling of the probabilities back
          to the input grid, argmax), 3 preprocessing / 3 export worker processes (its defaults).
          Skipped when nnunetv2 is not installed (`make bench-deps`).
  monai:  LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(model spacing, bilinear)
          -> ScaleIntensityRanged(model window) -> fp32 sliding_window_inference(roi=patch,
          sw_batch_size=4, overlap=0.5, mode="gaussian") -> Invertd(logits, nearest_interp=False)
          -> AsDiscreted(argmax) -> SaveImaged: the MONAI spleen-segmentation tutorial's inference path.

Reported: median and min-max of wall time per arm, the ratios, peak RSS, Dice per label and the
exact-match fraction of each arm's label map against medct's, medct's network time and its pipeline
overhead (end to end minus network forward, imports included), and (for information) each arm's
lung Dice against the manual contours. Writes bench/results/segment.json.

Usage: python bench/segment.py [--quick] [--model DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DATA, ROOT, all_met, paired_goal, write_result
from _phantom_train import Recipe, cached_model

IMAGE = DATA / "pancreas_ct_cbct" / "planct.nii.gz"
TRUTH = DATA / "pancreas_ct_cbct" / "planct_labels.nii.gz"
RESULT = ROOT / "bench" / "results" / "segment.json"

OVERLAP = 0.5  # nnU-Net's default tile step (half a patch) for all three arms
SW_BATCH = 4  # the MONAI spleen tutorial's sw_batch_size
# nnU-Net's own PlainConvUNet (dynamic-network-architectures; medct registry "nnunet_plain"): the one
# network all three pipelines load. 5 stages of 8-128 features instead of nnU-Net's 6 of 32-320,
# and 3 mm (TotalSegmentator's "fast" resolution) instead of 1.5 mm, so that training and three
# arms x repeats fit in tens of minutes on 2 CPU cores (a training step on two 80^3 crops: 1.15 s
# at 8-128 features, 1.93 s at 16-256). Trained on 80^3 crops (the patch): with 64^3 crops and
# 800 steps the left lung came out at Dice 0.17 on the real CT (left/right context missing).
# -950 HU as the window floor: air (about -1000 +- 15 HU) clips to exactly 0, so instance norm never
# blows air noise up into lung-like texture.
RECIPE = Recipe(
    net_name="nnunet_plain",
    net_args={"n_stages": 5, "features_per_stage": [8, 16, 32, 64, 128]},
    spacing=(3.0, 3.0, 3.0),
    patch=(80, 80, 80),
    crop=(80, 80, 80),
    hu_window=(-950.0, 1000.0),
    steps=1000,
    cases=16,
    overlap=OVERLAP,
)
TARGET_SPEEDUP = {"nnunet": 2.0, "monai": 3.0}  # medct (bf16) end to end vs each arm (fp32, as users run them)
TARGET_DICE = 0.99  # medct vs MONAI and medct bf16 vs medct fp32: the same tiles and weights
TARGET_DICE_NNUNET = 0.98  # medct vs nnU-Net v2: its own resampling (cubic spline) and tiling
TARGET_OVERHEAD = 0.20  # (end to end - network forward) / end to end, medct arm (bf16)


def get_model(args: argparse.Namespace) -> tuple[Path, dict[str, object]]:
    if args.model:
        return Path(args.model), {"source": f"--model {args.model}"}
    recipe = dataclasses.replace(RECIPE, steps=args.train_steps, cases=args.train_cases)
    return cached_model(recipe, "bench_segment")


# ----------------------------------------------------------------------------- the MONAI arm


def monai_arm(model_dir: str, image: str, out_dir: str) -> None:
    """The plain MONAI tutorial inference path; prints its stage timings as JSON."""
    t0 = time.perf_counter()
    import torch
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from medct.checkpoint import load_model_folder

    net, card = load_model_folder(model_dir)  # the same network and weights as the medct arm
    pre = card.preprocessing
    t_import = time.perf_counter()
    test_transforms = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=pre.spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=pre.hu_min, a_max=pre.hu_max, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    post_transforms = Compose(
        [
            Invertd(
                keys="pred",
                transform=test_transforms,
                orig_keys="image",
                meta_keys="pred_meta_dict",
                orig_meta_keys="image_meta_dict",
                meta_key_postfix="meta_dict",
                nearest_interp=False,
                to_tensor=True,
            ),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(
                keys="pred",
                meta_keys="pred_meta_dict",
                output_dir=out_dir,
                output_postfix="seg",
                resample=False,
                separate_folder=False,
            ),
        ]
    )
    data = test_transforms({"image": image})
    t_pre = time.perf_counter()
    with torch.no_grad():
        inputs = data["image"][None]  # (1, 1, X, Y, Z)
        data["pred"] = sliding_window_inference(
            inputs, card.patch_size, SW_BATCH, net, overlap=OVERLAP, mode="gaussian"
        )[0]
    t_swi = time.perf_counter()
    post_transforms(data)
    t_post = time.perf_counter()
    print(
        "STAGES "
        + json.dumps(
            {
                "import_load_model": t_import - t0,
                "load_preprocess": t_pre - t_import,
                "sliding_window": t_swi - t_pre,
                "invert_argmax_save": t_post - t_swi,
                "network_grid": list(inputs.shape[2:]),
            }
        ),
        flush=True,
    )
    del decollate_batch


# ----------------------------------------------------------------------------- running


def run_child(cmd: list[str], log: Path) -> dict[str, object]:
    """Run `cmd`, return wall seconds, peak RSS (MiB) of that child and its stage line if any."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    stages = None
    for line in text.splitlines():
        if line.startswith("STAGES "):
            stages = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in json.loads(line[7:]).items()}
    rss_mib = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    return {"seconds": round(wall, 2), "peak_rss_mib": round(rss_mib), "stages": stages}


MIN_ML = 1.0  # labels smaller than this in both outputs are too small to score (a few stray voxels)


def compare(a_path: Path, b_path: Path) -> dict[str, object]:
    """Agreement of two label maps on one grid: Dice per label, exact-match fraction, volumes."""
    import numpy as np

    from medct.io import read_volume
    from medct.metrics import dice_per_label
    from medct.phantom import LABELS

    a, b = read_volume(a_path), read_volume(b_path)
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise RuntimeError(f"outputs on different grids: {a.shape} {b.shape}\n{a.affine}\n{b.affine}")
    la, lb = np.asarray(a.array).astype(np.uint8), np.asarray(b.array).astype(np.uint8)
    voxel_ml = float(np.prod(a.spacing)) / 1000.0
    ca = np.bincount(la.ravel(), minlength=len(LABELS))
    cb = np.bincount(lb.ravel(), minlength=len(LABELS))
    dice = dice_per_label(la, lb)
    scored = {k: v for k, v in dice.items() if max(ca[k], cb[k]) * voxel_ml >= MIN_ML}
    name = lambda k: LABELS.get(k, str(k))  # noqa: E731
    return {
        "exact_match_fraction": round(float(np.mean(la == lb)), 6),
        "dice_per_label": {name(k): round(v, 4) for k, v in sorted(dice.items())},
        "ml_per_label": {name(k): [round(ca[k] * voxel_ml, 1), round(cb[k] * voxel_ml, 1)] for k in sorted(dice)},
        # the goal's number: mean Dice over labels of >= MIN_ML in either output
        "dice_mean_scored": round(float(np.mean(list(scored.values()))), 4) if scored else 1.0,
        "dice_min_scored": round(float(min(scored.values())), 4) if scored else 1.0,
        "scored_labels": [name(k) for k in sorted(scored)],
    }


def lungs_vs_manual(label_path: Path, truth_path: Path) -> dict[str, float]:
    """For information: each lung of an arm's output against the manual contours (3 left, 4 right)."""
    import numpy as np

    from medct.io import read_volume
    from medct.metrics import dice_per_label
    from medct.phantom import LABEL_IDS

    lab, t = np.asarray(read_volume(label_path).array), np.asarray(read_volume(truth_path).array)
    return {
        side: round(dice_per_label(lab == LABEL_IDS[f"lung_{side}"], t == tv, [True])[True], 3)
        for side, tv in (("left", 3), ("right", 4))
    }


def ras_copy(src: Path, dst: Path) -> Path:
    """`src` stored in RAS voxel order (same world geometry, voxels reordered: as_closest_canonical).
    nnU-Net feeds the network the file's array order without reorienting; medct and MONAI reorient
    to RAS themselves, so on this copy all three arms give the network the same orientation."""
    import nibabel as nib

    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.as_closest_canonical(nib.load(str(src))), str(dst))
    return dst


def nnunet_available() -> bool:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        return False
    return Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder").is_file()


def judge(
    rows: list[dict[str, Any]], agreement: dict[str, Any], arm: str, target_dice: float, target_speedup: float
) -> dict[str, Any]:
    """The goal against one arm (`_common.paired_goal`): medct >= target_speedup x faster, paired by
    interleaved repeat (arm's seconds / medct's), and the label maps agree (Dice, one deterministic
    comparison) at >= target_dice."""

    def seconds(a: str) -> list[float]:
        return [float(r["seconds"]) for r in sorted((r for r in rows if r["arm"] == a), key=lambda r: r["repeat"])]

    ratios = [o / m for o, m in zip(seconds(arm), seconds("medct"), strict=False)]
    agr = agreement[f"medct_vs_{arm}"]
    checks = {
        "speedup": paired_goal(f">= {target_speedup:g}x faster than {arm}", ratios, target_speedup),
        "agreement": paired_goal(
            f"Dice >= {target_dice} vs {arm}", [float(agr["dice_mean_scored"])], target_dice, min_pairs=1
        ),
    }
    return {
        "target": f"medct >= {target_speedup:g}x faster than {arm} end to end on CPU, "
        f"Dice >= {target_dice} between the label maps (mean over labels of >= {MIN_ML:g} mL)",
        "measured": {
            "speedup_per_repeat": [round(r, 3) for r in ratios],
            "dice_mean_over_labels_ge_1ml": agr["dice_mean_scored"],
            "dice_min_over_labels_ge_1ml": agr["dice_min_scored"],
        },
        "checks": checks,
        "met": all_met(list(checks.values())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs per arm instead of 3 (same model)")
    parser.add_argument("--model", default=None, help="exported model folder to use instead of training one")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm (default: quick 2, full 3)")
    parser.add_argument("--train-steps", type=int, default=RECIPE.steps, help="training steps of the default model")
    parser.add_argument("--train-cases", type=int, default=RECIPE.cases, help="phantoms the default model trains on")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON results")
    parser.add_argument("--child-monai", nargs=3, metavar=("MODEL", "IMAGE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_monai:
        monai_arm(*args.child_monai)
        return 0
    if not IMAGE.is_file():
        print(f"bench/segment.py: {IMAGE} not found (see shared/data/MANIFEST.md); nothing to measure.")
        return 1
    repeats = args.repeats or (2 if args.quick else 3)
    model_dir, model_info = get_model(args)

    work = Path(tempfile.mkdtemp(prefix="medct_bench_segment_"))
    image = ras_copy(IMAGE, work / "in" / "planct.nii.gz")
    truth = ras_copy(TRUTH, work / "truth" / "planct.nii.gz") if TRUTH.is_file() else None
    medct_bin = Path(sys.executable).with_name("medct")
    arms: dict[str, list[str]] = {
        "medct": [
            str(medct_bin), "segment", "-m", str(model_dir), "-i", str(image), "-o", str(work / "medct"),
            "--overlap", str(OVERLAP), "--sw-batch-size", str(SW_BATCH), "--overwrite", "--precision", "bf16",
        ],
        "medct_fp32": [
            str(medct_bin), "segment", "-m", str(model_dir), "-i", str(image), "-o", str(work / "medct_fp32"),
            "--overlap", str(OVERLAP), "--sw-batch-size", str(SW_BATCH), "--overwrite", "--precision", "fp32",
        ],
        "monai": [sys.executable, str(Path(__file__).resolve()), "--child-monai", str(model_dir), str(image), str(work / "monai")],
    }  # fmt: skip
    outputs = {
        "medct": work / "medct" / "planct.nii.gz",
        "medct_fp32": work / "medct_fp32" / "planct.nii.gz",
        "monai": work / "monai" / "planct_seg.nii.gz",
    }
    if nnunet_available():
        from _nnunet_folder import write_nnunet_model_folder

        nn_model = write_nnunet_model_folder(model_dir, work / "nnunet_model")
        (work / "nnunet_in").mkdir()
        os.link(image, work / "nnunet_in" / "planct_0000.nii.gz")  # nnU-Net's channel suffix
        # nnU-Net's documented CPU inference: its defaults (tile step 0.5, Gaussian, 3 preprocessing and
        # 3 export processes) with mirroring off, as in the other arms
        arms["nnunet"] = [
            str(Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")),
            "-i", str(work / "nnunet_in"), "-o", str(work / "nnunet"), "-m", str(nn_model), "-f", "0",
            "-device", "cpu", "--disable_tta", "--disable_progress_bar",
        ]  # fmt: skip
        outputs["nnunet"] = work / "nnunet" / "planct.nii.gz"
    else:
        print("nnU-Net v2 is not installed (make bench-deps): running without its arm", flush=True)
    names = list(arms)
    # Warm the page cache of the Python packages and the image once, untimed, so the first timed
    # run of an arm does not pay for cold disk reads.
    warm = "import torch, monai, nibabel, medct.inference" + (
        ", nnunetv2.inference.predict_from_raw_data" if "nnunet" in arms else ""
    )
    subprocess.run([sys.executable, "-c", warm], check=True, cwd=ROOT)
    image.read_bytes()

    rows: list[dict[str, object]] = []
    try:
        for r in range(repeats):
            for arm in names:  # interleaved A B C A B C
                res = run_child(arms[arm], work / f"{arm}_{r}.log")
                if arm.startswith("medct"):  # the network's forward time, from the summary medct writes
                    with open(work / arm / "summary.csv", newline="") as f:
                        res["network_s"] = float(next(csv.DictReader(f))["network_seconds"])
                rows.append({"arm": arm, "repeat": r, **res})
                print(f"  {arm:6s} run {r}: {res['seconds']:7.1f} s  peak RSS {res['peak_rss_mib']} MiB", flush=True)
        agreement = {f"medct_vs_{arm}": compare(outputs["medct"], outputs[arm]) for arm in names if arm != "medct"}
        manual = {arm: lungs_vs_manual(outputs[arm], truth) for arm in names} if truth is not None else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, dict[str, float]] = {}
    for arm in names:
        secs = [float(row["seconds"]) for row in rows if row["arm"] == arm]  # type: ignore[arg-type]
        rss = [float(row["peak_rss_mib"]) for row in rows if row["arm"] == arm]  # type: ignore[arg-type]
        summary[arm] = {
            "median_s": round(statistics.median(secs), 2),
            "min_s": min(secs),
            "max_s": max(secs),
            "peak_rss_mib": max(rss),
        }
    speedup = {
        arm: round(summary[arm]["median_s"] / summary["medct"]["median_s"], 2) for arm in names if arm != "medct"
    }
    # pipeline overhead: end to end (process start to label map on disk, imports included) minus the
    # network's forward passes, as a fraction of end to end
    for arm in ("medct_fp32", "medct"):  # the last one's are the goal's
        medct_rows = [row for row in rows if row["arm"] == arm]
        overheads = [1.0 - float(row["network_s"]) / float(row["seconds"]) for row in medct_rows]  # type: ignore[arg-type]
        overhead = statistics.median(overheads)
        summary[arm]["network_s_median"] = round(statistics.median(float(row["network_s"]) for row in medct_rows), 2)  # type: ignore[arg-type]
        summary[arm]["overhead_fraction_median"] = round(overhead, 3)

    print()
    print(
        f"planct.nii.gz 512x512x134 (stored RAS), model {model_dir.name}: overlap {OVERLAP}, "
        f"sw_batch_size {SW_BATCH}, CPU (medct bf16, medct_fp32 / monai / nnunet fp32), {repeats} runs per arm"
    )
    print(
        f"{'arm':8s} {'median s':>9s} {'min-max s':>14s} {'peak RSS MiB':>13s} {'x medct':>8s} {'Dice vs medct':>14s}"
    )
    for arm in names:
        s = summary[arm]
        dice = agreement.get(f"medct_vs_{arm}", {}).get("dice_mean_scored", "")
        ratio = f"{speedup[arm]:.2f}" if arm in speedup else "1.00"
        print(
            f"{arm:8s} {s['median_s']:9.1f} {s['min_s']:6.1f}-{s['max_s']:<7.1f} {s['peak_rss_mib']:13.0f} "
            f"{ratio:>8s} {dice!s:>14s}"
        )
    for key, agr in agreement.items():
        print(f"{key}: exact match {agr['exact_match_fraction']:.5f}; per label {agr['dice_per_label']}")
    if manual:
        print(f"lung Dice vs manual contours: {manual}")

    def goal_for(arm: str, target_dice: float) -> dict[str, object]:
        target = TARGET_SPEEDUP[arm]
        if arm not in speedup:
            return {"target": f"medct >= {target:g}x faster than {arm}", "measured": None, "met": False,
                    "why": f"{arm} arm not run (nnU-Net v2 not installed: make bench-deps)"}  # fmt: skip
        goal = judge(rows, agreement, arm, target_dice, target)
        print(f"goal vs {arm}: >= {target}x faster and Dice >= {target_dice}: {goal['met']}")
        return goal

    goal_nnunet = goal_for("nnunet", TARGET_DICE_NNUNET)
    goal_monai = goal_for("monai", TARGET_DICE)
    bf16 = agreement["medct_vs_medct_fp32"]
    goal_bf16 = {
        **paired_goal(
            f"medct bf16 labels vs medct fp32: Dice >= {TARGET_DICE}", [float(bf16["dice_mean_scored"])], TARGET_DICE,
            min_pairs=1,
        ),
        "measured": {"dice_mean": bf16["dice_mean_scored"], "dice_min": bf16["dice_min_scored"]},
    }  # fmt: skip
    print(f"goal bf16 vs fp32 labels: mean Dice >= {TARGET_DICE}: {goal_bf16['met']}")
    met_overhead = overhead <= TARGET_OVERHEAD
    print(
        f"pipeline overhead (end to end minus network forward, imports included): {overhead:.1%} of end to end; "
        f"goal <= {TARGET_OVERHEAD:.0%}: {'met' if met_overhead else 'NOT met'}"
    )
    write_result(
        args.out,
        "segment",
        {
            "settings": {
                "image": str(IMAGE.relative_to(DATA.parent)) if IMAGE.is_relative_to(DATA.parent) else str(IMAGE),
                "input_given_to_every_arm": "a copy stored in RAS voxel order (nibabel as_closest_canonical)",
                "model": model_info,
                "overlap": OVERLAP,
                "sw_batch_size": SW_BATCH,
                "blend": "gaussian",
                "precision": "medct: bf16 autocast (--precision bf16); medct_fp32, monai, nnunet: fp32 (CPU)",
                "repeats_per_arm": repeats,
                "order": "interleaved " + ", ".join(names) + ", ...",
                "peak_rss": "largest single process of the arm's process tree (os.wait4 ru_maxrss)",
            },
            "rows": rows,
            "summary": summary,
            "speedup_median": speedup,
            "agreement": agreement,
            "lung_dice_vs_manual": manual,
            "goal": {"nnunet": goal_nnunet, "monai": goal_monai, "bf16_vs_fp32": goal_bf16},
            "goal_overhead": {
                "target": f"pipeline overhead (end to end minus network forward, imports included) <= {TARGET_OVERHEAD:.0%} of end to end",
                "measured": {
                    "overhead_fraction_median": round(overhead, 3),
                    "per_run": [round(o, 3) for o in overheads],
                },
                "met": met_overhead,
            },
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
