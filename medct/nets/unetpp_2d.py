"""MONAI BasicUNetPlusPlus in 2D (Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation", DLMIA 2018), registered as `unetpp_2d`: the 2.5D network of synthetic CT
(`medct.synthesis.sct`; Boussot et al., SynthRAD2025), whose input channels are 2k+1 neighbouring
axial slices and whose output is the centre slice. State-dict keys are MONAI's own.

A 2D network among the 3D ones: its registry entry says output="slices", i.e. it maps
(B, in_channels, X, Y) to (B, out_channels, X, Y); X and Y must be multiples of 16 (four poolings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from monai.networks.nets import BasicUNetPlusPlus
from torch import Tensor

from medct.nets.registry import record_config, register_net

STRIDE = 16  # four 2x poolings


@register_net("unetpp_2d", tiny_args={"features": [4, 4, 8, 8, 16, 4]}, tiny_size=32, output="slices")
class SliceUNetPlusPlus(BasicUNetPlusPlus):
    """2D U-Net++ without deep supervision: (B, in_channels, X, Y) -> (B, out_channels, X, Y)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            deep_supervision=False,
            act=(act, {"negative_slope": 0.1, "inplace": True}) if act == "leakyrelu" else act,
            norm=(norm, {"affine": True}) if norm == "instance" else norm,
            dropout=dropout,
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        record_config(self, SliceUNetPlusPlus, locals())
        self.encoder_prefixes: tuple[str, ...] = tuple(f"conv_{i}_0." for i in range(5))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # (B, C_in, X, Y) -> (B, C_out, X, Y)
        return super().forward(x)[0]

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """The backbone column x_{i,0}, shallow to deep: (B, features[i], X/2^i, Y/2^i) for i = 0..4."""
        feats = [self.conv_0_0(x)]
        for i in range(1, 5):
            feats.append(getattr(self, f"conv_{i}_0")(feats[-1]))  # each conv_i_0 max-pools first
        return feats


def pad_to_stride(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, X, Y) edge-padded at the far end to multiples of STRIDE; returns it and (X, Y)."""
    X, Y = x.shape[-2:]
    px, py = (-X) % STRIDE, (-Y) % STRIDE
    return (F.pad(x, (0, py, 0, px), mode="replicate") if px or py else x), (int(X), int(Y))
