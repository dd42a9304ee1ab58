"""CoTTA: continual test-time adaptation (Wang et al., "Continual Test-Time Domain Adaptation",
CVPR 2022; reference code qinenergy/cotta), for `medct segment --adapt cotta`.

  * a mean teacher: the teacher is the exponential moving average (momentum 0.999) of the
    student, and it is the teacher that segments the case;
  * augmentation-averaged pseudo-labels: where the teacher's plain prediction is not confident
    (max softmax < 0.69, the threshold of CoTTA's segmentation code) its softmax averaged over flips
    (the A-P and S-I axes, as the Predictor's flip TTA: a left-right mirror would swap paired organs)
    and rescaled inputs (x0.75, x1.25, kept at multiples of the patch's power-of-two factor, up to
    32, so the network's strides still fit) replaces it;
  * the student (all weights) minimises the soft cross-entropy to those pseudo-labels (Adam);
  * stochastic restore: after every step each weight returns to its source value with p = 0.01,
    so that knowledge of the source domain is not lost over a long stream.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from medct.finetune.tta import adaptation_mode, ema_update, mean_teacher_start, soft_cross_entropy


def _size_multiple(patch: tuple[int, ...]) -> int:
    m = 32
    while m > 1 and any(p % m for p in patch):
        m //= 2
    return m


def augmented_mean_probs(net: nn.Module, x: Tensor, scales: tuple[float, ...] = (0.75, 1.25)) -> Tensor:
    """Softmax of `net` averaged over the plain input, its flips along the A-P and S-I axes and
    rescaled copies, each transformation undone before averaging: (B, C, *S)."""
    probs = []
    for r in range(3):
        for dims in itertools.combinations((3, 4), r):
            y = net(torch.flip(x, dims) if dims else x)
            probs.append(torch.softmax(torch.flip(y, dims) if dims else y, dim=1))
    size = tuple(x.shape[2:])
    m = _size_multiple(size)
    for s in scales:
        new = tuple(max(m, round(p * s / m) * m) for p in size)
        if new == size:
            continue
        y = net(nn.functional.interpolate(x, size=new, mode="trilinear", align_corners=False))
        y = nn.functional.interpolate(y, size=size, mode="trilinear", align_corners=False)
        probs.append(torch.softmax(y, dim=1))
    return torch.stack(probs).mean(0)


class CoTTA:
    """Mean teacher + confidence-gated augmentation averaging + stochastic restore."""

    name = "cotta"

    def __init__(
        self, lr: float = 1e-4, momentum: float = 0.999, restore_p: float = 0.01, confidence: float = 0.69
    ) -> None:
        self.lr, self.momentum, self.restore_p, self.confidence = (
            float(lr),
            float(momentum),
            float(restore_p),
            float(confidence),
        )
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None

    def start(self, source: nn.Module) -> None:
        self.source = source
        self.student, self.teacher, self.optimizer = mean_teacher_start(source, self.lr)

    @torch.no_grad()
    def pseudo_labels(self, x: Tensor) -> Tensor:
        """The teacher's soft labels: plain where confident, augmentation-averaged elsewhere."""
        assert self.teacher is not None
        self.teacher.eval()
        plain = torch.softmax(self.teacher(x).float(), dim=1)
        confident = plain.max(dim=1, keepdim=True).values >= self.confidence  # (B, 1, *S)
        if bool(confident.all()):
            return plain
        return torch.where(confident, plain, augmented_mean_probs(self.teacher, x).float())

    def step(self, x: Tensor) -> float:
        assert self.student is not None and self.teacher is not None
        target = self.pseudo_labels(x)
        loss = soft_cross_entropy(adaptation_mode(self.student)(x), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update(self.teacher, self.student, self.momentum)
        self._restore()
        return float(loss.detach())

    @torch.no_grad()
    def _restore(self) -> None:
        assert self.student is not None
        for p, p0 in zip(self.student.parameters(), self.source.parameters(), strict=True):
            mask = torch.rand_like(p) < self.restore_p
            p.copy_(torch.where(mask, p0, p))

    def predictor(self) -> nn.Module:
        assert self.teacher is not None
        return self.teacher
