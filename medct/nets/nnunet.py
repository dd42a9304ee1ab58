"""nnU-Net's own networks from dynamic-network-architectures (what nnU-Net v2 instantiates),
registered as `nnunet_resenc` (ResidualEncoderUNet) and `nnunet_plain` (PlainConvUNet).

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nat. Methods 2021; "nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical
Image Segmentation", MICCAI 2024. Subclassing the DNA classes keeps their state-dict keys, so one
set of weights runs in medct, in MONAI code and in nnU-Net v2's own predictor (`bench/segment.py`
writes the small nnU-Net model folder for that, see bench/_nnunet_folder.py).

Fixed as in every nnU-Net 3D plan: Conv3d, 3^3 kernels, stride 1 then 2 per stage, conv bias,
InstanceNorm3d(eps 1e-5, affine), LeakyReLU(0.01), no dropout. Features double from 32 up to 320
(nnU-Net's UNet_base_num_features and UNet_max_features_3d) unless `features_per_stage` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net

NNUNET_MAX_FEATURES = 320


def nnunet_fixed_kwargs() -> dict[str, Any]:
    """The constructor arguments every nnU-Net 3D plan fixes (the `_kw_requires_import` ones included)."""
    return {
        "conv_op": nn.Conv3d,
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
    }


def _stages(n_stages: int, features_per_stage: Sequence[int] | None) -> tuple[list[int], list[int], list[int]]:
    """(features, kernel sizes, strides) per stage."""
    if n_stages < 2:
        raise ValueError(f"an nnU-Net network needs at least 2 stages, got n_stages={n_stages}")
    feats = (
        [min(32 * 2**i, NNUNET_MAX_FEATURES) for i in range(n_stages)]
        if features_per_stage is None
        else [int(f) for f in features_per_stage]
    )
    if len(feats) != n_stages:
        raise ValueError(f"features_per_stage needs {n_stages} entries, got {feats}")
    return feats, [3] * n_stages, [1] + [2] * (n_stages - 1)


def _plans_arch(
    cls: type, feats: list[int], kernels: list[int], strides: list[int], decoder: list[int], **per_stage: list[int]
) -> dict[str, Any]:
    """What nnU-Net's plans.json says of this network ("architecture": class name + arch_kwargs)."""
    return {
        "network_class_name": f"{cls.__module__}.{cls.__name__}",
        "n_stages": len(feats),
        "features_per_stage": feats,
        "kernel_sizes": [[k] * 3 for k in kernels],
        "strides": [[s] * 3 for s in strides],
        **per_stage,
        "n_conv_per_stage_decoder": decoder,
    }


@register_net("nnunet_resenc", tiny_args={"n_stages": 3, "features_per_stage": [4, 8, 16]}, tiny_size=16)
class NNUNetResEnc(ResidualEncoderUNet):
    """nnU-Net's ResidualEncoderUNet (the ResEnc M/L/XL presets' network).

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: classes, background included (nnU-Net's num_classes). Defaults to 2.
        n_stages: resolution stages; the input side must be divisible by 2^(n_stages - 1). Defaults to 6.
        features_per_stage: channels per stage; None = 32 doubling up to 320. Defaults to None.
        n_blocks_per_stage: residual blocks per encoder stage. Defaults to (1, 3, 4, 6, 6, 6) (ResEnc-M).
        n_conv_per_stage_decoder: convolutions per decoder stage. Defaults to 1 each.
        deep_supervision: lower-resolution outputs in training mode (a list). Defaults to False.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_stages: int = 6,
        features_per_stage: Sequence[int] | None = None,
        n_blocks_per_stage: Sequence[int] | None = None,
        n_conv_per_stage_decoder: Sequence[int] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        feats, kernels, strides = _stages(n_stages, features_per_stage)
        blocks = list(n_blocks_per_stage) if n_blocks_per_stage is not None else [1, 3, 4, 6, 6, 6, 6, 6][:n_stages]
        decoder = list(n_conv_per_stage_decoder) if n_conv_per_stage_decoder is not None else [1] * (n_stages - 1)
        super().__init__(
            input_channels=in_channels,
            n_stages=n_stages,
            features_per_stage=feats,
            kernel_sizes=kernels,
            strides=strides,
            n_blocks_per_stage=blocks,
            num_classes=out_channels,
            n_conv_per_stage_decoder=decoder,
            deep_supervision=deep_supervision,
            **nnunet_fixed_kwargs(),
        )
        record_config(self, NNUNetResEnc, locals())
        self.encoder_prefixes: tuple[str, ...] = ("encoder.",)
        self.nnunet_arch = _plans_arch(ResidualEncoderUNet, feats, kernels, strides, decoder, n_blocks_per_stage=blocks)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, features[i], X/2^i, Y/2^i, Z/2^i) per stage."""
        return list(self.encoder(x))


@register_net("nnunet_plain", tiny_args={"n_stages": 3, "features_per_stage": [4, 8, 16]}, tiny_size=16)
class NNUNetPlain(PlainConvUNet):
    """nnU-Net's PlainConvUNet (the default 3d_fullres network of nnU-Net v2).

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: classes, background included (nnU-Net's num_classes). Defaults to 2.
        n_stages: resolution stages; the input side must be divisible by 2^(n_stages - 1). Defaults to 6.
        features_per_stage: channels per stage; None = 32 doubling up to 320. Defaults to None.
        n_conv_per_stage: convolutions per encoder stage. Defaults to 2 each.
        n_conv_per_stage_decoder: convolutions per decoder stage. Defaults to 2 each.
        deep_supervision: lower-resolution outputs in training mode (a list). Defaults to False.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_stages: int = 6,
        features_per_stage: Sequence[int] | None = None,
        n_conv_per_stage: Sequence[int] | None = None,
        n_conv_per_stage_decoder: Sequence[int] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        feats, kernels, strides = _stages(n_stages, features_per_stage)
        enc = list(n_conv_per_stage) if n_conv_per_stage is not None else [2] * n_stages
        decoder = list(n_conv_per_stage_decoder) if n_conv_per_stage_decoder is not None else [2] * (n_stages - 1)
        super().__init__(
            input_channels=in_channels,
            n_stages=n_stages,
            features_per_stage=feats,
            kernel_sizes=kernels,
            strides=strides,
            n_conv_per_stage=enc,
            num_classes=out_channels,
            n_conv_per_stage_decoder=decoder,
            deep_supervision=deep_supervision,
            **nnunet_fixed_kwargs(),
        )
        record_config(self, NNUNetPlain, locals())
        self.encoder_prefixes: tuple[str, ...] = ("encoder.",)
        self.nnunet_arch = _plans_arch(PlainConvUNet, feats, kernels, strides, decoder, n_conv_per_stage=enc)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, features[i], X/2^i, Y/2^i, Z/2^i) per stage."""
        return list(self.encoder(x))
