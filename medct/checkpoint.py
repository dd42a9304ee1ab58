"""Exported model folders: `model.safetensors` + `medct.json`, never pickle.

A model folder is what `medct export` writes and `medct segment -m` / `medct.load_model` read:

    MODEL_DIR/
      model.safetensors   the network's state dict (tensors only)
      medct.json          ModelCard: task, architecture name and init args, labels/outputs,
                          preprocessing (spacing, intensity window, modality), patch size,
                          inference settings, medct version, licence

The card is built by the task that trained the model (each medct LightningModule has
`model_card()` and stores it in its checkpoints with `store_card`); `medct export` copies it.

Training state (optimizer, epochs) stays in Lightning checkpoints; this format is for shipping.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medct.card import CARD_FILE, ENCODER_TASK, FORMAT_VERSION, ModelCard, read_model_card
from medct.errors import ModelFolderError
from medct.paths import atomic_folder

# The card lives in medct.card; these names stay importable from here, where they always were.
__all__ = [
    "CARD_FILE", "ENCODER_TASK", "FORMAT_VERSION", "ModelCard", "export_lightning_checkpoint", "load_model_folder",
    "read_model_card", "read_network_weights", "read_part_weights", "save_model_folder", "store_card",
]  # fmt: skip

WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_KEY = "medct"  # Lightning checkpoint["medct"] = {"card": card dict, "net_prefix": "net."}


def store_card(
    checkpoint: dict[str, Any],
    card: ModelCard,
    net_prefix: str = "net.",
    parts: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> None:
    """Put `card` into a Lightning checkpoint (call from a task's `on_save_checkpoint`).

    net_prefix: the state-dict prefix of the exported network inside the task (its attribute
    name plus a dot). parts: further modules to export beside it, name -> state-dict prefix
    (e.g. {"mae_decoder": "mae_decoder."}); `medct export` writes each as NAME.safetensors and the
    card says how to rebuild it. files: text files that travel with the model, name -> content
    (e.g. a CLIP model's tokenizer.json). JSON primitives only, so the checkpoint stays
    weights_only-loadable.
    """
    checkpoint[CHECKPOINT_KEY] = {
        "card": json.loads(json.dumps(card.to_dict())),
        "net_prefix": net_prefix,
        "parts": dict(parts or {}),
        "files": {str(k): str(v) for k, v in (files or {}).items()},
    }


def save_model_folder(
    net: nn.Module,
    card: ModelCard,
    out_dir: str | os.PathLike[str],
    parts: dict[str, dict[str, torch.Tensor]] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write `net` and `card` into `out_dir` atomically (staged in a sibling temp folder), with
    `parts` (name -> tensors, as NAME.safetensors) and text `files` (name -> content) beside them.

    For an encoder card (task "encoder") only the encoder's tensors are written: a pretraining
    task's network has a decoder nobody trained (SparK and the contrastive methods use only the
    encoder), and shipping it would suggest otherwise."""
    from safetensors.torch import save_file as _save_file

    from medct.nets import encoder_state_dict, unique_state_dict

    def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
        """safetensors' save_file; its I/O failures (a full disk, ...) as the OSError they are, not a
        SafetensorError (which the CLI would not know for the system's refusal)."""
        try:
            _save_file(tensors, path, metadata=metadata)
        except Exception as e:  # safetensors raises its own SafetensorError for every failure
            if "os error 28" in str(e) or "No space left" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", path) from None
            if "I/O error" in str(e):
                raise OSError(errno.EIO, str(e).split("I/O error:", 1)[-1].strip(), path) from None
            raise

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ModelFolderError(f"Output '{out_dir}' is a file; a model is written as a folder.")
    with atomic_folder(out_dir) as stage:
        # safetensors refuses shared/non-contiguous storage: one name per tensor, contiguous CPU copies.
        tensors = encoder_state_dict(net) if card.task == ENCODER_TASK else unique_state_dict(net)
        state = {k: v.cpu().contiguous() for k, v in tensors.items()}
        save_file(state, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, tensors in (parts or {}).items():  # e.g. a BM-MAE decoder beside its encoder
            part = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(part, str(stage / f"{name}.safetensors"), metadata={"format": "pt"})
        for name, text in (files or {}).items():
            if Path(name).name != name or name in (WEIGHTS_FILE, CARD_FILE):
                raise ValueError(f"a model folder file must be a plain new file name, got {name!r}")
            (stage / name).write_text(text)
        (stage / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return Path(out_dir)


def load_model_folder(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network of a model folder and load its weights strictly; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medct.nets import create_net, load_unique_state_dict

    card = read_model_card(model_dir)
    if card.task == ENCODER_TASK:
        raise ModelFolderError(
            f"{model_dir} holds a pretrained encoder, not a whole network; give it to a recipe as "
            "model.init_args.pretrained_encoder, or load it with medct.nets.load_encoder_folder."
        )
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
        load_unique_state_dict(net, state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelFolderError(f"{weights} does not match network '{card.net_name}' ({first}).") from e
    return net.to(device).eval(), card


def _read_lightning_checkpoint(src: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of a Lightning checkpoint; one-sentence errors otherwise."""
    from medct.errors import InputPathError

    if not src.is_file():
        raise InputPathError(f"Checkpoint {src} does not exist.")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean the same thing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{src} is not a loadable Lightning checkpoint ({first}).") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelFolderError(f"{src} is not a Lightning checkpoint (it has no state_dict).")
    return ckpt


def export_lightning_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    licence: str | None = None,
    intended_use: str | None = None,
) -> Path:
    """Turn a Lightning checkpoint of a medct task into a model folder (safetensors + medct.json).

    The checkpoint is read with `torch.load(weights_only=True)`. The task wrote its model card and
    the state-dict prefix of its network into checkpoint["medct"] (`store_card`); the card is
    copied as it is (plus the source checkpoint, epoch and step, and `licence` / `intended_use`
    when given), the
    tensors under the prefix are the network's. Nothing here knows a task's argument names.
    """
    from medct.nets import create_net

    src = Path(ckpt_path)
    ckpt = _read_lightning_checkpoint(src)
    stored = ckpt.get(CHECKPOINT_KEY) or {}
    if "card" not in stored:
        raise ModelFolderError(
            f"{src} holds no medct model card; was it saved by a medct task with `medct fit` (checkpoints saved before medct had model cards have none)?"
        )
    try:
        card = ModelCard.from_dict(stored["card"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{src} holds an invalid medct model card ({type(e).__name__}: {e}).") from e
    prefix = str(stored.get("net_prefix", "net."))
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net = create_net(card.net_name, **card.net_args)
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0]
        raise ModelFolderError(f"{src}: cannot rebuild network '{card.net_name}' from its weights ({first}).") from e
    if licence is not None:
        card.licence = licence
    if intended_use is not None:
        card.intended_use = intended_use
    card.extra = {
        **card.extra,
        "source_checkpoint": src.name,
        "epoch": int(ckpt.get("epoch", -1)),
        "global_step": int(ckpt.get("global_step", -1)),
    }
    parts = {
        str(name): {k[len(p) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(p)}
        for name, p in dict(stored.get("parts", {})).items()
    }
    empty = [name for name, tensors in parts.items() if not tensors]
    if empty:
        raise ModelFolderError(
            f"{src}: the card names the part '{empty[0]}' but the checkpoint holds no tensors for it."
        )
    return save_model_folder(net, card, out_dir, parts, dict(stored.get("files", {})))


def read_part_weights(model_dir: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor]:
    """The tensors of part `name` of a model folder (NAME.safetensors); one sentence if absent or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(model_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ModelFolderError(
            f"Model folder '{model_dir}' lacks its '{name}' part ({path.name}); re-export it with `medct export`."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{path} is corrupt or not a safetensors file ({e}).") from e


def read_network_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The network tensors of a medct Lightning checkpoint (`.ckpt`, the keys under the task's
    network prefix, read with weights_only=True) or of a model folder (model.safetensors): what a
    later training stage starts from (Turbolift's hand-over of all weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(path)
    if src.is_dir():
        weights = src / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelFolderError(f"Model folder '{src}' has no {WEIGHTS_FILE}.")
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelFolderError(f"{weights} is corrupt or not a safetensors file ({e}).") from e
    ckpt = _read_lightning_checkpoint(src)
    prefix = str((ckpt.get(CHECKPOINT_KEY) or {}).get("net_prefix", "net."))
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ModelFolderError(f"{src} holds no network tensors under '{prefix}'.")
    return state
