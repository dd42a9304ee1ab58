"""Segmentation losses by name, for `SegmentationTask(loss=...)`.

dice_ce        MONAI DiceCELoss: Dice + cross-entropy on softmax outputs (the nnU-Net loss).
focal_tversky  Focal Tversky loss (Abraham & Khan, ISBI 2019), the loss of Turbolift learning
               (Haseljic, Chatterjee et al. 2022; reference code soumickmj/Turbolift
               Utils/seglosses.py `focal_tversky_loss` at b03e0cc): per foreground class c the
               Tversky index over the whole batch TI_c = (TP + 1) / (TP + a FN + b FP + 1) with
               a = 0.7 on false negatives, b = 0.3 on false positives, and (1 - TI_c)^(1/gamma),
               gamma = 4/3 (their exponent 0.75). The reference has one channel (liver) and sums
               over channels; with several organs medct averages them, so that the loss's scale
               (and what a regulariser weight means beside it) does not grow with the number of
               labels. Built on MONAI's TverskyLoss, whose `alpha` weights false *positives* and
               `beta` false *negatives*: the names below say which. tests/parity checks the value
               and gradient against the reference.
"""

from __future__ import annotations

from typing import Literal

from monai.losses import DiceCELoss, TverskyLoss
from torch import Tensor, nn

LossName = Literal["dice_ce", "focal_tversky"]


class FocalTverskyLoss(nn.Module):
    """Mean over classes of (1 - Tversky index)^(1/gamma) (see the module docstring).

    `fn_weight` / `fp_weight`: weights of false negatives / positives in the index (0.7 / 0.3
    penalise missed voxels more, for small structures). The reference's defaults: foreground
    classes only, counts summed over the whole batch, smoothing 1 (`include_background=True`,
    `batch=False`: per sample and per class, background included). Input: logits (B, C, *spatial)
    and class indices (B, 1, *spatial).
    """

    def __init__(
        self,
        fn_weight: float = 0.7,
        fp_weight: float = 0.3,
        gamma: float = 4.0 / 3.0,
        smooth: float = 1.0,
        include_background: bool = False,
        batch: bool = True,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"focal Tversky gamma must be positive, got {gamma}")
        self.gamma = float(gamma)
        self.tversky = TverskyLoss(
            to_onehot_y=True, softmax=True, alpha=fp_weight, beta=fn_weight, include_background=include_background,
            batch=batch, smooth_nr=smooth, smooth_dr=smooth, reduction="none",
        )  # fmt: skip

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        one_minus_ti = self.tversky(logits, target).clamp_min(0.0)  # (C,) with batch, else (B, C)
        return one_minus_ti.pow(1.0 / self.gamma).mean()


def make_loss(name: LossName) -> nn.Module:
    """The loss module of a name in `LossName`."""
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "focal_tversky":
        return FocalTverskyLoss()
    raise ValueError(f"unknown loss {name!r}; choose dice_ce or focal_tversky")
