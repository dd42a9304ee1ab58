"""`MotionPredictor` (`medct motion`, `medct.predict_motion`): register, fine-tune, roll out, warp; and the sequence previews."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medct.errors import ConfigError, InvalidVolumeError
from medct.geometry import Grid
from medct.precision import autocast
from medct.synthesis.motion.baselines import PCAMotionModel, copy_last, linear_extrapolation
from medct.synthesis.motion.sequence import (
    MIN_PHASES,
    Method,
    Registration,
    from_motion_grid,
    motion_grid,
    read_sequence,
    reference_channel,
    register_phases,
    to_motion_grid,
    warp_reference,
)
from medct.synthesis.motion.task import finetune, rollout
from medct.volume import Volume


@dataclass
class MotionPrediction:
    """Predicted future phases of one 4D scan (all on the input grid)."""

    phases: list[Volume]  # the reference warped by each predicted field
    displacements: list[Volume]  # (X, Y, Z, 3) RAS mm, pull-back to phase 0
    observed: list[Volume]  # the input phases
    observed_fields: np.ndarray  # (M, X, Y, Z, 3) registered fields of the observed phases
    method: str
    seconds: dict[str, float]


class MotionPredictor:
    """`medct motion` and `medct.predict_motion`: register, fine-tune (AR), roll out, warp.

    net / card: an exported motion model (None with a baseline method). precision: auto (None),
    bf16 or fp32 (`medct.precision`) for the network's fine-tuning and roll-out and IMPACT's
    encoder; its losses stay float32."""

    def __init__(
        self, net: nn.Module | None, card: Any | None, device: str = "cpu", precision: str | None = None
    ) -> None:
        from medct.precision import resolve_precision

        self.net, self.card, self.device = net, card, device
        # auto: fp32 on CPU, where the motion transformer trains slower in bf16 (MotionTask.bf16_cpu)
        self.precision = resolve_precision(precision, torch.device(device), bf16_cpu=False)

    @classmethod
    def from_folder(cls, model_dir: str, device: str | None = None, precision: str | None = None) -> MotionPredictor:
        from medct.predictor import load_for_task

        net, card, device_ = load_for_task(model_dir, "motion", "motion", device)
        dev = str(device_)
        return cls(net, card, dev, precision)

    def predict(
        self,
        source: str | Path | Sequence[str | Path] | Sequence[Volume],
        k: int,
        method: Method = "ar",
        finetune_steps: int | None = None,
        registration: Registration | None = None,
        seed: int = 0,
    ) -> MotionPrediction:
        """Predict the `k` phases after the observed ones of `source` (a 4D NIfTI, a folder of phase
        volumes, a list of paths or of Volumes, in time order; phase 0 is the reference)."""
        if k < 1:
            raise ConfigError(f"--predict must be at least 1 phase, got {k}.")
        if method not in ("ar", "copy-last", "linear", "pca"):
            raise ConfigError(f"Unknown method {method!r}; use ar, copy-last, linear or pca.")
        if method == "ar" and self.net is None:
            raise ConfigError("The autoregressive method needs a motion model (-m MODEL).")
        if isinstance(source, (list, tuple)) and source and all(isinstance(v, Volume) for v in source):
            vols = list(source)
        else:
            vols = read_sequence(source)  # type: ignore[arg-type]
        if len(vols) < MIN_PHASES:
            raise InvalidVolumeError(
                f"A 4D scan for motion prediction needs at least {MIN_PHASES} phases, got {len(vols)}."
            )
        inf = self.card.inference if self.card is not None else {}
        reg = registration or inf.get("registration", "intensity")
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        obs_fields = register_phases(vols, reg, float(inf.get("registration_spacing_mm", 6.0)), self.device, seed)
        times["registration"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = vols[0]
        spacing = tuple(self.card.preprocessing.spacing) if self.card is not None else (8.0, 8.0, 8.0)
        grid = motion_grid(ref, spacing)
        obs = to_motion_grid(obs_fields, ref, grid)  # (M, 3, x, y, z)
        if method == "copy-last":
            pred = copy_last(obs, k)
        elif method == "linear":
            pred = linear_extrapolation(obs, k)
        elif method == "pca":
            pred = PCAMotionModel().fit(obs).predict(k)
        else:
            pred = self._ar(obs, ref, grid, k, finetune_steps, seed)
        times["prediction"] = time.perf_counter() - t0
        fields = from_motion_grid(pred, grid, ref)
        images = warp_reference(ref, fields)
        disps = [Volume(u, ref.affine.copy(), {"kind": "displacement_ras_mm"}) for u in fields]
        return MotionPrediction(images, disps, vols, obs_fields, method, times)

    def _ar(
        self, obs: np.ndarray, ref: Volume, grid: Grid, k: int, finetune_steps: int | None, seed: int
    ) -> np.ndarray:
        assert self.net is not None and self.card is not None
        inf, pre = self.card.inference, self.card.preprocessing
        dev = torch.device(self.device)
        o = torch.from_numpy(obs).to(dev)
        img = torch.from_numpy(reference_channel(ref, grid, pre.hu_min, pre.hu_max)).to(dev)
        steps = int(inf.get("finetune_steps", 0) if finetune_steps is None else finetune_steps)
        if steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {steps}.")
        context = int(inf["context"])
        # next_phase_loss is float32 (fp32_loss); no weight-cast cache: finetune updates the weights
        with autocast(dev, self.precision, cache=False):
            net = finetune(self.net, o, img, steps, float(inf.get("finetune_lr", 1e-4)), context, seed)
            return rollout(net, o, img, k, context).float().cpu().numpy()


def save_sequence_previews(phases: Sequence[Volume], n_observed: int, png: Path, gif: Path | None) -> None:
    """A PNG strip (one coronal plane through the reference's centre per phase, predicted ones
    titled in red) and an animated GIF of the same frames; both written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    from medct.paths import atomic_file
    from medct.preview import _to_ras

    frames = []
    for v in phases:
        ras, sp = _to_ras(np.asarray(v.array, np.float32), v.affine)
        frames.append((ras[::-1, ras.shape[1] // 2, ::-1].T, sp))
    n = len(frames)
    cols = min(n, 12)
    rows = -(-n // cols)
    (_, sp) = frames[0]
    fig = plt.figure(
        figsize=(1.6 * cols, 1.6 * rows * sp[2] / sp[0] * frames[0][0].shape[0] / frames[0][0].shape[1] + 0.3)
    )
    fig.patch.set_facecolor("black")
    for i, (img, s) in enumerate(frames):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img, cmap="gray", vmin=-1000, vmax=400, aspect=s[2] / s[0])
        pred = i >= n_observed
        ax.set_title(f"{'pred ' if pred else ''}{i}", color="red" if pred else "white", fontsize=7)
        ax.set_axis_off()
    try:
        with atomic_file(png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    if gif is not None:
        ims = []
        for img, s in frames:
            a = (np.clip((img + 1000.0) / 1400.0, 0, 1) * 255).astype(np.uint8)
            h = max(1, int(round(a.shape[0] * s[2] / s[0])))
            ims.append(Image.fromarray(a).resize((a.shape[1], h)))
        with atomic_file(gif, suffix=".gif") as tmp:
            ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=250, loop=0)
