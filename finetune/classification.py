"""Volume-level CT classification: the LightningModule behind `medct fit` for classification recipes.

The network is `medct.nets.EncoderClassifier`: a registry backbone's encoder with every stage
average-pooled and concatenated, then a linear head. As for segmentation, a pretrained encoder
(`pretrained_encoder: ENC_DIR`, from `medct export` of a pretraining run) is loaded with a strict
report and the head starts fresh (nnssl's practice). `freeze_encoder` trains the head only: the
linear probe of the SSL literature (e.g. Chen et al., SimCLR, ICML 2020 §4.1), which measures the
representation itself; without it the whole network is fine-tuned.

Loss: cross-entropy. Validation: accuracy and the area under the ROC curve (MONAI ROCAUCMetric,
macro over one-vs-rest for more than two classes), gathered over DDP ranks, logged as
val/accuracy, val/auc. The seed's CT-classification papers (Delving into Masked Autoencoders for
Multi-Label Thorax Disease Classification; Self-Supervised Pre-Training with Contrastive and
Masked Autoencoder Methods for Dealing with Small Datasets) compare SparK-style masked and
contrastive pretraining on exactly this: bench/ssl_transfer.py does too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from medct.checkpoint import ModelCard
from medct.errors import ConfigError
from medct.nets.encoder import load_pretrained_encoder
from medct.precision import fp32_loss
from medct.task import MedCTTask
from medct.transforms import Preprocessing


def roc_auc(scores: Tensor, targets: Tensor, num_classes: int) -> float:
    """ROC AUC of class scores (N, C) against class indices (N,): binary for 2 classes, else macro
    one-vs-rest (MONAI's ROCAUCMetric); NaN when a class has no positive or no negative case."""
    from monai.metrics import compute_roc_auc

    y = F.one_hot(targets.long(), num_classes).float()
    if num_classes == 2:
        if y[:, 1].min() == y[:, 1].max():
            return math.nan
        return float(compute_roc_auc(scores[:, 1], y[:, 1]))
    present = [c for c in range(num_classes) if 0 < y[:, c].sum() < len(y)]
    if not present:
        return math.nan
    return float(sum(compute_roc_auc(scores[:, c], y[:, c]) for c in present) / len(present))


class ClassificationTask(MedCTTask):
    """Train `net` (an EncoderClassifier) to give each volume one of `labels`.

    Args:
        net: the classifier network (`medct.nets.EncoderClassifier`).
        labels: class names by index (linked from the data module).
        preprocessing, patch_size: the data's (linked), for the card.
        lr: AdamW learning rate. weight_decay: AdamW weight decay.
        scheduler: "cosine" or "constant" (per optimiser step).
        pretrained_encoder: an encoder folder to start from. encoder_strict: refuse a partial load.
        freeze_encoder: train the head only (linear probe).
    """

    def __init__(
        self,
        net: nn.Module,
        labels: Sequence[str] = ("negative", "positive"),
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "constant"] = "cosine",
        pretrained_encoder: str | None = None,
        encoder_strict: bool = True,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.hparams.update(labels=[str(n) for n in labels])
        if not hasattr(net, "head") or not hasattr(net, "encoder_features"):
            raise ConfigError(
                f"{type(net).__name__} is not a classifier network; use medct.nets.EncoderClassifier as model.net."
            )
        out = (self.net_config or {}).get("args", {}).get("out_channels")
        if out is not None and int(out) != len(labels):
            raise ConfigError(f"the classifier has {out} outputs but there are {len(labels)} classes {list(labels)}.")
        if len(labels) < 2:
            raise ConfigError(f"Classification needs at least two classes, got {list(labels)}.")
        if pretrained_encoder is not None:
            report = load_pretrained_encoder(net, pretrained_encoder, encoder_strict)
            rank_zero_info(f"pretrained encoder {pretrained_encoder}: {report.summary()}")
        if freeze_encoder:
            prefixes = tuple(net.encoder_prefixes)
            for name, p in net.named_parameters():
                if name.startswith(prefixes):
                    p.requires_grad_(False)
        self.labels = [str(n) for n in labels]
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []

    def model_card(self) -> ModelCard:
        hp = self.hparams
        return self.card(
            "classification",
            labels=dict(enumerate(self.labels)),
            outputs={"input": "body-cropped volume padded / centre-cropped to patch_size", "scores": "softmax"},
            extra={"pretrained_encoder": hp.pretrained_encoder, "freeze_encoder": bool(hp.freeze_encoder)},
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, *patch) -> (B, classes) logits
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_encoder:  # a frozen encoder keeps its dropout/norm behaviour fixed too
            self.net.backbone.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["class"].long()
        loss = fp32_loss(F.cross_entropy)(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if hp.scheduler == "constant" or not math.isfinite(total):
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _evaluate(self, batch: dict[str, Any]) -> None:
        x, y = batch["image"], batch["class"].long()
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=x.shape[0], sync_dist=True)
        self._scores.append(logits.float().softmax(dim=1))
        self._targets.append(y)

    def _log_scores(self, prefix: str) -> None:
        if not self._scores:
            return
        scores, targets = torch.cat(self._scores), torch.cat(self._targets)
        self._scores.clear()
        self._targets.clear()
        if self.trainer.world_size > 1:
            scores = self.all_gather(scores).flatten(0, 1)
            targets = self.all_gather(targets).flatten(0, 1)
        accuracy = (scores.argmax(dim=1) == targets).float().mean()
        self.log(f"{prefix}/accuracy", accuracy, prog_bar=True, batch_size=len(targets))
        auc = roc_auc(scores.cpu(), targets.cpu(), len(self.labels))
        self.log(f"{prefix}/auc", torch.tensor(auc), batch_size=len(targets))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")
