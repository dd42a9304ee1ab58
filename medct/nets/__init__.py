"""Networks: a registry of backbones with a clean encoder/decoder split (see `registry`, `encoder`).

    >>> from medct.nets import create_net, list_nets
    >>> net = create_net("resenc_unet_m", out_channels=5)     # nnU-Net ResEnc-M
    >>> net.net_config                                         # what a model card stores
    {'name': 'resenc_unet_m', 'args': {...}}

One file per family; each subclasses the MONAI network it wraps, so state-dict keys are MONAI's:
  unet.py         `unet` (MONAI UNet, residual units)
  resenc_unet.py  `resenc_unet` (default), `resenc_unet_m`, `resenc_unet_l` (nnU-Net ResEnc presets)
  segresnet.py    `segresnet` (MONAI SegResNet)
  swinunetr.py    `swinunetr` (MONAI SwinUNETR)
  nnunet.py       `nnunet_resenc`, `nnunet_plain` (nnU-Net v2's own networks, dynamic-network-architectures)
  mm_unetr.py     `mm_unetr` (BM-MAE's multimodal ViT, any subset of modalities, + UNETR decoder)
  attention_unet.py `attention_unet` (Oktay's attention-gated U-Net, deep supervision; Turbolift's net)
  unetpp_2d.py    `unetpp_2d` (MONAI BasicUNetPlusPlus in 2D: 2k+1 slices -> 1; synthetic CT)
  classifier.py   `encoder_classifier`: any backbone's encoder + a pooled linear head (volume-level classes)
Every network exposes `encoder_prefixes` and `encoder_features(x)`; `save_encoder` / `load_encoder`
move pretrained encoders between networks of one backbone. A new family is one more file here
that registers itself with `register_net(name, tiny_args=..., tiny_size=...)` and is listed in
`registry.NET_MODULES` and `_CLASSES` below (families load on first use);
a named variant is a registered subclass (`ResEncUNetM`) that fixes its base's settings.
"""

from __future__ import annotations

from typing import Any

from medct.nets.encoder import (
    ENCODER_NET_KEY,
    EncoderLoadReport,
    encoder_state_dict,
    load_encoder,
    load_encoder_folder,
    load_pretrained_encoder,
    load_unique_state_dict,
    save_encoder,
    unique_state_dict,
)
from medct.nets.registry import (
    DEFAULT_NET,
    NET_MODULES,
    NetEntry,
    create_net,
    create_tiny_net,
    list_nets,
    load_all_families,
    net_entry,
    record_config,
    register_net,
)

# The network classes load with their family on first use (`medct.nets.ResEncUNetM` in a YAML
# class_path, `create_net(name)`): importing medct.nets does not import MONAI.
_CLASSES = {
    "MedUNet": "medct.nets.unet",
    "ResEncUNet": "medct.nets.resenc_unet",
    "ResEncUNetM": "medct.nets.resenc_unet",
    "ResEncUNetL": "medct.nets.resenc_unet",
    "MedSegResNet": "medct.nets.segresnet",
    "MedSwinUNETR": "medct.nets.swinunetr",
    "NNUNetPlain": "medct.nets.nnunet",
    "NNUNetResEnc": "medct.nets.nnunet",
    "EncoderClassifier": "medct.nets.classifier",
    "MultiModalUNETR": "medct.nets.mm_unetr",
    "AttentionUNet": "medct.nets.attention_unet",
    "SliceUNetPlusPlus": "medct.nets.unetpp_2d",
    "KLAutoencoder": "medct.nets.generative",
    "LatentDiffusionUNet": "medct.nets.generative",
    "CLIP3D": "medct.nets.generative",
    "MotionTransformer": "medct.nets.motion",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'medct.nets' has no attribute '{name}'")


__all__ = [
    "DEFAULT_NET",
    "ENCODER_NET_KEY",
    "EncoderClassifier",
    "EncoderLoadReport",
    "MedSegResNet",
    "MedSwinUNETR",
    "MedUNet",
    "MultiModalUNETR",
    "NNUNetPlain",
    "NNUNetResEnc",
    "NET_MODULES",
    "NetEntry",
    "ResEncUNet",
    "ResEncUNetL",
    "ResEncUNetM",
    "SliceUNetPlusPlus",
    "create_net",
    "create_tiny_net",
    "encoder_state_dict",
    "list_nets",
    "load_all_families",
    "load_encoder",
    "load_encoder_folder",
    "load_pretrained_encoder",
    "load_unique_state_dict",
    "net_entry",
    "record_config",
    "register_net",
    "save_encoder",
    "unique_state_dict",
]
