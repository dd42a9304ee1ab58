"""Train a segmentation network on medct phantoms only, for the benchmarks (cached, exported as a
medct model folder). Shared by bench/phantom_to_real.py and bench/segment.py.

Data: `medct.phantom.make_phantom` cases with varied fields of view (330-555 mm wide, 300-420 mm
long, centred from the lower chest to the upper abdomen), contrast phases, noise levels and 1 in 4
a CBCT-like variant, at the recipe's spacing, HU-windowed to [0, 1]. Training: random crops (2 in 3
centred on a labelled voxel), MONAI augmentation (affine, intensity scale/shift, gamma, blur,
noise), Dice + cross-entropy, AdamW with a one-cycle schedule, bf16 autocast on CPU. A hand loop,
not Lightning: a few hundred steps on in-memory arrays, no checkpoints or logging needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import CACHE


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a benchmark model is trained with (all of it goes into the cache key)."""

    net_name: str
    net_args: dict[str, Any]
    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]  # inference patch (model card)
    crop: tuple[int, int, int]  # training crop
    hu_window: tuple[float, float]
    steps: int
    cases: int
    seed: int = 0
    lr: float = 2e-3
    overlap: float = 0.5  # the card's sliding-window overlap


def phantom_cases(recipe: Recipe) -> list[tuple[np.ndarray, np.ndarray]]:
    """`recipe.cases` phantoms as ((X, Y, Z) float32 in [0, 1], (X, Y, Z) uint8 labels), RAS."""
    from medct.phantom import Appearance, GridSpec, make_phantom
    from medct.transforms import Preprocessing, scale_intensity

    pre = Preprocessing(spacing=recipe.spacing, hu_min=recipe.hu_window[0], hu_max=recipe.hu_window[1])
    rng = np.random.default_rng(recipe.seed)
    out = []
    for i in range(recipe.cases):
        side_mm, length_mm = float(rng.integers(110, 185)) * 3.0, float(rng.integers(100, 140)) * 3.0
        shape = (
            round(side_mm / recipe.spacing[0]),
            round(side_mm / recipe.spacing[1]),
            round(length_mm / recipe.spacing[2]),
        )
        centre = (float(rng.normal(0, 15)), float(rng.normal(0, 15)), float(rng.uniform(-60, 60)))
        grid = GridSpec(shape=shape, spacing=recipe.spacing, center_mm=centre)
        look = Appearance(
            variant="cbct" if rng.random() < 0.25 else "ct",
            phase=str(rng.choice(["native", "arterial", "venous"])),  # type: ignore[arg-type]
            noise_hu=float(rng.uniform(5, 30)),
        )
        case = make_phantom(int(recipe.seed * 1000 + i), grid, look)
        out.append((scale_intensity(case.image.array, pre), np.asarray(case.label.array, dtype=np.uint8)))
    return out


def augmentation() -> Any:
    """MONAI dictionary augmentation of (1, x, y, z) image/label crops."""
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


def train(recipe: Recipe, out_dir: Path, trained_by: str) -> dict[str, object]:
    """Train one model on phantoms; export it as a medct model folder to `out_dir`."""
    import torch
    from monai.losses import DiceCELoss

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_net
    from medct.phantom import LABELS
    from medct.transforms import Preprocessing

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.perf_counter()
    cases = phantom_cases(recipe)
    t_data = time.perf_counter() - t0
    aug = augmentation()
    aug.set_random_state(seed=recipe.seed)
    net = create_net(recipe.net_name, in_channels=1, out_channels=len(LABELS), **recipe.net_args)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    crop = np.asarray(recipe.crop)
    losses: list[float] = []
    net.train()
    for _ in range(recipe.steps):
        xs, ys = [], []
        for _b in range(2):
            img, lab = cases[int(rng.integers(len(cases)))]
            if rng.random() < 0.67:  # centred on a labelled voxel
                fg = np.argwhere(lab[::3, ::3, ::3] > 0) * 3
                c = fg[rng.integers(len(fg))]
            else:
                c = np.array([rng.integers(s) for s in img.shape])
            lo = np.clip(c - crop // 2, 0, np.maximum(np.asarray(img.shape) - crop, 0))
            sl = tuple(slice(int(a), int(a + p)) for a, p in zip(lo, crop, strict=True))
            pad = [(0, int(p) - len(range(*s.indices(n)))) for s, p, n in zip(sl, crop, img.shape, strict=True)]
            d = aug({"image": np.pad(img[sl], pad)[None], "label": np.pad(lab[sl], pad)[None]})
            xs.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
            ys.append(torch.as_tensor(np.asarray(d["label"])))
        x, y = torch.stack(xs), torch.stack(ys)  # (B, 1, *crop)
        opt.zero_grad(set_to_none=True)
        # bf16 autocast: ~1.6x faster steps on CPUs with AVX512-BF16; the exported weights are fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    card = ModelCard(
        net_name=recipe.net_name,
        net_args=dict(net.net_config["args"]),  # type: ignore[attr-defined]
        labels=dict(LABELS),
        preprocessing=Preprocessing(spacing=recipe.spacing, hu_min=recipe.hu_window[0], hu_max=recipe.hu_window[1]),
        patch_size=recipe.patch,
        inference={"overlap": recipe.overlap, "sw_batch_size": 4},
        licence="Apache-2.0 (trained on synthetic phantoms)",
        extra={"trained_by": trained_by, "seed": recipe.seed, "steps": recipe.steps, "phantoms": recipe.cases},
    )
    save_model_folder(net, card, out_dir)
    return {
        "recipe": dataclasses.asdict(recipe),
        "data_s": round(t_data, 1),
        "train_s": round(time.perf_counter() - t0 - t_data, 1),
        "loss_first_last": [round(statistics.mean(losses[:20]), 3), round(statistics.mean(losses[-20:]), 3)],
    }


def cached_model(recipe: Recipe, bench: str) -> tuple[Path, dict[str, object]]:
    """The model folder for `recipe` under ~/.cache/medct/<bench>/, trained on first use.

    The cache key covers the recipe, this trainer and the phantom code (a phantom change retrains)."""
    from medct.phantom import spec

    phantom_src = "".join(p.read_text() for p in sorted(Path(spec.__file__).parent.glob("*.py")))
    key = json.dumps([dataclasses.asdict(recipe), Path(__file__).read_text(), phantom_src])
    folder = CACHE / bench / f"{recipe.net_name}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    info_file = folder / "bench_info.json"
    if not info_file.is_file():
        print(f"training {recipe.net_name} on {recipe.cases} phantoms for {recipe.steps} steps -> {folder}", flush=True)
        info = train(recipe, folder, f"bench/{bench}.py")
        info_file.write_text(json.dumps(info, indent=2))
    info = json.loads(info_file.read_text())
    info["cached_at"] = str(folder)
    return folder, info
