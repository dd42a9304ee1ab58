"""MONAI UNet with residual units (Kerfoot et al., "Left-ventricle quantification using residual
U-Net", STACOM 2018), registered as `unet`. State-dict keys are MONAI's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net


@register_net("unet", tiny_args={"channels": [4, 8, 16]}, tiny_size=32)
class MedUNet(UNet):
    """MONAI UNet with residual units; strides 2 between the levels of `channels`."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )
        record_config(self, MedUNet, locals())
        # MONAI nests the UNet as Sequential(down, SkipConnection(Sequential(down, ..., up)), up):
        # the encoder is every level's `down` plus the innermost bottom layer.
        names = {id(m): n for n, m in self.named_modules()}
        self._encoder_blocks = _unet_encoder_blocks(self.model)
        self.encoder_prefixes: tuple[str, ...] = tuple(names[id(m)] + "." for m in self._encoder_blocks)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: one (B, channels[i], D/2^i, H/2^i, W/2^i) per level."""
        feats = []
        for block in self._encoder_blocks:
            x = block(x)
            feats.append(x)
        return feats


def _unet_encoder_blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    node = model
    while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
        blocks.append(node[0])
        node = node[1].submodule
    blocks.append(node)  # bottom layer
    return blocks
