"""Training throughput per recipe family: fp32 vs medct's default precision policy (bf16 autocast on
CPUs with AMX / AVX-512 BF16), with and without channels_last_3d, against a bare PyTorch loop.

Question (issue 31): how much faster does every recipe train with bf16 autocast (and
channels_last_3d where it helps) than in fp32, does `medct fit` lose time against a hand-written
loop, and does bf16 change the loss curve?

Design: each family is its own recipe in configs/ at the recipe's network, patch and batch, run by
MedCTCLI as `medct fit --config RECIPE` runs it (its DataLoader workers, cache, augmentation),
on a small phantom cohort of the recipe's own shape (4 cases: a throughput question), for
`--warmup` + `--steps` optimiser steps (the first bf16 steps build oneDNN's kernels: 1-3 s). A callback times each step (data waiting between steps is
reported apart). Arms, interleaved per family and repeated `--repeats` times in one process:
  fp32     `--precision fp32 --channels_last false`
  bf16     `--precision bf16 --channels_last false`
  bf16_cl  `--precision bf16 --channels_last true`
The "default" is the arm `--precision auto` picks on this machine (bf16 unless the family's
`bf16_cpu` is off, with channels_last as the family's `channels_last_cpu`). Turbolift's attention U-Net: the chain's shared recipe on its
first stage's data. Latent diffusion: the recipe's U-Net on the latents of an untrained tiny VAE
(tests/conftest.make_text2ct_parts), since a trained VAE is another recipe's output.

Ceiling: a bare loop for the segmentation recipe (the same network, the same batches fetched
beforehand and kept in memory, the same precision and memory format, the task's own loss and
optimiser): `medct fit`'s step time over the bare loop's.

Loss curves: the segmentation recipe narrowed (ResEnc 8-32, 32^3 patches, 8 phantoms at 64^3) for
`--curve-steps` steps, fp32 and bf16, seeds 0..2; per 50-step window the mean training loss, and
whether bf16 minus fp32 lies within two standard errors of the seed-to-seed spread.

Goals: default >= 2x fp32 steps/s for every 3D convolution family; `medct fit` >= 0.9x the bare
loop; loss curves within run-to-run noise. Writes bench/results/train_throughput.json.

Usage: python bench/train_throughput.py [--quick] [--families seg_resenc,spark,...]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _common import CACHE, ROOT, StepTimer, all_met, mean_sd, paired_goal, quiet_lightning, write_result

RESULT = ROOT / "bench" / "results" / "train_throughput.json"
WORK = CACHE / "train_throughput"
CONFIGS = ROOT / "configs"
# family -> (recipe, has 3D convolutions: the families the 2x goal is about)
FAMILIES: dict[str, tuple[str, bool]] = {
    "seg_resenc": ("finetune/seg_phantom.yaml", True),
    "attention_unet": ("finetune/turbolift_phantom.yaml", True),
    "spark": ("pretrain/spark.yaml", True),
    "simclr": ("pretrain/simclr.yaml", True),
    "volume_fusion": ("pretrain/volume_fusion.yaml", True),
    "bm_mae": ("pretrain/bm_mae.yaml", False),  # a ViT: patch embedding, then attention and MLPs
    "vae": ("synthesis/vae_phantom.yaml", True),
    "ldm": ("synthesis/ldm_phantom.yaml", True),
    "sct_2p5d": ("synthesis/sct_cbct_phantom.yaml", False),  # 2D convolutions on slices with context
    "motion": ("synthesis/motion_phantom.yaml", False),  # a transformer over displacement fields
}
ARMS: dict[str, list[str]] = {
    "fp32": ["--precision", "fp32", "--channels_last", "false"],
    "bf16": ["--precision", "bf16", "--channels_last", "false"],
    "bf16_cl": ["--precision", "bf16", "--channels_last", "true"],
}
TARGET_SPEEDUP = 2.0
TARGET_CEILING = 0.9
WINDOW = 50


# ----------------------------------------------------------------------------- recipes


def small_recipe(family: str, work: Path) -> Path:
    """The family's recipe with a small phantom cohort under `work`, no checkpoints or validation."""
    rel, _ = FAMILIES[family]
    cfg = yaml.safe_load((CONFIGS / rel).read_text())
    if "turbolift" in cfg:  # the chain's shared recipe on its first stage's data
        stage = cfg.pop("turbolift")["stages"][0]
        cfg["data"]["init_args"].update(copy.deepcopy(stage["data"]))
    cfg.pop("seed_everything", None)
    cfg["trainer"] = {
        **{k: v for k, v in cfg.get("trainer", {}).items() if k in ("accumulate_grad_batches", "gradient_clip_val")},
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": -1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(work / "runs"),
    }
    model = cfg["model"]["init_args"]
    if model.get("pretrained_encoder"):
        model["pretrained_encoder"] = None
    data = cfg["data"]["init_args"]
    if "phantom" in data:
        data["phantom"] = {**data["phantom"], "n": 4}
    if "phantom_patients" in data:
        data["phantom_patients"] = 2
    if "phantom_patients" not in data:
        data["data_dir"] = str(work / "data")
    if "cache_dir" in data:
        data["cache_dir"] = str(work / "cache")
    if data.get("align") == "elastix":  # the pairs' alignment is set-up, not training: the cheapest preset
        data["align_preset"] = "rigid"
    if "vae" in model and "clip" in model:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_text2ct_parts

        net = model["net"]["init_args"]
        spacing = tuple(data["preprocessing"]["spacing"])
        vae, clip = make_text2ct_parts(work / "parts", spacing, 32, embed_dim=int(net["cross_attention_dim"]))
        model["vae"], model["clip"] = str(vae), str(clip)
    path = work / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_arm(recipe: Path, flags: list[str], steps: int, seed: int = 0) -> tuple[Any, Any]:
    """(cli, timer) after `steps` optimiser steps of `medct fit` on `recipe` with `flags`."""
    import lightning.pytorch as pl

    from medct.lightning_cli import MedCTCLI

    pl.seed_everything(seed, verbose=False)
    cli = MedCTCLI(["--config", str(recipe), *flags, f"--trainer.max_steps={steps}"], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, timer


def measure(family: str, arm: str, steps: int, warmup: int) -> dict[str, Any]:
    work = WORK / family
    recipe = small_recipe(family, work)
    cli, timer = run_arm(recipe, ARMS[arm], warmup + steps)
    comp = timer.steps[warmup:]
    waits = timer.waits[warmup - 1 :] if warmup else [0.0, *timer.waits]
    total = [c + w for c, w in zip(comp, waits, strict=False)]
    return {
        "family": family,
        "arm": arm,
        "precision": str(cli.trainer.precision),
        "channels_last": any(type(c).__name__ == "ChannelsLast" for c in cli.trainer.callbacks),
        "steps_timed": len(comp),
        "step_s_median": round(statistics.median(comp), 4),
        "wait_s_median": round(statistics.median(waits[: len(comp)]), 4) if waits else 0.0,
        "steps_per_s": round(len(total) / sum(total), 4),
        "compute_steps_per_s": round(len(comp) / sum(comp), 4),
        "loss_last": timer.losses[-1],
    }


# ----------------------------------------------------------------------------- bare loop


def bare_loop(arm: str, steps: int, warmup: int) -> dict[str, Any]:
    """The segmentation recipe's network, loss and optimiser in a hand-written loop over batches
    fetched beforehand (no DataLoader, no Lightning), at the arm's precision and memory format."""
    import torch

    from medct.precision import channels_last

    work = WORK / "seg_resenc"
    recipe = small_recipe("seg_resenc", work)
    # the task, data and optimiser exactly as the recipe builds them (0 fit steps: set-up only)
    cli, _ = run_arm(recipe, ARMS[arm], 0)
    task, dm = cli.model, cli.datamodule
    batches = []
    for batch in dm.train_dataloader():
        batches.append((batch["image"], batch["label"]))
        if len(batches) == warmup + steps:
            break
    if ARMS[arm][3] == "true":
        channels_last(task)
    opt = task.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt[0][0] if isinstance(opt, tuple) else opt
    bf16 = ARMS[arm][1] == "bf16"
    task.train()
    times = []
    for i in range(warmup + steps):
        image, label = batches[i % len(batches)]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = task.supervised_loss(task.net(image), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    comp = times[warmup:]
    return {"arm": arm, "step_s_median": round(statistics.median(comp), 4), "steps_timed": len(comp)}


# ----------------------------------------------------------------------------- loss curves


def curve_recipe(work: Path) -> Path:
    cfg = yaml.safe_load(small_recipe("seg_resenc", work).read_text())
    cfg["model"]["init_args"]["net"]["init_args"]["filters"] = [8, 16, 32]
    data = cfg["data"]["init_args"]
    data["phantom"] = {**data["phantom"], "n": 8}
    data["sampling"] = {**data["sampling"], "patch_size": [32, 32, 32]}
    path = work / "curve.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def loss_curves(steps: int, seeds: int) -> dict[str, Any]:
    work = WORK / "curve"
    recipe = curve_recipe(work)
    curves: dict[str, list[list[float]]] = {"fp32": [], "bf16": []}
    for seed in range(seeds):
        for arm in curves:  # interleaved
            _, timer = run_arm(recipe, ARMS[arm], steps, seed=seed)
            curves[arm].append(timer.losses)
            print(f"  curve seed {seed} {arm}: last-{WINDOW} mean loss {statistics.fmean(timer.losses[-WINDOW:]):.4f}")
    windows = []
    for start in range(0, steps, WINDOW):
        per = {arm: [statistics.fmean(c[start : start + WINDOW]) for c in cs] for arm, cs in curves.items()}
        (m32, s32), (m16, s16) = mean_sd(per["fp32"]), mean_sd(per["bf16"])
        se = math.sqrt(s32**2 / seeds + s16**2 / seeds)
        windows.append(
            {
                "steps": [start, min(start + WINDOW, steps)],
                "fp32_mean_sd": [round(m32, 4), round(s32, 4)],
                "bf16_mean_sd": [round(m16, 4), round(s16, 4)],
                "difference": round(m16 - m32, 4),
                "two_se": round(2 * se, 4),
                "within_noise": abs(m16 - m32) <= 2 * se,
            }
        )
    return {"steps": steps, "seeds": seeds, "windows": windows, "curves": curves}


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 timed steps, 60-step curves, 2 seeds")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of the families")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm (default: quick 3, full 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (first allocations, workers)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: quick 1, full 2)")
    parser.add_argument("--curve-steps", type=int, default=None, help="loss-curve steps (default: quick 60, full 300)")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON results")
    args = parser.parse_args()
    quiet_lightning()
    import torch

    from medct.lightning_cli import MedCTCLI  # noqa: F401  (imported once, outside the timings)
    from medct.precision import cpu_has_bf16, resolve_precision

    if not cpu_has_bf16():
        print("this CPU has no native bf16 (AMX / AVX-512 BF16): the bf16 arms would be emulated; nothing to measure")
        return 1
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 2)
    curve_steps = args.curve_steps or (60 if args.quick else 300)
    seeds = 2 if args.quick else 3

    rows: list[dict[str, Any]] = []
    for r in range(repeats):
        for family in families:
            for arm in ARMS:
                row = {**measure(family, arm, steps, args.warmup), "repeat": r}
                rows.append(row)
                print(
                    f"  {family:15s} {arm:8s} run {r}: {row['steps_per_s']:.3f} steps/s "
                    f"(step {row['step_s_median']:.3f} s, data wait {row['wait_s_median']:.3f} s)",
                    flush=True,
                )
    bare = []
    if "seg_resenc" in families:
        for r in range(repeats):
            for arm in ("fp32", "bf16"):
                bare.append({**bare_loop(arm, steps, args.warmup), "repeat": r})
                print(f"  bare loop {arm} run {r}: step {bare[-1]['step_s_median']:.3f} s", flush=True)
    curves = loss_curves(curve_steps, seeds) if "seg_resenc" in families else None

    auto_precision = resolve_precision("auto", torch.device("cpu"))
    summary: dict[str, dict[str, Any]] = {}
    goals: dict[str, Any] = {}
    print()
    print(f"{'family':15s} {'fp32':>8s} {'bf16':>8s} {'bf16_cl':>8s}  steps/s (median)  default  x fp32")
    for family in families:
        per = {arm: [x["steps_per_s"] for x in rows if x["family"] == family and x["arm"] == arm] for arm in ARMS}
        task_class = _task_class(family)
        cl_default = bool(getattr(task_class, "channels_last_cpu", False))
        auto = resolve_precision("auto", torch.device("cpu"), bool(getattr(task_class, "bf16_cpu", True)))
        default = ("bf16_cl" if cl_default else "bf16") if auto == "bf16" else "fp32"
        ratios = [d / f for d, f in zip(per[default], per["fp32"], strict=True)]
        summary[family] = {
            "steps_per_s_median": {arm: round(statistics.median(v), 4) for arm, v in per.items()},
            "default_arm": default,
            "default_over_fp32": [round(x, 3) for x in ratios],
            "bf16_cl_over_bf16": [round(a / b, 3) for a, b in zip(per["bf16_cl"], per["bf16"], strict=True)],
            "conv3d": FAMILIES[family][1],
        }
        med = summary[family]["steps_per_s_median"]
        print(
            f"{family:15s} {med['fp32']:8.3f} {med['bf16']:8.3f} {med['bf16_cl']:8.3f}  "
            f"{'':16s} {default:8s} {statistics.median(ratios):.2f}"
        )
        if FAMILIES[family][1]:
            goals[f"speedup_{family}"] = paired_goal(
                f"{family}: default >= {TARGET_SPEEDUP:g}x fp32 steps/s", ratios, TARGET_SPEEDUP, min_pairs=1
            )
    if bare:
        fit_step = {
            arm: [x["step_s_median"] for x in rows if x["family"] == "seg_resenc" and x["arm"] == arm]
            for arm in ("fp32", "bf16")
        }
        bare_step = {arm: [x["step_s_median"] for x in bare if x["arm"] == arm] for arm in ("fp32", "bf16")}
        ratio = {arm: [b / f for b, f in zip(bare_step[arm], fit_step[arm], strict=True)] for arm in bare_step}
        summary["bare_loop"] = {
            "bare_step_s": bare_step,
            "fit_step_s": fit_step,
            "fit_speed_over_bare": {k: [round(v, 3) for v in vs] for k, vs in ratio.items()},
        }
        print(f"medct fit step time / bare loop: {summary['bare_loop']['fit_speed_over_bare']}")
        goals["fit_vs_bare_loop"] = paired_goal(
            f"medct fit >= {TARGET_CEILING:g}x the bare loop's speed (bf16)", ratio["bf16"], TARGET_CEILING,
            min_pairs=1,
        )  # fmt: skip
    if curves:
        within = [w["within_noise"] for w in curves["windows"]]
        for w in curves["windows"]:
            print(
                f"loss steps {w['steps'][0]:3d}-{w['steps'][1]:3d}: fp32 {w['fp32_mean_sd'][0]:.4f} ± "
                f"{w['fp32_mean_sd'][1]:.4f}, bf16 {w['bf16_mean_sd'][0]:.4f} ± {w['bf16_mean_sd'][1]:.4f}, "
                f"difference {w['difference']:+.4f} (2 SE {w['two_se']:.4f})"
            )
        goals["loss_curves"] = {
            "target": f"bf16 minus fp32 training loss within 2 standard errors of the seed spread in every "
            f"{WINDOW}-step window ({curves['seeds']} seeds each)",
            "measured": {"windows_within": sum(within), "windows": len(within)},
            "met": all(within),
        }
    write_result(
        args.out,
        "train_throughput",
        {
            "settings": {
                "families": {f: FAMILIES[f][0] for f in families},
                "arms": {k: " ".join(v) for k, v in ARMS.items()},
                "default_precision_here": auto_precision,
                "steps_timed": steps,
                "warmup": args.warmup,
                "repeats": repeats,
                "order": "per repeat: family by family, arms fp32, bf16, bf16_cl",
                "cohort": "4 phantoms of the recipe's shape (2 patients for motion)",
                "ldm_parts": "untrained tiny VAE / CLIP (tests/conftest.make_text2ct_parts)",
                "torch_threads": torch.get_num_threads(),
            },
            "rows": rows,
            "bare_loop_rows": bare,
            "summary": summary,
            "loss_curves": curves,
            "goal": goals,
            "all_met": all_met(list(goals.values())),
        },
        quick=args.quick,
    )
    return 0


def _task_class(family: str) -> type:
    """The task class a family's recipe names (its `channels_last_cpu` default)."""
    import importlib

    cfg = yaml.safe_load((CONFIGS / FAMILIES[family][0]).read_text())
    module, name = cfg["model"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    sys.exit(main())
