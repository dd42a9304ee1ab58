"""What every pretraining method shares: the pretrained network, its encoder card, the schedules.

A pretraining task (SparK, contrastive, Volume Fusion) trains the *encoder* of a network from the
registry (`medct.nets`, the ResEnc default included) on unlabelled volumes. It receives that
network as an argument (Lightning style guide), like the segmentation task does, so a YAML names
the same `class_path` for pretraining and fine-tuning and the encoder keys line up by
construction. What it exports is an encoder folder (`medct export CKPT -o ENC_DIR`): card task
"encoder" (`medct.checkpoint.ENCODER_TASK`) with the backbone name and args, which method, what data
it saw and the preprocessing, and the encoder's tensors only. A segmentation or classification
recipe loads it with `pretrained_encoder: ENC_DIR` (`medct.nets.load_pretrained_encoder`).

Schedules (`lr_lambda`): linear warmup then cosine decay to 0 ("cosine"), or warmup-stable-decay
("wsd": constant after warmup, linear decay over the last `decay_fraction` of the run; Hu et al.,
MiniCPM 2024, and Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large
Language Models", 2024), whose stable phase can be continued on a new domain without re-warming
(continual pretraining), "poly" (nnU-Net's and nnssl's (1 - t)^0.9 after the warmup) or "constant".
The optimiser is AdamW, or SGD with Nesterov momentum 0.99 as every nnssl trainer
(`AbstractTrainer.configure_optimizers`: lr 1e-2, weight decay 3e-5, poly decay; SparK there also
clips the gradient norm at 12, which a recipe asks of Lightning with `trainer.gradient_clip_val`).

Validation of a pretraining run is its own loss on a fixed centre crop of each validation volume
with a fixed random draw (`val_generator`), so val/loss curves are comparable across epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from medct.checkpoint import ENCODER_TASK, ModelCard
from medct.errors import ConfigError
from medct.nets.encoder import load_pretrained_encoder
from medct.task import MedCTTask
from medct.transforms import Preprocessing

Schedule = Literal["cosine", "wsd", "poly", "constant"]
Optimiser = Literal["adamw", "sgd"]


class WarmupSchedule:
    """LambdaLR factor at optimiser step `step` of `total` (a class, not a closure: picklable).

    cosine:   linear warmup over `warmup` steps, then cosine from 1 to 0.
    wsd:      linear warmup, constant 1, then linear decay to 0 over the last `decay_fraction`.
    poly:     linear warmup, then (1 - t)^0.9 (nnU-Net's PolyLRScheduler).
    constant: linear warmup, then 1.
    """

    def __init__(self, kind: Schedule, total: int, warmup: int, decay_fraction: float = 0.1) -> None:
        self.kind, self.total, self.warmup, self.decay_fraction = kind, max(int(total), 1), int(warmup), decay_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind in ("cosine", "poly"):
            t = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * t)) if self.kind == "cosine" else (1.0 - t) ** 0.9
        decay_start = self.total * (1.0 - self.decay_fraction)
        if step < decay_start:
            return 1.0
        return max(0.0, (self.total - step) / max(self.total - decay_start, 1.0))


def centre_patch(image: Tensor, patch: Sequence[int]) -> Tensor:
    """(B, C, X, Y, Z) -> (B, C, *patch): the centre crop, zero-padded (air after windowing) where smaller."""
    pads: list[int] = []
    for size, p in zip(reversed(image.shape[2:]), reversed(list(patch)), strict=True):
        extra = max(p - size, 0)
        pads += [extra // 2, extra - extra // 2]
    image = F.pad(image, pads)
    starts = [(s - p) // 2 for s, p in zip(image.shape[2:], patch, strict=True)]
    x, y, z = starts
    return image[:, :, x : x + patch[0], y : y + patch[1], z : z + patch[2]]


@dataclass(frozen=True)
class Optimisation:
    """The optimiser and its warmup schedule, as every pretraining method uses them.

    optimizer: "adamw", or "sgd" (Nesterov, `momentum`; nnssl's). lr: peak learning rate.
    weight_decay: the optimiser's weight decay. momentum: SGD's (unused by AdamW).
    scheduler: "cosine", "wsd", "poly" or "constant" (`WarmupSchedule`). warmup_steps: linear warmup
    length. decay_fraction: the last fraction of the run over which "wsd" decays to 0.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-2
    scheduler: Schedule = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    optimizer: Optimiser = "adamw"
    momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "wsd", "poly", "constant"):
            raise ConfigError(f"model.optim.scheduler must be cosine, wsd, poly or constant, got '{self.scheduler}'.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"model.optim.optimizer must be adamw or sgd, got '{self.optimizer}'.")
        if not 0.0 < self.momentum < 1.0:  # Nesterov SGD needs a momentum
            raise ConfigError(f"model.optim.momentum must lie in (0, 1), got {self.momentum}.")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"model.optim.decay_fraction must lie in (0, 1], got {self.decay_fraction}.")
        if int(self.warmup_steps) < 0:
            raise ConfigError(f"model.optim.warmup_steps must be 0 or more, got {self.warmup_steps}.")
        if not self.lr > 0:
            raise ConfigError(f"model.optim.lr must be positive, got {self.lr}.")

    @classmethod
    def of(cls, value: Optimisation | dict[str, Any]) -> Optimisation:
        """The dataclass, or its mapping (a checkpoint's hyperparameters fed back on --ckpt_path)."""
        return value if isinstance(value, cls) else cls(**dict(value))


class PretrainTask(MedCTTask):
    """Base of the pretraining tasks: `net` (a registry network) whose encoder is pretrained.

    Args (shared by every method's YAML):
        net: the network from `medct.nets` (its `encoder_prefixes` part is exported).
        preprocessing, patch_size: the data's (linked from the data module by MedCTCLI), stored
            in the encoder card.
        optim: AdamW and its schedule (`Optimisation`).
        pretrained_encoder: an encoder folder to start from (continual pretraining).
    """

    method: ClassVar[str] = ""  # the card's extra.pretraining.method

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        optim: Optimisation | dict[str, Any] = Optimisation(),
        pretrained_encoder: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.optim = Optimisation.of(optim)
        if not hasattr(net, "encoder_features"):
            raise ConfigError(f"{type(net).__name__} is not a medct registry network (no encoder_features).")
        self.lineage: list[dict[str, Any]] = []  # earlier pretraining phases of the encoder we start from
        if pretrained_encoder is not None:
            report = load_pretrained_encoder(net, pretrained_encoder, strict=True)
            rank_zero_info(f"pretrained encoder {pretrained_encoder}: {report.summary()}")
            self.lineage = _lineage_of(pretrained_encoder)

    def record_data(self) -> None:
        super().record_data()
        self.hparams.update(optim=asdict(self.optim))

    def method_settings(self) -> dict[str, Any]:
        """The method's own hyperparameters, for the card (JSON primitives)."""
        skip = {"preprocessing", "patch_size", "pretrained_encoder"}
        return {k: v for k, v in dict(self.hparams).items() if k not in skip and not k.startswith("_")}

    def data_seen(self) -> dict[str, Any]:
        """Which data this run trained on (from the data module, when there is one)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        seen: dict[str, Any] = {"steps": int(self.global_step)}
        if dm is not None:
            seen["data_dir"] = getattr(dm, "data_dir", None)
            seen["datalist"] = getattr(dm, "datalist", None)
            seen["train_volumes"] = len(getattr(dm, "train_items", []) or [])
        return seen

    def model_card(self) -> ModelCard:
        """The encoder card `medct export` writes (task "encoder")."""
        phase = {"method": self.method, "settings": self.method_settings(), "data": self.data_seen()}
        return self.card(
            ENCODER_TASK,
            outputs={"encoder_prefixes": list(self.net.encoder_prefixes)},
            extra={"pretraining": {**phase, "earlier_phases": self.lineage}},
        )

    # -- optimisation

    def configure_optimizers(self) -> Any:
        o = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(total):
            return opt
        lam = WarmupSchedule(o.scheduler, int(total), o.warmup_steps, o.decay_fraction)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def val_generator(self, batch_idx: int, device: torch.device | str | None = None) -> torch.Generator:
        """The same random draw for validation case `batch_idx` at every epoch (on `device`, default this task's)."""
        g = torch.Generator(device=self.device if device is None else device)
        g.manual_seed(1_000_003 * (batch_idx + 1))
        return g


def _lineage_of(encoder_dir: str) -> list[dict[str, Any]]:
    """The pretraining phases recorded in an encoder folder's card (oldest first), plus its own."""
    from pathlib import Path

    from medct.checkpoint import CARD_FILE, read_model_card

    if not (Path(encoder_dir) / CARD_FILE).is_file():
        return [{"source": str(encoder_dir)}]
    pre = read_model_card(encoder_dir).extra.get("pretraining", {})
    earlier = list(pre.get("earlier_phases", []))
    own = {k: v for k, v in pre.items() if k != "earlier_phases"}
    return [*earlier, {**own, "source": str(encoder_dir)}]
