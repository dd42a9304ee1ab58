"""BM-MAE: masked autoencoding over several modalities, so one encoder serves any subset of them.

Robinet et al., "Multimodal Masked Autoencoder Pre-training for 3D MRI-Based Brain Tumor Analysis
with Missing Modalities", 2025 (after MultiMAE, Bachmann et al., ECCV 2022). medct's CT version:
the modalities are contrast phases of one CT (native / arterial / venous) or CT and MR of the same
anatomy, stacked as channels (`data.keys: [phases]`, a datalist entry lists one volume per
modality on one grid).

  * Encoder: `medct.nets.MultiModalUNETR` (one patch embedding per modality, 16^3 patches, frozen
    sin-cos positions, one transformer over the concatenated tokens).
  * Masking: 75 % of all tokens are masked; the visible budget (25 % of modalities x tokens) is
    split over the modalities by a Dirichlet(1) draw per sample (`dirichlet_visible`), so some
    samples see one modality almost only and the encoder learns to work from any subset.
  * Decoder (`MAEDecoder`): light (3 blocks), mask tokens plus per-modality learned embeddings and
    sin-cos positions; it reconstructs *every* modality at every position, missing ones included.
  * Loss: MSE on the masked patches (optionally per-patch normalised targets, MAE's norm_pix_loss).

Fine-tuning with any subset: the segmentation network is the same `mm_unetr` (its encoder loads
from the exported encoder folder); `forward(x, present=[...])` tokenises only the present
modalities, no architecture change. The MAE decoder is exported beside the encoder
(`mae_decoder.safetensors`), so `medct.api.reconstruct_modality` can fill in a missing modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import TransformerBlock
from torch import Tensor, nn

from medct.card import ModelCard
from medct.errors import ConfigError
from medct.nets.mm_unetr import sincos_positions
from medct.pretrain.base import Optimisation, PretrainTask, centre_patch
from medct.transforms import Preprocessing

DECODER_PART = "mae_decoder"  # the exported file mae_decoder.safetensors, from the task's `mae_decoder.` tensors


def dirichlet_visible(
    batch: int,
    modalities: int,
    tokens: int,
    visible: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(B, visible) indices into the M * N token sequence (modality-major): per sample, the visible
    budget split over the modalities by Dirichlet(1) proportions (largest-remainder rounding, at most
    N per modality), positions drawn at random within each modality."""
    out = torch.empty(batch, visible, dtype=torch.long)
    for b in range(batch):
        # Dirichlet(1, ..., 1) = normalised Exp(1) draws (torch's Dirichlet takes no generator)
        e = -torch.log(torch.rand(modalities, generator=generator).clamp_min(1e-12))
        share = e / e.sum() * visible
        counts = share.floor().long()
        for i in torch.argsort(share - counts, descending=True)[: visible - int(counts.sum())]:
            counts[i] += 1
        while (counts > tokens).any():  # a modality has only N tokens: give the rest to others
            over = int(torch.argmax(counts))
            extra = int(counts[over]) - tokens
            counts[over] = tokens
            room = torch.nonzero(counts < tokens).flatten()
            counts[room[int(torch.randint(len(room), (1,), generator=generator))]] += extra
        picks = [m * tokens + torch.randperm(tokens, generator=generator)[: int(c)] for m, c in enumerate(counts)]
        out[b] = torch.cat(picks)
    return out.to(device)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, M, X, Y, Z) -> (B, M * N, p^3), tokens in the order of `MultiModalUNETR.tokenize`."""
    b, m, X, Y, Z = x.shape
    v = x.reshape(b, m, X // p, p, Y // p, p, Z // p, p).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return v.reshape(b, m * (X // p) * (Y // p) * (Z // p), p**3)


def unpatchify(t: Tensor, m: int, grid: Sequence[int], p: int) -> Tensor:
    """Inverse of `patchify`: (B, M * N, p^3) -> (B, M, X, Y, Z)."""
    b = t.shape[0]
    gx, gy, gz = (int(g) for g in grid)
    v = t.reshape(b, m, gx, gy, gz, p, p, p).permute(0, 1, 2, 5, 3, 6, 4, 7)
    return v.reshape(b, m, gx * p, gy * p, gz * p)


class MAEDecoder(nn.Module):
    """BM-MAE's light decoder: visible encoder tokens + mask tokens -> every modality's patches.

    Args:
        encoder_dim: the encoder's hidden size. modalities: how many. patch: patch side.
        dim, depth, heads: the decoder transformer. Defaults to 192, 3, 6.
    """

    def __init__(
        self, encoder_dim: int, modalities: int, patch: int, dim: int = 192, depth: int = 3, heads: int = 6
    ) -> None:
        super().__init__()
        self.modalities, self.patch, self.dim = modalities, patch, dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(1, modalities, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.modality_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, 4 * dim, heads, 0.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch**3)

    def forward(self, visible_tokens: Tensor, visible_index: Tensor, grid: Sequence[int]) -> Tensor:
        """(B, V, encoder_dim) at (B, V) indices -> (B, M * N, p^3) predictions for every token."""
        b = visible_tokens.shape[0]
        n = int(grid[0]) * int(grid[1]) * int(grid[2])
        dec = self.embed(visible_tokens)  # (B, V, dim)
        full = self.mask_token.to(dec.dtype).expand(b, self.modalities * n, self.dim).clone()
        full = full.scatter(1, visible_index[..., None].expand(-1, -1, self.dim), dec)
        pos = sincos_positions(grid, self.dim, dec.device).to(dec.dtype)  # (1, N, dim)
        full = full.view(b, self.modalities, n, self.dim) + pos[:, None] + self.modality_embed.to(dec.dtype)
        full = full.view(b, self.modalities * n, self.dim)
        for block in self.blocks:
            full = block(full)
        return self.head(self.norm(full))


@torch.no_grad()
def reconstruct_all(net: nn.Module, decoder: MAEDecoder, x: Tensor, present: Sequence[str] | Sequence[bool]) -> Tensor:
    """(B, M, X, Y, Z) predictions of every modality from the tokens of the present ones (all visible)."""
    idx = net.present_indices(present)
    parts = [net.tokenize(x, i) for i in range(len(net.modalities))]
    tokens, grid = torch.cat([p[0] for p in parts], dim=1), parts[0][1]
    n = tokens.shape[1] // len(net.modalities)
    vis = torch.cat([i * n + torch.arange(n, device=x.device) for i in idx])[None].expand(x.shape[0], -1)
    encoded, _ = net.run_blocks(tokens.gather(1, vis[..., None].expand(-1, -1, tokens.shape[2])))
    return unpatchify(decoder(encoded, vis, grid), len(net.modalities), grid, net.patch)


class BMMAETask(PretrainTask):
    """BM-MAE pretraining of a `mm_unetr` encoder (module docstring).

    Args (besides PretrainTask's):
        mask_ratio: share of all tokens masked. Defaults to 0.75.
        decoder_dim, decoder_depth, decoder_heads: the light decoder. Defaults to 192, 3, 6.
        norm_target: reconstruct per-patch normalised targets. Defaults to False.
        image_key: the batch key holding (B, M, X, Y, Z). Defaults to "phases".
    """

    bf16_cpu = False  # bf16 autocast measured slower than fp32 on CPU (bench/train_throughput.py)

    method = "bm_mae"

    def __init__(
        self,
        net: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 192,
        decoder_depth: int = 3,
        decoder_heads: int = 6,
        norm_target: bool = False,
        image_key: str = "phases",
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        optim: Optimisation | dict[str, Any] = Optimisation(lr=1.5e-4, weight_decay=0.05),
        pretrained_encoder: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size, optim, pretrained_encoder)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        if not hasattr(net, "tokenize") or not hasattr(net, "modalities"):
            raise ConfigError(
                f"BM-MAE pretrains a multimodal ViT (medct.nets.MultiModalUNETR), not {type(net).__name__}."
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
        if any(int(p) % net.patch for p in patch_size):
            raise ConfigError(
                f"BM-MAE needs a patch size divisible by the token size {net.patch}, got {list(patch_size)}."
            )
        if int(decoder_dim) % 6:
            raise ConfigError(f"model.decoder_dim must be divisible by 6 (3D sin-cos positions), got {decoder_dim}.")
        self.mae_decoder = MAEDecoder(
            net.hidden, len(net.modalities), net.patch, decoder_dim, decoder_depth, decoder_heads
        )

    def model_card(self) -> ModelCard:
        """The encoder card, with how to rebuild the MAE decoder exported beside it."""
        card = super().model_card()
        hp = self.hparams
        card.extra[DECODER_PART] = {
            "dim": hp.decoder_dim,
            "depth": hp.decoder_depth,
            "heads": hp.decoder_heads,
            "modalities": list(self.net.modalities),
        }
        return card

    def card_parts(self) -> dict[str, str]:
        return {DECODER_PART: "mae_decoder."}

    def _all_tokens(self, x: Tensor) -> tuple[Tensor, list[int]]:
        parts = [self.net.tokenize(x, m) for m in range(len(self.net.modalities))]
        return torch.cat([p[0] for p in parts], dim=1), parts[0][1]  # (B, M * N, D), grid

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Masked-patch MSE of x (B, M, *patch) in [0, 1]."""
        m = len(self.net.modalities)
        if x.shape[1] != m:
            raise ConfigError(f"BM-MAE: the batch has {x.shape[1]} channels for the modalities {self.net.modalities}.")
        tokens, grid = self._all_tokens(x)
        n = tokens.shape[1] // m
        n_visible = max(1, round((1.0 - float(self.hparams.mask_ratio)) * m * n))
        vis = dirichlet_visible(x.shape[0], m, n, n_visible, generator, x.device)  # (B, V)
        enc_in = tokens.gather(1, vis[..., None].expand(-1, -1, tokens.shape[2]))
        encoded, _ = self.net.run_blocks(enc_in)
        pred = self.mae_decoder(encoded, vis, grid).float()  # (B, M * N, p^3)
        target = patchify(x.float(), self.net.patch)
        if self.hparams.norm_target:
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
            target = (target - mu) / (var + 1e-6).sqrt()
        masked = torch.ones(pred.shape[:2], device=pred.device).scatter(1, vis, 0.0)  # (B, M * N)
        per_token = ((pred - target) ** 2).mean(dim=-1)
        return (per_token * masked).sum() / masked.sum().clamp_min(1.0)

    def reconstruct(self, x: Tensor, present: Sequence[str] | Sequence[bool]) -> Tensor:
        """Every modality of x (B, M, X, Y, Z) (sides divisible by the patch) from the present ones only."""
        return reconstruct_all(self.net, self.mae_decoder, x, present)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch[self.hparams.image_key]  # (B, M, *patch)
        loss = self.loss(x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = centre_patch(batch[self.hparams.image_key], self.patch)
        loss = self.loss(x, self.val_generator(batch_idx, "cpu"))
        self.log("val/loss", loss, prog_bar=True, batch_size=1, sync_dist=True)


class ModalityReconstructor:
    """A BM-MAE export (encoder folder + mae_decoder.safetensors) that fills in missing modalities.

        >>> rec = ModalityReconstructor.from_folder("models/enc_bm_mae")
        >>> out = rec.reconstruct({"native": native_ct, "venous": venous_ct})   # Volumes on one grid
        >>> out["arterial"]                                                     # HU, on their grid

    The given volumes are resampled to the model's spacing in RAS (`medct.geometry`), windowed as in
    training, zero-padded to whole 16^3 patches, reconstructed in one pass (no sliding window: the
    token grid of a ViT with sin-cos positions can take the whole volume), mapped back to HU and to
    the input grid.
    """

    def __init__(self, net: nn.Module, decoder: MAEDecoder, card: Any, device: torch.device) -> None:
        self.net, self.decoder, self.card, self.device = net, decoder, card, device

    @classmethod
    def from_folder(cls, model_dir: str, device: str | None = None) -> ModalityReconstructor:
        from pathlib import Path

        from safetensors.torch import load_file

        from medct.checkpoint import read_model_card
        from medct.errors import ModelFolderError
        from medct.nets import load_encoder_folder
        from medct.predictor import resolve_device

        card = read_model_card(model_dir)
        spec = card.extra.get(DECODER_PART)
        weights = Path(model_dir) / f"{DECODER_PART}.safetensors"
        if spec is None or not weights.is_file():
            raise ModelFolderError(
                f"{model_dir} holds no BM-MAE decoder ({DECODER_PART}.safetensors); export a BM-MAE run."
            )
        dev = resolve_device(device)
        net, _ = load_encoder_folder(model_dir)
        decoder = MAEDecoder(
            net.hidden, len(net.modalities), net.patch, int(spec["dim"]), int(spec["depth"]), int(spec["heads"])
        )
        decoder.load_state_dict(load_file(str(weights)), strict=True)
        return cls(net.to(dev).eval(), decoder.to(dev).eval(), card, dev)

    @property
    def modalities(self) -> list[str]:
        return list(self.net.modalities)

    def reconstruct(self, volumes: dict[str, Any]) -> dict[str, Any]:
        """{modality: Volume or path} of the present modalities -> {modality: Volume} of every modality."""
        import numpy as np

        from medct.errors import ConfigError as Bad
        from medct.geometry import Grid, network_grid, resample_volume
        from medct.io import Volume, check_same_grid, read_volume
        from medct.transforms import scale_intensity

        if not volumes:
            raise Bad("Give at least one modality to reconstruct the others from.")
        unknown = [m for m in volumes if m not in self.modalities]
        if unknown:
            raise Bad(f"This model knows the modalities {self.modalities}, not {unknown}.")
        vols = {m: v if isinstance(v, Volume) else read_volume(v) for m, v in volumes.items()}
        ref = next(iter(vols.values()))
        for m, v in vols.items():
            check_same_grid(ref, v, what=f"{m} and the first modality")
        pre = self.card.preprocessing
        grid = network_grid(ref.affine, ref.shape, pre.spacing)
        p = self.net.patch
        padded = [int(np.ceil(s / p) * p) for s in grid.shape]
        x = torch.zeros(1, len(self.modalities), *padded)
        for m, v in vols.items():
            arr = scale_intensity(resample_volume(v, grid, padding=pre.hu_min).array, pre)
            x[0, self.modalities.index(m), : grid.shape[0], : grid.shape[1], : grid.shape[2]] = torch.from_numpy(arr)
        out = reconstruct_all(self.net, self.decoder, x.to(self.device), list(vols)).float().cpu()
        result = {}
        for i, m in enumerate(self.modalities):
            scaled = out[0, i, : grid.shape[0], : grid.shape[1], : grid.shape[2]].clamp(0, 1).numpy()
            hu = scaled * (pre.hu_max - pre.hu_min) + pre.hu_min
            on_net = Volume(hu.astype(np.float32), grid.affine)
            result[m] = resample_volume(on_net, Grid(tuple(ref.shape), ref.affine), padding=pre.hu_min)
        return result
