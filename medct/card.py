"""The model card (`medct.json`): what a model folder's network is and how to feed it.

Written by the task that trained the model (`model_card()` of each medct LightningModule, built
with `medct.card.model_card`), copied by `medct export`, read by every predictor. This module holds
no torch and no network code, so `medct.nets` (encoder folders) and `medct.checkpoint` (weights)
both read cards without importing each other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medct.errors import ModelFolderError
from medct.transforms import Preprocessing

CARD_FILE = "medct.json"
FORMAT_VERSION = 2  # 2: "inference" settings and preprocessing.modality; 1: overlap in "extra"
ENCODER_TASK = "encoder"  # the card task of a pretrained encoder: model.safetensors holds the encoder only


@dataclass
class ModelCard:
    """Everything needed to rebuild a network and feed it correctly; written by the task that
    trained it (`model_card()` of a medct LightningModule), copied by `medct export`.

    net_name/net_args: `medct.nets.create_net(net_name, **net_args)` rebuilds the architecture.
    labels:        class index -> name (segmentation/classification); index 0 is background.
    preprocessing: spacing, intensity window and modality of the input (`Preprocessing`).
    patch_size:    the network's input patch (sliding-window tile) in voxels, RAS order.
    task:          what the model does (segmentation, encoder, classification, sct, generation,
                   motion, ...); picks its predictor in `medct.load_model` (`medct.api.PREDICTORS`).
    inference:     default inference settings, e.g. {"overlap": 0.5, "sw_batch_size": 4}; also
                   "precision": the precision the model was validated at ("bf16" or "fp32", from
                   the training run's trainer) and "bf16_tolerance" (mean label Dice bf16 vs fp32
                   a model not validated in bf16 must reach to run in bf16, default 0.99).
    outputs:       for tasks without labels: what the network returns (channels, units, ...).
    extra:         provenance (source checkpoint, epoch, ...); never read by inference.
    intended_use:  what the model was made for, in a sentence (a model card's "intended use",
                   Mitchell et al., FAT* 2019); `medct segment` prints it. "" when unstated.
    """

    net_name: str
    net_args: dict[str, Any]
    labels: dict[int, str]
    preprocessing: Preprocessing
    patch_size: tuple[int, int, int]
    task: str = "segmentation"
    licence: str = "unspecified"
    medct_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    intended_use: str = ""

    @property
    def modality(self) -> str:
        return self.preprocessing.modality or "CT"

    def to_dict(self) -> dict[str, Any]:
        from medct import __version__

        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "modality": self.modality,  # for readers of the JSON; preprocessing.modality is what is read back
            "net": {"name": self.net_name, "args": self.net_args},
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "outputs": self.outputs,
            "preprocessing": self.preprocessing.to_dict(),
            "patch_size": list(self.patch_size),
            "inference": self.inference,
            "licence": self.licence,
            "intended_use": self.intended_use,
            "medct_version": self.medct_version or __version__,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        version = int(d.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this medct reads ({FORMAT_VERSION}); upgrade medct"
            )
        extra = dict(d.get("extra", {}))
        if version == 1:  # format 1 kept inference settings (when any) in "extra"
            inference = {k: extra[k] for k in ("overlap", "sw_batch_size") if k in extra}
        else:
            inference = dict(d.get("inference", {}))
        card = cls(
            net_name=str(d["net"]["name"]),
            net_args=dict(d["net"]["args"]),
            labels={int(k): str(v) for k, v in d.get("labels", {}).items()},
            preprocessing=_card_preprocessing(d["preprocessing"]),
            patch_size=tuple(int(p) for p in d["patch_size"]),  # type: ignore[arg-type]
            task=str(d.get("task", "segmentation")),
            licence=str(d.get("licence", "unspecified")),
            medct_version=str(d.get("medct_version", "")),
            extra=extra,
            inference=inference,
            outputs=dict(d.get("outputs", {})),
            intended_use=str(d.get("intended_use", "")),
        )
        card.validate()
        return card

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot be right (read_model_card turns it
        into a ModelFolderError sentence): the network's output channels against the labels,
        spacing, intensity window, patch size and the inference settings."""
        pre = self.preprocessing
        if len(pre.spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in pre.spacing):
            raise ValueError(f"preprocessing.spacing must be three positive numbers (mm), got {list(pre.spacing)}")
        if not (math.isfinite(pre.hu_min) and math.isfinite(pre.hu_max) and pre.hu_min < pre.hu_max):
            raise ValueError(f"preprocessing.hu_min must be below hu_max, got {pre.hu_min} and {pre.hu_max}")
        if len(self.patch_size) != 3 or not all(p > 0 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive integers, got {list(self.patch_size)}")
        if self.labels:
            if min(self.labels) < 0 or 0 not in self.labels:
                raise ValueError(f"labels must be indexed from 0 (background), got indices {sorted(self.labels)}")
            channels = self.net_args.get("out_channels")
            if channels is not None and int(channels) != max(self.labels) + 1:
                raise ValueError(f"labels name {max(self.labels) + 1} classes but net.args.out_channels is {channels}")
        elif self.task in ("segmentation", "classification"):
            raise ValueError(f"a {self.task} model needs labels; the card has none")
        if self.inference.get("overlap") is not None:
            from medct.errors import MedCTError
            from medct.sliding_window import check_overlap

            try:
                check_overlap(self.inference["overlap"])
            except MedCTError as e:
                raise ValueError(f"inference.{str(e).rstrip('.')}") from e
        batch = self.inference.get("sw_batch_size")
        if batch is not None and int(batch) < 1:
            raise ValueError(f"inference.sw_batch_size must be at least 1, got {batch}")
        if not isinstance(self.inference.get("body_only", True), bool):
            raise ValueError(f"inference.body_only must be true or false, got {self.inference['body_only']!r}")
        unknown = [n for n in self.inference.get("keep_largest", []) if n not in self.labels.values()]
        if unknown:
            raise ValueError(f"inference.keep_largest names {unknown}, which are not labels of this model")
        if self.inference.get("precision", "fp32") not in ("bf16", "fp32"):
            raise ValueError(f"inference.precision must be bf16 or fp32, got {self.inference['precision']!r}")
        tolerance = self.inference.get("bf16_tolerance", 0.99)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0.0 <= tolerance <= 1.0:
            raise ValueError(f"inference.bf16_tolerance must be a number in [0, 1], got {tolerance!r}")


def read_model_card(model_dir: str | os.PathLike[str]) -> ModelCard:
    """Read and validate `medct.json` of a model folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder '{folder}' does not exist or is not a folder.")
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise ModelFolderError(f"Model folder '{folder}' has no {CARD_FILE}; export one with `medct export`.")
    try:
        return ModelCard.from_dict(json.loads(card_path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{card_path} is not a valid medct model card ({type(e).__name__}: {e}).") from e


def _card_preprocessing(d: dict[str, Any]) -> Preprocessing:
    """A card's preprocessing; its own check's sentence as a ValueError (read_model_card names the card)."""
    from medct.errors import MedCTError

    try:
        return Preprocessing.from_dict(d)
    except MedCTError as e:
        raise ValueError(str(e).rstrip(".")) from e
