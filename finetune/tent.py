"""TENT: test-time entropy minimisation (Wang et al., "Tent: Fully Test-time Adaptation by Entropy
Minimization", ICLR 2021), for `medct segment --adapt tent`.

Only the normalisation layers' affine parameters (scale, shift) are trained, to minimise the mean
voxel entropy of the softmax prediction on the incoming case's patches; batch-norm layers use the
test batch's statistics while adapting (and keep them for the case's prediction through their
running averages). Adam, lr 1e-3 by default (TENT's ImageNet setting uses SGD; Adam is its
setting for the smaller models). The loop, bounds and collapse guard are in `finetune/tta.py`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from medct.errors import ConfigError
from medct.finetune.tta import adaptation_mode, entropy_map, norm_affine_parameters


class Tent:
    """Entropy minimisation on the normalisation affine parameters."""

    name = "tent"

    def __init__(self, lr: float = 1e-3) -> None:
        self.lr = float(lr)
        self.net: nn.Module | None = None

    def start(self, source: nn.Module) -> None:
        net = copy.deepcopy(source)
        for p in net.parameters():
            p.requires_grad_(False)
        params = norm_affine_parameters(net)
        if not params:
            raise ConfigError(
                "--adapt tent needs normalisation layers with a learned scale and shift; this network has none."
            )
        for p in params:
            p.requires_grad_(True)
        self.net = adaptation_mode(net)
        self.optimizer = torch.optim.Adam(params, lr=self.lr)

    def step(self, x: Tensor) -> float:  # x: (B, 1, *patch)
        assert self.net is not None
        adaptation_mode(self.net)  # the guard may have put it in eval mode
        loss = entropy_map(self.net(x)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def predictor(self) -> nn.Module:
        assert self.net is not None
        return self.net
