"""SparK: masked image modelling for convolutional encoders, in 3D.

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling",
ICLR 2023; 3D as in nnssl's SparK3D (Wald et al., "An OpenMind for 3D medical vision
self-supervised learning", 2025; MIC-DKFZ/nnssl `architectures/spark_model.py`).

  * A random mask on the stride-`mask_stride` grid of the patch (a 10^3 grid for 160^3 patches at
    stride 16): exactly int(mask_ratio * cells) cells are masked per sample (nnssl's
    `create_blocky_mask`).
  * Sparse convolution is emulated: the input is multiplied by the mask, and so is the output of
    every convolution and pooling of the encoder (at that stage's resolution); normalisation
    statistics are taken over the visible voxels only (per sample and channel). Nothing of a masked
    cell therefore reaches a visible feature (tested). Stages whose grid is coarser than the mask
    grid are not masked (nnssl's `_get_active_ex_or_ii`). The input is masked too, as in SparK's
    own code (keyu-tian/SparK `spark.py`: `inp_bchw * active_b1hw`); nnssl's SparkTrainer feeds the
    unmasked input, so its first convolution reads one voxel into every masked cell: a deviation
    kept on purpose (tests/parity/test_spark_parity.py feeds the reference the masked input).
  * Densify, per stage: instance norm without affine parameters over the visible voxels, masked
    positions filled with a learned mask token, a 3^3 convolution (the shallowest stage: identity),
    all as nnssl's SparK3D (tests/parity/test_spark_parity.py).
  * A plain U-Net decoder (transposed-conv up-sampling, skip concatenation, two conv-norm-act
    blocks per stage) with one output channel reconstructs the input; nnssl uses the nnU-Net
    network's own decoder, medct's registry networks do not expose theirs as a function of
    features, so the decoder here is SparK's own and is dropped after pretraining in both.
  * Loss: MSE on the masked voxels only; `norm_target` normalises the target per mask cell (MAE's
    `norm_pix_loss`, He et al., CVPR 2022), an option the issue asks to try.

The emulation is done with hooks on the registry network's own modules (`SparseEmulation`), so
the network's state-dict keys are untouched and the encoder exports as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medct.errors import ConfigError
from medct.pretrain.base import Optimisation, PretrainTask, centre_patch
from medct.transforms import Preprocessing

# ----------------------------------------------------------------------------- masks


def random_cell_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(B, 1, gx, gy, gz) float, 1 = visible: exactly int(ratio * cells) cells masked per sample."""
    cells = int(grid[0]) * int(grid[1]) * int(grid[2])
    n_masked = int(ratio * cells)
    order = torch.rand(batch, cells, generator=generator, device=device).argsort(dim=1)  # (B, cells)
    visible = torch.ones(batch, cells, device=device)
    visible.scatter_(1, order[:, :n_masked], 0.0)
    return visible.view(batch, 1, *[int(g) for g in grid])


def upsample_mask(mask: Tensor, shape: Sequence[int]) -> Tensor | None:
    """The cell mask (B, 1, gx, gy, gz) at a feature resolution `shape` (X, Y, Z) by repetition;
    None where that grid is coarser than the mask grid (the stage is not masked)."""
    grid = mask.shape[2:]
    if any(s < g for s, g in zip(shape, grid, strict=True)):
        return None
    if any(s % g for s, g in zip(shape, grid, strict=True)):
        raise ConfigError(
            f"SparK: a feature map of {list(shape)} voxels is not a whole number of mask cells ({list(grid)}); "
            "use a patch size divisible by model.init_args.mask_stride."
        )
    out = mask
    for dim, (s, g) in enumerate(zip(shape, grid, strict=True), start=2):
        out = out.repeat_interleave(s // g, dim=dim)
    return out  # (B, 1, X, Y, Z)


def masked_instance_norm(x: Tensor, visible: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Instance norm of x (B, C, X, Y, Z) with mean/variance over visible voxels (per sample and
    channel), zero at masked voxels. Written by hand: no library norm takes a mask."""
    n = visible.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)  # (B, 1, 1, 1, 1)
    mean = (x * visible).sum(dim=(2, 3, 4), keepdim=True) / n  # (B, C, 1, 1, 1)
    var = (((x - mean) * visible) ** 2).sum(dim=(2, 3, 4), keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)  # type: ignore[union-attr]
    return y * visible


def masked_batch_norm(module: nn.BatchNorm3d, x: Tensor, visible: Tensor) -> Tensor:
    """Batch norm with statistics over the visible voxels of the whole batch (SparK's SparseBatchNorm)."""
    if not module.training:
        return module(x) * visible
    n = visible.sum().clamp_min(1.0)
    mean = (x * visible).sum(dim=(0, 2, 3, 4), keepdim=True) / n  # (1, C, 1, 1, 1)
    var = (((x - mean) * visible) ** 2).sum(dim=(0, 2, 3, 4), keepdim=True) / n
    if module.track_running_stats and module.running_mean is not None:
        m = module.momentum if module.momentum is not None else 0.1
        with torch.no_grad():
            module.running_mean.mul_(1 - m).add_(m * mean.flatten())
            module.running_var.mul_(1 - m).add_(m * var.flatten() * n / (n - 1).clamp_min(1.0))
    y = (x - mean) * torch.rsqrt(var + module.eps)
    if module.affine:
        y = y * module.weight.view(1, -1, 1, 1, 1) + module.bias.view(1, -1, 1, 1, 1)
    return y * visible


class SparseEmulation:
    """Hooks on a network's encoder modules that emulate sparse convolution while `mask` is set.

    Every Conv3d / pooling output is multiplied by the mask at its resolution; InstanceNorm3d and
    BatchNorm3d compute their statistics over visible voxels. With `mask = None` the network runs
    exactly as without hooks (used for validation features and after pretraining). Norms other
    than instance/batch (group, layer) would mix masked and visible voxels: refused.
    """

    def __init__(self, net: nn.Module) -> None:
        self.mask: Tensor | None = None  # (B, 1, gx, gy, gz), 1 = visible
        roots = tuple(p.rstrip(".") for p in net.encoder_prefixes)  # module names of the encoder parts
        self.handles: list[Any] = []
        for name, module in net.named_modules():
            if name not in roots and not name.startswith(tuple(r + "." for r in roots)):
                continue
            if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
                self.handles.append(module.register_forward_hook(self._mask_output))
            elif isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)):
                self.handles.append(module.register_forward_hook(self._masked_norm))
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)):
                raise ConfigError(
                    f"SparK emulates sparse convolution for convolutional encoders with instance or batch norm; "
                    f"'{name}' of {type(net).__name__} is a {type(module).__name__}."
                )

    def _visible_at(self, out: Tensor) -> Tensor | None:
        if self.mask is None:
            return None
        return upsample_mask(self.mask.to(out.dtype), out.shape[2:])

    def _mask_output(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        visible = self._visible_at(out)
        return None if visible is None else out * visible

    def _masked_norm(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        # The hook replaces the norm's output: the dense statistics it computed are discarded.
        visible = self._visible_at(out)
        if visible is None:
            return None
        if isinstance(module, nn.BatchNorm3d):
            return masked_batch_norm(module, inputs[0], visible)
        return masked_instance_norm(inputs[0], visible, module.weight, module.bias, module.eps)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- blocks


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class Densify(nn.Module):
    """One stage's densify step: norm over visible voxels, mask token where masked, then `proj`
    (nnssl SparK3D: `SparseInstanceNorm3d(channels)`, i.e. no affine parameters)."""

    def __init__(self, channels: int, proj: bool) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=False)
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # SparK's initialisation
        self.proj: nn.Module = nn.Conv3d(channels, channels, 3, padding=1) if proj else nn.Identity()

    def forward(self, feat: Tensor, visible: Tensor | None) -> Tensor:  # (B, C, X, Y, Z) -> same
        if visible is None:  # a stage coarser than the mask: dense already
            return self.proj(self.norm(feat))
        feat = masked_instance_norm(feat, visible, self.norm.weight, self.norm.bias, self.norm.eps)
        feat = torch.where(visible > 0, feat, self.mask_token.to(feat.dtype).expand_as(feat))
        return self.proj(feat)


class SparKDecoder(nn.Module):
    """Plain U-Net decoder over the densified stage features (deepest first), one output channel."""

    def __init__(self, channels: Sequence[int], factors: Sequence[Sequence[int]], stem: Sequence[int]) -> None:
        super().__init__()
        # factors[i]: the up-sampling from stage i + 1 to stage i, per axis
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], tuple(factors[i]), stride=tuple(factors[i]))
            for i in range(len(channels) - 1)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_block(2 * channels[i], channels[i]), _conv_block(channels[i], channels[i]))
            for i in range(len(channels) - 1)
        )
        # an encoder whose first stage already strides (MONAI UNet) is brought back to input resolution
        self.stem_up: nn.Module = (
            nn.ConvTranspose3d(channels[0], channels[0], tuple(stem), stride=tuple(stem))
            if any(f > 1 for f in stem)
            else nn.Identity()
        )
        self.head = nn.Conv3d(channels[0], 1, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:  # stage features shallow..deep -> (B, 1, X, Y, Z)
        y = feats[-1]
        for i in reversed(range(len(self.ups))):
            y = self.ups[i](y)  # (B, c_i, stage-i grid)
            y = self.blocks[i](torch.cat([y, feats[i]], dim=1))
        return self.head(self.stem_up(y))


def encoder_layout(net: nn.Module, in_channels: int, side: int = 64) -> tuple[list[int], list[list[int]], list[int]]:
    """(channels per stage, up-sampling factor from each stage to the one above, stride of the first
    stage) of `net`'s encoder, from one dry run on a side^3 input."""
    with torch.no_grad():
        was_training = net.training
        net.eval()
        feats = net.encoder_features(torch.zeros(1, in_channels, side, side, side))
        net.train(was_training)
    channels = [int(f.shape[1]) for f in feats]
    factors = []
    for a, b in zip(feats[:-1], feats[1:], strict=True):
        factors.append([int(sa) // int(sb) for sa, sb in zip(a.shape[2:], b.shape[2:], strict=True)])
    return channels, factors, [side // int(s) for s in feats[0].shape[2:]]


def patch_normalised(x: Tensor, cell: Sequence[int], eps: float = 1e-6) -> Tensor:
    """x (B, 1, X, Y, Z) normalised to zero mean / unit variance within each mask cell."""
    b, c, X, Y, Z = x.shape
    cx, cy, cz = (int(v) for v in cell)
    v = x.view(b, c, X // cx, cx, Y // cy, cy, Z // cz, cz)
    mean = v.mean(dim=(3, 5, 7), keepdim=True)
    var = v.var(dim=(3, 5, 7), keepdim=True, unbiased=False)
    return ((v - mean) / (var + eps).sqrt()).view(b, c, X, Y, Z)


# ----------------------------------------------------------------------------- task


class SparKTask(PretrainTask):
    """SparK pretraining of `net`'s encoder (module docstring).

    Args (besides PretrainTask's):
        mask_ratio: fraction of mask cells masked per sample. Defaults to 0.75.
        mask_stride: mask cell side in voxels (the encoder's stride-16 grid). Defaults to 16.
        norm_target: reconstruct the per-cell normalised input. Defaults to False.
    """

    method = "spark"

    def __init__(
        self,
        net: nn.Module,
        mask_ratio: float = 0.75,
        mask_stride: int = 16,
        norm_target: bool = False,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        optim: Optimisation | dict[str, Any] = Optimisation(),
        pretrained_encoder: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size, optim, pretrained_encoder)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
        bad = [p for p in patch_size if int(p) % int(mask_stride)]
        if int(mask_stride) < 1 or bad:
            raise ConfigError(
                f"SparK needs a patch size divisible by mask_stride {mask_stride}, got {list(patch_size)}."
            )
        self.grid = [int(p) // int(mask_stride) for p in patch_size]
        in_channels = int((self.net_config or {}).get("args", {}).get("in_channels", 1))
        channels, factors, stem = encoder_layout(net, in_channels)
        self.sparse = SparseEmulation(net)
        # nnssl SparK3D: identity on the shallowest stage (i = 0 of the encoder's skips), 3^3 conv elsewhere
        self.densify = nn.ModuleList(Densify(c, proj=i > 0) for i, c in enumerate(channels))
        self.decoder = SparKDecoder(channels, factors, stem)

    def encode(self, x: Tensor, visible: Tensor) -> list[Tensor]:
        """Sparse encoder features (shallow to deep) of x (B, C, X, Y, Z) under the cell mask
        (B, 1, gx, gy, gz): masked input, every conv/pool output re-masked, visible-only norms."""
        full = upsample_mask(visible.to(x.dtype), x.shape[2:])
        self.sparse.mask = visible
        try:
            return self.net.encoder_features(x * full)
        finally:
            self.sparse.mask = None

    def reconstruct(self, x: Tensor, visible: Tensor) -> Tensor:
        """x (B, C, X, Y, Z) and the cell mask (B, 1, gx, gy, gz) -> reconstruction (B, 1, X, Y, Z)."""
        feats = self.encode(x, visible)
        dense = [
            d(f, upsample_mask(visible.to(f.dtype), f.shape[2:])) for d, f in zip(self.densify, feats, strict=True)
        ]
        return self.decoder(dense)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Masked-voxel MSE of one batch of crops x (B, C, *patch); the target is channel 0 of x."""
        visible = random_cell_mask(x.shape[0], self.grid, self.hparams.mask_ratio, generator, x.device)
        rec = self.reconstruct(x, visible).float()
        target = x[:, :1].float()
        if self.hparams.norm_target:
            target = patch_normalised(target, [int(self.hparams.mask_stride)] * 3)
        masked = 1.0 - upsample_mask(visible, x.shape[2:])  # (B, 1, X, Y, Z)
        return ((rec - target) ** 2 * masked).sum() / masked.sum().clamp_min(1.0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]  # (B, 1, *patch) in [0, 1]
        loss = self.loss(x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = centre_patch(batch["image"], self.patch)  # (1, 1, *patch): the whole volume's centre
        loss = self.loss(x, self.val_generator(batch_idx))
        self.log("val/loss", loss, prog_bar=True, batch_size=1, sync_dist=True)
