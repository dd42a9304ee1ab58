"""The network registry: `create_net(name, **args) -> nn.Module` (timm's `create_model` pattern).

A registered name is a network class whose typed keyword arguments are the architecture's knobs.
A *named variant* (timm's `resnet50` on `ResNet`) is a registered subclass whose __init__ takes
only the few arguments that still vary and passes fixed settings to its base, e.g.
`resenc_unet_m` = `ResEncUNetM` (nnU-Net's ResEnc-M depths) on `ResEncUNet`. A class rather than
timm's function because LightningCLI links `out_channels` into `model.init_args.net`, which
jsonargparse supports for classes only. YAML names either by `class_path`
(`medct.nets.ResEncUNet`, `medct.nets.ResEncUNetM`).

Every network built through the registry carries `net.net_config = {"name", "args"}` (JSON-
primitive arguments of the registered callable), which is what a model card stores and
`create_net(**net_config)` rebuilds from. Every registration declares `tiny`: arguments and an input
size that make a small, fast instance for tests; `tests/test_nets.py` runs every registered name
through the same checks, so a newly added network cannot escape them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

DEFAULT_NET = "resenc_unet"
_T = TypeVar("_T", bound=type[nn.Module])


@dataclass(frozen=True)
class NetEntry:
    """One registered network: how to build it and how to build a tiny one for tests."""

    name: str
    builder: type[nn.Module]
    tiny_args: dict[str, Any] = field(default_factory=dict)
    tiny_size: int = 32  # cube side of a test input (a multiple of the net's total stride)
    variant_of: str | None = None  # registry name of the registered base class of a variant
    # "dense": (B, out_channels, X, Y, Z) maps; "classes": (B, out_channels) logits; "slices": a 2D
    # network, (B, in_channels, X, Y) -> (B, out_channels, X, Y) (2.5D synthetic CT); the generative
    # kinds of text-to-CT (medct.nets.generative): "latent" (an autoencoder), "denoiser" (a diffusion
    # UNet), "embedding" (a CLIP model); "motion" (medct.nets.motion): displacement fields in, the next
    # phase's fields out
    output: str = "dense"


OUTPUT_KINDS = ("dense", "classes", "slices", "latent", "denoiser", "embedding", "motion")
SEGMENTATION_KINDS = ("dense", "classes", "slices")  # image in, one map/vector of out_channels out
_NETS: dict[str, NetEntry] = {}

# Where each registered name is defined, so that `create_net("nnunet_plain")` imports only that
# family: the MONAI-based families import all of MONAI (~3 s on 2 cores), which a model of another
# family does not need. A new family adds its names here; tests/test_nets.py checks that this table
# and the family files agree.
NET_MODULES: dict[str, str] = {
    "unet": "medct.nets.unet",
    "resenc_unet": "medct.nets.resenc_unet",
    "resenc_unet_m": "medct.nets.resenc_unet",
    "resenc_unet_l": "medct.nets.resenc_unet",
    "segresnet": "medct.nets.segresnet",
    "swinunetr": "medct.nets.swinunetr",
    "nnunet_resenc": "medct.nets.nnunet",
    "nnunet_plain": "medct.nets.nnunet",
    "encoder_classifier": "medct.nets.classifier",
    "mm_unetr": "medct.nets.mm_unetr",
    "attention_unet": "medct.nets.attention_unet",
    "unetpp_2d": "medct.nets.unetpp_2d",
    "kl_autoencoder": "medct.nets.generative",
    "latent_diffusion_unet": "medct.nets.generative",
    "clip3d": "medct.nets.generative",
    "motion_transformer": "medct.nets.motion",
}


def load_all_families() -> None:
    """Import every network family (registers all names)."""
    import importlib

    for module in sorted(set(NET_MODULES.values())):
        importlib.import_module(module)


def jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively: net args must survive JSON and torch.load(weights_only=True)."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def record_config(net: nn.Module, cls: type, init_locals: dict[str, Any]) -> None:
    """Store `net.net_config` = {"name": cls's registry name, "args": cls.__init__'s arguments}.

    Call as `record_config(self, MyNet, locals())` at the end of `MyNet.__init__`. Does nothing
    when `net` is an instance of a registered subclass with its own __init__ (a variant), which
    records its own; a registered subclass without one (an alias such as ResEncUNetL) records
    these arguments under its own name.
    """
    if type(net).__init__ is not cls.__init__:
        return
    params = inspect.signature(cls.__init__).parameters
    args = {k: jsonable(init_locals[k]) for k in params if k != "self"}
    json.dumps(args)  # fail at construction, not at export, if an argument is not JSON-primitive
    net.net_config = {"name": type(net).net_name, "args": args}  # type: ignore[attr-defined]


def register_net(
    name: str, tiny_args: dict[str, Any] | None = None, tiny_size: int = 32, output: str = "dense"
) -> Callable[[_T], _T]:
    """Class decorator: make `cls` buildable as `create_net(name, ...)`.

    tiny_args / tiny_size: arguments and input cube side of a small, fast instance for tests.
    output: "dense" (segmentation-shaped output), "classes" (one logit vector per input),
    "slices" (a 2D network on (B, C, X, Y) slices), or a generative kind (see NetEntry).
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got '{output}'")

    def deco(cls: _T) -> _T:
        if name in _NETS:
            raise ValueError(f"network name '{name}' is already registered to {_NETS[name].builder.__name__}")
        cls.net_name = name  # type: ignore[attr-defined]
        base = next((getattr(b, "net_name", None) for b in cls.__mro__[1:] if "net_name" in vars(b)), None)
        _NETS[name] = NetEntry(name, cls, dict(tiny_args or {}), tiny_size, variant_of=base, output=output)
        return cls

    return deco


def list_nets() -> list[str]:
    """Registered network names, sorted (every family imported)."""
    load_all_families()
    return sorted(_NETS)


def net_entry(name: str) -> NetEntry:
    """The registry entry of `name` (KeyError naming the registered networks otherwise)."""
    if name not in _NETS and name in NET_MODULES:
        import importlib

        importlib.import_module(NET_MODULES[name])
    if name not in _NETS:
        raise KeyError(f"unknown network '{name}'; registered networks are: {', '.join(list_nets())}")
    return _NETS[name]


def create_net(name: str, **args: Any) -> nn.Module:
    """Build the registered network `name` with its keyword arguments (timm's create_model)."""
    return net_entry(name).builder(**args)


def create_tiny_net(name: str, **args: Any) -> nn.Module:
    """The small test instance of `name`: its declared tiny arguments, overridden by `args`."""
    entry = net_entry(name)
    return entry.builder(**{**entry.tiny_args, **args})
