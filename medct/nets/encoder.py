"""Encoder transfer: save a network's encoder once, load it into any network of the same backbone.

Every registered network names its encoder: `encoder_prefixes` (state-dict key prefixes) and
`encoder_features(x)` (multi-scale features, shallow to deep). A pretrained encoder (SparK,
contrastive, ...) is written with `save_encoder` (safetensors, the registry name and args as
metadata) and loaded with `load_encoder`, which returns a strict report of loaded / missing /
unexpected / shape-mismatched keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from medct.errors import InputPathError, ModelFolderError
from medct.paths import atomic_file

ENCODER_NET_KEY = "medct_net"  # safetensors metadata: the registry name the encoder came from


@dataclass
class EncoderLoadReport:
    """What `load_encoder` did: keys are the network's state-dict keys."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # encoder keys of the net absent from the source
    unexpected: list[str] = field(default_factory=list)  # source keys that are not encoder keys of the net
    mismatched: list[str] = field(default_factory=list)  # present in both with different shapes
    adapted: list[str] = field(default_factory=list)  # stem weights repeated over more input channels
    source_net: str | None = None  # registry name stored with the encoder file, when known

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        adapted = f" ({len(self.adapted)} stem tensors repeated over the input channels)" if self.adapted else ""
        return (
            f"{len(self.loaded)} loaded{adapted}, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched encoder tensors"
        )


def unique_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """`net.state_dict()` without aliases: a tensor registered under several names (nnU-Net's
    dynamic-network-architectures keeps `all_modules` and `decoder.encoder` views of the same
    modules) appears once, under its first name. safetensors refuses shared tensors, so every
    file medct writes holds this, and `load_unique_state_dict` restores the aliases."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for k, v in net.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v.detach()
    return out


def load_unique_state_dict(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a state dict written from `unique_state_dict` strictly: every alias of a loaded tensor is
    filled from it; any other missing or unexpected key raises RuntimeError (as load_state_dict)."""
    first: dict[int, str] = {}
    full = dict(state)
    for k, v in net.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(v), k)
        if k not in full and canonical in state:
            full[k] = state[canonical]
    net.load_state_dict(full, strict=True)


def _encoder_prefixes(net: nn.Module) -> tuple[str, ...]:
    prefixes = getattr(net, "encoder_prefixes", None)
    if not prefixes:
        raise TypeError(
            f"{type(net).__name__} does not declare `encoder_prefixes`; build it with medct.nets.create_net"
        )
    return tuple(prefixes)


def encoder_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The encoder's tensors of `net` (keys as in `net.state_dict()`), detached."""
    prefixes = _encoder_prefixes(net)
    return {k: v for k, v in unique_state_dict(net).items() if k.startswith(prefixes)}


def save_encoder(net: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write `net`'s encoder as safetensors (with the registry name and net args as metadata)."""
    from safetensors.torch import save_file

    out = Path(path)
    state = {k: v.cpu().contiguous() for k, v in encoder_state_dict(net).items()}
    config = getattr(net, "net_config", {})
    metadata = {
        "format": "pt",
        ENCODER_NET_KEY: str(config.get("name", "")),
        "net_args": json.dumps(config.get("args", {})),
    }
    with atomic_file(out) as tmp:  # no half-written encoder file
        save_file(state, str(tmp), metadata=metadata)
    return out


def _read_encoder_file(path: Path) -> tuple[dict[str, Tensor], str | None, int | None]:
    """(tensors, source registry name, source in_channels) of an encoder file or model folder."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    net_name: str | None = None
    in_channels: int | None = None
    if path.is_dir():  # a model folder (encoder or whole network): its card names the source network
        from medct.card import CARD_FILE, read_model_card

        if (path / CARD_FILE).is_file():
            card = read_model_card(path)
            net_name, in_channels = card.net_name, card.net_args.get("in_channels", 1)
        path = path / "model.safetensors"
    if not path.is_file():
        raise InputPathError(f"Encoder file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if net_name is None:
            net_name = meta.get(ENCODER_NET_KEY) or None
            in_channels = json.loads(meta.get("net_args", "{}")).get("in_channels", 1)
        return load_file(str(path)), net_name, None if in_channels is None else int(in_channels)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{path} is not a readable safetensors encoder file ({e}).") from e


def _repeat_stem(source: Tensor, target_shape: tuple[int, ...], source_in: int | None) -> Tensor | None:
    """A stem weight (out, source_in, k, k, k) repeated to (out, n * source_in, k, k, k) and divided by n,
    so a one-channel encoder starts a multi-channel network with the same response to an input
    whose channels are equal (nnssl / Models Genesis practice); None when `source` is not such a stem."""
    shape = tuple(source.shape)
    if source_in is None or len(shape) < 3 or len(shape) != len(target_shape) or shape[1] != source_in:
        return None
    if shape[:1] + shape[2:] != target_shape[:1] + target_shape[2:] or target_shape[1] % shape[1]:
        return None
    n = target_shape[1] // shape[1]
    return source.repeat(1, n, *([1] * (len(shape) - 2))) / n


def load_encoder(
    net: nn.Module, path_or_state: str | os.PathLike[str] | dict[str, Tensor], strict: bool = True
) -> EncoderLoadReport:
    """Copy a pretrained encoder into `net` and report what matched.

    `path_or_state`: a file from `save_encoder`, an exported model folder (its encoder part is
    used), or a state dict keyed like `net.state_dict()`. With `strict`, any missing, unexpected or
    shape-mismatched key raises ModelFolderError and nothing is loaded; otherwise the matching
    tensors are loaded and the rest is only reported. A stem weight pretrained on fewer input
    channels than `net` has is repeated over them and divided by the repeat (`_repeat_stem`).
    """
    prefixes = _encoder_prefixes(net)
    source_net: str | None = None
    source_in: int | None = None
    from_folder = False
    if isinstance(path_or_state, dict):
        state = dict(path_or_state)
        where = "the given state dict"
    else:
        p = Path(path_or_state).expanduser()
        state, source_net, source_in = _read_encoder_file(p)
        from_folder = p.is_dir()
        where = str(p)
    # a network that holds a backbone under a prefix (EncoderClassifier: "backbone.") takes an
    # encoder pretrained on the plain backbone: its keys gain the prefix
    key_prefix = str(getattr(net, "encoder_key_prefix", ""))
    if key_prefix:
        state = {k if k.startswith(key_prefix) else key_prefix + k: v for k, v in state.items()}
    if from_folder:  # a model folder of a whole network: its encoder part
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    target = encoder_state_dict(net)
    report = EncoderLoadReport(source_net=source_net)
    report.missing = sorted(k for k in target if k not in state)
    report.unexpected = sorted(k for k in state if k not in target)
    for k in sorted(k for k in target if k in state):
        if tuple(state[k].shape) == tuple(target[k].shape):
            report.loaded.append(k)
            continue
        repeated = _repeat_stem(state[k], tuple(target[k].shape), source_in)
        if repeated is None:
            report.mismatched.append(k)
        else:  # more input channels downstream than in pretraining
            state[k] = repeated
            report.loaded.append(k)
            report.adapted.append(k)
    if strict and not report.ok:
        first = (report.missing or report.unexpected or report.mismatched)[0]
        name = getattr(net, "net_name", type(net).__name__)
        raise ModelFolderError(
            f"The encoder in {where} does not fit network '{name}' ({report.summary()}, e.g. '{first}')."
        )
    with torch.no_grad():  # copying into one name of a shared tensor sets all its aliases
        params = dict(net.state_dict(keep_vars=True))
        for k in report.loaded:
            params[k].copy_(state[k].to(dtype=params[k].dtype, device=params[k].device))
    return report


def load_encoder_folder(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    net_args: dict[str, object] | None = None,
) -> tuple[nn.Module, EncoderLoadReport]:
    """The network named by an encoder folder's card (`medct export` of a pretraining run), with the
    pretrained encoder loaded strictly; `net_args` override the card's (e.g. out_channels=5 for a
    downstream head). The decoder is freshly initialised. Returns (net in eval mode, report)."""
    from medct.card import read_model_card
    from medct.nets.registry import create_net

    card = read_model_card(model_dir)
    try:
        net = create_net(card.net_name, **{**card.net_args, **(net_args or {})})
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{model_dir}: cannot build network '{card.net_name}' from medct.json ({e}).") from e
    report = load_encoder(net, model_dir, strict=True)
    return net.to(device).eval(), report


def load_pretrained_encoder(net: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> EncoderLoadReport:
    """What a downstream task does with `pretrained_encoder: ENC_DIR`: load it into `net`; with
    `strict=False` a partial load is a warning naming what did not load (strict: ModelFolderError)."""
    import warnings

    report = load_encoder(net, path, strict=strict)
    if not report.ok:
        first = (report.missing or report.unexpected or report.mismatched)[0]
        warnings.warn(
            f"pretrained encoder {path} loaded partially ({report.summary()}, e.g. '{first}').",
            UserWarning,
            stacklevel=2,
        )
    return report
