"""Contrastive pretraining of a 3D encoder: SimCLR and MoCo v2.

  * SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020 — two augmented views of one region, an MLP projector, the NT-Xent loss over the
    batch (temperature 0.5 here, as nnssl's simCLRTrainer).
  * MoCo v2: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
    CVPR 2020, and Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020 — a
    momentum (EMA) copy of encoder and projector encodes the second view, negatives come from a
    queue of earlier keys, InfoNCE at temperature 0.2.

3D specifics follow nnssl's SimCLRTransform (MIC-DKFZ/nnssl `ssl_data/dataloading/simclr_transform.py`):
the data module delivers one crop per volume sample (`data.sampling.patch_size`, e.g. 96^3); the two views
are `crop_size` (64^3) sub-crops of it that overlap by at least `min_overlap` (50 %) along every
axis, so both show the same region. The embedding is every encoder stage's output, average-
pooled and concatenated (B, sum of stage widths), into the projector. Augmentations are CT-sensible
MONAI array transforms applied to each view on its device (mirroring, 90-degree axial rotation,
brightness, contrast/gamma, noise, blur, as nnssl's list); no elastic warps, and intensities stay
in the HU window's [0, 1] scale.

The projector is nnssl's (VoCoProjectionHead: three linear layers, ReLU between) with SimCLR's
batch norm on its hidden layers instead of nnssl's per-sample InstanceNorm1d: measured on phantom
crops, per-sample normalisation left all embeddings at cosine ~0.995 from the start (the pooled
features of instance-normalised stages share a large common part) and SimCLR's loss stayed at
ln(2N - 1), collapse; normalising over the batch removes that common part. Both views go through
the projector together (2B samples), so batch statistics exist even for one crop per step; for the
same reason MoCo's loss is the symmetric one of MoCo v3 (Chen, Xie, He, ICCV 2021): each view is
a query against the other view's momentum key. nnssl clips gradients at norm 0.1
(`trainer.gradient_clip_val` in the recipes).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.errors import ConfigError
from medct.precision import fp32_loss
from medct.pretrain.base import Optimisation, PretrainTask, centre_patch
from medct.transforms import Preprocessing


def overlapping_offsets(
    patch: Sequence[int], crop: Sequence[int], min_overlap: float, generator: torch.Generator | None = None
) -> tuple[list[int], list[int]]:
    """Start corners of two `crop`s inside `patch` that overlap by >= min_overlap along each axis."""
    a, b = [], []
    for p, c in zip(patch, crop, strict=True):
        p, c = int(p), int(c)
        start = int(torch.randint(0, p - c + 1, (1,), generator=generator))
        reach = c - math.ceil(min_overlap * c)  # the largest shift that keeps the overlap
        lo, hi = max(0, start - reach), min(p - c, start + reach)
        a.append(start)
        b.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
    return a, b


def _crop(x: Tensor, start: Sequence[int], size: Sequence[int]) -> Tensor:
    return x[..., start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]


def _plain(x: Any) -> Tensor:
    """A MONAI MetaTensor (what its transforms return) as a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


@fp32_loss
def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: z1, z2 (N, d) embeddings of the two views; each view's positive is its
    partner, the other 2N - 2 embeddings are negatives. MONAI's ContrastiveLoss (normalises the
    embeddings itself); tests/pretrain/test_contrastive.py checks it against the definition."""
    from monai.losses import ContrastiveLoss

    return ContrastiveLoss(temperature=temperature)(z1.float(), z2.float())


def pooled_features(net: nn.Module, x: Tensor) -> Tensor:
    """Every encoder stage's output average-pooled and concatenated: (B, sum of stage widths)."""
    return torch.cat([f.mean(dim=(2, 3, 4)) for f in net.encoder_features(x)], dim=1)


def projection_head(width: int, hidden: int, out: int) -> nn.Sequential:
    """(B, width) -> (B, out): nnssl's three-layer head with batch-normalised hidden layers."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


def view_augmentation() -> Any:
    """The per-view augmentation (MONAI array transforms on one (C, X, Y, Z) view)."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandFlip,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandRotate90,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    return Compose(
        [
            RandGaussianNoise(prob=0.1, std=0.02),
            RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandScaleIntensity(factors=0.25, prob=0.15),  # brightness x [0.75, 1.25]
            RandShiftIntensity(offsets=0.05, prob=0.15),
            RandAdjustContrast(gamma=(0.7, 1.5), prob=0.3),
            RandFlip(spatial_axis=0, prob=0.5),
            RandFlip(spatial_axis=1, prob=0.5),
            RandFlip(spatial_axis=2, prob=0.5),
            RandRotate90(prob=0.5, spatial_axes=(0, 1)),  # in the axial plane
        ]
    )


class ContrastiveTask(PretrainTask):
    """SimCLR or MoCo v2 pretraining of `net`'s encoder (module docstring).

    Args (besides PretrainTask's):
        method: "simclr" or "moco". Defaults to "simclr".
        crop_size: side of each view in voxels (<= the data patch). Defaults to (64, 64, 64).
        min_overlap: least overlap of the two views along each axis. Defaults to 0.5.
        temperature: softmax temperature (SimCLR 0.5, MoCo v2 0.2). Defaults to 0.5.
        proj_hidden, proj_dim: projector widths (nnssl: 2048 and 2048). Defaults to 2048 and 2048.
        queue_size: MoCo negatives kept. Defaults to 4096.
        momentum: MoCo EMA of the key encoder. Defaults to 0.999.
    """

    def __init__(
        self,
        net: nn.Module,
        method: Literal["simclr", "moco"] = "simclr",
        crop_size: Sequence[int] = (64, 64, 64),
        min_overlap: float = 0.5,
        temperature: float = 0.5,
        proj_hidden: int = 2048,
        proj_dim: int = 2048,
        queue_size: int = 4096,
        momentum: float = 0.999,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        optim: Optimisation | dict[str, Any] = Optimisation(),
        pretrained_encoder: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size, optim, pretrained_encoder)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.hparams.update(
            crop_size=[int(c) for c in crop_size],
        )
        if method not in ("simclr", "moco"):
            raise ConfigError(f"model.method must be simclr or moco, got '{method}'.")
        if len(crop_size) != 3 or any(
            int(c) > int(p) or int(c) < 1 for c, p in zip(crop_size, patch_size, strict=True)
        ):
            raise ConfigError(
                f"model.crop_size {list(crop_size)} must be three sides no larger than data.sampling.patch_size {list(patch_size)}."
            )
        if not 0.0 < min_overlap <= 1.0:
            raise ConfigError(f"model.min_overlap must lie in (0, 1], got {min_overlap}.")
        if not temperature > 0:
            raise ConfigError(f"model.temperature must be positive, got {temperature}.")
        in_channels = int((self.net_config or {}).get("args", {}).get("in_channels", 1))
        with torch.no_grad():
            width = pooled_features(net.eval(), torch.zeros(1, in_channels, *[int(c) for c in crop_size])).shape[1]
        net.train()
        self.projector = projection_head(width, proj_hidden, proj_dim)
        self.augment = view_augmentation()
        self._val: list[tuple[Tensor, Tensor]] = []
        if method == "moco":
            if int(queue_size) < 1 or not 0.0 <= momentum < 1.0:
                raise ConfigError("model.queue_size must be >= 1 and model.momentum in [0, 1).")
            self.key_net = copy.deepcopy(net).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(proj_dim, int(queue_size)), dim=0))  # (d, K)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def method(self) -> str:  # type: ignore[override]  # the card's pretraining method
        return str(self.hparams.method)

    def on_fit_start(self) -> None:
        # augmentation draws follow the run's seed (seed_everything), like the data pipeline's
        self.augment.set_random_state(seed=int(torch.initial_seed() % 2**32) + self.global_rank)

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, *crop) -> projected embeddings (B, proj_dim)."""
        return self.projector(pooled_features(self.net, x))

    def views(self, x: Tensor, augment: bool, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two overlapping crop views (B, C, *crop_size) of each crop in x (B, C, *patch)."""
        crop = self.hparams.crop_size
        v1, v2 = [], []
        for sample in x:
            a, b = overlapping_offsets(sample.shape[1:], crop, self.hparams.min_overlap, generator)
            first, second = _crop(sample, a, crop), _crop(sample, b, crop)
            if augment:
                first, second = self.augment(first), self.augment(second)
            v1.append(_plain(first))
            v2.append(_plain(second))
        return torch.stack(v1).contiguous(), torch.stack(v2).contiguous()

    def _gather(self, z: Tensor, grads: bool) -> Tensor:
        if self._trainer is None or self.trainer.world_size <= 1:
            return z
        return self.all_gather(z, sync_grads=grads).flatten(0, 1)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = float(self.hparams.momentum)
        for q, k in ((self.net, self.key_net), (self.projector, self.key_projector)):
            for pq, pk in zip(q.parameters(), k.parameters(), strict=True):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        k = keys.shape[0]
        size = self.queue.shape[1]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(k, device=keys.device) + ptr) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + k) % size)

    def moco_loss(self, v1: Tensor, v2: Tensor, update: bool) -> Tensor:
        """Symmetric InfoNCE of queries (both views, query encoder) against the other view's key
        (momentum encoder) and the queue; the keys of both views are enqueued."""
        b = v1.shape[0]
        both = torch.cat([v1, v2])  # (2B, C, *crop)
        q = F.normalize(self.embed(both).float(), dim=1)  # (2B, d)
        with torch.no_grad():
            k = F.normalize(self.key_projector(pooled_features(self.key_net, both)).float(), dim=1)
            k = torch.cat([k[b:], k[:b]])  # each query's positive: the other view's key
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (2B, 1)
        l_neg = q @ self.queue.clone().detach().float()  # (2B, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / float(self.hparams.temperature)
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if update:
            self._enqueue(self._gather(k, grads=False))
        return loss

    def simclr_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        b = v1.shape[0]
        z = self.embed(torch.cat([v1, v2]))  # (2B, d): one projector pass, batch norm over both views
        return nt_xent(self._gather(z[:b], True), self._gather(z[b:], True), float(self.hparams.temperature))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        v1, v2 = self.views(batch["image"], augment=True)
        if self.hparams.method == "moco":
            self._momentum_update()
            loss = self.moco_loss(v1, v2, update=True)
        else:
            loss = self.simclr_loss(v1, v2)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=v1.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = centre_patch(batch["image"], self.patch)  # (1, C, *patch)
        v1, v2 = self.views(x, augment=False, generator=self.val_generator(batch_idx, "cpu"))
        z = self.embed(torch.cat([v1, v2])).float()  # eval mode: batch norm uses its running statistics
        self._val.append((z[:1], z[1:]))

    def on_validation_epoch_end(self) -> None:
        """val/retrieval_top1: how often a view's nearest partner among all validation volumes is the
        other view of the same region (chance 1 / N); val/loss: NT-Xent over them when N >= 2."""
        if not self._val:
            return
        z1 = self._gather(torch.cat([a for a, _ in self._val]), False)
        z2 = self._gather(torch.cat([b for _, b in self._val]), False)
        self._val.clear()
        sim = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T  # (N, N)
        top1 = (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean()
        self.log("val/retrieval_top1", top1, batch_size=len(sim))
        if len(sim) >= 2:
            self.log("val/loss", nt_xent(z1, z2, float(self.hparams.temperature)), batch_size=len(sim))
