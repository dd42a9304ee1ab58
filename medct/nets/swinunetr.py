"""MONAI SwinUNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of
Brain Tumors in MRI Images", BrainLes 2021; Tang et al., "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", CVPR 2022), registered as `swinunetr`.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SwinUNETR
from torch import Tensor

from medct.nets.registry import record_config, register_net


# 64^3 tiny input: the 32x-downsampled bottleneck is instance-normalised, which needs more than one voxel.
@register_net("swinunetr", tiny_args={"feature_size": 12, "depths": [1, 1, 1, 1]}, tiny_size=64)
class MedSwinUNETR(SwinUNETR):
    """MONAI SwinUNETR (no img_size in MONAI >= 1.5: any input divisible by 32 per axis).

    `feature_size` must be divisible by 12. The encoder is the Swin transformer (`swinViT.`), which
    is also the part MONAI's self-supervised weights (Tang et al. 2022) cover.
    """

    encoder_prefixes: tuple[str, ...] = ("swinViT.",)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        dropout_path_rate: float = 0.0,
        use_v2: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            dropout_path_rate=dropout_path_rate,
            use_v2=use_v2,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        record_config(self, MedSwinUNETR, locals())

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Swin hidden states, shallow to deep: (B, feature_size*2^i, D/2^(i+1), ...) for i = 0..4."""
        return list(self.swinViT(x, self.normalize))
