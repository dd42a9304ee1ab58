"""3D KL autoencoder of text-to-CT (`VAETask`, `medct fit --config configs/synthesis/vae_phantom.yaml`).

After Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022) and
MONAI MAISI (Guo et al., WACV 2025), as used by Molino et al., "Text-to-CT Generation via 3D Latent
Diffusion Model with Contrastive Vision-Language Pretraining" (2025; code cosbidev/Text2CT): MONAI's
AutoencoderKL (`medct.nets.KLAutoencoder`, 4 latent channels at 1/4 resolution by default), trained on
patches with

    loss = l1_weight * |x - x'| + perceptual_weight * IMPACT distance of a frozen medct encoder's
           features + kl_weight * KL(q(z|x) || N(0, I)) [+ adv_weight * least-squares GAN loss of a
           MONAI PatchDiscriminator, after `adv_start` steps]

The perceptual network is a medct model folder (`perceptual_model`: a segmentation model or a
pretrained encoder, e.g. one trained by medct on the same phantoms), not MONAI's PerceptualLoss,
whose LPIPS/MedicalNet/RadImageNet weights come from torch hub at run time (no downloads here).

Size rule: the encoder halves the grid len(channels) - 1 times, so every size of a volume it
encodes must be a multiple of f = 2^(len(channels) - 1) (`check_size`). Large volumes are encoded
and decoded in overlapping tiles (`encode`, `decode`: MONAI sliding_window_inference, Gaussian
blending), so memory is bounded by the tile. The latent scale factor (1 / sd of the latent means on
the validation volumes, Rombach et al. sec. 4.3.2) is measured after each validation and stored in
the model card: the diffusion model works on latent * scale_factor, which has unit variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.checkpoint import ModelCard
from medct.errors import ConfigError
from medct.precision import fp32_loss
from medct.task import MedCTTask
from medct.transforms import Preprocessing


def check_size(shape: Sequence[int], factor: int, what: str = "The VAE") -> None:
    """Raise a ConfigError unless every size is a positive multiple of `factor`, naming the rule."""
    bad = [int(s) for s in shape if int(s) < factor or int(s) % factor]
    if bad:
        near = [max(factor, round(int(s) / factor) * factor) for s in shape]
        raise ConfigError(
            f"{what} needs every size to be a multiple of {factor}; {list(map(int, shape))} is not "
            f"(nearest that works: {near})."
        )


def _sliding(fn: Any, x: Tensor, tile: Sequence[int], overlap: float) -> Tensor:
    """fn over overlapping tiles of x (B, C, X, Y, Z), Gaussian-blended; the output may be zoomed
    (MONAI sliding_window_inference infers the zoom from the output of the first tile)."""
    from monai.inferers import sliding_window_inference

    roi = tuple(min(int(t), int(s)) for t, s in zip(tile, x.shape[2:], strict=True))
    return sliding_window_inference(x, roi, 1, fn, overlap=overlap, mode="gaussian")


def encode(
    vae: nn.Module, x: Tensor, tile: Sequence[int] | None = None, overlap: float = 0.25
) -> tuple[Tensor, Tensor]:
    """(B, 1, X, Y, Z) in [0, 1] -> (mu, sigma), each (B, C_lat, X/f, Y/f, Z/f); tiled when the volume
    is larger than `tile` (None: whole volume)."""
    check_size(x.shape[2:], vae.downsample)
    if tile is None or all(int(s) <= int(t) for s, t in zip(x.shape[2:], tile, strict=True)):
        return vae.encode(x)
    for t in tile:
        check_size([t], vae.downsample, "A VAE tile")
    both = _sliding(lambda p: torch.cat(vae.encode(p), dim=1), x, tile, overlap)
    c = vae.latent_channels
    return both[:, :c], both[:, c:]


def decode(vae: nn.Module, z: Tensor, tile: Sequence[int] | None = None, overlap: float = 0.25) -> Tensor:
    """(B, C_lat, x, y, z) latent (unscaled) -> (B, 1, f x, f y, f z) image; tiled when the image is
    larger than `tile` (given in image voxels; None: whole volume)."""
    f = vae.downsample
    if tile is None or all(int(s) * f <= int(t) for s, t in zip(z.shape[2:], tile, strict=True)):
        return vae.decode(z)
    for t in tile:
        check_size([t], f, "A VAE tile")
    return _sliding(vae.decode, z, [int(t) // f for t in tile], overlap)


@fp32_loss
def kl_divergence(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels, mean over the batch (MONAI tutorials)."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    return 10.0 * torch.log10(data_range**2 / F.mse_loss(a, b).clamp_min(1e-12))


class VAETask(MedCTTask):
    """Train a `medct.nets.KLAutoencoder` on CT patches in [0, 1] (hu_min..hu_max).

    `preprocessing` and `patch_size` come from the data module (linked by the CLI) and go into the
    model card. perceptual_model: a medct model/encoder folder (None: no perceptual term).
    adv_weight > 0 adds a PatchDiscriminator (least-squares GAN) from step `adv_start` on. Validation
    reconstructs whole volumes (tiled at patch_size) and logs val/l1, val/psnr and the latent scale
    factor (val/scale_factor), which the model card stores.
    """

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(spacing=(4.0, 4.0, 4.0), modality="CT"),
        patch_size: Sequence[int] = (64, 64, 32),
        lr: float = 1e-4,
        l1_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_model: str | None = None,
        perceptual_layers: Sequence[int] = (0, 1),
        kl_weight: float = 1e-6,
        adv_weight: float = 0.0,
        adv_start: int = 0,
        disc_channels: int = 32,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.hparams.update(perceptual_layers=[int(i) for i in perceptual_layers])
        self.automatic_optimization = False  # generator and discriminator steps (MONAI's tutorial loop)
        check_size(patch_size, net.downsample, "The VAE's training patch (data.sampling.patch_size)")
        if perceptual_weight > 0 and perceptual_model is None:
            raise ConfigError(
                "model.perceptual_weight > 0 needs model.perceptual_model (a medct model or encoder folder)."
            )
        self._features: tuple[nn.Module, ...] = ()  # frozen; kept out of the state dict and checkpoints
        if perceptual_weight > 0 and perceptual_model is not None:
            from medct.registration.impact import load_feature_model

            self._features = (load_feature_model(perceptual_model, perceptual_layers).model,)
        self.disc: nn.Module | None = None
        if adv_weight > 0:
            from monai.networks.nets import PatchDiscriminator

            self.disc = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=disc_channels, in_channels=1)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self._latent_sq: list[Tensor] = []

    # -- card

    def model_card(self) -> ModelCard:
        hp = self.hparams
        return self.card(
            "vae",
            inference={"scale_factor": float(self.scale_factor), "tile": list(self.patch), "overlap": 0.25},
            outputs={"latent_channels": int(self.net.latent_channels), "downsample": int(self.net.downsample)},
            extra={"loss": {k: float(hp[k]) for k in ("l1_weight", "perceptual_weight", "kl_weight", "adv_weight")}},
        )

    def on_fit_start(self) -> None:
        self._features = tuple(m.to(self.device) for m in self._features)

    # -- losses

    def _perceptual(self, recon: Tensor, x: Tensor) -> Tensor:
        if not self._features:
            return recon.new_zeros(())
        from medct.registration.impact import impact_distance

        def hu(t: Tensor) -> Tensor:
            return t * (self.pre.hu_max - self.pre.hu_min) + self.pre.hu_min

        model = self._features[0]
        with torch.no_grad():
            target = model(hu(x))
        return impact_distance(model(hu(recon)), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        x = batch["image"]  # (B, 1, X, Y, Z) in [0, 1]
        opts = self.optimizers()
        opt_g = opts[0] if isinstance(opts, list) else opts
        recon, mu, sigma = self.net(x)
        l1 = (recon.float() - x).abs().mean()
        perceptual = self._perceptual(recon, x)
        kl = kl_divergence(mu, sigma)
        loss = hp.l1_weight * l1 + hp.perceptual_weight * perceptual + hp.kl_weight * kl
        adv_on = self.disc is not None and self.global_step >= hp.adv_start
        if adv_on:
            loss = loss + hp.adv_weight * (self.disc(recon)[-1].float() - 1.0).pow(2).mean()
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        if adv_on and isinstance(opts, list):
            opt_d = opts[1]
            real, fake = self.disc(x)[-1].float(), self.disc(recon.detach())[-1].float()
            d_loss = 0.5 * ((real - 1.0).pow(2).mean() + fake.pow(2).mean())
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/disc", d_loss, batch_size=x.shape[0])
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({"train/l1": l1, "train/kl": kl, "train/perceptual": perceptual}, batch_size=bs)
        return loss

    # -- validation: whole volumes, tiled at the patch size

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]  # (1, 1, X, Y, Z)
        tile = self.patch
        mu, _sigma = encode(self.net, x, tile)
        recon = decode(self.net, mu, tile).clamp(0.0, 1.0)
        self._latent_sq.append(torch.stack([mu.mean(), mu.pow(2).mean()]).detach())
        self.log("val/l1", (recon - x).abs().mean(), batch_size=1, sync_dist=True)
        self.log("val/psnr", psnr(recon, x), batch_size=1, sync_dist=True, prog_bar=True)
        self.log("val/loss", (recon - x).abs().mean(), batch_size=1, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self._latent_sq:
            return
        m = torch.stack(self._latent_sq).mean(0)
        self._latent_sq.clear()
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        sd = (m[1] - m[0] ** 2).clamp_min(1e-8).sqrt()
        self.scale_factor.fill_(float(1.0 / sd))
        self.log("val/scale_factor", self.scale_factor, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        if self.disc is None:
            return opt_g
        return [opt_g, torch.optim.Adam(self.disc.parameters(), lr=self.hparams.lr)]
