"""Text-conditioned latent diffusion (`LDMTask`) and generation (`TextToCT`, `medct generate`).

After Molino et al., "Text-to-CT Generation via 3D Latent Diffusion Model with Contrastive
Vision-Language Pretraining" (2025; code cosbidev/Text2CT) and MONAI MAISI (Guo et al., WACV 2025):
a frozen medct VAE (`medct.synthesis.vae`) maps CT to a latent at 1/f resolution; a 3D diffusion
UNet (`medct.nets.LatentDiffusionUNet`, MONAI's DiffusionModelUNet) denoises latent * scale_factor
with cross-attention on the text embedding of a frozen medct 3D CLIP (`medct.synthesis.clip3d`):
`context="pooled"` (default) is the pooled, unit-norm embedding, a context of length 1 as in
Text2CT; `context="tokens"` is the per-token sequence (B, max_length, D) of the CLIP text encoder,
padding positions zeroed, as Stable Diffusion / MAISI-style models attend over text tokens: the
denoiser can then read each stated fact from its own words instead of from one pooled vector.

  * objective "rflow" (default): rectified flow (Liu et al., ICLR 2023) with MONAI's RFlowScheduler,
    x_t = (1 - t) z + t eps, the network predicts v = z - eps; logit-normal timesteps (Esser et
    al., SD3, ICML 2024) with MAISI's resolution-dependent shift. "ddpm": epsilon prediction on
    MONAI's DDPMScheduler (scaled-linear betas), sampled with DDIM (Song et al., ICLR 2021).
  * classifier-free guidance (Ho & Salimans, 2022): the text context is replaced by a constant
    (`null_value`, MONAI's cfg_fill_value) with probability `cond_drop` in training (Text2CT: 10%);
    sampling mixes uncond + guidance * (cond - uncond) by MONAI's DiffusionInferer (guidance 5,
    30 steps by default).
  * the frozen VAE and CLIP are part of the task, so one checkpoint holds all three and `medct
    export` writes one model folder: model.safetensors (the diffusion UNet), vae.safetensors,
    clip.safetensors, tokenizer.json and medct.json (task "text2ct"), whose extra.parts holds the
    VAE's and CLIP's own cards.

Latents and text embeddings of the (deterministic) training items are computed once and cached in
memory by case path and text (the VAE and CLIP are frozen); each step draws a fresh latent sample
z = mu + sigma * eps from the cached posterior.

Generated volumes are HU (int16) on a RAS grid at the model's spacing (or resampled to `spacing`),
centred on the world point the training volumes were centred on (card inference.center_mm).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.checkpoint import ModelCard
from medct.errors import ConfigError, InputPathError, ModelFolderError
from medct.precision import autocast
from medct.synthesis.clip3d import TOKENIZER_FILE, load_tokenizer, tokenize
from medct.synthesis.vae import check_size, decode
from medct.task import MedCTTask
from medct.transforms import Preprocessing
from medct.volume import Volume

Objective = Literal["rflow", "ddpm"]
Context = Literal["pooled", "tokens"]
TRAIN_TIMESTEPS = 1000


def make_scheduler(objective: str, latent_numel: int) -> Any:
    """The training scheduler of `objective` (MONAI): RFlow with logit-normal, resolution-shifted
    timesteps (MAISI's settings), or DDPM with scaled-linear betas (MONAI's latent-diffusion tutorial)."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    if objective == "rflow":
        return RFlowScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS,
            use_discrete_timesteps=True,
            sample_method="logit-normal",
            use_timestep_transform=True,
            base_img_size_numel=int(latent_numel),
            spatial_dim=3,
        )
    if objective == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195
        )
    raise ConfigError(f"model.objective must be 'rflow' or 'ddpm', got '{objective}'.")


def sampling_scheduler(objective: str, sampler: str, steps: int, latent_numel: int, train_numel: int) -> Any:
    """The scheduler that samples a model trained with `objective`: RFlow steps for "rflow", DDIM
    for "ddpm" (the sampler must match what the model learned to predict)."""
    from monai.networks.schedulers import DDIMScheduler

    need = {"rflow": "rflow", "ddpm": "ddim"}[objective]
    if sampler != need:
        raise ConfigError(
            f"This model was trained with the {objective} objective, which samples with '{need}', not '{sampler}'."
        )
    if not 1 <= int(steps) <= TRAIN_TIMESTEPS:
        raise ConfigError(f"--steps must be between 1 and {TRAIN_TIMESTEPS}, got {steps}.")
    if objective == "rflow":
        sched = make_scheduler("rflow", train_numel)
        sched.set_timesteps(int(steps), input_img_size_numel=int(latent_numel))
        return sched
    sched = DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        schedule="scaled_linear_beta",
        beta_start=0.0015,
        beta_end=0.0195,
        clip_sample=False,
    )
    sched.set_timesteps(int(steps))
    return sched


def sample_latent(
    net: nn.Module,
    scheduler: Any,
    noise: Tensor,
    context: Tensor,
    guidance: float | None,
    null_value: float,
    progress: bool = False,
) -> Tensor:
    """Run the sampling chain from `noise` (B, C, x, y, z) with cross-attention `context` (B, L, D).
    guidance None: the conditional prediction only; a float: classifier-free guidance (MONAI's
    DiffusionInferer: uncond + guidance * (cond - uncond), uncond = context filled with null_value)."""
    from monai.inferers import DiffusionInferer

    inferer = DiffusionInferer(scheduler)
    return inferer.sample(
        input_noise=noise,
        diffusion_model=net,
        scheduler=scheduler,
        conditioning=context,
        mode="crossattn",
        verbose=progress,
        cfg=None if guidance is None else float(guidance),
        cfg_fill_value=float(null_value),
    )


def text_embedding(clip: nn.Module, ids: Tensor, context: str) -> Tensor:
    """(B, L) token ids -> the cross-attention context of `context` kind: "pooled" (B, 1, D), the
    unit-norm CLIP text embedding, or "tokens" (B, L, D), the token embeddings with padding zeroed."""
    pooled, tokens = clip.encode_text(ids)
    if context == "pooled":
        return pooled.unsqueeze(1)
    if context == "tokens":
        return tokens * (ids != 0).unsqueeze(-1).to(tokens.dtype)
    raise ConfigError(f"model.context must be 'pooled' or 'tokens', got '{context}'.")


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _load_part(model_dir: str, task: str) -> tuple[nn.Module, ModelCard]:
    from medct.checkpoint import load_model_folder

    if not Path(model_dir).is_dir():
        raise InputPathError(f"The {task} model folder '{model_dir}' does not exist; export one with `medct export`.")
    net, card = load_model_folder(model_dir)
    if card.task != task:
        raise ConfigError(f"{model_dir} holds a '{card.task}' model where a '{task}' model is needed.")
    return net, card


class LDMTask(MedCTTask):
    """Train a `medct.nets.LatentDiffusionUNet` in the latent space of the VAE folder `vae`,
    conditioned on the text embedding of the CLIP folder `clip` (both exported with `medct export`).

    preprocessing / patch_size (the whole generation grid) come from the data module and must
    match the VAE's. objective: "rflow" or "ddpm". context: "pooled" (the CLIP text embedding, length
    1, Text2CT) or "tokens" (the CLIP text encoder's token sequence). cond_drop: probability of replacing the text
    context by `null_value` (classifier-free guidance). steps / guidance: the card's sampling defaults.
    """

    def __init__(
        self,
        net: nn.Module,
        vae: str,
        clip: str,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(spacing=(4.0, 4.0, 4.0), modality="CT"),
        patch_size: Sequence[int] = (96, 96, 48),
        objective: Objective = "rflow",
        context: Context = "pooled",
        lr: float = 1e-4,
        cond_drop: float = 0.1,
        null_value: float = -1.0,
        steps: int = 30,
        guidance: float = 5.0,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        if objective not in ("rflow", "ddpm"):
            raise ConfigError(f"model.objective must be 'rflow' or 'ddpm', got '{objective}'.")
        if context not in ("pooled", "tokens"):
            raise ConfigError(f"model.context must be 'pooled' or 'tokens', got '{context}'.")
        if not 0.0 <= cond_drop < 1.0:
            raise ConfigError(f"model.cond_drop must be in [0, 1), got {cond_drop}.")
        self.vae, self.vae_card = _load_part(vae, "vae")
        self.clip, self.clip_card = _load_part(clip, "clip")
        _frozen(self.vae), _frozen(self.clip)
        tok_path = Path(clip) / TOKENIZER_FILE
        if not tok_path.is_file():
            raise ModelFolderError(f"The CLIP model folder '{clip}' has no {TOKENIZER_FILE}.")
        self.tokenizer_json = tok_path.read_text()
        self.tokenizer = load_tokenizer(self.tokenizer_json)
        pre, own = self.vae_card.preprocessing, self.pre
        if [round(s, 4) for s in pre.spacing] != [round(s, 4) for s in own.spacing] or (pre.hu_min, pre.hu_max) != (
            own.hu_min,
            own.hu_max,
        ):
            raise ConfigError(
                f"The data (spacing {list(own.spacing)}, window [{own.hu_min}, {own.hu_max}]) must match the VAE's "
                f"(spacing {list(pre.spacing)}, window [{pre.hu_min}, {pre.hu_max}])."
            )
        f = int(self.vae.downsample)
        check_size(patch_size, f * int(net.stride), "The generation grid (data.size = data.sampling.patch_size)")
        if int(net.in_channels) != int(self.vae.latent_channels):
            raise ConfigError(
                f"The diffusion UNet takes {net.in_channels} channels but the VAE's latent has {self.vae.latent_channels}."
            )
        if int(net.cross_attention_dim) != int(self.clip.embed_dim):
            raise ConfigError(
                f"The diffusion UNet's cross_attention_dim ({net.cross_attention_dim}) must equal the CLIP embedding "
                f"size ({self.clip.embed_dim})."
            )
        self.scale_factor = float(self.vae_card.inference.get("scale_factor", 1.0))
        self.latent_shape = [int(p) // f for p in patch_size]
        # MONAI schedulers are nn.Modules without state worth saving (RFlowScheduler does not even
        # initialise nn.Module), so the task holds it outside its module tree
        self._scheduler = (make_scheduler(objective, int(np.prod(self.latent_shape))),)
        self._latents: dict[str, tuple[Tensor, Tensor]] = {}  # case -> (mu, sigma) on CPU
        self._contexts: dict[str, Tensor] = {}  # text -> (L, D)
        self.center_mm = [0.0, 0.0, 0.0]

    # -- card

    def model_card(self) -> ModelCard:
        hp = self.hparams
        sampler = "rflow" if hp.objective == "rflow" else "ddim"
        return self.card(
            "text2ct",
            preprocessing=self.vae_card.preprocessing,
            inference={
                "objective": hp.objective,
                "sampler": sampler,
                "steps": int(hp.steps),
                "guidance": float(hp.guidance),
                "null_value": float(hp.null_value),
                "scale_factor": self.scale_factor,
                "tile": list(self.vae_card.inference.get("tile", self.patch)),
                "center_mm": [float(c) for c in self.center_mm],
                "max_length": int(self.clip.max_length),
                "context": str(hp.context),
            },
            outputs={"units": "HU", "range": [self.vae_card.preprocessing.hu_min, self.vae_card.preprocessing.hu_max]},
            extra={
                "parts": {"vae": self.vae_card.to_dict(), "clip": self.clip_card.to_dict()},
                "cond_drop": hp.cond_drop,
            },
        )

    @property
    def scheduler(self) -> Any:
        return self._scheduler[0]

    def card_parts(self) -> dict[str, str]:
        return {"vae": "vae.", "clip": "clip."}

    def card_files(self) -> dict[str, str]:
        return {TOKENIZER_FILE: self.tokenizer_json}

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        items = getattr(dm, "train_items", None) or []
        if items:  # the world centre of the training grids: where generated volumes are placed
            from medct.io import read_volume

            vol = read_volume(items[0]["image"])
            centre = vol.affine[:3, :3] @ ((np.asarray(vol.shape[:3]) - 1) / 2.0) + vol.affine[:3, 3]
            self.center_mm = [float(c) for c in centre]

    def on_train_epoch_start(self) -> None:
        self.vae.eval(), self.clip.eval()

    # -- conditioning and latents (frozen parts, cached)

    def text_context(self, texts: Sequence[str]) -> Tensor:
        """(B,) texts -> (B, L, D) cross-attention contexts (L = 1 pooled, max_length tokens)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._contexts]
        if missing:
            with torch.no_grad():
                ids = tokenize(self.tokenizer, missing, self.clip.max_length).to(self.device)
                emb = text_embedding(self.clip, ids, self.hparams.context)
            self._contexts.update({t: e.detach().cpu() for t, e in zip(missing, emb, strict=True)})
        return torch.stack([self._contexts[t] for t in texts]).to(self.device)

    def latents(self, images: Tensor, cases: Sequence[str]) -> Tensor:
        """(B, 1, X, Y, Z) images -> scaled latent samples (B, C, x, y, z)."""
        todo = [i for i, c in enumerate(cases) if c not in self._latents]
        if todo:
            with torch.no_grad():
                mu, sigma = self.vae.encode(images[todo])
            for j, i in enumerate(todo):
                self._latents[cases[i]] = (mu[j].detach().cpu(), sigma[j].detach().cpu())
        mu = torch.stack([self._latents[c][0] for c in cases]).to(self.device)
        sigma = torch.stack([self._latents[c][1] for c in cases]).to(self.device)
        return (mu + sigma * torch.randn_like(mu)) * self.scale_factor

    # -- steps

    def _loss(self, z: Tensor, context: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        noisy = self.scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
        pred = self.net(noisy, timesteps=t, context=context)
        target = z - noise if self.hparams.objective == "rflow" else noise
        return F.mse_loss(pred.float(), target.float())

    def _timesteps(self, z: Tensor) -> Tensor:
        if self.hparams.objective == "rflow":
            return self.scheduler.sample_timesteps(z)
        return torch.randint(0, TRAIN_TIMESTEPS, (z.shape[0],), device=z.device).long()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z = self.latents(batch["image"], batch["case"])
        context = self.text_context(batch["text"])
        drop = torch.rand(z.shape[0], device=z.device) < self.hparams.cond_drop
        context = torch.where(drop[:, None, None], torch.full_like(context, self.hparams.null_value), context)
        loss = self._loss(z, context, torch.randn_like(z), self._timesteps(z))
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The loss at fixed timesteps (1/4, 1/2, 3/4 of the chain) and seeded noise: comparable across epochs."""
        with torch.no_grad():
            mu, _sigma = self.vae.encode(batch["image"])
        z = mu * self.scale_factor
        gen = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        context = self.text_context(batch["text"])
        losses = []
        for frac in (0.25, 0.5, 0.75):
            noise = torch.randn(z.shape, generator=gen).to(z)
            t = torch.full((z.shape[0],), int(frac * TRAIN_TIMESTEPS), device=z.device, dtype=torch.long)
            losses.append(self._loss(z, context, noise, t))
        self.log("val/loss", torch.stack(losses).mean(), batch_size=z.shape[0], sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=1e-5)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        warm = max(1, min(100, int(total) // 20))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------- generation


class TextToCT:
    """Generate CT volumes from report text with an exported text2ct model folder
    (`TextToCT.from_folder`, `medct.load_model`, `medct.generate`, `medct generate`)."""

    def __init__(
        self,
        net: nn.Module,
        vae: nn.Module,
        clip: nn.Module,
        tokenizer: Any,
        card: ModelCard,
        device: str | torch.device = "cpu",
        precision: str | None = None,
    ) -> None:
        from medct.precision import resolve_precision
        from medct.predictor import resolve_device

        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.precision = resolve_precision(precision, self.device)  # the one policy (medct.precision)
        self.net, self.vae, self.clip = (m.to(self.device).eval() for m in (net, vae, clip))
        self.tokenizer, self.card = tokenizer, card
        self.inference = dict(card.inference)

    @classmethod
    def from_folder(
        cls, model_dir: str | os.PathLike[str], device: str | None = None, precision: str | None = None
    ) -> TextToCT:
        from medct.checkpoint import read_part_weights
        from medct.nets import create_net, load_unique_state_dict
        from medct.predictor import load_for_task

        net, card, dev = load_for_task(model_dir, "text2ct", "text-to-CT", device)
        parts = card.extra.get("parts", {})
        modules: dict[str, nn.Module] = {}
        for name in ("vae", "clip"):
            if name not in parts:
                raise ModelFolderError(f"{model_dir}/medct.json names no '{name}' part; re-export the model.")
            part_card = ModelCard.from_dict(parts[name])
            state = read_part_weights(model_dir, name)
            module = create_net(part_card.net_name, **part_card.net_args)
            try:
                load_unique_state_dict(module, state)
            except RuntimeError as e:
                raise ModelFolderError(
                    f"{model_dir}/{name}.safetensors does not match its card ({str(e).splitlines()[0]})."
                ) from e
            modules[name] = module
        tok = Path(model_dir) / TOKENIZER_FILE
        if not tok.is_file():
            raise ModelFolderError(f"Model folder '{model_dir}' lacks its tokenizer ({TOKENIZER_FILE}).")
        return cls(net, modules["vae"], modules["clip"], load_tokenizer(tok.read_text()), card, dev, precision)

    @property
    def factor(self) -> int:
        """Every generated size must be a multiple of this (VAE downsampling x UNet stride)."""
        return int(self.vae.downsample) * int(self.net.stride)

    def grid_size(self, size: Sequence[int] | None = None) -> list[int]:
        """The generation grid (X, Y, Z) voxels: `size`, or the model's; ConfigError unless three
        multiples of `factor` (checked before any sampling)."""
        size_t = [int(s) for s in (self.card.patch_size if size is None else size)]
        if len(size_t) != 3:
            raise ConfigError(f"--size needs three voxel counts (X Y Z), got {size_t}.")
        check_size(size_t, self.factor, "This model")
        return size_t

    def context(self, prompts: Sequence[str]) -> Tensor:
        """(B,) prompts -> (B, L, D) text contexts of the model's kind (card inference.context)."""
        ids = tokenize(self.tokenizer, prompts, int(self.clip.max_length)).to(self.device)
        with torch.no_grad():
            return text_embedding(self.clip, ids, str(self.inference.get("context", "pooled")))

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        size: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        sampler: str | None = None,
        progress: bool = False,
        unconditional: bool = False,
    ) -> list[Volume]:
        """`n` volumes per prompt (prompt-major order), HU int16 on a RAS grid. Volume k (0-based over
        the whole call) uses noise seeded by seed + k, so a volume depends only on its prompt, seed
        and settings. unconditional: sample with the null context (the model's unconditional mode;
        prompts are then labels only). meta: text, seed, seconds."""
        from medct.errors import MedCTError

        inf = self.inference
        steps = int(inf.get("steps", 30) if steps is None else steps)
        guidance = float(inf.get("guidance", 5.0) if guidance is None else guidance)
        sampler = str(inf.get("sampler", "rflow") if sampler is None else sampler)
        size_t = self.grid_size(size)
        if int(n) < 1:
            raise ConfigError(f"-n must be at least 1, got {n}.")
        texts = [str(p).strip() for p in prompts]
        if not texts or any(not t for t in texts):
            raise MedCTError('A prompt is empty; give the report text to generate from (e.g. "enlarged liver").')
        latent = [s // int(self.vae.downsample) for s in size_t]
        train_latent = int(np.prod([p // int(self.vae.downsample) for p in self.card.patch_size]))
        pre = self.card.preprocessing
        affine = np.diag([*pre.spacing, 1.0])
        centre = np.asarray(inf.get("center_mm", [0.0, 0.0, 0.0]), float)
        affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(size_t) - 1) / 2.0)
        null = float(inf.get("null_value", -1.0))
        out: list[Volume] = []
        k = 0
        for text in texts:
            ctx = self.context([text])
            if unconditional:
                ctx = torch.full_like(ctx, null)
            for _ in range(int(n)):
                start = time.perf_counter()
                sched = sampling_scheduler(
                    str(inf.get("objective", "rflow")), sampler, steps, int(np.prod(latent)), train_latent
                )
                gen = torch.Generator(device="cpu").manual_seed(int(seed) + k)
                noise = torch.randn((1, int(self.vae.latent_channels), *latent), generator=gen).to(self.device)
                with (
                    torch.no_grad(),
                    autocast(self.device, self.precision),
                ):
                    z = sample_latent(self.net, sched, noise, ctx, None if unconditional else guidance, null, progress)
                    img = decode(self.vae, z.float() / float(inf.get("scale_factor", 1.0)), inf.get("tile"))
                unit = img.float().clamp(0.0, 1.0)[0, 0].cpu().numpy()
                hu = np.rint(unit * (pre.hu_max - pre.hu_min) + pre.hu_min).astype(np.int16)
                vol = Volume(hu, affine.copy(), {"text": text, "seed": int(seed) + k, "modality": "CT"})
                if spacing is not None:
                    vol = _respace(vol, spacing)
                vol.meta["seconds"] = time.perf_counter() - start
                out.append(vol)
                k += 1
        return out


def _respace(vol: Volume, spacing: Sequence[float]) -> Volume:
    """`vol` resampled (linear) to `spacing` mm over the same field of view."""
    from medct.geometry import network_grid, resample_volume

    sp = [float(s) for s in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ConfigError(f"--spacing needs three positive millimetre values, got {list(spacing)}.")
    grid = network_grid(vol.affine, vol.shape, sp)
    out = resample_volume(vol, grid, "linear", padding=-1000.0)
    return Volume(np.rint(out.array).astype(np.int16), out.affine, dict(vol.meta))
