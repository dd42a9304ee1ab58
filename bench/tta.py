"""Does test-time adaptation recover Dice under scanner shift, without collapsing or hurting the source domain?

Question (issue 9): a source-trained model on shifted domains, Dice without and with each
`--adapt` method, per case (`--adapt-reset case`) and continual over a long folder whose domain
changes along the way (`--adapt-reset never`), to show error accumulation or its absence.
Goal: the best method gains >= 5 Dice points on the phantom shifts, never collapses, and costs the
source domain no more than 1 point.

Design:
  * Source model: `resenc_unet` (8, 16, 32, 64) trained on 16 phantom CTs (64^3 at 4 mm, 32^3
    crops, `--source-steps` steps, default 600), cached as a model folder.
  * Test stream: 34 unseen phantom cases in domain blocks, CT (source, 6) -> CBCT-like (8) ->
    CBCT-TST-like (8) -> MR-like (6) -> CT again (6), each case segmented by the `medct segment`
    code path (`medct.segment_job.segment_paths`, the same Predictor and TestTimeAdapter), Dice per case
    against its labels (mean over the organs present). MR-like: the phantom's MR variant (other
    tissue contrasts, bias field, Rician noise) with its intensities mapped linearly from
    [0, 99.5th percentile] to [-1000, 1000], as a naive conversion would; a CT model refuses raw MR
    (`not CT in HU`) by design, so only such a mapped scan reaches it.
  * Arms: no adaptation; tent, cotta, psmt x reset case / never; 10 steps per case (the default).
    The adaptation draws its patches at random: 3 seeds of that draw (the source model is one).
  * Real CBCT: a source model trained on the one labelled planning CT (its CBCT-field-of-view
    crop, 4 labels, 3 mm, `--real-source-steps`), then the same patient's CBCT of a later day
    (not HU-calibrated, its own manual contours) segmented without and with each method; the
    planning CT itself (the model's training scan, so an optimistic source reference) is the
    source-domain check. One CBCT: per case and continual are the same run.

CPU time: 103 minutes measured on 2 cores while other jobs shared them (source models cached); alone ~60.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import CACHE, DATA, ROOT, all_met, paired_goal, quiet_lightning, quiet_trainer, write_result

from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

RESULT = ROOT / "bench" / "results" / "tta.json"
WORK = CACHE / "tta"
SPACING = (4.0, 4.0, 4.0)
STREAM = (("ct", 6, 300), ("cbct", 8, 400), ("cbct_tst", 8, 500), ("mr", 6, 700), ("ct", 6, 600))
DOMAINS = ("ct", "cbct", "cbct_tst", "mr")
SHIFTS = ("cbct", "cbct_tst", "mr")
METHODS = ("tent", "cotta", "psmt")


def _train_source(
    folder: Path, datalist: Path | None, steps: int, spacing: tuple[float, ...], patch: list[int]
) -> Path:
    """Train and export the source model once (cached)."""
    model_dir = folder / "model"
    if (model_dir / "medct.json").is_file():
        return model_dir
    import lightning.pytorch as pl

    from medct.checkpoint import save_model_folder
    from medct.data import PhantomCohort, SegmentationDataModule
    from medct.finetune.segmentation import SegmentationTask
    from medct.nets import create_net

    pl.seed_everything(0, verbose=False)
    if datalist is None:
        dm = SegmentationDataModule(data_dir=str(folder / "source_ct"), phantom=PhantomCohort(n=16, variant="ct", seed=0, shape=(64, 64, 64), spacing=SPACING), num_workers=2, preprocessing=Preprocessing(spacing=spacing), sampling=Sampling(patch_size=patch, batch_size=2, num_samples=1), split=Split(val_fraction=0.125))  # fmt: skip
    else:
        dm = SegmentationDataModule(
            datalist=str(datalist),
            num_workers=2,
            preprocessing=Preprocessing(spacing=spacing),
            sampling=Sampling(patch_size=patch, batch_size=1, num_samples=2),
        )
    dm.prepare_data()
    dm.setup("fit")
    net = create_net("resenc_unet", filters=[8, 16, 32, 64], out_channels=dm.num_classes)
    task = SegmentationTask(
        net,
        labels=dm.labels,
        patch_size=patch,
        lr=3e-3,
        preprocessing=Preprocessing(spacing=spacing, modality=dm.modality),
    )
    trainer = quiet_trainer(steps)
    trainer.fit(task, datamodule=dm)
    return save_model_folder(task.net, task.model_card(), model_dir)


def _stream(folder: Path) -> tuple[Path, list[dict[str, str]]]:
    """The test folder and its cases, named so that their order is the stream's (domain blocks)."""
    import shutil

    from medct.phantom import write_cohort

    scans = folder / f"stream_{sum(n for _, n, _ in STREAM)}"  # one folder per stream layout
    cases: list[dict[str, str]] = []
    k = 0
    for block, (variant, n, seed) in enumerate(STREAM):
        src = folder / f"cohort_{block}_{variant}"
        if not (src / "dataset.json").is_file():
            write_cohort(src, n=n, variant=variant, seed=seed, shape=(64, 64, 64), spacing=SPACING)
        meta = json.loads((src / "dataset.json").read_text())
        for e in meta["training"]:
            name = f"case{k:03d}_{variant}"
            dst = scans / f"{name}.nii.gz"
            if not dst.is_file():
                scans.mkdir(parents=True, exist_ok=True)
                if variant == "mr":
                    _mr_to_hu_range(src / e["image"], dst)
                else:
                    shutil.copy(src / e["image"], dst)
            cases.append({"name": name, "domain": variant, "block": str(block), "label": str(src / e["label"])})
            k += 1
    return scans, cases


def _mr_to_hu_range(src: Path, dst: Path) -> None:
    """An MR image mapped linearly from [0, its 99.5th percentile] to [-1000, 1000] (same grid)."""
    import nibabel as nib

    img = nib.load(src)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    mapped = arr / np.percentile(arr, 99.5) * 2000.0 - 1000.0
    out = nib.Nifti1Image(np.clip(mapped, -1024, 3071).astype(np.int16), img.affine, img.header)
    out.set_data_dtype(np.int16)
    nib.save(out, str(dst))


def _real_stream(folder: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    """The real planning CT crop's training datalist, the test folder and its cases: the planning
    CT, then the CBCT."""
    import shutil

    src = DATA / "pancreas_ct_cbct" / "crop_cbct_fov"
    names = {"0": "background", "1": "stomach_duodenum", "2": "small_bowel", "3": "lung_left", "4": "lung_right"}
    datalist = folder / "planct.json"
    entry = {"image": str(src / "planct_crop.nii.gz"), "label": str(src / "planct_labels_crop.nii.gz")}
    lst = {"training": [entry], "validation": [entry], "labels": names, "modality": {"0": "CT"}}
    folder.mkdir(parents=True, exist_ok=True)
    datalist.write_text(json.dumps(lst, indent=1))
    scans = folder / "stream"
    scans.mkdir(exist_ok=True)
    cases = []
    for k, (domain, image, label) in enumerate(
        (
            ("planct", "planct_crop.nii.gz", "planct_labels_crop.nii.gz"),
            ("cbct", "cbct_CB07_on_planct_grid_crop.nii.gz", "cbct_CB07_labels_crop.nii.gz"),
        )
    ):
        name = f"case{k:03d}_{domain}"
        if not (scans / f"{name}.nii.gz").is_file():
            shutil.copy(src / image, scans / f"{name}.nii.gz")
        cases.append({"name": name, "domain": domain, "block": str(k), "label": str(src / label)})
    return datalist, scans, cases


def _dice(pred: np.ndarray, ref: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(1, classes):
        p, r = pred == c, ref == c
        if r.sum() == 0:
            continue
        scores.append(2.0 * float((p & r).sum()) / float(p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def _run(
    model: Path, scans: Path, out: Path, cases: list[dict[str, str]], adapt: str | None, reset: str, seed: int
) -> list[dict[str, Any]]:
    import medct.finetune.tta  # noqa: F401 - registers the adaptation methods the runner looks up
    from medct.checkpoint import read_model_card
    from medct.io import read_volume
    from medct.segment_job import segment_paths

    classes = len(read_model_card(model).labels)
    segment_paths(model, scans, out, device="cpu", adapt=adapt, adapt_reset=reset, adapt_seed=seed, overwrite=True)
    summary = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}
    rows = []
    for c in cases:
        row = summary[c["name"]]
        pred = np.asarray(read_volume(row["output"]).array)
        ref = np.asarray(read_volume(c["label"]).array)
        rows.append(
            {
                "case": c["name"], "domain": c["domain"], "block": int(c["block"]),
                "dice": round(_dice(pred, ref, classes), 4),
                "reverted": row.get("adapt_reverted", "") or "",
                "adapt_seconds": float(row.get("adapt_seconds") or 0.0),
            }
        )  # fmt: skip
    return rows


def _arms(methods: tuple[str, ...], resets: tuple[str, ...]) -> list[tuple[str, str | None, str]]:
    return [("none", None, "case")] + [(f"{m}_{r}", m, r) for m in methods for r in resets]


def _run_arms(
    model: Path, work: Path, scans: Path, cases: list[dict[str, str]], arms: list[tuple[str, str | None, str]], seeds: list[int],
    tag: str, domains: tuple[str, ...],
) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for arm, method, reset in arms:
        for seed in seeds if method else seeds[:1]:
            per_case = _run(model, scans, work / f"out_{len(cases)}" / f"{arm}_s{seed}", cases, method, reset, seed)
            rows += [{"arm": arm, "seed": seed, **r} for r in per_case]
            by = {d: statistics.fmean([r["dice"] for r in per_case if r["domain"] == d]) for d in domains}
            secs = statistics.fmean([r["adapt_seconds"] for r in per_case])
            print(
                f"{tag} {arm} seed {seed}: "
                + ", ".join(f"{d} {v:.3f}" for d, v in by.items())
                + f", {secs:.1f} s/case",
                flush=True,
            )
    return rows


def _summary(
    rows: list[dict[str, Any]],
    arms: list[tuple[str, str | None, str]],
    domains: tuple[str, ...],
    last_block: int | None,
) -> dict[str, Any]:
    """Mean ± sd over the adaptation seeds of each domain's mean Dice, per arm (printed as a table)."""
    cols = (*domains, "ct_last_block") if last_block is not None else domains
    summary: dict[str, Any] = {}
    print(f"\n{'arm':<14}" + "".join(f"{d:>20}" for d in cols) + f"{'reverted':>10}{'s/case':>8}")
    for arm, _, _ in arms:
        entry: dict[str, Any] = {}
        line = f"{arm:<14}"
        for d in cols:
            per_seed = []
            for seed in sorted({r["seed"] for r in rows if r["arm"] == arm}):
                sel = [r["dice"] for r in rows if r["arm"] == arm and r["seed"] == seed and
                       (r["domain"] == d if d != "ct_last_block" else r["block"] == last_block)]  # fmt: skip
                per_seed.append(statistics.fmean(sel))
            m = statistics.fmean(per_seed)
            sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            entry[d] = {"mean": round(m, 4), "sd": round(sd, 4)}
            line += f"{m:>12.3f} ± {sd:<5.3f}"
        entry["reverted_cases"] = sum(1 for r in rows if r["arm"] == arm and r["reverted"])
        entry["adapt_seconds_per_case"] = round(
            statistics.fmean([r["adapt_seconds"] for r in rows if r["arm"] == arm]), 2
        )
        summary[arm] = entry
        print(line + f"{entry['reverted_cases']:>10}{entry['adapt_seconds_per_case']:>8.1f}")
    return summary


def _gains(summary: dict[str, Any], shifts: tuple[str, ...], source: str) -> dict[str, Any]:
    base = summary["none"]
    gains = {}
    for arm in summary:
        if arm == "none":
            continue
        per = {d: round(summary[arm][d]["mean"] - base[d]["mean"], 4) for d in shifts}
        gains[arm] = {
            "gain_per_shift": per,
            "gain_on_shifts": round(statistics.fmean(per.values()), 4),
            "source_cost": round(base[source]["mean"] - summary[arm][source]["mean"], 4),
            "reverted_cases": summary[arm]["reverted_cases"],
        }
    return gains


def judge(rows: list[dict[str, Any]], gains: dict[str, Any]) -> dict[str, Any]:
    """The goal (`_common.paired_goal`, per adaptation seed against the deterministic no-adaptation
    arm): the best method (by mean gain) gains >= 0.05 Dice on the phantom shifts, costs <= 0.01 on
    CT, and reverts no case."""
    best = max(gains, key=lambda a: gains[a]["gain_on_shifts"]) if gains else None
    if best is None:
        return {"target": "no adaptation arm ran", "met": None}

    def domain_mean(arm: str, seed: int, domain: str) -> float:
        return statistics.fmean(
            r["dice"] for r in rows if r["arm"] == arm and r["seed"] == seed and r["domain"] == domain
        )

    base_seed = min(r["seed"] for r in rows if r["arm"] == "none")
    seeds = sorted({r["seed"] for r in rows if r["arm"] == best})
    gain = [
        statistics.fmean(domain_mean(best, s, d) - domain_mean("none", base_seed, d) for d in SHIFTS) for s in seeds
    ]
    cost = [domain_mean("none", base_seed, "ct") - domain_mean(best, s, "ct") for s in seeds]
    checks = {
        "gain_on_shifts": paired_goal(f"{best} gains >= 0.05 Dice on the shifts", gain, 0.05),
        "ct_cost": paired_goal(f"{best} costs <= 0.01 Dice on CT", [0.01] * len(cost), cost),
        "no_reverted_case": {
            "reverted_cases": gains[best]["reverted_cases"],
            "met": gains[best]["reverted_cases"] == 0,
        },
    }
    return {
        "target": "best method gains >= 0.05 Dice on the phantom shifts (mean of CBCT, CBCT-TST, MR-like), "
        "no collapse (no reverted case), <= 0.01 cost on CT",
        "best": best,
        "best_gain_on_shifts": gains[best]["gain_on_shifts"],
        "checks": checks,
        "met": all_met(list(checks.values())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 source steps, one seed, tent only")
    parser.add_argument("--source-steps", type=int, default=None, help="phantom source model steps (600)")
    parser.add_argument("--real-source-steps", type=int, default=None, help="real source model steps (400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--no-real", action="store_true", help="skip the real CBCT")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    global WORK
    if args.quick:
        WORK = CACHE / "tta_quick"
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.source_steps or (20 if args.quick else 600)
    real_steps = args.real_source_steps or (10 if args.quick else 400)
    methods = ("tent",) if args.quick else METHODS
    quiet_lightning()
    t0 = time.perf_counter()

    model = _train_source(WORK / f"source_{steps}", None, steps, SPACING, [32, 32, 32])
    scans, cases = _stream(WORK)
    arms = _arms(methods, ("case", "never"))
    rows = _run_arms(model, WORK, scans, cases, arms, seeds, "phantom", DOMAINS)
    summary = _summary(rows, arms, DOMAINS, len(STREAM) - 1)
    gains = _gains(summary, SHIFTS, "ct")
    body: dict[str, Any] = {
        "settings": {
            "source_steps": steps, "real_source_steps": real_steps, "seeds": seeds, "stream": STREAM,
            "methods": methods, "adapt_steps": 10, "mr_like": "phantom MR, [0, p99.5] mapped to [-1000, 1000]",
        },
        "phantom": {"rows": rows, "summary": summary, "gains": gains},
    }  # fmt: skip

    if not args.no_real:
        real_work = WORK / "real"
        datalist, real_scans, real_cases = _real_stream(real_work)
        real_model = _train_source(
            real_work / f"source_{real_steps}", datalist, real_steps, (3.0, 3.0, 3.0), [64, 64, 32]
        )
        real_arms = _arms(methods, ("case",))
        real_rows = _run_arms(
            real_model, real_work, real_scans, real_cases, real_arms, seeds, "real", ("planct", "cbct")
        )
        real_summary = _summary(real_rows, real_arms, ("planct", "cbct"), None)
        body["real"] = {"rows": real_rows, "summary": real_summary, "gains": _gains(real_summary, ("cbct",), "planct")}

    goal = judge(rows, gains)
    print("\ngoal:", json.dumps(goal))
    body["goal"] = goal
    body["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(args.out, "tta", body, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
