"""Exported model folders: `model.safetensors` + `medct.json`, never pickle.

A model folder is what `medct export` writes and `medct segment -m` / `medct.load_model` read:

    MODEL_DIR/
      model.safetensors   the network's state dict (tensors only)
      medct.json          ModelCard: architecture name and init args, label names, preprocessing,
                          patch size, medct version, licence

Training state (optimizer, epochs) stays in Lightning checkpoints; this format is for shipping.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medct.errors import ModelFolderError
from medct.paths import atomic_folder
from medct.transforms import Preprocessing

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "medct.json"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """Everything needed to rebuild a network and feed it correctly.

    net_name/net_args: `medct.nets.create_net(net_name, **net_args)` rebuilds the architecture.
    labels: class index -> name; index 0 is background.
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

    def to_dict(self) -> dict[str, Any]:
        from medct import __version__

        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "net": {"name": self.net_name, "args": self.net_args},
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "preprocessing": self.preprocessing.to_dict(),
            "patch_size": list(self.patch_size),
            "licence": self.licence,
            "medct_version": self.medct_version or __version__,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        return cls(
            net_name=str(d["net"]["name"]),
            net_args=dict(d["net"]["args"]),
            labels={int(k): str(v) for k, v in d["labels"].items()},
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            patch_size=tuple(int(p) for p in d["patch_size"]),  # type: ignore[arg-type]
            task=str(d.get("task", "segmentation")),
            licence=str(d.get("licence", "unspecified")),
            medct_version=str(d.get("medct_version", "")),
            extra=dict(d.get("extra", {})),
        )


def save_model_folder(net: nn.Module, card: ModelCard, out_dir: str | os.PathLike[str]) -> Path:
    """Write `net` and `card` into `out_dir` atomically (staged in a sibling temp folder)."""
    from safetensors.torch import save_file

    with atomic_folder(out_dir) as stage:
        # safetensors refuses shared/non-contiguous storage: store contiguous CPU copies.
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        (stage / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return Path(out_dir)


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


def load_model_folder(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network of a model folder and load its weights strictly; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medct.nets import create_net

    card = read_model_card(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"Model folder '{model_dir}' has no {WEIGHTS_FILE}.")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{weights} is corrupt or not a safetensors file ({e}).") from e
    try:
        net = create_net(card.net_name, **card.net_args)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{model_dir}: cannot build network '{card.net_name}' from medct.json ({e}).") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelFolderError(f"{weights} does not match network '{card.net_name}' ({first}).") from e
    return net.to(device).eval(), card


def export_lightning_checkpoint(
    ckpt_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], licence: str = "unspecified"
) -> Path:
    """Turn a Lightning checkpoint of a medct task into a model folder (safetensors + medct.json).

    The checkpoint is read with `torch.load(weights_only=True)`. It must hold
    checkpoint["medct"]["net_config"] ({"name", "args"} of a medct.nets network) and the task
    hyperparameters `labels`, `spacing`, `hu_min`, `hu_max`, `patch_size` (what
    medct.finetune.segmentation.SegmentationTask saves). The network's tensors are the state-dict
    entries under "net.".
    """
    from medct.errors import InputPathError
    from medct.nets import create_net

    src = Path(ckpt_path)
    if not src.is_file():
        raise InputPathError(f"Checkpoint {src} does not exist.")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean the same thing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{src} is not a loadable Lightning checkpoint ({first}).") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelFolderError(f"{src} is not a Lightning checkpoint (it has no state_dict).")
    hp = dict(ckpt.get("hyper_parameters", {}))
    hp["net_config"] = (ckpt.get("medct") or {}).get("net_config")
    missing = [k for k in ("net_config", "labels", "spacing", "hu_min", "hu_max", "patch_size") if hp.get(k) is None]
    if missing:
        raise ModelFolderError(
            f"{src} lacks {', '.join(missing)}; was it trained with a medct task on a medct.nets network?"
        )
    cfg = hp["net_config"]
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net = create_net(str(cfg["name"]), **dict(cfg["args"]))
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0]
        raise ModelFolderError(f"{src}: cannot rebuild network '{cfg.get('name')}' from its weights ({first}).") from e
    card = ModelCard(
        net_name=str(cfg["name"]),
        net_args=dict(cfg["args"]),
        labels={i: str(n) for i, n in enumerate(hp["labels"])},
        preprocessing=Preprocessing(
            spacing=tuple(float(s) for s in hp["spacing"]),  # type: ignore[arg-type]
            hu_min=float(hp["hu_min"]),
            hu_max=float(hp["hu_max"]),
        ),
        patch_size=tuple(int(p) for p in hp["patch_size"]),  # type: ignore[arg-type]
        licence=licence,
        extra={
            "source_checkpoint": src.name,
            "epoch": int(ckpt.get("epoch", -1)),
            "global_step": int(ckpt.get("global_step", -1)),
        },
    )
    return save_model_folder(net, card, out_dir)
