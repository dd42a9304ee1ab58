"""MONAI SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization",
BrainLes 2018), registered as `segresnet`.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNet
from torch import Tensor

from medct.nets.registry import record_config, register_net


@register_net("segresnet", tiny_args={"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, tiny_size=32)
class MedSegResNet(SegResNet):
    """MONAI SegResNet; input size divisible by 2^(len(blocks_down) - 1)."""

    encoder_prefixes: tuple[str, ...] = ("convInit.", "down_layers.")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout if dropout > 0 else None,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
        )
        record_config(self, MedSegResNet, locals())

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, init_filters*2^i, D/2^i, H/2^i, W/2^i)."""
        _, feats = super().encode(x)
        return feats
