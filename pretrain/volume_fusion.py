"""Volume Fusion: pretraining by segmenting the fusion coefficients of two mixed volumes.

Wang et al., "MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a
Large-Scale Unannotated Dataset", 2023; settings as nnssl's VolumeFusionTransform
(MIC-DKFZ/nnssl `ssl_data/dataloading/volume_fusion_transform.py`):

  * a foreground and a background crop from *different* volumes;
  * 10-39 boxes per sample (`num_boxes` = [10, 40), upper bound exclusive as numpy's randint), each
    side drawn from [8, 0.625 x patch side], at a random place; later boxes overwrite earlier ones;
  * each box takes a fusion coefficient alpha from {0, 0.25, 0.5, 0.75, 1} (outside every box
    alpha = 0: the background volume);
  * fused x = alpha * fg + (1 - alpha) * bg, and the network predicts each voxel's alpha as a
    5-class segmentation (Dice + cross-entropy, MONAI DiceCELoss).

The whole registry network trains (encoder and decoder, `out_channels` = number of alphas); its
encoder is what `medct export` writes. Pairing: nnssl splits a batch into a foreground and a
background half (half the batch per step); medct pairs crop i with crop i + k of the same batch,
k the crops per volume (`data.num_samples`), so both come from different volumes and the step
keeps the whole batch. The boxes are drawn on the tensors' device inside the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medct.errors import ConfigError
from medct.precision import fp32_loss
from medct.pretrain.base import Optimisation, PretrainTask, centre_patch
from medct.transforms import Preprocessing

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fusion_boxes(
    batch: int,
    patch: Sequence[int],
    n_alphas: int,
    num_boxes: Sequence[int] = (10, 40),
    min_side: int = 8,
    max_side_fraction: float = 0.625,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Class map (B, 1, *patch) long: the alpha index of each voxel (0 outside every box; later boxes overwrite)."""
    labels = torch.zeros(batch, 1, *[int(p) for p in patch], dtype=torch.long, device=device)

    def randint(lo: int, hi: int) -> int:  # [lo, hi)
        return int(torch.randint(lo, hi, (1,), generator=generator))

    for b in range(batch):
        for _ in range(randint(int(num_boxes[0]), int(num_boxes[1]))):
            alpha_index = randint(0, n_alphas)
            box = []
            for p in patch:
                hi = max(min_side, int(max_side_fraction * int(p)))
                side = min(randint(min_side, hi + 1), int(p))
                start = randint(0, int(p) - side + 1)
                box.append(slice(start, start + side))
            labels[b, 0, box[0], box[1], box[2]] = alpha_index
    return labels


def fuse(fg: Tensor, bg: Tensor, labels: Tensor, alphas: Sequence[float]) -> Tensor:
    """alpha * fg + (1 - alpha) * bg with alpha = alphas[labels] per voxel; fg, bg (B, C, *patch)."""
    alpha = torch.as_tensor(list(alphas), dtype=fg.dtype, device=fg.device)[labels]  # (B, 1, *patch)
    return alpha * fg + (1.0 - alpha) * bg


class VolumeFusionTask(PretrainTask):
    """Volume Fusion pretraining of `net` (module docstring).

    Args (besides PretrainTask's):
        alphas: the fusion coefficients, one class each. Defaults to (0, 0.25, 0.5, 0.75, 1).
        num_boxes: [min, max) boxes per sample. Defaults to (10, 40).
        min_side: smallest box side in voxels. Defaults to 8.
        max_side_fraction: largest box side as a fraction of the patch side. Defaults to 0.625.
    """

    method = "volume_fusion"

    def __init__(
        self,
        net: nn.Module,
        alphas: Sequence[float] = ALPHAS,
        num_boxes: Sequence[int] = (10, 40),
        min_side: int = 8,
        max_side_fraction: float = 0.625,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        optim: Optimisation | dict[str, Any] = Optimisation(lr=1e-3, weight_decay=1e-5),
        pretrained_encoder: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size, optim, pretrained_encoder)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.hparams.update(
            alphas=[float(a) for a in alphas],
            num_boxes=[int(n) for n in num_boxes],
        )
        if len(alphas) < 2 or any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ConfigError(f"model.alphas must be two or more coefficients in [0, 1], got {list(alphas)}.")
        if len(num_boxes) != 2 or not 1 <= int(num_boxes[0]) < int(num_boxes[1]):
            raise ConfigError(f"model.num_boxes must be [min, max) with 1 <= min < max, got {list(num_boxes)}.")
        out = (self.net_config or {}).get("args", {}).get("out_channels")
        if out is not None and int(out) != len(alphas):
            raise ConfigError(
                f"Volume Fusion predicts one class per alpha: set the network's out_channels to {len(alphas)}, not {out}."
            )
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self._same_volume_warned = False

    def _crops_per_volume(self) -> int:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(dm, "num_samples", 1) or 1)

    def fused_batch(self, x: Tensor, shift: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(fused images, alpha class map) of crops x (B, C, *patch): crop i fused over crop i + shift."""
        labels = fusion_boxes(
            x.shape[0],
            x.shape[2:],
            len(self.hparams.alphas),
            self.hparams.num_boxes,
            self.hparams.min_side,
            self.hparams.max_side_fraction,
            generator,
            x.device,
        )
        bg = torch.roll(x, shifts=shift, dims=0)
        return fuse(x, bg, labels, self.hparams.alphas), labels

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]  # (B, 1, *patch), B = volumes x crops per volume
        k = self._crops_per_volume()
        if x.shape[0] <= k and not self._same_volume_warned:
            self._same_volume_warned = True
            self.print(
                "Volume Fusion: one volume per batch, so fg and bg crops come from the same volume; "
                "use data.sampling.batch_size >= 2."
            )
        fused, labels = self.fused_batch(x, shift=k)
        loss = fp32_loss(self.loss_fn)(self.net(fused), labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # one validation volume per batch: fuse its centre crop over its own mirror image (a
        # different image at every voxel), with a fixed draw of boxes per case
        x = centre_patch(batch["image"], self.patch)
        labels = fusion_boxes(
            1,
            x.shape[2:],
            len(self.hparams.alphas),
            self.hparams.num_boxes,
            self.hparams.min_side,
            self.hparams.max_side_fraction,
            self.val_generator(batch_idx, "cpu"),
            x.device,
        )
        fused = fuse(x, torch.flip(x, dims=(2, 3, 4)), labels, self.hparams.alphas)
        logits = self.net(fused)
        self.log("val/loss", self.loss_fn(logits, labels), prog_bar=True, batch_size=1, sync_dist=True)
        acc = (logits.argmax(dim=1, keepdim=True) == labels).float().mean()
        self.log("val/accuracy", acc, batch_size=1, sync_dist=True)
