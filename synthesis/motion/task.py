"""The autoregressive motion model: rollout, next-phase loss, patient-specific fine-tuning, and `MotionTask` (population training)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.card import ModelCard
from medct.errors import ConfigError
from medct.precision import fp32_loss
from medct.task import MedCTTask
from medct.transforms import Preprocessing


def rollout(net: nn.Module, observed: Tensor, image: Tensor, k: int, context: int) -> Tensor:
    """(k, 3, x, y, z) future fields from observed (M, 3, x, y, z) and image (1, x, y, z): each step
    predicts from the last `context` fields (observed, then predicted) and appends its prediction."""
    seq = observed
    preds = []
    with torch.no_grad():
        for _ in range(k):
            window = seq[-context:]
            nxt = net(window[None], image[None])[0, -1]
            preds.append(nxt)
            seq = torch.cat([seq, nxt[None]])
    return torch.stack(preds)


def _windows(fields: Tensor, length: int) -> Tensor:
    """(W, length, ...) every window of `length` consecutive fields."""
    return torch.stack([fields[s : s + length] for s in range(len(fields) - length + 1)])


def next_phase_loss(net: nn.Module, fields: Tensor, image: Tensor) -> Tensor:
    """Teacher-forced L1 (mm) of predicting fields[:, 1:] from fields[:, :-1]; fields (B, L+1, 3, ...)."""
    pred = net(fields[:, :-1], image)
    return fp32_loss(F.l1_loss)(pred, fields[:, 1:])


def finetune(
    net: nn.Module, observed: Tensor, image: Tensor, steps: int, lr: float, context: int, seed: int = 0
) -> nn.Module:
    """A copy of `net` adapted to one patient: `steps` Adam steps of the next-phase loss on every
    window of its observed fields (length up to context + 1). steps 0 returns `net` itself."""
    if steps <= 0:
        return net
    torch.manual_seed(seed)
    tuned = copy.deepcopy(net).train()
    length = min(context, len(observed) - 1) + 1
    win = _windows(observed, length)  # (W, L+1, 3, x, y, z)
    img = image[None].expand(len(win), *image.shape)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        loss = next_phase_loss(tuned, win, img)
        loss.backward()
        opt.step()
    return tuned.eval()


class MotionTask(MedCTTask):
    """Population training of a `medct.nets.MotionTransformer` on displacement-field sequences
    (batches from `MotionDataModule`: "fields" (B, L+1, 3, x, y, z) mm, "image" (B, 1, x, y, z)).

    preprocessing / patch_size / context: the motion grid and reference window, the training crop
    and the context length (linked from the data module). Validation rolls out each validation sequence from its first `context`
    fields and logs the mean displacement error (mm): val/rollout_mm. finetune_steps / finetune_lr:
    the defaults of patient-specific fine-tuning, stored in the card.
    """

    bf16_cpu = False  # bf16 autocast measured slower than fp32 on CPU (bench/train_throughput.py)

    def __init__(
        self,
        net: nn.Module,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        context: int = 16,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(
            spacing=(8.0, 8.0, 8.0), hu_max=500.0, modality="CT"
        ),
        patch_size: Sequence[int] = (32, 32, 24),
        registration_spacing_mm: float = 6.0,
        finetune_steps: int = 50,
        finetune_lr: float = 1e-4,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        if context < 2:
            raise ConfigError(f"model.context must be at least 2 phases, got {context}.")
        if context > int(getattr(net, "max_phases", context)):
            raise ConfigError(f"model.context ({context}) exceeds the network's max_phases ({net.max_phases}).")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = next_phase_loss(self.net, batch["fields"], batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["fields"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        c = int(self.hparams.context)
        f, img = batch["fields"][0], batch["image"][0]
        if len(f) <= c:
            return
        pred = rollout(self.net, f[:c], img, len(f) - c, c)
        err = torch.linalg.vector_norm(pred - f[c:], dim=1).mean()
        self.log("val/rollout_mm", err, prog_bar=True, batch_size=1)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def model_card(self) -> ModelCard:
        hp = self.hparams
        return self.card(
            "motion",
            inference={
                "context": int(hp.context),
                "registration": "intensity",
                "registration_spacing_mm": float(hp.registration_spacing_mm),
                "finetune_steps": int(hp.finetune_steps),
                "finetune_lr": float(hp.finetune_lr),
            },
            outputs={"units": "mm", "kind": "pull-back displacement from phase 0, RAS"},
        )
