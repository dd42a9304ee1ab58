"""The predictor protocol every model kind follows, and the one place that decides the device for
all of them (the precision: `medct.precision`, the one policy of predictors and training alike).

A predictor is built from an exported model folder by `from_folder(model_dir, device=None,
precision=None)`: `load_for_task` reads the card, refuses a folder of another task in one
sentence, resolves the device (`resolve_device`: cuda > mps > cpu) and loads the network;
`medct.precision.resolve_precision` says whether it runs under bf16 autocast. Segmentation (`medct.inference.Predictor`), synthetic CT
(`medct.synthesis.sct.SCTPredictor`), text-to-CT (`medct.synthesis.diffusion.TextToCT`) and motion
(`medct.synthesis.motion.MotionPredictor`) all load this way; what differs (sliding window, slices
with context, sampling, rollout) is each method's own code. `medct.load_model` picks the predictor
by the card's task (`medct.api.PREDICTORS`).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import nn

from medct.card import ModelCard, read_model_card
from medct.errors import ConfigError, ModelFolderError


class VolumePredictor(Protocol):
    """A model that maps one volume to one volume on the input's exact grid."""

    card: ModelCard
    device: torch.device

    def predict(self, volume: Any) -> Any:
        """`medct.volume.Volume` in -> `Volume` out, with the input's shape and affine."""
        ...


def auto_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for `device` (None: auto); ConfigError when the asked one is not there."""
    if device is None:
        return auto_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' was asked for, but PyTorch sees no CUDA GPU here; use cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{device}' was asked for, but only {torch.cuda.device_count()} GPU(s) exist.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device '{device}' was asked for, but MPS is not available here; use cpu.")
    elif dev.type != "cpu":
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}.")
    return dev


def load_for_task(
    model_dir: str | os.PathLike[str], task: str, what: str, device: str | torch.device | None = None
) -> tuple[nn.Module, ModelCard, torch.device]:
    """(network in eval mode on the CPU, card, resolved device) of a model folder of `task`; a folder
    of another task is one sentence naming both (`what`: the task in words, e.g. "synthetic-CT")."""
    from medct.checkpoint import load_model_folder

    card = read_model_card(model_dir)
    if card.task != task:
        raise ModelFolderError(f"{model_dir} holds a '{card.task}' model, not a {what} model (task '{task}').")
    dev = resolve_device(device)
    net, card = load_model_folder(model_dir, device="cpu")
    return net, card, dev
