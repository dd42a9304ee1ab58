"""3D CLIP of text-to-CT (`CLIPTask`, `medct fit --config configs/synthesis/clip3d_phantom.yaml`).

After Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP,
ICML 2021) in 3D as in Molino et al., "Text-to-CT Generation via 3D Latent Diffusion Model with
Contrastive Vision-Language Pretraining" (2025; code cosbidev/Text2CT): a CT encoder from the medct
registry (`medct.nets.CLIP3D`; a medct pretrained encoder loads into it with `pretrained_encoder`)
and a text transformer, trained with the symmetric InfoNCE loss

    logits = exp(t) * img @ txt^T,   loss = (CE(logits, diag) + CE(logits^T, diag)) / 2

with a learnable temperature t (clamped at log 100 as in CLIP). Its pooled text embedding is the
cross-attention context of the latent diffusion model (`medct.synthesis.diffusion`).

Offline text: the tokenizer is trained by medct on the training reports (`train_tokenizer`: byte-level
BPE of the Hugging Face `tokenizers` package, digits split one by one so that sizes are read digit by
digit; lossless, so a report round-trips). It is stored in the checkpoints and exported beside the
weights as `tokenizer.json`; nothing is downloaded. A tokenizer already on disk (the
`tokenizer.json` of a locally installed Hugging Face text model, e.g. a clinical BERT's folder)
is used instead with `tokenizer: PATH`; its id 0 must be its padding token (BERT's [PAD] is).

Validation logs retrieval recall R@1/R@5 in both directions over the whole validation set
(`retrieval_recall`): val/r1_i2t (image -> its report), val/r1_t2i, val/r5_*, and val/loss.
"""

from __future__ import annotations

import math
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

PAD = "[PAD]"  # id 0: the text transformer's padding id
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 258  # byte-level BPE: the 256 byte symbols and [PAD], plus at least one merge


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) trained on `texts`; [PAD] is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not texts:
        raise ConfigError("A tokenizer needs report texts to train on; the training split has none.")
    if int(vocab_size) < MIN_VOCAB:
        raise ConfigError(
            f"The text vocabulary (vocab_size) must hold at least {MIN_VOCAB} tokens (256 bytes + [PAD]), got {vocab_size}."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def load_tokenizer(text: str) -> Any:
    """A tokenizer from its JSON text (`tokenizer.to_str()`, the exported tokenizer.json)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


def read_tokenizer(path: str, vocab_size: int) -> Any:
    """A tokenizer from a local tokenizer.json, or a model folder holding one, checked against the
    text transformer: id 0 must be padding and every id must fit its `vocab_size` embeddings."""
    from pathlib import Path

    file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"model.tokenizer '{path}' is neither a tokenizer.json nor a folder holding one.")
    try:
        tok = load_tokenizer(file.read_text())
    except Exception as e:  # tokenizers raises its own Exception type for unreadable JSON
        raise ConfigError(f"model.tokenizer '{file}' is not a readable tokenizers JSON ({str(e)[:80]}).") from e
    if tok.id_to_token(0) not in PAD_NAMES:
        raise ConfigError(
            f"The tokenizer '{file}' has '{tok.id_to_token(0)}' as id 0; medct pads with id 0, so it must be a "
            f"padding token ({', '.join(PAD_NAMES)})."
        )
    if tok.get_vocab_size() > int(vocab_size):
        raise ConfigError(
            f"The tokenizer '{file}' has {tok.get_vocab_size()} tokens; set the network's vocab_size to at least that "
            f"(it is {vocab_size})."
        )
    return tok


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """Texts -> (B, max_length) int64 ids, truncated and padded with 0."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, enc in enumerate(tokenizer.encode_batch([str(t) for t in texts])):
        row = enc.ids[:max_length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


@fp32_loss
def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of matched rows of unit-norm (B, D) embeddings."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def retrieval_recall(img: Tensor, txt: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """R@k both ways for matched rows: i2t = the image's own report ranks in its top k, t2i likewise."""
    sim = img @ txt.t()  # (N, N)
    target = torch.arange(sim.shape[0], device=sim.device)
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)  # 0 = the match is the most similar
        for k in ks:
            out[f"r{k}_{name}"] = float((rank < k).float().mean())
    return out


class CLIPTask(MedCTTask):
    """Train `medct.nets.CLIP3D` on (volume, report) pairs of a `TextCTDataModule`.

    The tokenizer is trained on the data module's training reports at the start of fitting (unless
    a checkpoint brought one) with `vocab_size` = the network's, or read from `tokenizer` (a local
    tokenizer.json or a folder holding one; nothing is downloaded). pretrained_encoder: a medct encoder
    folder/file loaded into the CT encoder before training.
    """

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(spacing=(4.0, 4.0, 4.0), modality="CT"),
        patch_size: Sequence[int] = (96, 96, 48),
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        pretrained_encoder: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.tokenizer: Any = read_tokenizer(tokenizer, int(net.vocab_size)) if tokenizer else None
        if pretrained_encoder:
            from medct.nets import load_pretrained_encoder

            load_pretrained_encoder(net.image, pretrained_encoder)
        self._val: list[tuple[Tensor, Tensor]] = []

    def model_card(self) -> ModelCard:
        return self.card(
            "clip",
            inference={"max_length": int(self.net.max_length)},
            outputs={"embed_dim": int(self.net.embed_dim)},
        )

    # -- tokenizer: trained on the training reports, carried by checkpoints

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and stage == "fit":
            dm = self.trainer.datamodule if self.trainer is not None else None
            if dm is None or not hasattr(dm, "texts"):
                raise ConfigError("CLIPTask needs a data module with report texts (medct.synthesis.TextCTDataModule).")
            self.tokenizer = train_tokenizer(dm.texts("train"), vocab_size=int(self.net.vocab_size))

    def card_files(self) -> dict[str, str]:
        return {TOKENIZER_FILE: self.tokenizer.to_str()} if self.tokenizer is not None else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medct_tokenizer"] = self.card_files().get(TOKENIZER_FILE)
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("medct_tokenizer"):
            self.tokenizer = load_tokenizer(checkpoint["medct_tokenizer"])

    def ids(self, texts: Sequence[str]) -> Tensor:
        return tokenize(self.tokenizer, texts, int(self.net.max_length)).to(self.device)

    # -- steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        img, txt = self.net(batch["image"], self.ids(batch["text"]))
        loss = clip_loss(img, txt, self.net.logit_scale)
        self.log("train/loss", loss, prog_bar=True, batch_size=img.shape[0])
        self.log("train/temperature", self.net.logit_scale.exp(), batch_size=img.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img, txt = self.net(batch["image"], self.ids(batch["text"]))
        self._val.append((img.detach(), txt.detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img = torch.cat([a for a, _ in self._val])
        txt = torch.cat([b for _, b in self._val])
        self._val.clear()
        self.log("val/loss", clip_loss(img, txt, self.net.logit_scale))
        for k, v in retrieval_recall(img, txt).items():
            self.log(f"val/{k}", v, prog_bar=k == "r1_i2t")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
