"""Residual-encoder U-Net in the style of nnU-Net ResEnc (Isensee et al., "nnU-Net Revisited: A
Call for Rigorous Validation in 3D Medical Image Segmentation", MICCAI 2024), built on MONAI DynUNet
with residual blocks (state-dict keys stay MONAI's). Registered as `resenc_unet` (the default
network) and as the named variants `resenc_unet_m` / `resenc_unet_l` with nnU-Net's ResEnc depths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net

NORMS = {"instance": "INSTANCE", "batch": "BATCH"}  # medct name -> MONAI's norm layer name


@register_net("resenc_unet", tiny_args={"filters": [4, 8, 16]}, tiny_size=32)
class ResEncUNet(DynUNet):
    """Residual-encoder U-Net (nnU-Net ResEnc style) on MONAI DynUNet with `res_block=True`.

    One stage per entry of `filters`: 3^3 kernels everywhere, stride 1 at the input stage and 2 at
    every following one, so the input size must be divisible by 2^(len(filters) - 1).
    `blocks_per_stage`: residual blocks per encoder stage (the first one strides); nnU-Net's ResEnc
    presets use (1, 3, 4, 6, 6, 6). Default one per stage (DynUNet's own layout: lighter, and the
    state-dict keys stay MONAI's). The decoder has one block per stage, as in nnU-Net ResEnc.
    With `deep_supervision`, training-mode output is (B, 1 + deep_supr_num, C, X, Y, Z).

    Args:
        in_channels: input channels (1 for CT). Defaults to 1.
        out_channels: classes, background included. Defaults to 2.
        filters: channels per stage, shallow to deep. Defaults to (32, 64, 128, 256, 320).
        deep_supervision: also return lower-resolution heads in training mode. Defaults to False.
        deep_supr_num: number of extra heads with deep supervision. Defaults to 1.
        dropout: dropout probability in every block (0 = none). Defaults to 0.0.
        blocks_per_stage: residual blocks per encoder stage; None = one each. Defaults to None.
        norm: "instance" (nnU-Net's) or "batch" (BatchNorm3d: running statistics that test-time
            adaptation such as TENT can re-estimate on a new scanner). Defaults to "instance".
    """

    encoder_prefixes: tuple[str, ...] = ("input_block.", "downsamples.", "bottleneck.")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Sequence[int] = (32, 64, 128, 256, 320),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        dropout: float = 0.0,
        blocks_per_stage: Sequence[int] | None = None,
        norm: str = "instance",
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"resenc_unet norm must be one of {', '.join(NORMS)}, got {norm!r}")
        n = len(filters)
        if n < 3:
            raise ValueError(f"resenc_unet needs at least 3 stages in `filters`, got {list(filters)}")
        blocks = [1] * n if blocks_per_stage is None else [int(b) for b in blocks_per_stage]
        if len(blocks) != n or min(blocks) < 1:
            raise ValueError(
                f"resenc_unet: `blocks_per_stage` needs one count >= 1 per stage of `filters` ({n}), got {blocks}"
            )
        strides = [1] + [2] * (n - 1)
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * n,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(filters),
            dropout=dropout if dropout > 0 else None,
            norm_name=(NORMS[norm], {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=True,
        )
        record_config(self, ResEncUNet, locals())
        # DynUNet's recursive `skip_layers` registers every block a second time under another name:
        # duplicated state-dict keys sharing storage, which safetensors refuses. The same topology
        # runs as a loop in `forward` below, so the recursive copy is dropped.
        del self.skip_layers
        # Deeper stages: the stage's strided block, then stride-1 residual blocks of the same width.
        self.input_block = self._deepen(self.input_block, filters[0], blocks[0])
        self.downsamples = nn.ModuleList(
            [self._deepen(b, f, k) for b, f, k in zip(self.downsamples, filters[1:-1], blocks[1:-1], strict=True)]
        )
        self.bottleneck = self._deepen(self.bottleneck, filters[-1], blocks[-1])

    def _deepen(self, block: nn.Module, width: int, n_blocks: int) -> nn.Module:
        """`block` followed by n_blocks - 1 stride-1 UnetResBlocks of `width` channels (or `block` alone)."""
        if n_blocks == 1:
            return block
        extra = [
            UnetResBlock(3, width, width, 3, 1, self.norm_name, self.act_name, dropout=self.dropout)
            for _ in range(n_blocks - 1)
        ]
        return nn.Sequential(block, *extra)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, filters[i], D/2^i, H/2^i, W/2^i) per stage."""
        x = self.input_block(x)
        feats = [x]
        for down in self.downsamples:
            x = down(x)
            feats.append(x)
        feats.append(self.bottleneck(feats[-1]))
        return feats

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, D, H, W) -> (B, Cout, D, H, W)
        feats = self.encoder_features(x)
        y = feats[-1]
        n_up = len(self.upsamples)
        heads: list[Tensor] = []
        for i, up in enumerate(self.upsamples):  # deepest first, as in DynUNet
            y = up(y, feats[-2 - i])
            level = n_up - 1 - i  # DynUNet's skip-layer index: 0 is the full-resolution level
            if self.deep_supervision and 1 <= level <= self.deep_supr_num:
                heads.append(self.deep_supervision_heads[level - 1](y))
        out = self.output_block(y)
        if self.training and self.deep_supervision:
            heads.reverse()  # shallow (highest resolution) first, as DynUNet returns them
            out_all = [out] + [nn.functional.interpolate(h, out.shape[2:]) for h in heads]
            return torch.stack(out_all, dim=1)  # (B, 1 + deep_supr_num, Cout, D, H, W)
        return out


# ----------------------------------------------------------------------------- variants
# nnU-Net's residual-encoder presets (nnUNetPlannerResEncM / ...ResEncL, Isensee et al. 2024):
# 32 base features doubled per stage up to 320, (1, 3, 4, 6, 6, 6, ...) residual blocks per encoder
# stage, one block per decoder stage. M and L build the same network for the same number of stages;
# they differ in the patch size nnU-Net plans for them (8 vs 24 GB of GPU memory), which a recipe
# states as data.sampling.patch_size. nnU-Net plans the number of stages from the patch size: 6 for 3D
# full-resolution patches of ~128^3 (bottleneck 4^3), hence the default.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6)
RESENC_MAX_FEATURES = 320


def _preset(n_stages: int) -> tuple[list[int], list[int]]:
    """(filters, blocks_per_stage) of nnU-Net's ResEnc presets for `n_stages` stages."""
    if not 3 <= n_stages <= len(RESENC_BLOCKS):
        raise ValueError(f"n_stages must lie in [3, {len(RESENC_BLOCKS)}], got {n_stages}")
    return [min(32 * 2**i, RESENC_MAX_FEATURES) for i in range(n_stages)], list(RESENC_BLOCKS[:n_stages])


@register_net("resenc_unet_m", tiny_args={"n_stages": 3}, tiny_size=32)
class ResEncUNetM(ResEncUNet):
    """nnU-Net ResEnc-M: features (32, 64, 128, 256, 320, 320), blocks (1, 3, 4, 6, 6, 6) for 6 stages.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: classes, background included. Defaults to 2.
        n_stages: resolution stages (input side divisible by 2^(n_stages - 1)). Defaults to 6.
        deep_supervision: lower-resolution heads in training mode. Defaults to False.
        deep_supr_num: extra heads with deep supervision. Defaults to 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_stages: int = 6,
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
    ) -> None:
        filters, blocks = _preset(n_stages)
        super().__init__(in_channels, out_channels, filters, deep_supervision, deep_supr_num, 0.0, blocks)
        record_config(self, ResEncUNetM, locals())


@register_net("resenc_unet_l", tiny_args={"n_stages": 3}, tiny_size=32)
class ResEncUNetL(ResEncUNetM):
    """nnU-Net ResEnc-L: the ResEnc-M network (same features and blocks per stage, same arguments),
    meant for the larger patches nnU-Net plans for 24 GB GPUs (state them as data.sampling.patch_size, e.g.
    160^3). A name of its own so that recipes and model cards say which preset they follow."""
