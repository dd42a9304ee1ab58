"""Learning-rate schedule of a segmentation fine-tuning run, with nnssl's warm-up for pretrained
encoders (reference code: the nnU-Net `PretrainedTrainer` of MIC-DKFZ/nnssl's fine-tuning
("nnUNetv2_train_pretrained"), its `Lin_incr_LRScheduler` and `PolyLRScheduler_offset`).

Per optimiser step s of `total`, as a factor on each group's learning rate:
  * s < freeze (`freeze_encoder_steps`): the encoder is frozen (`SegmentationTask` gives it no
    gradient) and the fresh decoder warms up linearly, (1 + s) / freeze: the decoder first learns to
    read the pretrained features before their gradients can overwrite them (the decoder warm-up
    stage nnssl's trainer names, `warmup_decoder`);
  * freeze <= s < freeze + warmup (`warmup_steps`): the whole network warms up linearly,
    (1 + s - freeze) / warmup (nnssl: 50 of 1000 epochs, from lr / 50);
  * then the run's schedule over the remaining steps: poly (1 - t / T)^0.9 (nnU-Net), cosine, or
    constant, with t counted from the end of the warm-ups.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleName = Literal["poly", "cosine", "constant"]


def lr_factor(step: int, total: int, kind: ScheduleName, freeze: int = 0, warmup: int = 0) -> float:
    """The learning-rate factor at optimiser step `step` (0-based) of `total` (see the module docstring)."""
    if step < freeze:
        return (1 + step) / freeze
    if step < freeze + warmup:
        return (1 + step - freeze) / warmup
    if kind == "constant":
        return 1.0
    start = freeze + warmup
    t, span = step - start, max(total - start, 1)
    progress = min(t / span, 1.0)
    if kind == "poly":
        return (1.0 - progress) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * progress))
