"""Backbone registry: `create_net(name, **args) -> nn.Module`, with a clean encoder/decoder split.

Pattern from timm's `create_model`: a registry maps short names to thin `nn.Module` classes with
typed keyword arguments and literal defaults. Every registered class

  * subclasses the MONAI network it wraps, so its state-dict keys are MONAI's own (community and
    MONAI-bundle weights load as they are),
  * records `self.net_config = {"name": <registry name>, "args": {...}}` (JSON-primitive init args),
    which is what an exported model's medct.json stores and `create_net` rebuilds from,
  * names its encoder: `encoder_prefixes` (state-dict key prefixes) and `encoder_features(x)` (multi-scale
    features, shallow to deep), so a pretrained encoder (SparK, contrastive, ...) is saved once with
    `save_encoder` and loaded into any network of the same backbone with `load_encoder`, which
    returns a strict report of loaded/missing/unexpected/mis-shaped keys.

Networks:
  unet         MONAI UNet (Kerfoot et al., "Left-ventricle quantification using residual U-Net", 2018).
  resenc_unet  (default) residual-encoder U-Net in the style of nnU-Net ResEnc (Isensee et al.,
               "nnU-Net Revisited", MICCAI 2024), built on MONAI DynUNet with residual blocks.
  segresnet    MONAI SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder
               regularization", 2018).
  swinunetr    MONAI SwinUNETR (Hatamizadeh et al., "Swin UNETR", 2022; Tang et al., "Self-Supervised
               Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet
from torch import Tensor, nn

from medct.errors import InputPathError, ModelFolderError
from medct.paths import atomic_file

DEFAULT_NET = "resenc_unet"
ENCODER_NET_KEY = "medct_net"  # safetensors metadata: the registry name the encoder came from

# ----------------------------------------------------------------------------- registry

_NETS: dict[str, type[nn.Module]] = {}
_T = TypeVar("_T", bound=type[nn.Module])


def register_net(name: str) -> Callable[[_T], _T]:
    """Class decorator: make `cls` buildable as `create_net(name, ...)`."""

    def deco(cls: _T) -> _T:
        if name in _NETS:
            raise ValueError(f"network name '{name}' is already registered to {_NETS[name].__name__}")
        cls.net_name = name  # type: ignore[attr-defined]
        _NETS[name] = cls
        return cls

    return deco


def list_nets() -> list[str]:
    """Registered network names, sorted."""
    return sorted(_NETS)


def create_net(name: str, **args: Any) -> nn.Module:
    """Build the registered network `name` with its keyword arguments (timm's create_model)."""
    if name not in _NETS:
        raise KeyError(f"unknown network '{name}'; registered networks are: {', '.join(list_nets())}")
    return _NETS[name](**args)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively: net args must survive JSON and torch.load(weights_only=True)."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _record_config(net: nn.Module, init_locals: dict[str, Any]) -> None:
    """Store `net.net_config` from the `locals()` of its __init__ (only the signature's parameters)."""
    params = inspect.signature(type(net).__init__).parameters
    args = {k: _jsonable(init_locals[k]) for k in params if k != "self"}
    json.dumps(args)  # fail at construction, not at export, if an argument is not JSON-primitive
    net.net_config = {"name": type(net).net_name, "args": args}  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- networks


@register_net("unet")
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
        _record_config(self, locals())
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


@register_net("resenc_unet")
class ResEncUNet(DynUNet):
    """Residual-encoder U-Net (nnU-Net ResEnc style) on MONAI DynUNet with `res_block=True`.

    One stage per entry of `filters`: 3^3 kernels everywhere, stride 1 at the input stage and 2 at
    every following one, so the input size must be divisible by 2^(len(filters) - 1).
    `blocks_per_stage`: residual blocks per encoder stage (the first one strides); nnU-Net's ResEnc
    presets use (1, 3, 4, 6, 6, 6). Default one per stage (DynUNet's own layout: lighter, and the
    state-dict keys stay MONAI's). The decoder has one block per stage, as in nnU-Net ResEnc.
    With `deep_supervision`, training-mode output is (B, 1 + deep_supr_num, C, D, H, W).
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
    ) -> None:
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
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=True,
        )
        _record_config(self, locals())
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


@register_net("segresnet")
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
        _record_config(self, locals())

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Encoder features, shallow to deep: (B, init_filters*2^i, D/2^i, H/2^i, W/2^i)."""
        _, feats = super().encode(x)
        return feats


@register_net("swinunetr")
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
        _record_config(self, locals())

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Swin hidden states, shallow to deep: (B, feature_size*2^i, D/2^(i+1), ...) for i = 0..4."""
        return list(self.swinViT(x, self.normalize))


# ----------------------------------------------------------------------------- encoder transfer


@dataclass
class EncoderLoadReport:
    """What `load_encoder` did: keys are the network's state-dict keys."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # encoder keys of the net absent from the source
    unexpected: list[str] = field(default_factory=list)  # source keys that are not encoder keys of the net
    mismatched: list[str] = field(default_factory=list)  # present in both with different shapes
    source_net: str | None = None  # registry name stored with the encoder file, when known

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched encoder tensors"
        )


def _encoder_prefixes(net: nn.Module) -> tuple[str, ...]:
    prefixes = getattr(net, "encoder_prefixes", None)
    if not prefixes:
        raise TypeError(
            f"{type(net).__name__} does not declare `encoder_prefixes`; build it with medct.nets.create_net"
        )
    return tuple(prefixes)


def encoder_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The encoder's tensors of `net` (keys as in `net.state_dict()`), detached."""
    prefixes = _encoder_prefixes(net)
    return {k: v.detach() for k, v in net.state_dict().items() if k.startswith(prefixes)}


def save_encoder(net: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write `net`'s encoder as safetensors (with the registry name and net args as metadata)."""
    from safetensors.torch import save_file

    out = Path(path)
    state = {k: v.cpu().contiguous() for k, v in encoder_state_dict(net).items()}
    config = getattr(net, "net_config", {})
    metadata = {
        "format": "pt",
        ENCODER_NET_KEY: str(config.get("name", "")),
        "net_args": json.dumps(config.get("args", {})),
    }
    with atomic_file(out) as tmp:  # no half-written encoder file
        save_file(state, str(tmp), metadata=metadata)
    return out


def _read_encoder_file(path: Path) -> tuple[dict[str, Tensor], str | None]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if path.is_dir():  # an exported model folder: take its full weights, the encoder is selected below
        path = path / "model.safetensors"
    if not path.is_file():
        raise InputPathError(f"Encoder file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), (meta.get(ENCODER_NET_KEY) or None)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{path} is not a readable safetensors encoder file ({e}).") from e


def load_encoder(
    net: nn.Module, path_or_state: str | os.PathLike[str] | dict[str, Tensor], strict: bool = True
) -> EncoderLoadReport:
    """Copy a pretrained encoder into `net` and report what matched.

    `path_or_state`: a file from `save_encoder`, an exported model folder (its encoder part is
    used), or a state dict keyed like `net.state_dict()`. With `strict`, any missing, unexpected or
    shape-mismatched key raises ModelFolderError and nothing is loaded; otherwise the matching
    tensors are loaded and the rest is only reported.
    """
    prefixes = _encoder_prefixes(net)
    source_net: str | None = None
    if isinstance(path_or_state, dict):
        state = dict(path_or_state)
        where = "the given state dict"
    else:
        p = Path(path_or_state).expanduser()
        state, source_net = _read_encoder_file(p)
        if p.is_dir():
            state = {k: v for k, v in state.items() if k.startswith(prefixes)}
        where = str(p)
    target = {k: v for k, v in net.state_dict().items() if k.startswith(prefixes)}
    report = EncoderLoadReport(source_net=source_net)
    report.missing = sorted(k for k in target if k not in state)
    report.unexpected = sorted(k for k in state if k not in target)
    for k in sorted(k for k in target if k in state):
        (report.loaded if tuple(state[k].shape) == tuple(target[k].shape) else report.mismatched).append(k)
    if strict and not report.ok:
        first = (report.missing or report.unexpected or report.mismatched)[0]
        name = getattr(net, "net_name", type(net).__name__)
        raise ModelFolderError(
            f"The encoder in {where} does not fit network '{name}' ({report.summary()}, e.g. '{first}')."
        )
    with torch.no_grad():
        params = dict(net.state_dict(keep_vars=True))
        for k in report.loaded:
            params[k].copy_(state[k].to(dtype=params[k].dtype, device=params[k].device))
    return report
