"""Continual-learning safeguards of a sequential fine-tuning chain (Turbolift stages).

* L2 towards the previous stage's weights: lambda/2 sum_i (theta_i - theta*_i)^2. "A Closer Look
  at Rehearsal-Free Continual Learning" (Smith et al., CVPR-W 2023) finds this plain anchor strong
  once the model starts from good weights.
* EWC (Kirkpatrick et al., PNAS 2017): the same anchor weighted per parameter by the diagonal
  Fisher information F_i of the previous stage, lambda/2 sum_i F_i (theta_i - theta*_i)^2. F is the
  empirical Fisher, the mean squared gradient of the training loss over batches of the previous
  stage's training data at its final weights (`fisher_diagonal`), and is divided by its mean over
  all parameters, so that one lambda means the same overall strength for L2 and EWC and only the
  distribution over parameters differs.
* Slow learner (SLCA, Zhang et al., ICCV 2023): the pretrained encoder learns at a fraction of the
  decoder's rate (`encoder_lr_scale` of SegmentationTask); param_groups below.
* Rehearsal (replay of earlier stages' samples) is a data mixture: `finetune.turbolift` adds
  earlier stages' training cases to a stage's datalist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class WeightAnchor:
    """Quadratic pull of a network's parameters towards reference values.

    reference: parameter name -> theta* (the previous stage's weights); importance: name -> F_i
    (EWC; None = 1 everywhere, i.e. L2); strength: lambda. Parameters absent from `reference` (none,
    in a chain of one architecture) are not anchored.
    """

    def __init__(self, reference: dict[str, Tensor], strength: float, importance: dict[str, Tensor] | None = None):
        if strength < 0:
            raise ValueError(f"the regulariser weight must be >= 0, got {strength}")
        self.strength = float(strength)
        self.reference = {k: v.detach().float().clone() for k, v in reference.items()}
        self.importance = None if importance is None else {k: v.detach().float() for k, v in importance.items()}

    def to(self, device: torch.device) -> WeightAnchor:
        self.reference = {k: v.to(device) for k, v in self.reference.items()}
        if self.importance is not None:
            self.importance = {k: v.to(device) for k, v in self.importance.items()}
        return self

    def penalty(self, net: nn.Module) -> Tensor:
        """lambda/2 sum_i w_i (theta_i - theta*_i)^2 over the anchored parameters (a scalar)."""
        total: Tensor | None = None
        for name, p in net.named_parameters():
            ref = self.reference.get(name)
            if ref is None:
                continue
            sq = (p.float() - ref).pow(2)
            if self.importance is not None:
                sq = sq * self.importance[name]
            total = sq.sum() if total is None else total + sq.sum()
        if total is None:
            return torch.zeros((), device=next(net.parameters()).device)
        return 0.5 * self.strength * total


def fisher_diagonal(
    net: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    loss_of: Callable[[dict[str, Tensor]], Tensor],
    max_batches: int,
    normalise: bool = True,
) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: mean over up to `max_batches` batches of grad(loss)^2 per parameter,
    divided by its mean over all parameters (see the module docstring; `normalise=False`: the raw
    mean, as PSMT's reference weighs it). `loss_of(batch)` runs the
    network on a batch (already on the network's device) and returns the training loss.
    The network's train/eval mode is left as it was; batch-norm statistics are not updated."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = net.training
    net.eval()  # frozen normalisation statistics: the Fisher of the weights as they are
    count = 0
    try:
        for batch in batches:
            if count >= max_batches:
                break
            net.zero_grad(set_to_none=True)
            loss_of(batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach().float().pow(2)
            count += 1
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    if count == 0:
        raise ValueError("the Fisher information needs at least one training batch")
    if not normalise:
        return {n: (a / count).cpu() for n, a in acc.items()}
    total = sum(float(a.sum()) for a in acc.values())
    n_params = sum(a.numel() for a in acc.values())
    mean = total / count / max(n_params, 1)
    scale = 1.0 / (count * mean) if mean > 0 else 0.0
    return {n: (a * scale).cpu() for n, a in acc.items()}


def save_fisher(fisher: dict[str, Tensor], path: str | os.PathLike[str]) -> Path:
    from safetensors.torch import save_file

    from medct.paths import atomic_file

    out = Path(path)
    with atomic_file(out) as tmp:
        save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
    return out


def load_fisher(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from medct.errors import InputPathError

    if not Path(path).is_file():
        raise InputPathError(f"Fisher information file {path} does not exist.")
    return load_file(str(path))


def param_groups(net: nn.Module, lr: float, encoder_lr_scale: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups: the encoder (under `net.encoder_prefixes`) at lr x encoder_lr_scale, the rest
    at lr (SLCA's slow learner); one group when the scale is 1 or the net has no encoder split."""
    prefixes = tuple(getattr(net, "encoder_prefixes", ()))
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if encoder_lr_scale == 1.0 or not prefixes:
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay}]
    enc = [p for n, p in named if n.startswith(prefixes)]
    rest = [p for n, p in named if not n.startswith(prefixes)]
    return [
        {"params": enc, "lr": lr * encoder_lr_scale, "weight_decay": weight_decay, "name": "encoder"},
        {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "decoder"},
    ]
