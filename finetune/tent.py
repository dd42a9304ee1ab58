"""TENT: test-time entropy minimisation (Wang et al., "Tent: Fully Test-time Adaptation by Entropy
Minimization", ICLR 2021), for `medct segment --adapt tent`.

Reference code: DequanWang/tent `tent.py` (e9e926a); one step is checked against it in
tests/parity/test_tta_parity.py. Only the normalisation layers' affine parameters (scale, shift)
are trained, to minimise the mean voxel entropy of the softmax prediction on the incoming case's
patches. Adam, lr 1e-3 by default (TENT's CIFAR setting; its ImageNet setting uses SGD).

Batch-norm statistics (`bn_stats`): "batch" (default, the reference's `configure_model`): running
statistics are dropped, so every forward pass - adaptation steps and the case's sliding-window
batches alike - normalises by its own batch. "running": the running averages are kept and updated
by the adaptation batches (momentum 0.1), and the case is segmented with them (one set of
statistics for every tile of the case). Instance and group norm always use each input's own
statistics: there TENT can only move the affine parameters (the InstanceNorm ResEnc default
removes a scanner's gain and offset by itself; `resenc_unet` with `norm: batch` gives TENT its lever).
The loop, bounds and collapse guard are in `finetune/tta.py`.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from medct.errors import ConfigError
from medct.finetune.tta import adaptation_mode, entropy_map, norm_affine_parameters


class Tent:
    """Entropy minimisation on the normalisation affine parameters."""

    name = "tent"

    def __init__(self, lr: float = 1e-3, bn_stats: Literal["batch", "running"] = "batch") -> None:
        if bn_stats not in ("batch", "running"):
            raise ValueError(f"tent bn_stats must be 'batch' or 'running', got {bn_stats!r}")
        self.lr, self.bn_stats = float(lr), bn_stats
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
        if self.bn_stats == "batch":  # the reference: batch statistics in every mode, no running ones
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.track_running_stats = False
                    m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
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
