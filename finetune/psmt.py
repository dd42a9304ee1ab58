"""PSMT-style test-time adaptation (after Tian et al., "Parameter-Selective Mean Teacher for
Continual Test-Time Adaptation", 2024), for `medct segment --adapt psmt`.

A mean teacher (EMA 0.999, the teacher segments the case) whose student is kept near the source
weights where they matter most:
  * importance: the diagonal Fisher information of the *source* network, from its own predicted
    labels (argmax) on the first adaptation batch it sees (medct model folders carry no source
    data; the model's confidence on the new scans stands in for it). Normalised to mean 1
    (`finetune.safeguards.fisher_diagonal`);
  * an EWC-like penalty lambda/2 sum_i F_i (theta_i - theta_src,i)^2 (`WeightAnchor`) on the
    student's loss;
  * shielding: the `shield` fraction of weights with the highest Fisher information are reset to
    their source values after every step (they never move); the rest adapt.
The student minimises the soft cross-entropy to the teacher's plain softmax. "PSMT-style": the
paper's selective distillation on features is not reproduced; the Fisher mask and anchor are.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from medct.finetune.safeguards import WeightAnchor, fisher_diagonal
from medct.finetune.tta import adaptation_mode, ema_update, mean_teacher_start, soft_cross_entropy


class PSMT:
    """Mean teacher with a Fisher-weighted anchor and a shielded top fraction of weights."""

    name = "psmt"

    def __init__(self, lr: float = 1e-4, momentum: float = 0.999, penalty: float = 1.0, shield: float = 0.1) -> None:
        if not 0.0 <= shield < 1.0:
            raise ValueError(f"psmt shield fraction must lie in [0, 1), got {shield}")
        self.lr, self.momentum, self.penalty, self.shield = float(lr), float(momentum), float(penalty), float(shield)
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.anchor: WeightAnchor | None = None
        self.masks: dict[str, Tensor] = {}

    def start(self, source: nn.Module) -> None:
        self.source = source
        self.student, self.teacher, self.optimizer = mean_teacher_start(source, self.lr)
        self.anchor, self.masks = None, {}  # the importance is measured on the first batch

    def _importance(self, x: Tensor) -> None:
        net = copy.deepcopy(self.source)
        for p in net.parameters():
            p.requires_grad_(True)

        def loss_of(batch: Tensor) -> Tensor:
            logits = net(batch)
            return nn.functional.cross_entropy(logits, logits.argmax(dim=1).detach())

        with torch.enable_grad():
            fisher = fisher_diagonal(net, [x], loss_of, max_batches=1)
        device = x.device
        fisher = {k: v.to(device) for k, v in fisher.items()}
        reference = dict(self.source.named_parameters())
        self.anchor = WeightAnchor(reference, self.penalty, fisher)
        if self.shield > 0:
            flat = torch.cat([v.flatten() for v in fisher.values()])
            k = max(1, int(round(self.shield * flat.numel())))
            cut = torch.topk(flat, k).values.min()
            self.masks = {n: v >= cut for n, v in fisher.items()}

    def step(self, x: Tensor) -> float:
        assert self.student is not None and self.teacher is not None
        if self.anchor is None:
            self._importance(x)
        assert self.anchor is not None
        with torch.no_grad():
            target = torch.softmax(self.teacher.eval()(x).float(), dim=1)
        loss = soft_cross_entropy(adaptation_mode(self.student)(x), target) + self.anchor.penalty(self.student)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for (name, p), p0 in zip(self.student.named_parameters(), self.source.parameters(), strict=True):
                mask = self.masks.get(name)
                if mask is not None:
                    p.copy_(torch.where(mask, p0, p))
        ema_update(self.teacher, self.student, self.momentum)
        return float(loss.detach())

    def predictor(self) -> nn.Module:
        assert self.teacher is not None
        return self.teacher
