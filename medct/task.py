"""What every medct training task shares: its registry network, the data's preprocessing, the card.

A task (pretraining, segmentation, classification, a synthesis model) is a LightningModule that
trains a network from `medct.nets` on data whose preprocessing the data module decides. MedCTCLI
links the data module's resolved `preprocessing` and its `sampling.patch_size` into the task, so
a recipe states them once, under `data:`. `MedCTTask` keeps both, writes them into the
hyperparameters as JSON primitives (checkpoints stay `torch.load(weights_only=True)`-loadable;
LightningCLI feeds them back as init arguments on `--ckpt_path`) and builds the model card from
what is the task's own (`card`), which `on_save_checkpoint` stores in every checkpoint so
`medct export` needs no YAML.

A subclass calls `super().__init__(net, preprocessing, patch_size)`, then its own
`self.save_hyperparameters(ignore=["net"])` and `self.record_data()`, and defines `model_card`
with `self.card(task=..., ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch import nn

from medct.card import ModelCard
from medct.transforms import Preprocessing


class MedCTTask(pl.LightningModule):
    """Base of the training tasks: `net` (a registry network), `preprocessing`, `patch_size`.

    Args:
        net: the network, built by `medct.nets.create_net` (its `net_config` goes into the card).
        preprocessing: what the data module resolved (spacing, HU window, modality); a mapping is
            accepted too (a checkpoint's hyperparameters).
        patch_size: the training crop in voxels.
    """

    card_net_prefix: ClassVar[str] = "net."  # the network's state-dict prefix inside the task
    # channels_last_3d on CPU by default for this family (a recipe's `channels_last:` overrides):
    # on where bench/train_throughput.py measured it faster with bf16, off elsewhere
    channels_last_cpu: ClassVar[bool] = False
    # `precision: auto` on a bf16 CPU picks bf16 for this family (False: measured slower there)
    bf16_cpu: ClassVar[bool] = True

    def __init__(
        self, net: nn.Module, preprocessing: Preprocessing | dict[str, Any], patch_size: Sequence[int]
    ) -> None:
        super().__init__()
        self.net = net
        # How to rebuild the network, saved in the card (not in the hyperparameters: LightningCLI
        # feeds a checkpoint's hyperparameters back as init args on --ckpt_path).
        self.net_config: dict[str, Any] | None = getattr(net, "net_config", None)
        self.pre = Preprocessing.of(preprocessing)
        self.patch: tuple[int, int, int] = tuple(int(p) for p in patch_size)  # type: ignore[assignment]

    @property
    def preprocessing(self) -> Preprocessing:
        return self.pre

    def record_data(self) -> None:
        """The data groups in the hyperparameters as JSON primitives (after save_hyperparameters)."""
        self.hparams.update(preprocessing=self.pre.to_dict(), patch_size=list(self.patch))

    def card(
        self,
        task: str,
        labels: dict[int, str] | None = None,
        inference: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> ModelCard:
        """This task's network, preprocessing and patch, with what is the task's own."""
        if self.net_config is None:
            raise ValueError("the network was not built by medct.nets.create_net (it has no net_config)")
        return ModelCard(
            net_name=str(self.net_config["name"]),
            net_args=dict(self.net_config["args"]),
            labels=dict(labels or {}),
            preprocessing=preprocessing if preprocessing is not None else self.pre,
            patch_size=self.patch,
            task=task,
            inference=dict(inference or {}),
            outputs=dict(outputs or {}),
            extra=dict(extra or {}),
        )

    def model_card(self) -> ModelCard:
        """The card `medct export` writes for this task's network."""
        raise NotImplementedError(f"{type(self).__name__} defines no model card")

    def card_parts(self) -> dict[str, str]:
        """Further modules exported beside the network: name -> state-dict prefix (none by default)."""
        return {}

    def card_files(self) -> dict[str, str]:
        """Text files that travel with the model: name -> content (none by default)."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from medct.checkpoint import store_card

        if self.net_config is not None:
            card = self.model_card()
            card.inference.setdefault("precision", self.validated_precision())
            store_card(checkpoint, card, self.card_net_prefix, self.card_parts(), self.card_files())

    def validated_precision(self) -> str:
        """ "bf16" when this run trains and validates under bf16 autocast, else "fp32" (the card's
        `inference["precision"]`)."""
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        return "bf16" if precision.startswith("bf16") else "fp32"
