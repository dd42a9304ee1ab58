"""Attention U-Net (Oktay et al., "Attention U-Net: learning where to look for the pancreas", MIDL
2018) with deep supervision, registered as `attention_unet`: the network of Turbolift learning
(Haseljic, Chatterjee et al. 2022), 3D, with outputs at 1/8, 1/4, 1/2 and full scale.

Built from MONAI's own blocks (`monai.networks.nets.attentionunet`: ConvBlock, UpConv,
AttentionBlock). Written out here rather than subclassing MONAI's `AttentionUnet` because that one
nests its levels recursively and returns only the full-resolution output, so the intermediate
decoder outputs that deep supervision needs cannot be reached.

Training mode with `deep_supervision`: (B, 1 + deep_supr_num, C, D, H, W), the full-resolution
output first, the coarser heads upsampled (trilinear) to full size, as `resenc_unet` returns them
(SegmentationTask's deep-supervision loss reads that layout). Eval mode: (B, C, D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.attentionunet import AttentionBlock, ConvBlock, UpConv
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net


@register_net("attention_unet", tiny_args={"channels": [4, 8, 16, 32, 32], "deep_supr_num": 3}, tiny_size=32)
class AttentionUNet(nn.Module):
    """Attention-gated 3D U-Net; stride 2 between the levels of `channels` (batch norm, ReLU).

    Args:
        in_channels / out_channels: input channels and classes.
        channels: features per level, full resolution first. Defaults to (16, 32, 64, 128, 256).
        deep_supervision: also return the coarser decoder outputs in training mode. Defaults to False.
        deep_supr_num: how many coarser outputs (1/2, 1/4, 1/8, ... scale). Defaults to 3.
        dropout: dropout in the convolution blocks. Defaults to 0.0.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        deep_supervision: bool = False,
        deep_supr_num: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ch = [int(c) for c in channels]
        if len(ch) < 2:
            raise ValueError(f"attention_unet needs at least 2 levels in channels, got {ch}")
        if deep_supervision and not 1 <= deep_supr_num <= len(ch) - 2:
            raise ValueError(
                f"attention_unet: deep_supr_num must lie in [1, {len(ch) - 2}] for {len(ch)} levels, got {deep_supr_num}"
            )
        record_config(self, AttentionUNet, locals())
        self.deep_supervision, self.deep_supr_num = bool(deep_supervision), int(deep_supr_num)
        self.encoder = nn.ModuleList(
            [ConvBlock(3, in_channels, ch[0], dropout=dropout)]
            + [ConvBlock(3, ch[i - 1], ch[i], strides=2, dropout=dropout) for i in range(1, len(ch))]
        )
        # decoder level i (0 = full resolution) takes level i + 1's output up to level i
        self.upconvs = nn.ModuleList([UpConv(3, ch[i + 1], ch[i]) for i in range(len(ch) - 1)])
        self.gates = nn.ModuleList(
            [AttentionBlock(3, f_int=max(ch[i] // 2, 1), f_g=ch[i], f_l=ch[i]) for i in range(len(ch) - 1)]
        )
        self.merges = nn.ModuleList([ConvBlock(3, 2 * ch[i], ch[i], dropout=dropout) for i in range(len(ch) - 1)])
        self.head = nn.Conv3d(ch[0], out_channels, kernel_size=1)
        # heads on decoder levels 1 .. deep_supr_num (1/2, 1/4, 1/8 scale)
        self.ds_heads = nn.ModuleList(
            [nn.Conv3d(ch[i], out_channels, kernel_size=1) for i in range(1, 1 + self.deep_supr_num)]
            if self.deep_supervision
            else []
        )
        self.encoder_prefixes: tuple[str, ...] = ("encoder.",)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, channels[i], D/2^i, H/2^i, W/2^i) per level."""
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, D, H, W) -> (B, Cout, D, H, W)
        feats = self.encoder_features(x)
        y = feats[-1]
        decoded: list[Tensor] = []  # decoder outputs, deepest first
        for i in reversed(range(len(self.upconvs))):
            up = self.upconvs[i](y)  # (B, ch[i], D/2^i, ...)
            gated = self.gates[i](g=up, x=feats[i])
            y = self.merges[i](torch.cat((gated, up), dim=1))
            decoded.append(y)
        out = self.head(y)
        if not (self.training and self.deep_supervision):
            return out
        levels = decoded[::-1]  # full resolution first
        heads = [
            nn.functional.interpolate(head(levels[i + 1]), size=out.shape[2:], mode="trilinear", align_corners=False)
            for i, head in enumerate(self.ds_heads)
        ]
        return torch.stack([out, *heads], dim=1)  # (B, 1 + deep_supr_num, Cout, D, H, W)
