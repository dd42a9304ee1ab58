"""Does test-time adaptation recover Dice under scanner shift, without collapsing or hurting the source domain?

Question (issue 9): a source-trained model on shifted domains, Dice without and with each
`--adapt` method, per case (`--adapt-reset case`) and continual over a long folder whose domain
changes along the way (`--adapt-reset never`), to show error accumulation or its absence.
Goal: the best method gains >= 5 Dice points on the phantom shifts, never collapses, and costs the
source domain no more than 1 point.

Design:
  * Source model: `resenc_unet` (8, 16, 32, 64) trained on 16 phantom CTs (64^3 at 4 mm, 32^3
    crops, `--source-steps` steps, default 600), cached as a model folder.
  * Test stream: 28 unseen phantom cases in domain blocks, CT (source, 6) -> CBCT-like (8) ->
    CBCT-TST-like (8) -> CT again (6), each case segmented by the `medct segment` code path
    (`medct.runner.segment_paths`, the same Predictor and TestTimeAdapter), Dice per case against its
    labels (mean over the organs present). MR-like scans are not in the stream: a CT model refuses
    MR input by design (`not CT in HU`), with or without adaptation.
  * Arms: no adaptation; tent, cotta, psmt x reset case / never; 10 steps per case (the default).
    The adaptation draws its patches at random: 3 seeds of that draw (the source model is one).
  * Not here yet: the real CBCT (a source model trained on the planning CT crop, the same
    patient's CBCT as the shifted scan).

CPU time: estimated at ~30 minutes on 2 cores, not yet run in full (the source model is cached).
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
from _common import CACHE, ROOT, quiet_lightning, write_result

RESULT = ROOT / "bench" / "results" / "tta.json"
WORK = CACHE / "tta"
SPACING = (4.0, 4.0, 4.0)
STREAM = (("ct", 6, 300), ("cbct", 8, 400), ("cbct_tst", 8, 500), ("ct", 6, 600))
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
        dm = SegmentationDataModule(
            data_dir=str(folder / "source_ct"),
            phantom=PhantomCohort(n=16, variant="ct", seed=0, shape=(64, 64, 64), spacing=SPACING),
            spacing=spacing, patch_size=patch, batch_size=2, num_samples=1, num_workers=2, val_fraction=0.125,
        )  # fmt: skip
    else:
        dm = SegmentationDataModule(
            datalist=str(datalist), spacing=spacing, patch_size=patch, batch_size=1, num_samples=2, num_workers=2
        )
    dm.prepare_data()
    dm.setup("fit")
    net = create_net("resenc_unet", filters=[8, 16, 32, 64], out_channels=dm.num_classes)
    task = SegmentationTask(net, labels=dm.labels, spacing=spacing, patch_size=patch, lr=3e-3, modality=dm.modality)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    return save_model_folder(task.net, task.model_card(), model_dir)


def _stream(folder: Path) -> list[dict[str, str]]:
    """The test folder: cases named so that their order is the stream's (domain blocks)."""
    import shutil

    from medct.phantom import write_cohort

    scans = folder / "stream"
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
                shutil.copy(src / e["image"], dst)
            cases.append({"name": name, "domain": variant, "block": str(block), "label": str(src / e["label"])})
            k += 1
    return cases


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
    from medct.checkpoint import read_model_card
    from medct.io import read_volume
    from medct.runner import segment_paths

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 source steps, one seed, tent only")
    parser.add_argument("--source-steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    global WORK
    if args.quick:
        WORK = CACHE / "tta_quick"
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.source_steps or (20 if args.quick else 600)
    methods = ("tent",) if args.quick else METHODS
    quiet_lightning()
    t0 = time.perf_counter()
    model = _train_source(WORK / f"source_{steps}", None, steps, SPACING, [32, 32, 32])
    cases = _stream(WORK)
    arms: list[tuple[str, str | None, str]] = [("none", None, "case")]
    arms += [(f"{m}_{r}", m, r) for m in methods for r in ("case", "never")]
    rows: list[dict[str, Any]] = []
    for arm, method, reset in arms:
        for seed in seeds if method else seeds[:1]:
            per_case = _run(model, WORK / "stream", WORK / "out" / f"{arm}_s{seed}", cases, method, reset, seed)
            rows += [{"arm": arm, "seed": seed, **r} for r in per_case]
            by = {
                d: statistics.fmean([r["dice"] for r in per_case if r["domain"] == d])
                for d in ("ct", "cbct", "cbct_tst")
            }
            print(f"{arm} seed {seed}: " + ", ".join(f"{d} {v:.3f}" for d, v in by.items()), flush=True)

    domains = ("ct", "cbct", "cbct_tst")
    summary: dict[str, Any] = {}
    print(f"\n{'arm':<14}" + "".join(f"{d:>20}" for d in domains) + f"{'last CT block':>20}{'reverted':>10}")
    for arm, _, _ in arms:
        entry: dict[str, Any] = {}
        line = f"{arm:<14}"
        for d in (*domains, "ct_last_block"):
            per_seed = []
            for seed in {r["seed"] for r in rows if r["arm"] == arm}:
                sel = [r["dice"] for r in rows if r["arm"] == arm and r["seed"] == seed and
                       (r["domain"] == d if d != "ct_last_block" else r["block"] == len(STREAM) - 1)]  # fmt: skip
                per_seed.append(statistics.fmean(sel))
            m = statistics.fmean(per_seed)
            sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            entry[d] = {"mean": round(m, 4), "sd": round(sd, 4)}
            line += f"{m:>12.3f} ± {sd:<5.3f}"
        entry["reverted_cases"] = sum(1 for r in rows if r["arm"] == arm and r["reverted"])
        summary[arm] = entry
        print(line + f"{entry['reverted_cases']:>10}")

    base = summary["none"]
    gains = {}
    for arm, _method, _ in arms[1:]:
        shift_gain = statistics.fmean([summary[arm][d]["mean"] - base[d]["mean"] for d in ("cbct", "cbct_tst")])
        source_cost = base["ct"]["mean"] - summary[arm]["ct"]["mean"]
        gains[arm] = {"gain_on_shifts": round(shift_gain, 4), "source_cost": round(source_cost, 4)}
    best = max(gains, key=lambda a: gains[a]["gain_on_shifts"]) if gains else None
    goal = {
        "target": "best method gains >= 0.05 Dice on the phantom shifts (mean of CBCT, CBCT-TST), no collapse, <= 0.01 cost on CT",
        "per_arm": gains,
        "best": best,
        "met": bool(best)
        and gains[best]["gain_on_shifts"] >= 0.05
        and gains[best]["source_cost"] <= 0.01
        and summary[best]["reverted_cases"] == 0,
    }
    print("\ngoal:", json.dumps(goal))
    write_result(
        args.out,
        "tta",
        {
            "settings": {
                "source_steps": steps,
                "seeds": seeds,
                "stream": STREAM,
                "methods": methods,
                "adapt_steps": 10,
            },
            "rows": rows,
            "summary": summary,
            "goal": goal,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
