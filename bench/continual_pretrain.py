"""Continual pretraining CT -> CBCT: how much replay keeps the CT representation (stability gap, forgetting)?

Question (issue 8): an encoder pretrained on one domain (phantom CT) continues pretraining on a new
one (phantom CBCT-like) with a fraction of every batch replayed from the first domain, on a
warmup-stable-decay schedule that does not re-warm. Measured on a downstream probe of both
domains at several points of the new phase: the stability gap (the temporary drop of the old
domain's probe score early in the new phase and its recovery; Wang et al. 2024) and the final
forgetting (old-domain score before the new phase minus after it), for replay 0 / 0.1 / 0.25 / 0.5.

Design:
  * SparK (`medct.pretrain.spark`) on `resenc_unet` (8, 16, 32, 64), 32^3 crops at 4 mm: phase 1 on
    20 phantom CTs (`--phase1-steps`), exported with medct's export; phase 2 from that encoder on 20
    phantom CBCTs (`--phase2-steps`), `medct.pretrain.continual.ContinualDataModule` with each replay
    fraction, scheduler wsd (no warmup, decay over the last 20 %). Encoder snapshots at 0, 1/8, 1/4,
    1/2, 3/4 and all of phase 2.
  * Probe (per snapshot and domain): the encoder frozen; its first two stages' features (the second
    up-sampled) -> one 1x1x1 convolution -> 12 phantom classes, trained on 2 labelled
    volumes of the domain (`--probe-steps`), Dice (mean over organs) on 3 held-out volumes of the same domain; 3 probe
    seeds. A linear probe measures what the representation holds, not what a decoder can learn.
  * Goal: replay cuts forgetting of the CT domain: final forgetting with replay 0.25 below that with
    replay 0 (mean over probe seeds). Reported met or not, with the whole table.

CPU (2 cores): about 20 minutes alone; `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from _common import CACHE, ROOT, paired_goal, quiet_trainer, write_result

from medct.pretrain.base import Optimisation
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

RESULT = ROOT / "bench" / "results" / "continual_pretrain.json"
WORK = CACHE / "continual_pretrain"
NET_ARGS = {"filters": [8, 16, 32, 64]}
SPACING = (4.0, 4.0, 4.0)
PATCH = (32, 32, 32)
FRACTIONS = (0.0, 0.1, 0.25, 0.5)
POINTS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def _trainer(steps: int, callbacks: list[Any] | None = None) -> Any:
    return quiet_trainer(steps, WORK / "runs", callbacks)


def _spark(pretrained: str | None = None, scheduler: str = "cosine") -> Any:
    from medct.nets import create_net
    from medct.pretrain.spark import SparKTask

    return SparKTask(
        create_net("resenc_unet", **NET_ARGS),
        mask_ratio=0.75,
        mask_stride=8,
        patch_size=PATCH,
        pretrained_encoder=pretrained,
        preprocessing=Preprocessing(spacing=SPACING),
        optim=Optimisation(lr=2e-3, scheduler=scheduler, warmup_steps=0 if pretrained else 20, decay_fraction=0.2),
    )


def cohorts() -> dict[str, Path]:
    from medct.phantom import write_cohort

    out = {}
    for name, variant, seed in (
        ("ct", "ct", 10),
        ("cbct", "cbct", 20),
        ("ct_probe", "ct", 30),
        ("cbct_probe", "cbct", 40),
    ):
        folder = WORK / "data" / name
        if not (folder / "dataset.json").is_file():
            write_cohort(
                folder,
                n=20 if "probe" not in name else 5,
                variant=variant,
                seed=seed,
                shape=(64, 64, 64),
                spacing=SPACING,
            )
        out[name] = folder
    return out


def phase1(data: dict[str, Path], steps: int) -> Path:
    import lightning.pytorch as pl

    from medct.checkpoint import export_lightning_checkpoint
    from medct.data import VolumeDataModule

    out = WORK / f"enc_ct_{steps}"
    if (out / "medct.json").is_file():
        return out
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(steps)
    trainer.fit(
        _spark(),
        datamodule=VolumeDataModule(
            keys=["image"],
            data_dir=str(data["ct"]),
            num_workers=2,
            cache_dir=str(WORK / "cache"),
            preprocessing=Preprocessing(spacing=SPACING),
            sampling=Sampling(patch_size=PATCH, batch_size=2, num_samples=2),
            split=Split(val_fraction=0.1),
        ),
    )
    ckpt = WORK / "phase1.ckpt"
    trainer.save_checkpoint(ckpt)
    export_lightning_checkpoint(ckpt, out)
    ckpt.unlink()
    return out


def phase2(data: dict[str, Path], encoder: Path, fraction: float, steps: int) -> dict[float, dict[str, Any]]:
    """Encoder state dicts at each point of the new phase (fraction of its steps -> tensors)."""
    import lightning.pytorch as pl

    from medct.nets import encoder_state_dict
    from medct.pretrain.continual import ContinualDataModule

    marks = {round(p * steps): p for p in POINTS}
    snaps: dict[float, dict[str, Any]] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, module, *args):  # before step k: k steps done
            if trainer.global_step in marks and marks[trainer.global_step] not in snaps:
                snaps[marks[trainer.global_step]] = {k: v.clone() for k, v in encoder_state_dict(module.net).items()}

        def on_train_end(self, trainer, module):
            snaps[1.0] = {k: v.clone() for k, v in encoder_state_dict(module.net).items()}

    pl.seed_everything(0, verbose=False)
    dm = ContinualDataModule(
        data_dir=str(data["cbct"]),
        replay_data_dir=str(data["ct"]) if fraction > 0 else None,
        replay_fraction=fraction,
        num_workers=2,
        cache_dir=str(WORK / "cache"),
        preprocessing=Preprocessing(spacing=SPACING),
        sampling=Sampling(patch_size=PATCH, batch_size=2, num_samples=2),
        split=Split(val_fraction=0.1),
    )
    _trainer(steps, [Snapshot()]).fit(_spark(str(encoder), scheduler="wsd"), datamodule=dm)
    return snaps


class Probe:
    """A frozen encoder's first two stages -> 1x1x1 conv -> classes; trained on labelled crops of a domain."""

    def __init__(self, folder: Path) -> None:
        from medct.data import SegmentationDataModule

        self.dm = SegmentationDataModule(
            data_dir=str(folder),
            num_workers=0,
            cache_dir=str(WORK / "cache"),
            augment=False,
            preprocessing=Preprocessing(spacing=SPACING),
            sampling=Sampling(patch_size=PATCH, batch_size=2, num_samples=2),
            split=Split(val_fraction=0.6),
        )
        self.dm.setup()
        self.train = self.dm._dataset(self.dm.train_items, "train")
        self.val = self.dm._dataset(self.dm.val_items, "val")

    def score(self, encoder_state: dict[str, Any], seed: int, steps: int) -> float:
        import torch
        import torch.nn.functional as F
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot

        from medct.nets import create_net, load_encoder

        torch.manual_seed(seed)
        net = create_net("resenc_unet", **NET_ARGS)
        load_encoder(net, encoder_state)
        net.eval().requires_grad_(False)
        classes = self.dm.num_classes

        def feats(x: torch.Tensor) -> torch.Tensor:
            f = net.encoder_features(x)[:2]
            return torch.cat([f[0], F.interpolate(f[1], size=f[0].shape[2:], mode="trilinear")], dim=1)

        width = sum(NET_ARGS["filters"][:2])
        head = torch.nn.Conv3d(width, classes, 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed)
        self.train.transform.set_random_state(seed=seed)  # the same crops for every snapshot of one seed
        for _ in range(steps):
            item = self.train[int(torch.randint(len(self.train), (1,), generator=g))]
            x = torch.stack([c["image"] for c in item])
            y = torch.stack([c["label"] for c in item]).long()
            with torch.no_grad():
                f = feats(x)
            loss = F.cross_entropy(head(f), y[:, 0])
            opt.zero_grad()
            loss.backward()
            opt.step()
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            for i in range(len(self.val)):
                item = self.val[i]
                x, y = item["image"][None], item["label"][None].long()
                logits = sliding_window_inference(x, PATCH, 2, lambda t: head(feats(t)), overlap=0.25)
                metric(one_hot(logits.argmax(1, keepdim=True), classes), one_hot(y, classes))
        return float(metric.aggregate().nanmean())


def judge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal from the per-seed probe rows (`_common.paired_goal`): replay 0.25 forgets less of the
    CT domain than no replay, forgetting = CT Dice before phase 2 - CT Dice at its end, per probe seed."""

    def forgetting(fraction: float) -> list[float]:
        def at(point: float) -> list[float]:
            return next(
                r["per_seed"] for r in rows if r["replay"] == fraction and r["point"] == point and r["domain"] == "ct"
            )

        return [b - a for b, a in zip(at(0.0), at(1.0), strict=True)]

    f0, f25 = forgetting(0.0), forgetting(0.25)
    # less forgetting is better: "better" = the forgetting of no replay minus that of replay
    return paired_goal(
        "replay 0.25 forgets less of the CT domain than no replay (linear-probe Dice, phase-2 end, per probe seed)",
        f0,
        f25,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phase1-steps", type=int, default=None, help="default 200 (quick 4)")
    parser.add_argument("--phase2-steps", type=int, default=None, help="default 120 (quick 8)")
    parser.add_argument("--probe-steps", type=int, default=None, help="default 40 (quick 2)")
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    global WORK
    if args.quick:
        WORK = CACHE / "continual_pretrain_quick"
    s1 = args.phase1_steps or (4 if args.quick else 200)
    s2 = args.phase2_steps or (8 if args.quick else 120)
    ps = args.probe_steps or (2 if args.quick else 40)
    seeds = args.probe_seeds or ([0] if args.quick else [0, 1, 2])
    warnings.filterwarnings("ignore")
    import logging

    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    t0 = time.perf_counter()
    data = cohorts()
    enc = phase1(data, s1)
    probes = {"ct": Probe(data["ct_probe"]), "cbct": Probe(data["cbct_probe"])}
    rows = []
    for fraction in FRACTIONS:
        start = time.perf_counter()
        snaps = phase2(data, enc, fraction, s2)
        seconds = time.perf_counter() - start
        for point in POINTS:
            for domain, probe in probes.items():
                scores = [probe.score(snaps[point], seed, ps) for seed in seeds]
                rows.append(
                    {
                        "replay": fraction,
                        "point": point,
                        "step": round(point * s2),
                        "domain": domain,
                        "dice": round(statistics.mean(scores), 4),
                        "sd": round(statistics.stdev(scores), 4) if len(scores) > 1 else 0.0,
                        "per_seed": [round(s, 4) for s in scores],
                    }
                )
        print(
            f"replay {fraction}: phase 2 in {seconds:.0f} s; "
            + " ".join(f"{r['domain']}@{r['point']}={r['dice']:.3f}" for r in rows if r["replay"] == fraction),
            flush=True,
        )

    def at(fraction: float, point: float, domain: str) -> float:
        return next(
            r["dice"] for r in rows if r["replay"] == fraction and r["point"] == point and r["domain"] == domain
        )

    table = []
    print(
        f"\n{'replay':>7} {'CT before':>10} {'CT min (gap)':>13} {'CT after':>9} {'forgetting':>11} "
        f"{'CBCT before':>12} {'CBCT after':>11}"
    )
    for fraction in FRACTIONS:
        before = at(fraction, 0.0, "ct")
        during = [at(fraction, p, "ct") for p in POINTS[1:-1]]
        after = at(fraction, 1.0, "ct")
        row = {
            "replay": fraction,
            "ct_before": before,
            "ct_min_during": min(during),
            "stability_gap": round(before - min(during), 4),
            "ct_after": after,
            "forgetting": round(before - after, 4),
            "cbct_before": at(fraction, 0.0, "cbct"),
            "cbct_after": at(fraction, 1.0, "cbct"),
        }
        table.append(row)
        print(
            f"{fraction:>7} {before:>10.3f} {min(during):>7.3f} ({row['stability_gap']:+.3f}) {after:>9.3f} "
            f"{row['forgetting']:>+11.3f} {row['cbct_before']:>12.3f} {row['cbct_after']:>11.3f}"
        )
    goal = judge(rows)
    print("\ngoal:", json.dumps(goal))
    write_result(
        args.out,
        "continual_pretrain",
        {
            "settings": {
                "quick": args.quick,
                "phase1_steps": s1,
                "phase2_steps": s2,
                "probe_steps": ps,
                "probe_seeds": seeds,
                "net": {"name": "resenc_unet", "args": NET_ARGS},
                "patch": PATCH,
                "spacing": SPACING,
                "points": POINTS,
            },
            "rows": rows,
            "table": table,
            "goal": goal,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
