"""Pretraining throughput: samples per second of each method at 96^3 crops, and how much of a step
is spent waiting for data.

Question (issue 8): is pretraining compute-bound? Goal: data waiting < 10 % of step time for every
method, with the recipes' data settings (2 DataLoader workers, disk cache of the deterministic
preprocessing).

Design: each method's task from its recipe network (`resenc_unet` (16, 32, 64, 128) for SparK,
SimCLR, MoCo v2 and Volume Fusion; `mm_unetr` hidden 192 / depth 8 on three contrast phases for
BM-MAE) is trained with Lightning for `--steps` steps on 96^3 crops (2 crops per step: one volume x
2 crops; the contrastive methods take two 64^3 views of each 96^3 crop, as nnssl) from a phantom
cohort of 128^3 voxels at 3 mm, fp32 on CPU (bf16 autocast when a CUDA GPU is present). A
callback times every step: the time between the end of one training batch and the start of the
next is data waiting (Lightning fetching the next batch from the workers), the rest is compute. The
first `--warmup` steps are excluded (worker start-up, first allocations). The cache is filled in
`prepare_data`, before the timed steps, as in a real run's later epochs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from _common import CACHE, ROOT, StepTimer, all_met, paired_goal, quiet_trainer, write_result

from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

RESULT = ROOT / "bench" / "results" / "pretrain_throughput.json"
WORK = CACHE / "pretrain_throughput"
SPACING = (3.0, 3.0, 3.0)
PATCH = (96, 96, 96)
METHODS = ("spark", "simclr", "moco", "volume_fusion", "bm_mae")
PHASES = ("native", "arterial", "venous")


def task_for(method: str) -> tuple[Any, str]:
    """(task, data key) of `method` at the benchmark's patch."""
    from medct.nets import create_net

    common = {"spacing": SPACING, "patch_size": PATCH}
    if method == "bm_mae":
        from medct.pretrain.bm_mae import BMMAETask

        net = create_net("mm_unetr", modalities=list(PHASES), hidden_size=192, depth=8, num_heads=6, mlp_dim=768)
        return BMMAETask(net, decoder_dim=96, decoder_depth=3, decoder_heads=6, **common), "phases"
    net_args = {"filters": [16, 32, 64, 128]}
    if method == "spark":
        from medct.pretrain.spark import SparKTask

        return SparKTask(create_net("resenc_unet", **net_args), mask_stride=16, **common), "image"
    if method in ("simclr", "moco"):
        from medct.pretrain.contrastive import ContrastiveTask

        return ContrastiveTask(
            create_net("resenc_unet", **net_args),
            method=method,
            crop_size=(64, 64, 64),
            proj_hidden=512,
            proj_dim=128,
            queue_size=1024,
            **common,
        ), "image"
    from medct.pretrain.volume_fusion import VolumeFusionTask

    return VolumeFusionTask(create_net("resenc_unet", out_channels=5, **net_args), **common), "image"


def measure(method: str, steps: int, warmup: int, workers: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from medct.data import PhantomCohort, VolumeDataModule

    pl.seed_everything(0, verbose=False)
    task, key = task_for(method)
    multi = key == "phases"
    dm = VolumeDataModule(
        keys=[key],
        data_dir=str(WORK / ("multiphase" if multi else "ct")),
        num_workers=workers,
        cache_dir=str(WORK / "cache"),
        phantom=PhantomCohort(
            n=6 if multi else 8,
            variant="ct",
            seed=0,
            shape=(128, 128, 128),
            spacing=SPACING,
            phases=PHASES if multi else None,
        ),
        preprocessing=Preprocessing(spacing=SPACING),
        sampling=Sampling(patch_size=PATCH, batch_size=1, num_samples=2),
        split=Split(val_fraction=0.2),
    )
    timer = StepTimer()
    gpu = torch.cuda.is_available()
    trainer = quiet_trainer(
        warmup + steps, WORK / "runs", [timer], accelerator="auto", precision="bf16-mixed" if gpu else "32-true"
    )
    trainer.fit(task, datamodule=dm)
    waits = timer.waits[warmup:]
    comp = timer.steps[warmup + 1 :]  # aligned with the waits before them
    total = [w + c for w, c in zip(waits, comp, strict=False)]
    crops = 2
    return {
        "method": method,
        "device": "cuda" if gpu else "cpu",
        "precision": "bf16-mixed" if gpu else "fp32",
        "crops_per_step": crops,
        "steps_timed": len(total),
        "step_seconds_median": round(statistics.median(total), 3),
        "data_wait_seconds_median": round(statistics.median(waits[: len(total)]), 4),
        "data_wait_fraction": round(sum(waits[: len(total)]) / sum(total), 4),
        "samples_per_second": round(crops * len(total) / sum(total), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps per method")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 8, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (the recipes': 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 8)
    warnings.filterwarnings("ignore")
    import logging

    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    print(f"{'method':<15} {'device':>6} {'step s':>8} {'wait s':>8} {'wait %':>8} {'samples/s':>10}")
    for method in args.methods:
        r = measure(method, steps, args.warmup, args.workers)
        rows.append(r)
        print(
            f"{method:<15} {r['device']:>6} {r['step_seconds_median']:>8.3f} {r['data_wait_seconds_median']:>8.4f} "
            f"{100 * r['data_wait_fraction']:>7.2f}% {r['samples_per_second']:>10.3f}",
            flush=True,
        )
    worst = max(rows, key=lambda r: r["data_wait_fraction"])
    # one measurement (the mean over the timed steps) per method: judged by _common.paired_goal as such
    checks = {
        r["method"]: paired_goal(f"{r['method']}: data waiting < 10 %", [0.10], [r["data_wait_fraction"]], min_pairs=1)
        for r in rows
    }
    goal = {
        "target": "data waiting < 10 % of step time for every method (96^3 crops)",
        "measured": {r["method"]: r["data_wait_fraction"] for r in rows},
        "worst": worst["method"],
        "checks": checks,
        "met": all_met(list(checks.values())),
    }
    print("\ngoal:", goal)
    write_result(
        args.out,
        "pretrain_throughput",
        {
            "settings": {
                "steps": steps,
                "warmup": args.warmup,
                "workers": args.workers,
                "patch": PATCH,
                "spacing": SPACING,
            },
            "rows": rows,
            "goal": goal,
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
