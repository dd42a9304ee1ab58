"""Multimodal ViT encoder with a UNETR decoder, for any subset of input modalities: `mm_unetr`.

The encoder of BM-MAE (Robinet et al., "Multimodal Masked Autoencoder Pre-training for 3D
MRI-Based Brain Tumor Analysis with Missing Modalities", 2025): one patch embedding per modality
(16^3 patches), frozen 3D sin-cos positions (MONAI `build_sincos_position_embedding`, computed for
any grid, so any volume size divisible by the patch works), and one transformer over the tokens of
all *present* modalities concatenated. A missing modality contributes no token: the same weights
run on every subset, with no architecture change (`forward(x, present=...)`).

For segmentation the transformer's hidden states at 1/4, 1/2, 3/4 and the full depth are averaged
over the present modalities at each position and decoded by MONAI's UNETR blocks (Hatamizadeh et
al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022), with the mean of the
present input channels as the full-resolution skip. Medct's CT use: the modalities are contrast
phases of one CT (native / arterial / venous) or CT and MR of the same anatomy, channel i =
`modalities[i]`. `medct.pretrain.bm_mae` pretrains the encoder (`embed.`, `blocks.`, `norm.`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import TransformerBlock, UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net


def sincos_positions(grid: Sequence[int], dim: int, device: torch.device) -> Tensor:
    """(1, gx * gy * gz, dim) frozen 3D sin-cos positions (MAE / BM-MAE), for any token grid."""
    return build_sincos_position_embedding(list(grid), dim, spatial_dims=3).data.to(device)


@register_net(
    "mm_unetr",
    tiny_args={"hidden_size": 48, "depth": 4, "num_heads": 4, "mlp_dim": 96, "feature_size": 8},
    tiny_size=32,
)
class MultiModalUNETR(nn.Module):
    """BM-MAE's multimodal ViT encoder + UNETR decoder (module docstring).

    Args:
        modalities: the input channels' names, in channel order. Defaults to ("ct",).
        in_channels: must equal len(modalities) when given (registry uniformity). Defaults to None.
        out_channels: classes, background included. Defaults to 2.
        patch_size: token side in voxels (16: the UNETR decoder's four doublings). Defaults to 16.
        hidden_size, depth, num_heads, mlp_dim: the transformer. Defaults to 384, 12, 6, 1536.
        feature_size: UNETR decoder width. Defaults to 16.
        dropout: transformer dropout. Defaults to 0.0.
    """

    def __init__(
        self,
        modalities: Sequence[str] = ("ct",),
        in_channels: int | None = None,
        out_channels: int = 2,
        patch_size: int = 16,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_dim: int = 1536,
        feature_size: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        modalities = [str(m) for m in modalities]
        if in_channels is not None and int(in_channels) != len(modalities):
            raise ValueError(f"mm_unetr: in_channels {in_channels} does not match the modalities {modalities}")
        if int(patch_size) != 16:
            raise ValueError(
                f"mm_unetr: the UNETR decoder up-samples 16x (four doublings); patch_size must be 16, got {patch_size}"
            )
        if int(hidden_size) % 6:
            raise ValueError(f"mm_unetr: hidden_size must be divisible by 6 (3D sin-cos positions), got {hidden_size}")
        if depth < 4 or depth % 4:
            raise ValueError(f"mm_unetr: depth must be a multiple of 4 (UNETR taps 4 depths), got {depth}")
        self.modalities, self.patch, self.hidden = modalities, int(patch_size), int(hidden_size)
        self.embed = nn.ModuleDict(
            {m: nn.Conv3d(1, hidden_size, patch_size, stride=patch_size) for m in modalities}
        )  # one tokenizer per modality
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.taps = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]
        fs, n = feature_size, ("instance")
        self.skip = UnetrBasicBlock(3, 1, fs, 3, 1, n, res_block=True)
        self.enc2 = UnetrPrUpBlock(3, hidden_size, fs * 2, 2, 3, 1, 2, n, res_block=True)
        self.enc3 = UnetrPrUpBlock(3, hidden_size, fs * 4, 1, 3, 1, 2, n, res_block=True)
        self.enc4 = UnetrPrUpBlock(3, hidden_size, fs * 8, 0, 3, 1, 2, n, res_block=True)
        self.dec5 = UnetrUpBlock(3, hidden_size, fs * 8, 3, 2, n, res_block=True)
        self.dec4 = UnetrUpBlock(3, fs * 8, fs * 4, 3, 2, n, res_block=True)
        self.dec3 = UnetrUpBlock(3, fs * 4, fs * 2, 3, 2, n, res_block=True)
        self.dec2 = UnetrUpBlock(3, fs * 2, fs, 3, 2, n, res_block=True)
        self.out = UnetOutBlock(3, fs, out_channels)
        self.encoder_prefixes: tuple[str, ...] = ("embed.", "blocks.", "norm.")
        record_config(self, MultiModalUNETR, locals())

    # -- tokens

    def present_indices(self, present: Sequence[bool] | Sequence[str] | None) -> list[int]:
        """Channel indices of the present modalities (by flags per channel or by names)."""
        if present is None:
            return list(range(len(self.modalities)))
        items = list(present)
        if items and all(isinstance(p, str) for p in items):
            unknown = [p for p in items if p not in self.modalities]
            if unknown:
                raise ValueError(f"unknown modalities {unknown}; this network takes {self.modalities}")
            idx = [self.modalities.index(str(p)) for p in items]
        else:
            if len(items) != len(self.modalities):
                raise ValueError(f"present has {len(items)} flags for {len(self.modalities)} modalities")
            idx = [i for i, p in enumerate(items) if p]
        if not idx:
            raise ValueError("at least one modality must be present")
        return sorted(idx)

    def tokenize(self, x: Tensor, index: int) -> tuple[Tensor, list[int]]:
        """Channel `index` of x (B, M, X, Y, Z) -> (B, N, hidden) tokens with positions, and the grid."""
        t = self.embed[self.modalities[index]](x[:, index : index + 1])  # (B, hidden, gx, gy, gz)
        grid = list(t.shape[2:])
        t = t.flatten(2).transpose(1, 2)  # (B, N, hidden)
        return t + sincos_positions(grid, self.hidden, t.device).to(t.dtype), grid

    def run_blocks(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The transformer on (B, T, hidden): (normed output, hidden states at the UNETR taps)."""
        taps = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.taps:
                taps.append(tokens)
        return self.norm(tokens), taps

    # -- the registry interface

    def _states(
        self, x: Tensor, present: Sequence[bool] | Sequence[str] | None
    ) -> tuple[list[Tensor], list[int], list[int]]:
        idx = self.present_indices(present)
        parts = [self.tokenize(x, i) for i in idx]
        grid = parts[0][1]
        out, taps = self.run_blocks(torch.cat([p[0] for p in parts], dim=1))  # (B, P * N, hidden)
        b, n = x.shape[0], parts[0][0].shape[1]

        def per_position(t: Tensor) -> Tensor:  # (B, P * N, D) -> (B, D, gx, gy, gz), mean over modalities
            return t.view(b, len(idx), n, -1).mean(dim=1).transpose(1, 2).reshape(b, -1, *grid)

        return [per_position(t) for t in [*taps, out]], idx, grid

    def encoder_features(self, x: Tensor, present: Sequence[bool] | Sequence[str] | None = None) -> list[Tensor]:
        """Hidden states at 1/4, 1/2, 3/4 and the full depth as (B, hidden, gx, gy, gz) maps (mean
        over the present modalities); all on the token grid (a ViT has no pyramid)."""
        return self._states(x, present)[0]

    def forward(self, x: Tensor, present: Sequence[bool] | Sequence[str] | None = None) -> Tensor:
        """x (B, M, X, Y, Z) (absent channels are ignored) -> (B, out_channels, X, Y, Z) logits."""
        (h1, h2, h3, h4), idx, _ = self._states(x, present)
        skip = self.skip(x[:, idx].mean(dim=1, keepdim=True))  # (B, fs, X, Y, Z)
        y = self.dec5(h4, self.enc4(h3))
        y = self.dec4(y, self.enc3(h2))
        y = self.dec3(y, self.enc2(h1))
        return self.out(self.dec2(y, skip))
