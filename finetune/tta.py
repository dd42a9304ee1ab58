"""Test-time adaptation to scanner shift inside `medct segment --adapt tent|cotta|psmt`.

A `TestTimeAdapter` holds a copy of the source network (the model folder on disk is never
written) and, before each case is segmented, takes at most `steps` optimiser steps on random
patches of that case's network input (inside the body for CT). The method (`finetune/tent.py`,
`cotta.py`, `psmt.py`) decides the loss, which parameters move and which network predicts.
`reset="case"` starts every case from the source weights; `reset="never"` carries the adapted
state along the folder (continual test-time adaptation, where errors can accumulate).

Collapse guard (after the steps, before the case is segmented): the source and the adapted
network predict the same held-back patches of the case; when the adapted prediction's foreground
volume moves by more than `max_volume_change` (relative, +0.5 % of the patch volume slack) or its
mean voxel entropy grows past `max_entropy_ratio` x the source's (+0.05 nats), the case is
segmented with the source weights, the adapted state is reset, and summary.csv says so. Entropy
minimisation's known failure (everything one class) shows up as the volume change.

Bounds: steps per case, patches per step (`batch`), one patch size (the model's), so time and
memory per case are bounded; each case reports its steps, seconds and (CUDA) peak memory.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from medct.adaptation import AdapterFactory, AdaptOptions, ResetMode, register_adaptation
from medct.errors import ConfigError
from medct.precision import Precision, autocast, fp32_loss

ADAPT_METHODS = ("tent", "cotta", "psmt")


class AdaptationMethod(Protocol):
    """What a test-time adaptation method implements (one file per method)."""

    name: str

    def start(self, source: nn.Module) -> None:
        """Build the adapted copy (and teachers) from the source network; called again on reset."""

    def step(self, x: Tensor) -> float:
        """One optimiser step on patches x (B, 1, *patch); returns the loss."""

    def predictor(self) -> nn.Module:
        """The network that segments the case after adaptation (eval mode)."""


@fp32_loss
def entropy_map(logits: Tensor) -> Tensor:
    """Voxel-wise softmax entropy in nats: (B, C, *S) -> (B, *S)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@dataclass
class AdaptReport:
    """One case's adaptation: what summary.csv shows."""

    method: str
    steps: int
    seconds: float
    peak_mb: float | None
    final_loss: float | None
    reverted: str | None  # why the source weights were used, or None

    def row(self) -> dict[str, str]:
        out = {
            "adapt": self.method,
            "adapt_steps": str(self.steps),
            "adapt_seconds": f"{self.seconds:.2f}",
            "adapt_loss": "" if self.final_loss is None else f"{self.final_loss:.4f}",
        }
        if self.peak_mb is not None:
            out["adapt_peak_mb"] = f"{self.peak_mb:.0f}"
        if self.reverted:
            out["adapt_reverted"] = self.reverted
        return out


def random_patches(
    x: Tensor, patch: tuple[int, int, int], n: int, rng: np.random.Generator, keep: object | None = None
) -> Tensor:
    """n random (1, *patch) crops of x (1, 1, D, H, W), zero-padded where x is smaller; with a body
    mask (`keep.touches(lo, hi)`), crops that touch the body (up to 20 draws each)."""
    shape = x.shape[2:]
    pad = [max(p - s, 0) for s, p in zip(shape, patch, strict=True)]
    if any(pad):
        x = nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
        shape = x.shape[2:]
    crops = []
    for _ in range(n):
        for _attempt in range(20):
            lo = np.array([int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True)])
            hi = lo + np.array(patch) - 1
            if keep is None or any(pad) or keep.touches(lo, hi):  # type: ignore[attr-defined]
                break
        sl = tuple(slice(int(a), int(a) + p) for a, p in zip(lo, patch, strict=True))
        crops.append(x[(0, slice(None), *sl)])
    return torch.stack(crops)  # (n, 1, *patch)


class TestTimeAdapter:
    """Adapt a copy of `source` on each case before it is segmented (see the module docstring)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        source: nn.Module,
        method: AdaptationMethod,
        patch_size: tuple[int, int, int],
        steps: int = 10,
        batch: int = 2,
        reset: ResetMode = "case",
        device: torch.device | str = "cpu",
        seed: int = 0,
        precision: Precision = "fp32",
        max_volume_change: float = 0.5,
        max_entropy_ratio: float = 2.0,
    ) -> None:
        if steps < 1:
            raise ConfigError(f"--adapt-steps must be at least 1, got {steps}.")
        if reset not in ("case", "never"):
            raise ConfigError(f"--adapt-reset must be case or never, got '{reset}'.")
        self.device = torch.device(device)
        self.precision = precision
        # a private float32 copy in eval mode: the caller's network (and the folder) stay as they are
        self.source = copy.deepcopy(source).float().to(self.device).eval()
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.method, self.patch = method, tuple(int(p) for p in patch_size)
        self.steps, self.batch, self.reset = int(steps), int(batch), reset
        self.rng = np.random.default_rng(seed)
        self.max_volume_change, self.max_entropy_ratio = float(max_volume_change), float(max_entropy_ratio)
        self.method.start(self.source)

    def adapt(self, x: Tensor, body: object | None = None) -> tuple[nn.Module, AdaptReport]:
        """Adapt on the network input x (1, 1, D, H, W) of one case; returns the network to segment
        it with (a copy the caller may fold / convert) and the report."""
        if self.reset == "case":
            self.method.start(self.source)
        with torch.inference_mode(False):  # the Predictor made x under inference mode: a normal copy
            x = x.to(self.device, torch.float32).clone()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        loss = None
        # bf16: the forward passes under autocast; the losses (`fp32_loss`), the EMA teachers and
        # Fisher sums (float32 parameters and gradients) stay float32; no weight-cast cache, since
        # the weights change at every step (`autocast`)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            autocast(self.device, self.precision, cache=False),
        ):
            for _ in range(self.steps):
                loss = self.method.step(random_patches(x, self.patch, self.batch, self.rng, body))
        check = random_patches(x, self.patch, self.batch, self.rng, body)
        reverted = self._collapse(check)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        report = AdaptReport(self.method.name, self.steps, seconds, peak, loss, reverted)
        if reverted:
            self.method.start(self.source)  # a drifted continual state is not carried on
            return copy.deepcopy(self.source), report
        return copy.deepcopy(self.method.predictor()).eval(), report

    @torch.no_grad()
    def _collapse(self, x: Tensor) -> str | None:
        """Why the adapted network's prediction on x looks collapsed, or None."""
        src = self.source(x)
        ada = self.method.predictor().eval()(x)
        fg_src = float((src.argmax(1) > 0).float().mean())
        fg_ada = float((ada.argmax(1) > 0).float().mean())
        h_src, h_ada = float(entropy_map(src).mean()), float(entropy_map(ada).mean())
        if not (math.isfinite(h_ada) and math.isfinite(fg_ada)):
            return "adapted prediction not finite"
        if abs(fg_ada - fg_src) > self.max_volume_change * fg_src + 0.005:
            return f"foreground volume moved from {100 * fg_src:.1f} % to {100 * fg_ada:.1f} % of the patches"
        if h_ada > self.max_entropy_ratio * h_src + 0.05:
            return f"mean entropy rose from {h_src:.3f} to {h_ada:.3f}"
        return None


def make_method(name: str, lr: float | None = None, steps: int = 10, reset: ResetMode = "case") -> AdaptationMethod:
    """The adaptation method of a name in ADAPT_METHODS with its default settings (lr overrides).
    The mean teachers' EMA momentum follows the run: the references' 0.999 for a continual run
    (`reset="never"`, the stream they were made for), `case_momentum(steps)` per case (0.999 would
    move the teacher by 1 % in 10 steps)."""
    from medct.finetune.psmt import REFERENCE_MOMENTUM, case_momentum

    momentum = REFERENCE_MOMENTUM if reset == "never" else case_momentum(steps)
    if name == "tent":
        from medct.finetune.tent import Tent

        return Tent() if lr is None else Tent(lr=lr)
    if name == "cotta":
        from medct.finetune.cotta import CoTTA

        return CoTTA(momentum=momentum) if lr is None else CoTTA(lr=lr, momentum=momentum)
    if name == "psmt":
        from medct.finetune.psmt import PSMT

        return PSMT(momentum=momentum) if lr is None else PSMT(lr=lr, momentum=momentum)
    raise ConfigError(f"--adapt must be one of {', '.join(ADAPT_METHODS)}, got '{name}'.")


def harness(make: Callable[[AdaptOptions], AdaptationMethod]) -> AdapterFactory:
    """An entry of `medct.adaptation`'s table that runs the method `make(options)` builds inside the
    `TestTimeAdapter` harness (random body patches, reset, collapse guard) with the run's options."""

    def build(source: object, options: AdaptOptions) -> TestTimeAdapter:
        assert isinstance(source, nn.Module)
        return TestTimeAdapter(
            source, make(options), options.patch_size, steps=options.steps, batch=options.batch,
            reset=options.reset, device=options.device, seed=options.seed, precision=options.precision,
        )  # fmt: skip

    return build


def _method_for_run(name: str, options: AdaptOptions) -> AdaptationMethod:
    return make_method(name, steps=options.steps, reset=options.reset)


for _name in ADAPT_METHODS:  # `medct segment --adapt tent|cotta|psmt`
    register_adaptation(_name, harness(partial(_method_for_run, _name)))


# ----------------------------------------------------------------------------- shared by the methods

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def adaptation_mode(net: nn.Module) -> nn.Module:
    """Eval mode except the normalisation layers, which use the test batch's statistics (TENT's
    setting; instance and group norm do so in both modes). Dropout stays off and a
    deep-supervision network returns its full-resolution output only."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


def norm_affine_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The scale and shift of every normalisation layer that has them (TENT's parameters)."""
    return [p for m in net.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum x teacher + (1 - momentum) x student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


@fp32_loss
def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over voxels of -sum_c q_c log p_c (the mean-teacher consistency loss of CoTTA)."""
    return -(target_probs * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@fp32_loss
def hard_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over voxels of the cross-entropy to hard pseudo-labels (B, *S) (CoTTA's segmentation loss)."""
    return nn.functional.cross_entropy(logits.float(), labels)


@fp32_loss
def symmetric_cross_entropy(logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """Mean over voxels of (1 - alpha) CE(teacher -> student) + alpha CE(student -> teacher)
    (PSMT's SymmetricCrossEntropy, JiaxuTian/PSMT classification/methods/psmt.py)."""
    logp, logq = torch.log_softmax(logits.float(), dim=1), torch.log_softmax(teacher_logits.float(), dim=1)
    return (-(1.0 - alpha) * (logq.exp() * logp).sum(dim=1) - alpha * (logp.exp() * logq).sum(dim=1)).mean()


def mean_teacher_start(source: nn.Module, lr: float) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(student with every weight trainable, frozen eval-mode teacher, Adam on the student): the
    starting point of the mean-teacher methods (CoTTA, PSMT), both copies of the source."""
    student = copy.deepcopy(source)
    for p in student.parameters():
        p.requires_grad_(True)
    teacher = copy.deepcopy(source).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, torch.optim.Adam(student.parameters(), lr=lr)
