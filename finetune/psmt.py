"""PSMT: Parameter-Selective Mean Teacher (Tian et al., "Parameter-Selective Mean Teacher for
Continual Test-Time Adaptation", 2024; reference code JiaxuTian/PSMT, classification/methods/psmt.py
at 2c74335), for `medct segment --adapt psmt`.

Each step, on the case's patches x, as the reference's `forward_and_adapt`:
  * the student (every weight trainable, Adam) minimises the symmetric cross-entropy to the mean
    teacher, 0.5 CE(teacher -> student) + 0.5 CE(student -> teacher), per voxel. The reverse term
    is what gives a gradient at the start, when student and teacher are the same network (a one-way
    soft cross-entropy towards an identical teacher has gradient p - q = 0 and never moves);
  * plus an EWC penalty `penalty` x sum_i F_i (theta_i - theta_src,i)^2 on the raw Fisher diagonal
    F of the source network (reference: lambda 500, no 1/2, no normalisation);
  * after the optimiser step the teacher takes its EMA step; then the weights whose squared gradient
    this step is below the `restore` quantile of all squared gradients (the 3 % least informative)
    are restored to their source values in the student, and the teacher copies them there and takes
    a second EMA step elsewhere (the reference's `update_ema_variables_two`, kept as it is).
The teacher segments the case (the reference's sliding-window prediction, `forward_sliding_window`).

Deviations, each for a reason:
  * Fisher: the reference measures it on 10000 source images with the source model's predicted
    labels. A medct model folder carries no training data, so `fisher` (the same quantity, from
    source data, e.g. a training run's) is used when given; otherwise it is measured on the first
    adaptation batch of the case, with the source network's argmax labels (the same estimator on the
    only data there is).
  * Augmentation: the reference computes an augmented student view and augmentation-averaged
    teacher outputs, but overwrites both with the plain input (`features_aug_test =
    self.feature_extractor(imgs_test)`, the augmented teacher call commented out), so its loss is
    the symmetric CE on the plain input alone - which is what runs here.
  * Momentum: the reference's 0.999 is for a stream of hundreds of steps; `make_method` (what
    `medct segment --adapt psmt` runs) gives a per-case run (`reset="case"`) 0.5 ** (1 / steps), so
    that the final teacher holds half of the source weights as the reference's does after ~700
    steps (0.999 ** 700 = 0.50), and a continual run (`reset="never"`) 0.999.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from medct.finetune.safeguards import fisher_diagonal
from medct.finetune.tta import adaptation_mode, ema_update, mean_teacher_start, symmetric_cross_entropy

REFERENCE_MOMENTUM = 0.999  # the reference's M_TEACHER.MOMENTUM, for a continual stream


def case_momentum(steps: int) -> float:
    """EMA momentum for a per-case run of `steps` steps: the teacher ends half source, half adapted."""
    return 0.5 ** (1.0 / max(int(steps), 1))


def lower_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of a flat tensor with linear interpolation between order statistics: the
    reference's `find_quantile` (which sorts), by two k-th value selections (no full sort of every
    weight of the network)."""
    n = values.numel()
    pos = q * (n - 1)
    low = int(pos)
    high = min(low + 1, n - 1)
    lo = torch.kthvalue(values, low + 1).values
    hi = torch.kthvalue(values, high + 1).values
    return lo + (hi - lo) * (pos - low)


class PSMT:
    """Mean teacher with symmetric CE, a Fisher-weighted anchor and gradient-selected restore."""

    name = "psmt"

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = REFERENCE_MOMENTUM,
        penalty: float = 500.0,
        restore: float = 0.03,
        alpha: float = 0.5,
        fisher: dict[str, Tensor] | None = None,
    ) -> None:
        if not 0.0 <= restore < 1.0:
            raise ValueError(f"psmt restore quantile must lie in [0, 1), got {restore}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"psmt teacher momentum must lie in (0, 1), got {momentum}")
        self.lr, self.momentum, self.penalty = float(lr), float(momentum), float(penalty)
        self.restore, self.alpha = float(restore), float(alpha)
        self.given_fisher = fisher
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.fisher: dict[str, Tensor] | None = None

    def start(self, source: nn.Module) -> None:
        self.source = source
        self.student, self.teacher, self.optimizer = mean_teacher_start(source, self.lr)
        self.source_weights = {n: p.detach().clone() for n, p in source.named_parameters()}
        self.fisher = self.given_fisher  # None: measured on the first batch of the case

    def _measure_fisher(self, x: Tensor) -> dict[str, Tensor]:
        """Raw Fisher diagonal of the source network on x with its own argmax labels."""
        net = copy.deepcopy(self.source)
        for p in net.parameters():
            p.requires_grad_(True)

        def loss_of(batch: Tensor) -> Tensor:
            logits = net(batch)
            return nn.functional.cross_entropy(logits.float(), logits.argmax(dim=1).detach())

        with torch.enable_grad():
            return {k: v.to(x.device) for k, v in fisher_diagonal(net, [x], loss_of, 1, normalise=False).items()}

    def step(self, x: Tensor) -> float:  # x: (B, 1, *patch)
        student, teacher = self.student, self.teacher
        assert student is not None and teacher is not None
        if self.fisher is None:
            self.fisher = self._measure_fisher(x)
        with torch.no_grad():
            target = teacher.eval()(x)  # (B, C, *patch) teacher logits
        loss = symmetric_cross_entropy(adaptation_mode(student)(x), target, self.alpha)
        ewc = sum(
            (self.fisher[n] * (p - self.source_weights[n]).pow(2)).sum()
            for n, p in student.named_parameters()
            if n in self.fisher
        )
        loss = loss + self.penalty * ewc
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad2 = {n: p.grad.detach().pow(2) for n, p in student.named_parameters() if p.grad is not None}
        threshold = lower_quantile(torch.cat([g.flatten() for g in grad2.values()]), self.restore)
        self.optimizer.step()
        ema_update(teacher, student, self.momentum)  # the teacher's EMA step
        with torch.no_grad():
            m = self.momentum
            if self.restore > 0:
                for (n, s), t in zip(student.named_parameters(), teacher.parameters(), strict=True):
                    g = grad2.get(n)
                    if g is None:
                        continue
                    mask = (g < threshold).float()  # 1: restored to the source
                    s.copy_(self.source_weights[n] * mask + s * (1.0 - mask))
                    t.copy_(mask * s + (1.0 - mask) * (m * t + (1.0 - m) * s))
        return float(loss.detach())

    def predictor(self) -> nn.Module:
        assert self.teacher is not None
        return self.teacher
