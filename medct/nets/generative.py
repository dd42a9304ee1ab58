"""The three networks of text-to-CT (`medct.synthesis`), registered so that model cards, `medct export`
and `load_model_folder` treat them like every other medct network:

  * `kl_autoencoder` (output "latent"): MONAI's AutoencoderKL in 3D (Rombach et al., "High-Resolution
    Image Synthesis with Latent Diffusion Models", CVPR 2022; the MAISI layout of Guo et al., WACV 2025:
    4 latent channels at 1/4 resolution), (B, 1, X, Y, Z) -> (B, C_lat, X/f, Y/f, Z/f) with
    f = 2^(len(channels) - 1); every size must be a multiple of f.
  * `latent_diffusion_unet` (output "denoiser"): MONAI's DiffusionModelUNet with cross-attention on a
    text embedding, (B, C_lat, x, y, z), t, context (B, L, D) -> (B, C_lat, x, y, z).
  * `clip3d` (output "embedding"): a CT encoder from this registry (its deepest `encoder_features`,
    average-pooled) and a small text transformer, each projected to `embed_dim` and normalised, with a
    learnable temperature (Radford et al., "CLIP", ICML 2021; the 3D CLIP of Molino et al., "Text-to-CT
    Generation via 3D Latent Diffusion Model with Contrastive Vision-Language Pretraining", 2025).

The text transformer is written here because no offline text model can be loaded (no downloads at
run time): token + learned position embeddings, pre-norm `nn.TransformerEncoder`, the mean over
non-padding tokens as the pooled text embedding. Its tokenizer is trained by medct on the report
corpus (`medct.synthesis.clip3d.train_tokenizer`) and travels with the model as `tokenizer.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import Tensor, nn

from medct.nets.registry import create_net, record_config, register_net


@register_net(
    "kl_autoencoder",
    tiny_args={"channels": [8, 8, 8], "norm_num_groups": 4, "latent_channels": 4},
    tiny_size=16,
    output="latent",
)
class KLAutoencoder(AutoencoderKL):
    """3D KL autoencoder: `encode` -> (mu, sigma) of the latent, `decode` -> image; forward returns
    (reconstruction, mu, sigma) as MONAI's does. Non-local attention is off by default: at 3D
    resolution its memory grows with the square of the voxel count (MAISI drops it too)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        attention: bool = False,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            latent_channels=latent_channels,
            num_res_blocks=(num_res_blocks,) * len(channels),
            attention_levels=(False,) * len(channels),
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=attention,
            with_decoder_nonlocal_attn=attention,
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.latent_channels = int(latent_channels)
        self.downsample = 2 ** (len(channels) - 1)
        record_config(self, KLAutoencoder, locals())
        self.encoder_prefixes: tuple[str, ...] = ("encoder.", "quant_conv_mu.", "quant_conv_log_sigma.")


@register_net(
    "latent_diffusion_unet",
    tiny_args={
        "channels": [8, 8],
        "attention_levels": [False, True],
        "norm_num_groups": 4,
        "num_head_channels": 8,
        "cross_attention_dim": 8,
    },
    tiny_size=8,
    output="denoiser",
)
class LatentDiffusionUNet(DiffusionModelUNet):
    """3D denoiser in the VAE latent space, conditioned by cross-attention on `context` (B, L,
    cross_attention_dim); the timestep is embedded sinusoidally (MONAI)."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: Sequence[int] = (64, 128, 128),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
        cross_attention_dim: int = 128,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            with_conditioning=True,
            cross_attention_dim=cross_attention_dim,
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.cross_attention_dim = int(cross_attention_dim)
        self.stride = 2 ** (len(channels) - 1)  # latent sizes must be multiples of this
        record_config(self, LatentDiffusionUNet, locals())
        self.encoder_prefixes: tuple[str, ...] = ("conv_in.", "time_embed.", "down_blocks.", "middle_block.")


class TextTransformer(nn.Module):
    """Token ids (B, L) with padding id 0 -> (pooled (B, width), tokens (B, L, width))."""

    def __init__(self, vocab_size: int, max_length: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.normal_(self.position, std=0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.max_length = int(max_length)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        pad = ids == 0  # (B, L)
        x = self.token(ids) + self.position[:, : ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))  # (B, L, W)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # mean over real tokens
        return pooled, x


@register_net(
    "clip3d",
    tiny_args={
        "image_net": "unet",
        "image_args": {"channels": [4, 8, 16]},
        "vocab_size": 300,
        "max_length": 16,
        "width": 16,
        "layers": 1,
        "heads": 2,
        "embed_dim": 8,
    },
    tiny_size=16,
    output="embedding",
)
class CLIP3D(nn.Module):
    """CT encoder + text encoder with a shared, L2-normalised embedding space.

    image_net / image_args: any network of this registry (its deepest `encoder_features`, average
    pooled); a medct pretrained encoder loads into `image` with `load_pretrained_encoder`.
    """

    def __init__(
        self,
        image_net: str = "resenc_unet",
        image_args: dict[str, Any] | None = None,
        in_channels: int = 1,
        vocab_size: int = 1024,
        max_length: int = 96,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.image = create_net(image_net, in_channels=in_channels, out_channels=1, **dict(image_args or {}))
        with torch.no_grad():  # the width of the deepest stage (a tiny probe through the encoder)
            probe = torch.zeros(1, in_channels, *(32,) * 3)
            deep = int(self.image.encoder_features(probe)[-1].shape[1])
        self.image_proj = nn.Linear(deep, embed_dim, bias=False)
        self.text = TextTransformer(vocab_size, max_length, width, layers, heads)
        self.text_proj = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), CLIP's initial temperature
        self.in_channels = int(in_channels)
        self.embed_dim, self.max_length, self.vocab_size = int(embed_dim), int(max_length), int(vocab_size)
        record_config(self, CLIP3D, locals())
        self.encoder_prefixes: tuple[str, ...] = ("image.",)

    def encode_image(self, x: Tensor) -> Tensor:  # (B, C, X, Y, Z) -> (B, embed_dim), unit norm
        deep = self.image.encoder_features(x)[-1]
        return F.normalize(self.image_proj(deep.flatten(2).mean(-1)), dim=-1)

    def encode_text(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) ids -> (unit-norm pooled embedding (B, embed_dim), token embeddings (B, L, embed_dim))."""
        pooled, tokens = self.text(ids)
        return F.normalize(self.text_proj(pooled), dim=-1), self.text_proj(tokens)

    def forward(self, image: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """-> (image embeddings (B, D), text embeddings (B, D))."""
        return self.encode_image(image), self.encode_text(ids)[0]
