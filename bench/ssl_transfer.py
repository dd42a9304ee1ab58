"""Does self-supervised pretraining help when labels are few? Each method against scratch.

Question (issue 8): pretrain the same encoder with each medct method on unlabelled volumes, then
fine-tune with 1, 2 and 4 labelled volumes against the same network from scratch with the same
steps; also classify volumes with a linear probe and by fine-tuning (8 and 32 labels).

Design:
  * Network: `resenc_unet` with filters (8, 16, 32, 64) (4 stages, stride 8), 32^3 crops at 4 mm
    (sized for a 2-core CPU: one step of this net on 4 x 48^3 crops takes ~1 s there); the same
    backbone for every arm and every task, so only the encoder's starting weights differ.
  * Unlabelled pool (labels unused): 42 phantom CTs (native / arterial / venous phases), 12
    phantom CBCT-like volumes and every real CT in ../shared/data (planning CT, CBCT, TotalSegmentator
    abdomen, elastix lung crop, POPI DICOM slab).
  * Pretraining: SparK, SimCLR, MoCo v2, Volume Fusion, each `--pretrain-steps` steps (batch 2
    volumes x 2 crops), once (seed 0); encoders are exported with `medct`'s own export and cached.
    SparK masks on the encoder's deepest grid (stride 8 here: a 4^3 grid of 8^3 cells per 32^3
    crop; the issue's stride 16 is for 5-stage encoders, whose deepest grid it is). The
    contrastive views are 24^3 sub-crops of the 32^3 crop (>= 50 % overlap per axis).
  * Segmentation fine-tuning: phantom CBCT-like cases (a domain the CT-heavy pool covers only in
    part), 1 / 2 / 4 labelled volumes from a pool of 4, 11 organs, evaluated (Dice, mean over the
    organs) on 4 held-out CBCT phantoms; and the real pair: fine-tune on the one labelled planning
    CT (crop to the CBCT field of view: stomach+duodenum, small bowel, lungs), evaluate on the same
    patient's CBCT with its own contours. Same steps and learning rate for every arm, 3 seeds
    (seed = initialisation of the decoder/head, choice of labelled volumes, crop sampling).
  * Classification: contrast phase (3 classes) of phantom CTs, whole volumes at 8 mm (32^3); linear
    probe (logistic regression on the frozen, pooled encoder features) and fine-tuning
    (ClassificationTask), 8 and 32 labels, accuracy and AUC on 9 held-out volumes, 3 seeds.
  * Goal: each method beats scratch in the low-label setting (1 and 2 labelled volumes, phantom
    CBCT): mean Dice of the method > mean Dice of scratch. Reported per method, met or not.

Runs on CPU in about 45 minutes (2 cores); `--quick` is a smoke run of the whole pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _common import CACHE, DATA, ROOT, all_met, mean_sd, paired_goal, quiet_trainer, write_result

from medct.pretrain.base import Optimisation
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

RESULT = ROOT / "bench" / "results" / "ssl_transfer.json"
WORK = CACHE / "ssl_transfer"
NET_ARGS = {"filters": [8, 16, 32, 64]}
SPACING = (4.0, 4.0, 4.0)
PATCH = (32, 32, 32)
CLS_SPACING = (8.0, 8.0, 8.0)  # classification sees whole volumes at 8 mm: (32, 32, 32)
CLS_PATCH = (32, 32, 32)
ARMS = ("scratch", "spark", "simclr", "moco", "volume_fusion")
PHASES = ("native", "arterial", "venous")


# ----------------------------------------------------------------------------- data


def _write(folder: Path, **kw: Any) -> Path:
    from medct.phantom import write_cohort

    if not (folder / "dataset.json").is_file():
        write_cohort(folder, shape=(64, 64, 64), spacing=SPACING, **kw)
    return folder / "dataset.json"


def _entries(ds_json: Path) -> list[dict[str, Any]]:
    meta = json.loads(ds_json.read_text())
    return [
        {**e, "image": str(ds_json.parent / e["image"]), "label": str(ds_json.parent / e["label"])}
        for e in meta["training"]
    ]


def _datalist(path: Path, training: list[dict[str, Any]], validation: list[dict[str, Any]], **extra: Any) -> Path:
    path.write_text(json.dumps({"training": training, "validation": validation, **extra}, indent=1))
    return path


def build_data(n_cls: int) -> dict[str, Path]:
    """Write the cohorts and datalists under WORK/data (once) and return the datalists."""
    d = WORK / "data"
    d.mkdir(parents=True, exist_ok=True)
    cls = []
    for i, phase in enumerate(PHASES):
        cls += _entries(_write(d / f"ct_{phase}", n=n_cls, variant="ct", phase=phase, seed=100 + i))
    cbct_unlabelled = _entries(_write(d / "cbct_unlabelled", n=12, variant="cbct", seed=400))
    cbct = _entries(_write(d / "cbct_labelled", n=8, variant="cbct", seed=500))
    real = []
    pct = DATA / "pancreas_ct_cbct"
    for rel in (
        "pancreas_ct_cbct/planct.nii.gz",
        "pancreas_ct_cbct/cbct_CB07_on_planct_grid.nii.gz",
        "totalseg/example_ct.nii.gz",
        "elastix_lung_small/3DCT_lung_baseline_small.mha",
        "popi_phase00_10slices_dicom",
    ):
        if (DATA / rel).exists():
            real.append({"image": str(DATA / rel)})
    pool = [{"image": e["image"]} for e in cls + cbct_unlabelled] + real
    # class split: per phase, the last 3 volumes are held out
    held = {e["image"] for p in PHASES for e in [x for x in cls if x["phase"] == p][-3:]}
    from medct.phantom import LABELS

    out = {
        "pool": _datalist(d / "pool.json", pool, []),
        "cbct_seg": _datalist(
            d / "cbct_seg.json",
            cbct[:4],
            cbct[4:],
            labels={str(k): v for k, v in LABELS.items()},
            modality={"0": "CBCT"},
        ),
        "cls": _datalist(
            d / "cls.json", [e for e in cls if e["image"] not in held], [e for e in cls if e["image"] in held]
        ),
    }
    crop = pct / "crop_cbct_fov"
    if crop.is_dir():
        names = json.loads((pct / "label_map.json").read_text())["planct_labels"]
        out["real_seg"] = _datalist(
            d / "real_seg.json",
            [{"image": str(crop / "planct_crop.nii.gz"), "label": str(crop / "planct_labels_crop.nii.gz")}],
            [
                {
                    "image": str(crop / "cbct_CB07_on_planct_grid_crop.nii.gz"),
                    "label": str(crop / "cbct_CB07_labels_crop.nii.gz"),
                }
            ],
            labels={"0": "background", **{k: v.replace("_planCT", "") for k, v in names.items()}},
        )
    out["real_count"] = len(real)  # type: ignore[assignment]
    return out


# ----------------------------------------------------------------------------- helpers


def _trainer(max_steps: int, root: Path, val: bool = False) -> Any:
    return quiet_trainer(max_steps, root, validate=val)


def _net(out_channels: int = 2) -> Any:
    from medct.nets import create_net

    return create_net("resenc_unet", out_channels=out_channels, **NET_ARGS)


def pretrain(arm: str, pool: Path, steps: int) -> tuple[Path, float]:
    """The exported encoder folder of `arm` (cached by settings) and its pretraining seconds."""
    import lightning.pytorch as pl
    import torch

    from medct.checkpoint import export_lightning_checkpoint
    from medct.data import VolumeDataModule

    key = hashlib.sha1(json.dumps([arm, NET_ARGS, PATCH, SPACING, steps, 2]).encode()).hexdigest()[:10]
    out = WORK / "encoders" / f"{arm}_{key}"
    info = out / "bench_info.json"
    if info.is_file():
        return out, float(json.loads(info.read_text())["seconds"])
    pl.seed_everything(0, verbose=False)
    common = {"spacing": SPACING, "patch_size": PATCH}
    if arm == "spark":
        from medct.pretrain.spark import SparKTask

        task = SparKTask(
            _net(), mask_ratio=0.75, mask_stride=8, **common, optim=Optimisation(lr=3e-3, warmup_steps=steps // 20)
        )
    elif arm in ("simclr", "moco"):
        from medct.pretrain.contrastive import ContrastiveTask

        task = ContrastiveTask(
            _net(),
            method=arm,
            crop_size=(24, 24, 24),
            temperature=0.5 if arm == "simclr" else 0.2,
            proj_hidden=256,
            proj_dim=128,
            queue_size=256,
            momentum=0.99,
            **common,
            optim=Optimisation(lr=1e-3, warmup_steps=steps // 20),
        )
    elif arm == "volume_fusion":
        from medct.pretrain.volume_fusion import VolumeFusionTask

        task = VolumeFusionTask(_net(5), **common, optim=Optimisation(lr=3e-3, warmup_steps=steps // 20))
    else:
        raise ValueError(arm)
    dm = VolumeDataModule(
        keys=["image"],
        datalist=str(pool),
        num_workers=2,
        cache_dir=str(WORK / "cache"),
        **common,
        sampling=Sampling(batch_size=2, num_samples=2),
        split=Split(val_fraction=0.05),
    )
    trainer = _trainer(steps, WORK / "runs")
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    seconds = time.perf_counter() - start
    ckpt = WORK / "runs" / f"{arm}_{key}.ckpt"
    trainer.save_checkpoint(ckpt)
    export_lightning_checkpoint(ckpt, out)
    ckpt.unlink()
    loss = trainer.callback_metrics.get("train/loss_epoch", trainer.callback_metrics.get("train/loss"))
    info.write_text(
        json.dumps(
            {"arm": arm, "steps": steps, "seconds": seconds, "final_loss": float(loss) if loss is not None else None}
        )
    )
    del torch
    return out, seconds


def finetune_seg(datalist: Path, encoder: Path | None, n_train: int | None, seed: int, steps: int) -> dict[str, float]:
    """Dice per class and mean on the datalist's validation volumes after `steps` fine-tuning steps."""
    import lightning.pytorch as pl

    from medct.data import SegmentationDataModule
    from medct.finetune.segmentation import SegmentationTask

    pl.seed_everything(seed, verbose=False)
    dm = SegmentationDataModule(
        datalist=str(datalist),
        num_workers=2,
        cache_dir=str(WORK / "cache"),
        preprocessing=Preprocessing(spacing=SPACING),
        sampling=Sampling(patch_size=PATCH, batch_size=1, num_samples=2),
        split=Split(seed=seed, num_train=n_train),
    )
    task = SegmentationTask(
        _net(dm.num_classes),
        labels=dm.labels,
        patch_size=PATCH,
        lr=3e-3,
        sw_batch_size=2,
        sw_overlap=0.25,
        pretrained_encoder=None if encoder is None else str(encoder),
        preprocessing=Preprocessing(spacing=SPACING),
    )
    trainer = _trainer(steps, WORK / "runs", val=True)
    trainer.fit(task, datamodule=dm)
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    return {k.removeprefix("val/"): round(float(v), 4) for k, v in metrics.items() if k.startswith("val/dice")}


def _embeddings(encoder: Path | None, items: list[dict[str, Any]]) -> np.ndarray:
    import torch
    from monai.data import Dataset

    from medct.nets import create_net, load_encoder
    from medct.transforms import Preprocessing, classification_transforms

    torch.manual_seed(0)
    clf = create_net("encoder_classifier", backbone="resenc_unet", backbone_args=NET_ARGS, out_channels=3)
    if encoder is not None:
        load_encoder(clf, encoder)
    clf.eval()
    ds = Dataset(items, classification_transforms(Preprocessing(spacing=CLS_SPACING), CLS_PATCH, train=False))
    with torch.inference_mode():
        return np.stack([clf.embed(ds[i]["image"][None]).numpy()[0] for i in range(len(ds))])


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int
) -> dict[str, float]:
    """Multinomial logistic regression on standardised frozen features (the SSL linear probe)."""
    import torch

    from medct.finetune.classification import roc_auc

    torch.manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.tensor((train_x - mu) / sd, dtype=torch.float32)
    xte = torch.tensor((test_x - mu) / sd, dtype=torch.float32)
    ytr = torch.tensor(train_y)
    head = torch.nn.Linear(xtr.shape[1], 3)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = head(xte).softmax(dim=1)
    acc = float((scores.argmax(1).numpy() == test_y).mean())
    return {"accuracy": round(acc, 4), "auc": round(roc_auc(scores, torch.tensor(test_y), 3), 4)}


def finetune_cls(datalist: Path, encoder: Path | None, n_train: int, seed: int, steps: int) -> dict[str, float]:
    import lightning.pytorch as pl

    from medct.data import ClassificationDataModule
    from medct.finetune.classification import ClassificationTask
    from medct.nets import create_net

    pl.seed_everything(seed, verbose=False)
    dm = ClassificationDataModule(
        class_key="phase",
        classes=list(PHASES),
        datalist=str(datalist),
        num_workers=2,
        cache_dir=str(WORK / "cache"),
        preprocessing=Preprocessing(spacing=CLS_SPACING),
        sampling=Sampling(patch_size=CLS_PATCH, batch_size=4),
        split=Split(seed=seed, num_train=n_train),
    )
    net = create_net("encoder_classifier", backbone="resenc_unet", backbone_args=NET_ARGS, out_channels=3, dropout=0.2)
    task = ClassificationTask(
        net,
        labels=list(PHASES),
        patch_size=CLS_PATCH,
        lr=1e-3,
        pretrained_encoder=None if encoder is None else str(encoder),
        preprocessing=Preprocessing(spacing=CLS_SPACING),
    )
    trainer = _trainer(steps, WORK / "runs", val=True)
    trainer.fit(task, datamodule=dm)
    m = trainer.validate(task, datamodule=dm, verbose=False)[0]
    return {"accuracy": round(float(m["val/accuracy"]), 4), "auc": round(float(m["val/auc"]), 4)}


# ----------------------------------------------------------------------------- main


def judge(seg_rows: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The goal from the per-seed segmentation rows (`_common.paired_goal`): each pretraining method
    beats scratch on Dice (paired by seed) with 1 and with 2 labelled phantom CBCT volumes."""
    per_method: dict[str, Any] = {}
    for arm in arms:
        if arm == "scratch":
            continue
        checks = {}
        for n in (1, 2):

            def dice(a: str, n: int = n) -> list[float]:
                sel = [r for r in seg_rows if r["setting"] == "phantom_cbct" and r["labelled"] == n and r["arm"] == a]
                return [float(r.get("dice_mean", float("nan"))) for r in sorted(sel, key=lambda r: r["seed"])]

            if dice(arm) and dice("scratch"):
                checks[f"phantom_cbct_n{n}"] = paired_goal(
                    f"{arm} beats scratch, {n} labelled", dice(arm), dice("scratch")
                )
        per_method[arm] = {"beats_scratch": checks, "met": all_met(list(checks.values())) if checks else None}
    return {
        "target": "each pretraining method beats scratch (Dice, paired over seeds) with 1 and 2 labelled phantom CBCT volumes",
        "rule": "_common.paired_goal per method and label count",
        "per_method": per_method,
        "met": all_met(list(per_method.values())) if per_method else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed, one label count")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="per method (default 800, quick 4)")
    parser.add_argument("--seg-steps", type=int, default=None, help="fine-tuning steps (default 150, quick 2)")
    parser.add_argument("--cls-steps", type=int, default=None, help="classification fine-tuning steps (default 60)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument(
        "--label-counts", type=int, nargs="+", default=None, help="labelled CBCT volumes (default 1 2 4)"
    )
    parser.add_argument("--no-real", action="store_true", help="skip the real planning CT -> CBCT setting")
    parser.add_argument("--no-cls", action="store_true", help="skip the classification settings")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    p_steps = args.pretrain_steps or (4 if quick else 800)
    s_steps = args.seg_steps or (2 if quick else 150)
    c_steps = args.cls_steps or (2 if quick else 60)
    label_counts = args.label_counts or ([1] if quick else [1, 2, 4])
    cls_counts = [] if args.no_cls else ([8] if quick else [8, 32])
    global WORK
    if quick:
        WORK = CACHE / "ssl_transfer_quick"
    warnings.filterwarnings("ignore")
    import logging

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    t0 = time.perf_counter()
    data = build_data(n_cls=6 if quick else 14)
    encoders: dict[str, Path | None] = {"scratch": None}
    pretrain_rows = []
    for arm in args.arms:
        if arm == "scratch":
            continue
        folder, seconds = pretrain(arm, data["pool"], p_steps)
        encoders[arm] = folder
        info = json.loads((folder / "bench_info.json").read_text())
        pretrain_rows.append(
            {"arm": arm, "steps": p_steps, "seconds": round(seconds, 1), "final_loss": info["final_loss"]}
        )
        print(f"pretrained {arm}: {p_steps} steps in {seconds:.0f} s (final loss {info['final_loss']})", flush=True)

    seg_rows = []
    for n in label_counts:
        for seed in seeds:
            for arm in args.arms:
                d = finetune_seg(data["cbct_seg"], encoders[arm], n, seed, s_steps)
                seg_rows.append({"setting": "phantom_cbct", "labelled": n, "arm": arm, "seed": seed, **d})
                print(f"seg phantom_cbct n={n} seed={seed} {arm}: dice_mean {d.get('dice_mean')}", flush=True)
    if "real_seg" in data and not args.no_real:
        for seed in seeds:
            for arm in args.arms:
                d = finetune_seg(data["real_seg"], encoders[arm], None, seed, s_steps)
                seg_rows.append({"setting": "real_ct_to_cbct", "labelled": 1, "arm": arm, "seed": seed, **d})
                print(f"seg real planCT->CBCT seed={seed} {arm}: dice_mean {d.get('dice_mean')}", flush=True)

    cls_meta = json.loads(Path(data["cls"]).read_text())
    train_items, test_items = cls_meta["training"], cls_meta["validation"]
    ytr_all = np.array([PHASES.index(e["phase"]) for e in train_items])
    yte = np.array([PHASES.index(e["phase"]) for e in test_items])
    cls_rows = []
    for arm in args.arms if cls_counts else ():
        xtr_all, xte = _embeddings(encoders[arm], train_items), _embeddings(encoders[arm], test_items)
        for n in cls_counts:
            for seed in seeds:
                rng = np.random.default_rng(seed)
                pick = np.concatenate(
                    [rng.permutation(np.flatnonzero(ytr_all == c))[: n // 3 + (c < n % 3)] for c in range(3)]
                )
                probe = linear_probe(xtr_all[pick], ytr_all[pick], xte, yte, seed)
                cls_rows.append({"mode": "linear_probe", "labelled": n, "arm": arm, "seed": seed, **probe})
                ft = finetune_cls(data["cls"], encoders[arm], n, seed, c_steps)
                cls_rows.append({"mode": "finetune", "labelled": n, "arm": arm, "seed": seed, **ft})
                print(f"cls n={n} seed={seed} {arm}: probe {probe} finetune {ft}", flush=True)

    # ---- tables
    summary: dict[str, Any] = {"segmentation": {}, "classification": {}}
    print(f"\n{'segmentation (Dice mean)':<28}" + "".join(f"{a:>17}" for a in args.arms))
    settings = sorted({(r["setting"], r["labelled"]) for r in seg_rows}, key=lambda s: (s[0] != "phantom_cbct", s))
    for setting, n in settings:
        line = f"{setting + ' n=' + str(n):<28}"
        for arm in args.arms:
            m, sd = mean_sd(
                [
                    r.get("dice_mean", float("nan"))
                    for r in seg_rows
                    if r["setting"] == setting and r["labelled"] == n and r["arm"] == arm
                ]
            )
            summary["segmentation"].setdefault(f"{setting}_n{n}", {})[arm] = {"mean": round(m, 4), "sd": round(sd, 4)}
            line += f"{m:>10.3f} ± {sd:<5.3f}"
        print(line)
    for metric in ("accuracy", "auc"):
        print(f"\n{'phase classification (' + metric + ')':<28}" + "".join(f"{a:>17}" for a in args.arms))
        for mode in ("linear_probe", "finetune"):
            for n in cls_counts:
                line = f"{mode + ' n=' + str(n):<28}"
                for arm in args.arms:
                    m, sd = mean_sd(
                        [r[metric] for r in cls_rows if r["mode"] == mode and r["labelled"] == n and r["arm"] == arm]
                    )
                    summary["classification"].setdefault(f"{mode}_n{n}_{metric}", {})[arm] = {
                        "mean": round(m, 4),
                        "sd": round(sd, 4),
                    }
                    line += f"{m:>10.3f} ± {sd:<5.3f}"
                print(line)

    goal = judge(seg_rows, list(args.arms))
    print("\ngoal:", json.dumps(goal["per_method"]))
    write_result(
        args.out,
        "ssl_transfer",
        {
            "settings": {
                "quick": quick,
                "seeds": seeds,
                "pretrain_steps": p_steps,
                "seg_steps": s_steps,
                "cls_steps": c_steps,
                "label_counts": label_counts,
                "net": {"name": "resenc_unet", "args": NET_ARGS},
                "patch": PATCH,
                "spacing": SPACING,
                "real_scans_in_pool": data["real_count"],
            },
            "pretraining": pretrain_rows,
            "segmentation_rows": seg_rows,
            "classification_rows": cls_rows,
            "summary": summary,
            "goal": goal,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
