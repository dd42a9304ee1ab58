"""Supervised 3D CT segmentation: the LightningModule behind `medct fit` for segmentation recipes.

The task receives its network as an argument (Lightning style guide: system vs model) and holds
only the training logic:
  * loss: Dice + cross-entropy on softmax outputs (MONAI DiceCELoss; the nnU-Net loss, Isensee et
    al., Nat. Methods 2021) or the focal Tversky loss (`finetune.losses`), over deep-supervision
    heads with halving weights (nnU-Net) or their mean (Turbolift) when the network returns them;
  * optimiser: AdamW (Loshchilov & Hutter, ICLR 2019), Adam, or nnU-Net's SGD (momentum 0.99,
    Nesterov) with nnU-Net's polynomial decay (1 - step/total)^0.9 or cosine decay, stepped per
    optimiser step over the whole run; for a pretrained encoder nnssl's fine-tuning warm-ups
    (`freeze_encoder_steps`: decoder only, encoder frozen; `warmup_steps`: whole network; see
    `finetune.schedule`) and gradient clipping (Lightning's `trainer.gradient_clip_val`; nnU-Net 12);
  * sequential fine-tuning (Turbolift, `finetune.turbolift`): `init_checkpoint` starts from all
    weights of an earlier stage; `regularizer` l2/ewc anchors them, `encoder_lr_scale` slows the
    encoder (`finetune.safeguards`);
  * validation: whole preprocessed volumes through MONAI sliding_window_inference with Gaussian
    blending, per-class Dice (MONAI DiceMetric, background excluded) logged as val/dice_<name>
    and val/dice_mean, gathered over DDP ranks;
  * precision: whatever the Trainer says (`precision="bf16-mixed"` autocasts on GPU; fp32 on CPU).

Hyperparameters are saved as plain lists/str/float, and every checkpoint carries the model card
this task builds (`model_card`: network registry name + args, labels, preprocessing with modality,
patch size, sliding-window settings; `medct.checkpoint.store_card`), so it opens with
torch.load(weights_only=True) and `medct export` writes the model folder without the YAML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import Tensor, nn

from medct.checkpoint import ModelCard, read_network_weights
from medct.errors import ConfigError
from medct.finetune.losses import LossName, make_loss
from medct.finetune.safeguards import WeightAnchor, load_fisher, param_groups
from medct.finetune.schedule import lr_factor
from medct.nets.encoder import load_pretrained_encoder, load_unique_state_dict
from medct.precision import fp32_loss
from medct.sliding_window import DEFAULT_OVERLAP, check_overlap
from medct.task import MedCTTask
from medct.transforms import Preprocessing


class SegmentationTask(MedCTTask):
    """Train `net` to label CT voxels with `labels` (index 0 = background).

    `preprocessing` and `patch_size` describe the data the network sees (linked from the data
    module by MedCTCLI) and go into the exported model card, with
    `sw_overlap` / `sw_batch_size` as the model's default inference settings, and `keep_largest`:
    labels of which inference keeps only the largest connected component (nnU-Net's "remove all
    but the largest component" post-processing; for organs that are one piece, e.g. each lung).
    `body_only` (default true): inference writes no label outside the patient's body (CT/CBCT);
    set it false for label sets that lie outside the body (couch, immobilisation devices).
    `pretrained_encoder`: an encoder folder (`medct export` of a pretraining run) loaded into the
    network's encoder before training; the decoder and head start fresh (as nnssl does). Any
    missing, unexpected or shape-mismatched encoder tensor is an error unless `encoder_strict`
    is false (then they are only reported). `input_key` / `present`: a multimodal network
    (`mm_unetr`) reads the batch's "phases" channels and is given the names of the modalities the
    data has (any subset of its modalities, the same weights; BM-MAE's fine-tuning).

    Chains of stages (`finetune.turbolift` writes these for each stage): `init_checkpoint` (a
    medct .ckpt or model folder) gives all the network's weights, output layer included, before
    training (after `pretrained_encoder`); `regularizer` "l2" or "ewc" with `regularizer_weight`
    pulls the weights towards the init_checkpoint's, EWC weighting each by the Fisher information in
    `fisher_path`; `encoder_lr_scale` < 1 trains the encoder slower than the decoder.
    `loss` dice_ce | focal_tversky; `optimizer` adamw | adam | sgd; `ds_weighting` halving | mean.
    `freeze_encoder_steps` / `warmup_steps`: the warm-ups of `finetune.schedule` (nnssl fine-tunes a
    pretrained ResEnc with SGD 1e-3 and a whole-network warm-up over the first 5 % of the run).
    """

    def __init__(
        self,
        net: nn.Module,
        labels: Sequence[str] = ("background", "foreground"),
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(),
        patch_size: Sequence[int] = (96, 96, 96),
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        scheduler: Literal["poly", "cosine", "constant"] = "poly",
        sw_batch_size: int = 2,
        sw_overlap: float = DEFAULT_OVERLAP,
        keep_largest: Sequence[str] = (),
        body_only: bool = True,
        pretrained_encoder: str | None = None,
        encoder_strict: bool = True,
        input_key: str = "image",
        present: Sequence[str] | None = None,
        loss: LossName = "dice_ce",
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        ds_weighting: Literal["halving", "mean"] = "halving",
        init_checkpoint: str | None = None,
        regularizer: Literal["none", "l2", "ewc"] = "none",
        regularizer_weight: float = 0.0,
        fisher_path: str | None = None,
        encoder_lr_scale: float = 1.0,
        compile: bool = False,
        freeze_encoder_steps: int = 0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        # JSON primitives only (the Python API may pass tuples): checkpoints stay weights_only-loadable.
        self.hparams.update(
            labels=[str(n) for n in labels],
            keep_largest=[str(n) for n in keep_largest],
            present=None if present is None else [str(m) for m in present],
        )
        out_channels = (self.net_config or {}).get("args", {}).get("out_channels")
        if out_channels is not None and out_channels != len(labels):
            raise ValueError(f"the network has {out_channels} output channels but there are {len(labels)} labels")
        if pretrained_encoder is not None:
            report = load_pretrained_encoder(net, pretrained_encoder, encoder_strict)
            rank_zero_info(f"pretrained encoder {pretrained_encoder}: {report.summary()}")
        self.labels = [str(n) for n in labels]
        unknown = [n for n in keep_largest if n not in self.labels[1:]]
        if unknown:
            raise ConfigError(f"model.keep_largest names {unknown}, which are not foreground labels of {self.labels}.")
        self.num_classes = len(self.labels)
        self.loss_fn = make_loss(loss)
        # halving: weights 1, 1/2, 1/4, ... (nnU-Net); mean: equal weights, divided by the heads below
        self.ds_loss_fn = DeepSupervisionLoss(self.loss_fn, weight_mode="exp" if ds_weighting == "halving" else "same")
        self.eval_loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)  # val/loss is comparable across recipes
        self.anchor: WeightAnchor | None = None
        if init_checkpoint is not None:
            try:
                load_unique_state_dict(net, read_network_weights(init_checkpoint))
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise ConfigError(
                    f"model.init_checkpoint {init_checkpoint} does not fit this network ({first})."
                ) from e
        if regularizer != "none":
            if init_checkpoint is None:
                raise ConfigError(
                    f"model.regularizer {regularizer} anchors to model.init_checkpoint, which is not set."
                )
            if regularizer == "ewc" and fisher_path is None:
                raise ConfigError(
                    "model.regularizer ewc needs model.fisher_path (the previous stage's Fisher information)."
                )
            importance = load_fisher(fisher_path) if regularizer == "ewc" and fisher_path is not None else None
            reference = {n: p for n, p in net.named_parameters()}
            self.anchor = WeightAnchor(reference, regularizer_weight, importance)
        if not 0.0 < encoder_lr_scale <= 1.0:
            raise ConfigError(f"model.encoder_lr_scale must lie in (0, 1], got {encoder_lr_scale}.")
        if freeze_encoder_steps < 0 or warmup_steps < 0:
            raise ConfigError("model.freeze_encoder_steps and model.warmup_steps must be >= 0.")
        self.encoder_params = [
            p for n, p in net.named_parameters() if n.startswith(tuple(getattr(net, "encoder_prefixes", ())))
        ]
        if freeze_encoder_steps > 0 and not self.encoder_params:
            raise ConfigError(
                f"model.freeze_encoder_steps needs a network with an encoder split (encoder_prefixes); {type(net).__name__} has none."
            )
        check_overlap(sw_overlap)  # the one check of every overlap: a recipe's mistake before training
        self.dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)

    def model_card(self) -> ModelCard:
        """The card `medct export` writes for this task's network."""
        hp = self.hparams
        return self.card(
            "segmentation",
            labels=dict(enumerate(self.labels)),
            inference={
                "overlap": float(hp.sw_overlap),
                "sw_batch_size": int(hp.sw_batch_size),
                "keep_largest": list(hp.get("keep_largest", [])),
                "body_only": bool(hp.get("body_only", True)),
            },
        )

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.net.compile()  # in place: state-dict keys stay those of the plain network

    def on_fit_start(self) -> None:
        if self.anchor is not None:
            self.anchor.to(self.device)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, D, H, W) -> (B, C, D, H, W) logits
        present = self.hparams.get("present")
        return self.net(x) if present is None else self.net(x, present=present)

    # -- training

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The encoder has no gradient (no update, no optimiser state) while it is frozen."""
        freeze = int(self.hparams.get("freeze_encoder_steps", 0))
        if freeze:
            trainable = self.trainer.global_step >= freeze
            for p in self.encoder_params:
                p.requires_grad_(trainable)

    def on_train_end(self) -> None:
        """A run that ends while the encoder is frozen leaves it trainable (the next fit's optimiser
        is built from the trainable parameters)."""
        for p in self.encoder_params:
            p.requires_grad_(True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, label = batch[self.hparams.get("input_key", "image")], batch["label"]  # (B, C, *patch), class indices
        logits = self(image)
        loss = self.supervised_loss(logits, label)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        if self.anchor is not None:
            penalty = self.anchor.penalty(self.net)
            self.log("train/anchor", penalty, on_step=True, on_epoch=False, batch_size=image.shape[0])
            loss = loss + penalty
        return loss

    @fp32_loss
    def supervised_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """The training loss of network outputs (with or without deep-supervision heads), in float32."""
        if logits.ndim == label.ndim + 1:  # deep supervision: (B, heads, C, *patch), full resolution first
            heads = list(torch.unbind(logits, dim=1))
            loss = self.ds_loss_fn(heads, label)
            return loss / len(heads) if self.hparams.get("ds_weighting") == "mean" else loss
        return self.loss_fn(logits, label)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(self.net, hp.lr, float(hp.get("encoder_lr_scale", 1.0)), hp.weight_decay)
        name = hp.get("optimizer", "adamw")
        if name == "sgd":  # nnU-Net's (and nnssl's fine-tuning) optimiser
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=hp.lr, weight_decay=hp.weight_decay, momentum=0.99, nesterov=True
            )
        else:
            opt_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            opt = opt_cls(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        freeze, warmup = int(hp.get("freeze_encoder_steps", 0)), int(hp.get("warmup_steps", 0))
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if (hp.scheduler == "constant" and not freeze and not warmup) or not math.isfinite(total):
            return opt
        total = max(int(total), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, total=total, kind=hp.scheduler, freeze=freeze, warmup=warmup)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation / test

    def _infer(self, image: Tensor) -> Tensor:  # (1, 1, X, Y, Z) -> (1, C, X, Y, Z) logits
        return sliding_window_inference(
            image,
            roi_size=self.patch,
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=self,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        image, label = batch[self.hparams.get("input_key", "image")], batch["label"]  # (1, C, X, Y, Z) whole volumes
        logits = self._infer(image)
        self.log(f"{prefix}/loss", self.eval_loss_fn(logits.float(), label), batch_size=1, sync_dist=True)
        pred = one_hot(logits.argmax(dim=1, keepdim=True), self.num_classes)  # (1, C, X, Y, Z)
        self.dice_metric(y_pred=pred, y=one_hot(label.long(), self.num_classes))

    def _log_dice(self, prefix: str) -> None:
        scores = self.dice_metric.get_buffer()  # (N_local, C-1); NaN where a class is absent from the label
        self.dice_metric.reset()
        if scores is None or len(scores) == 0:
            return
        scores = torch.as_tensor(scores, dtype=torch.float32, device=self.device)
        if self.trainer.world_size > 1:  # Lightning's sampler gives every rank the same number of volumes
            scores = self.all_gather(scores).reshape(-1, scores.shape[-1])
        per_class = scores.nanmean(dim=0)  # (C-1,)
        for name, value in zip(self.labels[1:], per_class, strict=True):
            self.log(f"{prefix}/dice_{name}", value, batch_size=1)
        self.log(f"{prefix}/dice_mean", per_class.nanmean(), prog_bar=True, batch_size=1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Label map in the preprocessed (RAS, resampled) space: (1, 1, X, Y, Z) uint8.

        For predictions on the input's own grid use `medct segment` / medct.inference.
        """
        return self._infer(batch[self.hparams.get("input_key", "image")]).argmax(dim=1, keepdim=True).to(torch.uint8)
