"""Segmenting a real CT: `medct segment` vs the plain MONAI tutorial pipeline, same network and weights.

Question: how much faster is medct's inference path end to end (process start -> label map on disk)
than what a MONAI user writes from the tutorials, and do the two agree?

Input: ../shared/data/pancreas_ct_cbct/planct.nii.gz (512 x 512 x 134, 1.074 x 1.074 x 3 mm, LPS).
Model: by default the MONAI spleen tutorial's UNet (16-256, 2 residual units; medct registry "unet"),
1.5 mm, 96^3 patches, trained here on medct phantoms for a fixed number of steps (cached under
~/.cache/medct/bench_segment/) and exported with medct.checkpoint.save_model_folder; or --model DIR
(e.g. the demo's exported model). Both arms load the same folder.

Arms, each in its own subprocess (wall time and peak RSS per arm via os.wait4), interleaved
A B A B ...:
  medct: `.venv/bin/medct segment -m MODEL -i planct.nii.gz -o OUT --overlap 0.25 --sw-batch-size 4`
  monai: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(model spacing, bilinear)
         -> ScaleIntensityRanged(model window) -> fp32 sliding_window_inference(roi=patch, sw_batch_size=4,
         overlap=0.25, mode="gaussian") -> Invertd(logits, nearest_interp=False) -> AsDiscreted(argmax)
         -> SaveImaged: the MONAI spleen-segmentation tutorial's inference path (its sw_batch_size=4 and
         MONAI's default overlap 0.25), with Gaussian blending for both arms.

Reported: median and min-max of wall time per arm, the ratio, peak RSS, Dice per label and the
exact-match fraction between the two label maps, and (for information) the lung Dice of each arm
against the manual contours. Writes bench/results/segment.json.

Usage: python bench/segment.py [--quick] [--model DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDCT_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
IMAGE = DATA / "pancreas_ct_cbct" / "planct.nii.gz"
TRUTH = DATA / "pancreas_ct_cbct" / "planct_labels.nii.gz"
RESULT = ROOT / "bench" / "results" / "segment.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medct" / "bench_segment"

OVERLAP = 0.25  # MONAI's default, used by its spleen tutorial
SW_BATCH = 4  # the spleen tutorial's sw_batch_size
SPACING = (1.5, 1.5, 1.5)
PATCH = (96, 96, 96)
# -950 HU as the window floor: air (about -1000 +- 15 HU on CT, phantom or real) clips to exactly 0,
# so the network never sees air noise, which InstanceNorm would blow up into lung-like texture.
HU_WINDOW = (-950.0, 1000.0)
# The MONAI spleen tutorial's network (UNet 16-32-64-128-256, 2 residual units, batch norm), through
# medct's registry. Not resenc_unet: on 2 CPU cores it learns far slower (single-batch overfit, 30 Adam
# steps: cross-entropy 0.71-1.14 for resenc_unet 8-128 / 16-256 vs 0.10 for unet 16-128), so a few
# minutes of training gave it no usable labels on the real CT. Batch norm (the tutorial's) rather than
# instance norm: with instance norm each patch is normalised by its own statistics, so a barely
# trained network answers differently for every tiling of the volume (medct's body box moves the
# tiles), which is the network's instability, not either pipeline's.
NET_NAME = "unet"
NET_ARGS = {"channels": [16, 32, 64, 128, 256], "num_res_units": 2, "norm": "batch"}
TARGET_SPEEDUP = 2.0
TARGET_DICE = 0.99
TARGET_OVERHEAD = 0.25  # (end to end - network forward) / end to end, medct arm


# ----------------------------------------------------------------------------- model


def train_model(out_dir: Path, steps: int, n_cases: int, seed: int = 0) -> dict[str, object]:
    """Train a small segmentation network on phantoms at the model spacing; export it to `out_dir`."""
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_net
    from medct.phantom import LABELS, Appearance, GridSpec, make_phantom
    from medct.transforms import Preprocessing, scale_intensity

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pre = Preprocessing(spacing=SPACING, hu_min=HU_WINDOW[0], hu_max=HU_WINDOW[1])
    start = time.perf_counter()
    images, labels = [], []
    for s in range(n_cases):  # whole torsos (384 x 384 x 288 mm) at the model spacing, RAS
        grid = GridSpec(shape=(256, 256, 192), spacing=SPACING)
        case = make_phantom(1000 + s, grid, Appearance(phase=("native", "venous")[s % 2]))
        images.append(scale_intensity(case.image.array, pre))
        labels.append(case.label.array.astype(np.int64))
    t_data = time.perf_counter() - start
    net = create_net(NET_NAME, in_channels=1, out_channels=len(LABELS), **NET_ARGS)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    crop = 64
    net.train()
    losses = []
    for _ in range(steps):
        xs, ys = [], []
        for _b in range(2):
            i = int(rng.integers(n_cases))
            img, lab = images[i], labels[i]
            if rng.random() < 0.5:  # centre on a random foreground voxel (organs are small)
                fg = np.argwhere(lab[::4, ::4, ::4] > 0) * 4
                c = fg[rng.integers(len(fg))]
            else:
                c = np.array([rng.integers(s) for s in img.shape])
            lo = np.clip(c - crop // 2, 0, np.asarray(img.shape) - crop)
            sl = tuple(slice(a, a + crop) for a in lo)
            xs.append(img[sl])
            ys.append(lab[sl])
        x = torch.from_numpy(np.stack(xs))[:, None]  # (B, 1, crop, crop, crop)
        y = torch.from_numpy(np.stack(ys))[:, None]
        opt.zero_grad(set_to_none=True)
        # bf16 autocast: ~1.6x faster training steps on CPUs with AVX512-BF16 (measured 0.25 vs
        # 0.40 s per step); the exported weights are fp32 and inference in both arms is fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    card = ModelCard(
        net_name=NET_NAME,
        net_args=dict(net.net_config["args"]),  # type: ignore[attr-defined]
        labels=dict(LABELS),
        preprocessing=pre,
        patch_size=PATCH,
        licence="Apache-2.0 (trained on synthetic phantoms)",
        extra={"trained_by": "bench/segment.py", "steps": steps, "phantoms": n_cases},
    )
    save_model_folder(net, card, out_dir)
    return {
        "source": "trained on phantoms by bench/segment.py",
        "steps": steps,
        "phantoms": n_cases,
        "data_seconds": round(t_data, 1),
        "train_seconds": round(time.perf_counter() - start - t_data, 1),
        "loss_first_last": [round(statistics.mean(losses[:5]), 3), round(statistics.mean(losses[-5:]), 3)],
    }


def get_model(args: argparse.Namespace) -> tuple[Path, dict[str, object]]:
    if args.model:
        return Path(args.model), {"source": f"--model {args.model}"}
    key = hashlib.sha1(
        json.dumps([args.train_steps, args.train_cases, NET_NAME, NET_ARGS, SPACING, PATCH, HU_WINDOW]).encode()
    )
    folder = CACHE / f"{NET_NAME}_{key.hexdigest()[:10]}"
    info_file = folder / "bench_info.json"
    if not info_file.is_file():
        print(f"training a small {NET_NAME} on phantoms ({args.train_steps} steps) -> {folder}", flush=True)
        info = train_model(folder, args.train_steps, args.train_cases)
        info_file.write_text(json.dumps(info, indent=2))
    info = json.loads(info_file.read_text())
    info["cached_at"] = str(folder)
    return folder, info


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


def compare(medct_path: Path, monai_path: Path) -> dict[str, object]:
    """Agreement of the two label maps (Dice per label, exact match) and lung Dice vs manual contours."""
    import numpy as np

    from medct.io import read_volume
    from medct.metrics import dice_per_label
    from medct.phantom import LABEL_IDS, LABELS

    a, b = read_volume(medct_path), read_volume(monai_path)
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise RuntimeError(f"outputs on different grids: {a.shape} {b.shape}\n{a.affine}\n{b.affine}")
    la, lb = np.asarray(a.array).astype(np.uint8), np.asarray(b.array).astype(np.uint8)
    voxel_ml = float(np.prod(a.spacing)) / 1000.0
    ca = np.bincount(la.ravel(), minlength=len(LABELS))
    cb = np.bincount(lb.ravel(), minlength=len(LABELS))
    dice = dice_per_label(la, lb)
    scored = {k: v for k, v in dice.items() if max(ca[k], cb[k]) * voxel_ml >= MIN_ML}
    name = lambda k: LABELS.get(k, str(k))  # noqa: E731
    out: dict[str, object] = {
        "exact_match_fraction": round(float(np.mean(la == lb)), 6),
        "dice_per_label": {name(k): round(v, 4) for k, v in sorted(dice.items())},
        "ml_per_label": {name(k): [round(ca[k] * voxel_ml, 1), round(cb[k] * voxel_ml, 1)] for k in sorted(dice)},
        "ml_per_label_order": ["medct", "monai"],
        # the goal's number: mean Dice over labels of >= MIN_ML in either output
        "dice_mean_scored": round(float(np.mean(list(scored.values()))), 4) if scored else 1.0,
        "dice_min_scored": round(float(min(scored.values())), 4) if scored else 1.0,
        "scored_labels": [name(k) for k in sorted(scored)],
    }
    if TRUTH.is_file():  # for information: the lungs against the manual contours (3 left, 4 right)
        t = np.asarray(read_volume(TRUTH).array)
        out["lung_dice_vs_manual"] = {
            arm: {
                side: round(dice_per_label((lab == LABEL_IDS[f"lung_{side}"]), (t == tv), [True])[True], 3)
                for side, tv in (("left", 3), ("right", 4))
            }
            for arm, lab in (("medct", la), ("monai", lb))
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs per arm instead of 3 (same model)")
    parser.add_argument("--model", default=None, help="exported model folder to use instead of training one")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm (default: quick 2, full 3)")
    parser.add_argument("--train-steps", type=int, default=400, help="training steps of the default model")
    parser.add_argument("--train-cases", type=int, default=6, help="phantoms the default model trains on")
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

    medct_bin = Path(sys.executable).with_name("medct")
    work = Path(tempfile.mkdtemp(prefix="medct_bench_segment_"))
    arms = {
        "medct": lambda out: [
            str(medct_bin), "segment", "-m", str(model_dir), "-i", str(IMAGE), "-o", str(out),
            "--overlap", str(OVERLAP), "--sw-batch-size", str(SW_BATCH), "--overwrite",
        ],
        "monai": lambda out: [sys.executable, str(Path(__file__).resolve()), "--child-monai", str(model_dir), str(IMAGE), str(out)],
    }  # fmt: skip
    outputs = {"medct": work / "medct" / "planct.nii.gz", "monai": work / "monai" / "planct_seg.nii.gz"}
    # Warm the page cache of the Python packages and the image once, untimed, so the first timed
    # run of either arm does not pay for cold disk reads.
    subprocess.run([sys.executable, "-c", "import torch, monai, nibabel, medct.inference"], check=True, cwd=ROOT)
    IMAGE.read_bytes()

    rows: list[dict[str, object]] = []
    try:
        for r in range(repeats):
            for arm in ("medct", "monai"):  # interleaved A B A B
                res = run_child(arms[arm](work / arm), work / f"{arm}_{r}.log")
                if arm == "medct":  # the network's forward time, from the summary medct writes
                    with open(work / arm / "summary.csv", newline="") as f:
                        res["network_s"] = float(next(csv.DictReader(f))["network_seconds"])
                rows.append({"arm": arm, "repeat": r, **res})
                print(f"  {arm:5s} run {r}: {res['seconds']:7.1f} s  peak RSS {res['peak_rss_mib']} MiB", flush=True)
        agreement = compare(outputs["medct"], outputs["monai"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, dict[str, float]] = {}
    for arm in ("medct", "monai"):
        secs = [float(row["seconds"]) for row in rows if row["arm"] == arm]  # type: ignore[arg-type]
        rss = [float(row["peak_rss_mib"]) for row in rows if row["arm"] == arm]  # type: ignore[arg-type]
        summary[arm] = {
            "median_s": round(statistics.median(secs), 2),
            "min_s": min(secs),
            "max_s": max(secs),
            "peak_rss_mib": max(rss),
        }
    speedup = summary["monai"]["median_s"] / summary["medct"]["median_s"]
    # pipeline overhead: end to end (process start to label map on disk, imports included) minus the
    # network's forward passes, as a fraction of end to end
    overheads = [1.0 - float(row["network_s"]) / float(row["seconds"]) for row in rows if row["arm"] == "medct"]  # type: ignore[arg-type]
    overhead = statistics.median(overheads)
    summary["medct"]["network_s_median"] = round(
        statistics.median(float(row["network_s"]) for row in rows if row["arm"] == "medct"),
        2,  # type: ignore[arg-type]
    )
    summary["medct"]["overhead_fraction_median"] = round(overhead, 3)
    dice = float(agreement["dice_mean_scored"])  # type: ignore[arg-type]
    met = speedup >= TARGET_SPEEDUP and dice >= TARGET_DICE

    print()
    print(
        f"planct.nii.gz 512x512x134, model {model_dir.name}: overlap {OVERLAP}, sw_batch_size {SW_BATCH}, {repeats} runs per arm"
    )
    print(f"{'arm':8s} {'median s':>9s} {'min-max s':>14s} {'peak RSS MiB':>13s}")
    for arm in ("medct", "monai"):
        s = summary[arm]
        print(f"{arm:8s} {s['median_s']:9.1f} {s['min_s']:6.1f}-{s['max_s']:<7.1f} {s['peak_rss_mib']:13.0f}")
    print(f"speedup (monai / medct median): {speedup:.2f}x")
    print(
        f"Dice medct vs monai (volume-weighted over labels): {dice:.4f}; exact match {agreement['exact_match_fraction']:.5f}"
    )
    print(f"per label: {agreement['dice_per_label']}")
    if "lung_dice_vs_manual" in agreement:
        print(f"lung Dice vs manual contours: {agreement['lung_dice_vs_manual']}")
    print(f"goal: medct >= {TARGET_SPEEDUP}x faster and Dice >= {TARGET_DICE}: {'met' if met else 'NOT met'}")
    met_overhead = overhead <= TARGET_OVERHEAD
    print(
        f"pipeline overhead (end to end minus network forward, imports included): {overhead:.1%} of end to end; "
        f"goal <= {TARGET_OVERHEAD:.0%}: {'met' if met_overhead else 'NOT met'}"
    )

    result = {
        "benchmark": "segment",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "image": str(IMAGE.relative_to(DATA.parent)) if IMAGE.is_relative_to(DATA.parent) else str(IMAGE),
            "model": model_info,
            "spacing_mm": SPACING,
            "patch": PATCH,
            "overlap": OVERLAP,
            "sw_batch_size": SW_BATCH,
            "blend": "gaussian",
            "precision": "fp32 (CPU)",
            "repeats_per_arm": repeats,
            "order": "interleaved medct, monai, medct, monai, ...",
        },
        "rows": rows,
        "summary": summary,
        "speedup_median": round(speedup, 2),
        "agreement": agreement,
        "goal": {
            "target": f"medct >= {TARGET_SPEEDUP:g}x faster end to end on CPU, Dice >= {TARGET_DICE} between outputs",
            "measured": {
                "speedup_median": round(speedup, 2),
                "dice_mean_over_labels_ge_1ml": dice,
                "dice_min_over_labels_ge_1ml": agreement["dice_min_scored"],
            },
            "met": met,
        },
        "goal_overhead": {
            "target": f"pipeline overhead (end to end minus network forward, imports included) <= {TARGET_OVERHEAD:.0%} of end to end",
            "measured": {"overhead_fraction_median": round(overhead, 3), "per_run": [round(o, 3) for o in overheads]},
            "met": met_overhead,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
