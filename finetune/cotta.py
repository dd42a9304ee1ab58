"""CoTTA: continual test-time adaptation (Wang et al., "Continual Test-Time Domain Adaptation",
CVPR 2022; reference code qinenergy/cotta at c212a20), for `medct segment --adapt cotta`.

Each step, on the case's patches x:
  * pseudo-labels from the mean teacher, gated by the *source* (anchor) network's confidence: where
    the source's max softmax exceeds `confidence` the teacher's plain prediction, elsewhere its
    augmentation-averaged prediction (flips along the A-P and S-I axes - a left-right mirror would
    swap paired organs - and x0.75 / x1.25 rescaled inputs; `augmented_mean_probs`);
  * `labels="hard"` (default): the student (every weight, Adam) minimises the cross-entropy to the
    argmax of those pseudo-labels, as the authors' segmentation code for Cityscapes -> ACDC does
    (per-pixel gate 0.69 on the source's confidence, hard labels, the segmentation loss; distributed
    as a download, not in the repository). `labels="soft"`: the repository's classification step
    (cifar/cotta.py `forward_and_adapt`): soft cross-entropy to the teacher's softmax, the
    augmentation average used when the source's *mean* confidence is below `confidence` (0.92 for
    CIFAR-10) - with an identical student and teacher its first gradient is zero unless the
    augmentations differ, which is why hard labels are the segmentation default;
  * the teacher takes an EMA step; every weight returns to its source value with p = `restore_p`
    (stochastic restore, 0.01).
The case is segmented by the teacher's gated, augmentation-averaged prediction (`ensemble=True`, as
the authors' segmentation code reports its pseudo-labels), or the plain teacher (`ensemble=False`,
~6x fewer network passes).

Momentum: the reference's 0.999 is for a continual stream of thousands of steps; `make_method`
(what `medct segment --adapt cotta` runs) gives a per-case run 0.5 ** (1 / steps)
(`medct.finetune.psmt.case_momentum`) and a continual one 0.999.
"""

from __future__ import annotations

import copy
import itertools
from typing import Literal

import torch
from torch import Tensor, nn

from medct.finetune.tta import adaptation_mode, ema_update, hard_cross_entropy, mean_teacher_start, soft_cross_entropy

REFERENCE_MOMENTUM = 0.999
SEGMENTATION_CONFIDENCE = 0.69  # the authors' segmentation code: per-pixel gate on the source's confidence


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
            y = net(torch.flip(x, dims) if dims else x).float()
            probs.append(torch.softmax(torch.flip(y, dims) if dims else y, dim=1))
    size = tuple(x.shape[2:])
    m = _size_multiple(size)
    for s in scales:
        new = tuple(max(m, round(p * s / m) * m) for p in size)
        if new == size:
            continue
        y = net(nn.functional.interpolate(x, size=new, mode="trilinear", align_corners=False)).float()
        y = nn.functional.interpolate(y, size=size, mode="trilinear", align_corners=False)
        probs.append(torch.softmax(y, dim=1))
    return torch.stack(probs).mean(0)


def gated_probs(teacher: nn.Module, anchor: nn.Module, x: Tensor, confidence: float) -> Tensor:
    """(B, C, *S) the teacher's softmax where the source network (anchor) is confident (max
    softmax > `confidence`), its augmentation-averaged softmax elsewhere."""
    plain = torch.softmax(teacher(x).float(), dim=1)
    sure = torch.softmax(anchor(x).float(), dim=1).amax(dim=1, keepdim=True) > confidence  # (B, 1, *S)
    if bool(sure.all()):
        return plain
    return torch.where(sure, plain, augmented_mean_probs(teacher, x))


class CoTTAEnsemble(nn.Module):
    """The network that segments a case after CoTTA: log of `gated_probs` (argmax = the labels)."""

    def __init__(self, teacher: nn.Module, anchor: nn.Module, confidence: float) -> None:
        super().__init__()
        self.teacher, self.anchor, self.confidence = teacher, anchor, float(confidence)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, *S) -> (B, C, *S) log-probabilities
        return torch.log(gated_probs(self.teacher, self.anchor, x, self.confidence).clamp_min(1e-12))


class CoTTA:
    """Mean teacher + source-gated augmentation averaging + stochastic restore."""

    name = "cotta"

    def __init__(
        self,
        lr: float = 1e-4,
        momentum: float = REFERENCE_MOMENTUM,
        restore_p: float = 0.01,
        confidence: float = SEGMENTATION_CONFIDENCE,
        labels: Literal["hard", "soft"] = "hard",
        ensemble: bool = True,
    ) -> None:
        if labels not in ("hard", "soft"):
            raise ValueError(f"cotta labels must be 'hard' or 'soft', got {labels!r}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"cotta teacher momentum must lie in (0, 1), got {momentum}")
        self.lr, self.momentum, self.restore_p = float(lr), float(momentum), float(restore_p)
        self.confidence, self.labels, self.ensemble = float(confidence), labels, bool(ensemble)
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None

    def start(self, source: nn.Module) -> None:
        self.source = source
        self.anchor = copy.deepcopy(source).eval()
        self.student, self.teacher, self.optimizer = mean_teacher_start(source, self.lr)

    @torch.no_grad()
    def pseudo_labels(self, x: Tensor) -> Tensor:
        """(B, C, *S) the teacher's gated probabilities (`labels="hard"`: per voxel on the source's
        confidence; `"soft"`: all or nothing on its mean confidence, as the classification code)."""
        assert self.teacher is not None
        self.teacher.eval()
        if self.labels == "hard":
            return gated_probs(self.teacher, self.anchor, x, self.confidence)
        source_conf = torch.softmax(self.anchor(x).float(), dim=1).amax(dim=1).mean()
        if float(source_conf) < self.confidence:
            return augmented_mean_probs(self.teacher, x)
        return torch.softmax(self.teacher(x).float(), dim=1)

    def step(self, x: Tensor) -> float:  # x: (B, 1, *patch)
        assert self.student is not None and self.teacher is not None
        target = self.pseudo_labels(x)
        logits = adaptation_mode(self.student)(x)
        if self.labels == "hard":
            loss = hard_cross_entropy(logits, target.argmax(dim=1))
        else:
            loss = soft_cross_entropy(logits, target)
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
            mask = (torch.rand(p.shape, device=p.device) < self.restore_p).float()
            p.copy_(p0 * mask + p * (1.0 - mask))

    def predictor(self) -> nn.Module:
        assert self.teacher is not None
        if self.ensemble:
            return CoTTAEnsemble(self.teacher, self.anchor, self.confidence).eval()
        return self.teacher
