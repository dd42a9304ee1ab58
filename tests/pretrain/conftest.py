"""Tiny phantom crops and a few-step optimiser loop for the pretraining tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(scope="session")
def phantom_crops() -> Tensor:
    """(4, 1, 32, 32, 32) float32 in [0, 1]: the HU window of four phantom CTs at 8 mm."""
    from medct.phantom import GridSpec, make_phantom

    crops = []
    for seed in range(4):
        case = make_phantom(seed, GridSpec(shape=(40, 40, 40), spacing=(8.0, 8.0, 8.0)))
        hu = case.image.array[4:36, 4:36, 4:36]
        crops.append(np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32))
    return torch.from_numpy(np.stack(crops))[:, None]


def train_steps(task: nn.Module, loss_fn: Callable[[], Tensor], steps: int, lr: float = 3e-3) -> list[float]:
    """Run `steps` AdamW steps on `loss_fn()`; the losses before each step."""
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def quiet_trainer(root: Path, max_steps: int, callbacks: list[Any] | None = None, checkpoints: bool = False) -> Any:
    """A CPU Lightning Trainer for `max_steps` steps without logger, progress bar, summary or
    validation; checkpoints (into `root`) only when asked."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=list(callbacks or []),
    )
