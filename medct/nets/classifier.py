"""Volume-level classification on a registry backbone's encoder: `encoder_classifier`.

The encoder of any registered dense network (the ResEnc default included) followed by a pooling
head: every encoder stage's output average-pooled and concatenated (the embedding the contrastive
pretraining trains, `medct.pretrain.contrastive.pooled_features`), dropout, one linear layer to
`out_channels` logits. The backbone's decoder is removed (`_drop_decoder`), so a classifier holds
only what it uses. Its encoder tensors keep the backbone's keys under `backbone.`; `load_encoder`
maps an encoder pretrained on the plain backbone onto them (`encoder_key_prefix`).
Registered with output "classes": the output is (B, out_channels), not a label map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medct.nets.registry import create_net, record_config, register_net


def _drop_decoder(backbone: nn.Module) -> None:
    """Delete the backbone's top-level children that hold parameters of which some are not the
    encoder's (decoders, output heads); parameter-free children (dropout) and encoder parts stay."""
    roots = {p.split(".")[0] for p in backbone.encoder_prefixes}
    encoder_ids = {
        id(p) for name, p in backbone.named_parameters() if name.startswith(tuple(backbone.encoder_prefixes))
    }
    for name, child in list(backbone.named_children()):
        params = list(child.parameters())
        if name not in roots and params and any(id(p) not in encoder_ids for p in params):
            del backbone._modules[name]


@register_net(
    "encoder_classifier",
    tiny_args={"backbone": "resenc_unet", "backbone_args": {"filters": [4, 8, 16]}},
    tiny_size=32,
    output="classes",
)
class EncoderClassifier(nn.Module):
    """A registry backbone's encoder + pooled linear head.

    Args:
        backbone: registry name of the dense network whose encoder is used. Defaults to "resenc_unet".
        backbone_args: its arguments (without in/out channels). Defaults to None (its defaults).
        in_channels: input channels. Defaults to 1.
        out_channels: classes. Defaults to 2.
        dropout: dropout before the linear layer. Defaults to 0.0.
    """

    def __init__(
        self,
        backbone: str = "resenc_unet",
        backbone_args: dict[str, Any] | None = None,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = create_net(backbone, in_channels=in_channels, **dict(backbone_args or {}))
        self.encoder_key_prefix = "backbone."
        self.encoder_prefixes: tuple[str, ...] = tuple("backbone." + p for p in self.backbone.encoder_prefixes)
        with torch.no_grad():
            side = 64
            width = sum(
                int(f.shape[1])
                for f in self.backbone.eval().encoder_features(torch.zeros(1, in_channels, side, side, side))
            )
        self.backbone.train()
        _drop_decoder(self.backbone)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(width, out_channels)
        record_config(self, EncoderClassifier, locals())

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """The backbone's encoder features, shallow to deep."""
        return self.backbone.encoder_features(x)

    def embed(self, x: Tensor) -> Tensor:  # (B, C, X, Y, Z) -> (B, sum of stage widths)
        return torch.cat([f.mean(dim=(2, 3, 4)) for f in self.encoder_features(x)], dim=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, X, Y, Z) -> (B, out_channels) logits
        return self.head(self.dropout(self.embed(x)))
