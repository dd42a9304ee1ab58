"""The one precision policy of medct: which devices run bf16 autocast, for every task and predictor.

    auto  bf16 autocast where the device has bf16 arithmetic, fp32 elsewhere (and on CPU for the
          families measured slower in bf16 there: `bf16_cpu`):
            CUDA            torch.cuda.is_bf16_supported() (Ampere and later)
            CPU             oneDNN's bf16 kernels on native bf16 instructions: AMX-BF16 or AVX-512 BF16
                            (`cpu_has_bf16`; on an AVX-512 CPU without them oneDNN emulates bf16,
                            slower than fp32, so those stay fp32)
            MPS, others     fp32 (unmeasured)
    bf16  bf16 autocast; a device without bf16 is a PrecisionUnavailableError (one sentence, exit
          2), never a silent fp32 run.
    fp32  plain float32.

Autocast only: parameters, gradients and optimiser state stay float32 (Lightning's "bf16-mixed",
`torch.autocast` in the predictors). What must not lose precision runs outside autocast on
float32 tensors: losses (`fp32_loss`), softmax/argmax of scores, metrics, EMA teachers and Fisher
sums (updated from float32 parameters and gradients, outside the autocast region).

channels_last_3d (`channels_last`): NDHWC activations for 3D convolution networks, where
measured faster (bench/train_throughput.py, issue 31); a memory layout, so results are those of
the default layout up to floating-point reordering.

Refs: Micikevicius et al., "Mixed Precision Training", ICLR 2018; Kalamkar et al., "A Study of
BFLOAT16 for Deep Learning Training", arXiv 1905.12322 (bf16 needs no loss scaling).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Literal, ParamSpec, TypeVar

import torch
from torch import nn

from medct.errors import ConfigError, PrecisionUnavailableError

Precision = Literal["bf16", "fp32"]
PRECISION_CHOICES = ("auto", "bf16", "fp32")
# Lightning's names of the two precisions (Trainer(precision=...))
LIGHTNING_PRECISION: dict[str, str] = {"bf16": "bf16-mixed", "fp32": "32-true"}

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 instructions (AMX-BF16 or AVX-512 BF16) and PyTorch's
    oneDNN can use them. Read from /proc/cpuinfo (Linux); other systems answer False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    return native and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_has_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 autocast on native bf16 arithmetic (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def check_precision(value: object) -> str:
    """`value` if it is one of auto/bf16/fp32, else ConfigError."""
    if value not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {value!r}.")
    return str(value)


def resolve_precision(asked: str | None, device: torch.device, bf16_cpu: bool = True) -> Precision:
    """The precision to run at on `device` for `asked` (auto/bf16/fp32; None is auto).

    bf16_cpu: whether auto picks bf16 on a bf16 CPU for this network family; False for the
    transformer families bench/train_throughput.py measured slower in bf16 there (BM-MAE's ViT and
    the motion transformer: small matrices, where the casts cost more than AMX saves)."""
    asked = check_precision("auto" if asked is None else asked)
    if asked == "fp32":
        return "fp32"
    if device_has_bf16(device):
        return "bf16" if asked == "bf16" or bf16_cpu or device.type != "cpu" else "fp32"
    if asked == "bf16":
        what = (
            "this CPU has neither AMX-BF16 nor AVX-512 BF16" if device.type == "cpu" else f"{device.type} has no bf16"
        )
        raise PrecisionUnavailableError(f"--precision bf16 was asked for, but {what}; use --precision fp32 or auto.")
    return "fp32"


def lightning_device(accelerator: object) -> torch.device:
    """The device type a Trainer's `accelerator` trains on ("cpu", "gpu"/"cuda", "auto"/None: CUDA
    when PyTorch sees one, else CPU; others, e.g. mps: "meta", which medct has measured nothing on)."""
    acc = accelerator.lower() if isinstance(accelerator, str) else "auto"
    if acc in ("gpu", "cuda") or acc == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    if acc in ("cpu", "auto"):
        return torch.device("cpu")
    return torch.device("meta")


def lightning_precision(asked: str | None, accelerator: object, bf16_cpu: bool = True) -> str:
    """Lightning's Trainer precision for a recipe's `precision`, its trainer's `accelerator` and
    the task family's `bf16_cpu` (`MedCTTask.bf16_cpu`)."""
    return LIGHTNING_PRECISION[resolve_precision(asked, lightning_device(accelerator), bf16_cpu)]


def autocast(device: torch.device, precision: Precision, cache: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on `device` for "bf16", nothing for "fp32".

    `cache=False` for a region that updates weights (an optimiser loop inside one region): torch
    keeps the bf16 copy of every trainable weight it cast until the region ends, so a forward after
    `optimizer.step()` would still run the old weights (it made PSMT diverge in `medct segment`).
    Inference keeps the cache: the same weights serve every tile."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off (CPU and CUDA) inside the block: what runs there runs at its tensors' dtype."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _to_fp32(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, tuple | list):
        return type(value)(_to_fp32(v) for v in value)
    return value


def fp32_loss(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: `fn` (a loss, a metric) runs with autocast off on float32 copies of its floating
    tensor arguments (also inside tuples/lists), so a bf16 forward never gives a bf16 loss."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        args_32 = tuple(_to_fp32(a) for a in args)
        kwargs_32 = {k: _to_fp32(v) for k, v in kwargs.items()}
        with full_precision():
            return fn(*args_32, **kwargs_32)  # type: ignore[arg-type]

    return wrapper


def has_conv3d(net: nn.Module) -> bool:
    """Whether `net` holds a 3D (transposed) convolution, the layers channels_last_3d speeds up."""
    return any(isinstance(m, nn.Conv3d | nn.ConvTranspose3d) for m in net.modules())


def channels_last(net: nn.Module) -> nn.Module:
    """`net` with the weights of its 3D (transposed) convolutions in channels_last_3d (NDHWC)
    memory, in place; oneDNN then keeps activations in that layout through them. Other layers are
    left as they are (`Module.to(memory_format=...)` would also convert any 4D or 5D tensor of
    other layers, and refuses 4D ones)."""
    for m in net.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return net


def use_channels_last(asked: bool | None, family_default: bool, device: torch.device) -> bool:
    """Whether a run converts its network to channels_last_3d: `asked` (a recipe's
    `channels_last: true|false`) when given, else the family's measured CPU default
    (`MedCTTask.channels_last_cpu`, from bench/train_throughput.py); off on other devices unless
    asked (unmeasured there)."""
    if asked is not None:
        return bool(asked)
    return family_default and device.type == "cpu"
