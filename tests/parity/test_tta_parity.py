"""One step of medct's TENT, CoTTA and PSMT against the reference code on the same small net, input
and seed (the references are plain PyTorch inside their own frameworks, so the step function is
ported here, as unchanged as a 3-D segmentation net allows; each port names its file and commit).

References:
  TENT  DequanWang/tent            tent.py                       e9e926a
  CoTTA qinenergy/cotta            cifar/cotta.py                c212a20
  PSMT  JiaxuTian/PSMT             classification/methods/psmt.py 2c74335
Changes made in every port: `.cuda()` dropped; `.mean(0)` over a batch of images becomes `.mean()`
over the batch and its voxels (a segmentation net's loss per voxel); BatchNorm2d -> BatchNorm3d.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medct.finetune.cotta import CoTTA
from medct.finetune.psmt import PSMT
from medct.finetune.tent import Tent

TOL = 1e-5


def _net(norm: type[nn.Module] = nn.InstanceNorm3d) -> nn.Module:
    """Convolutions before a norm have no bias: the norm cancels it, so its gradient is float rounding
    alone, which Adam scales up to lr in a direction set by that rounding (no two codes agree there)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 6, 3, padding=1, bias=False),
        norm(6, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv3d(6, 6, 3, padding=1, bias=False),
        norm(6, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv3d(6, 3, 1),
    )


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(2, 1, 8, 8, 8, generator=g) * 2.0 - 0.5 for _ in range(n)]


def _assert_close(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        diff = float((p.detach() - q.detach()).abs().max())
        assert diff <= TOL, f"{what} {name}: max |difference| {diff:.2e}"


# ----------------------------------------------------------------------------------------- TENT


def _ref_softmax_entropy(x: torch.Tensor) -> torch.Tensor:  # tent.py softmax_entropy
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def _ref_tent_configure(model: nn.Module) -> nn.Module:  # tent.py configure_model
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def _ref_tent_params(model: nn.Module) -> list[nn.Parameter]:  # tent.py collect_params
    return [
        p
        for m in model.modules()
        if isinstance(m, nn.BatchNorm3d)
        for n, p in m.named_parameters()
        if n in ("weight", "bias")
    ]


def _ref_tent_step(x: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    outputs = model(x)  # tent.py forward_and_adapt
    loss = _ref_softmax_entropy(outputs).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def test_tent_steps_equal_the_reference_on_a_batchnorm_net() -> None:
    source = _net(nn.BatchNorm3d).eval()
    ref = _ref_tent_configure(copy.deepcopy(source))
    ref_opt = torch.optim.Adam(_ref_tent_params(ref), lr=1e-3, betas=(0.9, 0.999))
    ours = Tent(lr=1e-3)
    ours.start(source)
    for x in _batches(3):
        ref_loss = _ref_tent_step(x, ref, ref_opt)
        our_loss = ours.step(x)
        assert abs(our_loss - float(ref_loss)) <= TOL
    _assert_close(ours.predictor(), ref, "tent")
    # the prediction: batch statistics, as the reference forces them (no running statistics)
    x = _batches(4)[-1]
    with torch.no_grad():
        diff = float((ours.predictor().eval()(x) - ref.eval()(x)).abs().max())
    assert diff <= TOL
    moved = [not torch.equal(p, q) for p, q in zip(ours.predictor().parameters(), source.parameters(), strict=True)]
    assert any(moved)


# ---------------------------------------------------------------------------------------- CoTTA


def _ref_update_ema(ema_model: nn.Module, model: nn.Module, alpha_teacher: float) -> nn.Module:
    for ema_param, param in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_param.data[:] = alpha_teacher * ema_param[:].data[:] + (1 - alpha_teacher) * param[:].data[:]
    return ema_model


def _ref_cotta_soft_entropy(x: torch.Tensor, x_ema: torch.Tensor) -> torch.Tensor:  # cotta.py softmax_entropy
    return -(x_ema.softmax(1) * x.log_softmax(1)).sum(1)


class _RefCoTTA:
    """cifar/cotta.py CoTTA.forward_and_adapt with its augmentations off (`transform` = identity)."""

    def __init__(self, model: nn.Module, lr: float, mt: float, rst: float, ap: float) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        self.model_state = copy.deepcopy(model.state_dict())
        self.model_anchor = copy.deepcopy(model)
        self.model_ema = copy.deepcopy(model)
        for param in self.model_ema.parameters():
            param.detach_()
        self.mt, self.rst, self.ap = mt, rst, ap

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
        standard_ema = self.model_ema(x)
        outputs_emas = [self.model_ema(x).detach() for _ in range(4)]  # N = 32 in the reference; identity transform
        outputs_ema = torch.stack(outputs_emas).mean(0) if anchor_prob.mean() < self.ap else standard_ema
        loss = _ref_cotta_soft_entropy(outputs, outputs_ema).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.model_ema = _ref_update_ema(self.model_ema, self.model, self.mt)
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    mask = (torch.rand(p.shape) < self.rst).float()
                    with torch.no_grad():
                        p.data = self.model_state[f"{nm}.{npp}"] * mask + p * (1.0 - mask)
        return loss.detach()


def test_cotta_soft_steps_equal_the_classification_reference() -> None:
    """labels="soft" is the repository's step; its augmentation branch is off in both (gate 0: the
    source is always 'confident enough', so the plain teacher is the target, as the reference with
    an identity transform)."""
    source = _net().eval()
    ref = _RefCoTTA(copy.deepcopy(source), lr=1e-3, mt=0.9, rst=0.1, ap=0.0)
    ours = CoTTA(lr=1e-3, momentum=0.9, restore_p=0.1, confidence=0.0, labels="soft", ensemble=False)
    ours.start(source)
    # A teacher a little off the student in both: with teacher = student the soft loss's gradient is
    # float rounding only, which Adam's first step scales up to lr in a direction set by that rounding
    torch.manual_seed(7)
    with torch.no_grad():
        for p_ref, p_ours in zip(ref.model_ema.parameters(), ours.teacher.parameters(), strict=True):
            p_ref.add_(0.05 * torch.randn_like(p_ref))
            p_ours.copy_(p_ref)
    for i, x in enumerate(_batches(3)):
        torch.manual_seed(100 + i)  # the same restore masks: both draw torch.rand per parameter, in order
        ref_loss = ref.forward_and_adapt(x)
        torch.manual_seed(100 + i)
        # our restore draws after the step as the reference does; the forward passes draw nothing
        our_loss = ours.step(x)
        assert abs(our_loss - float(ref_loss)) <= TOL
    _assert_close(ours.student, ref.model, "cotta student")
    _assert_close(ours.teacher, ref.model_ema, "cotta teacher")


def test_cotta_hard_labels_move_the_student_from_the_first_step() -> None:
    """With student = teacher = source, soft targets give a zero first gradient (p - q = 0); the
    segmentation default's hard pseudo-labels do not, and the teacher follows by its EMA."""
    from medct.finetune.tta import hard_cross_entropy, soft_cross_entropy

    source = _net().eval()
    x = _batches(1)[0]

    def first_gradient(labels: str) -> float:
        m = CoTTA(lr=1e-3, restore_p=0.0, confidence=0.0 if labels == "soft" else 0.69, labels=labels, ensemble=False)
        m.start(source)
        target = m.pseudo_labels(x)
        logits = m.student(x)
        loss = hard_cross_entropy(logits, target.argmax(1)) if labels == "hard" else soft_cross_entropy(logits, target)
        loss.backward()
        return max(float(p.grad.abs().max()) for p in m.student.parameters())

    assert first_gradient("soft") < 1e-6 < 1e-3 < first_gradient("hard")
    hard = CoTTA(lr=1e-3, momentum=0.5, restore_p=0.0, labels="hard", ensemble=False)
    hard.start(source)
    hard.step(x)
    with torch.no_grad():
        for t, s, p0 in zip(hard.teacher.parameters(), hard.student.parameters(), source.parameters(), strict=True):
            assert torch.allclose(t, 0.5 * p0 + 0.5 * s, atol=1e-7)
        assert (
            max(
                float((s - p0).abs().max())
                for s, p0 in zip(hard.student.parameters(), source.parameters(), strict=True)
            )
            > 1e-4
        )


# ----------------------------------------------------------------------------------------- PSMT


class _RefSymmetricCrossEntropy(nn.Module):  # psmt.py SymmetricCrossEntropy
    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = alpha

    def __call__(self, x: torch.Tensor, x_ema: torch.Tensor) -> torch.Tensor:
        return -(1 - self.alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - self.alpha * (
            x.softmax(1) * x_ema.log_softmax(1)
        ).sum(1)


def _ref_find_quantile(arr: torch.Tensor, perc: float) -> torch.Tensor:  # psmt.py find_quantile
    arr_sorted = torch.sort(arr).values
    frac_idx = perc * (len(arr_sorted) - 1)
    frac_part = frac_idx - int(frac_idx)
    low_idx = int(frac_idx)
    high_idx = low_idx + 1
    return arr_sorted[low_idx] + (arr_sorted[high_idx] - arr_sorted[low_idx]) * frac_part


def _ref_update_ema_two(
    ema_model: nn.Module, model: nn.Module, alpha_teacher: float, masks: list[torch.Tensor]
) -> nn.Module:
    for ema_param, param, mask in zip(ema_model.parameters(), model.parameters(), masks, strict=True):
        ema_param.data = mask * param.data + (1 - mask) * (
            alpha_teacher * ema_param.data + (1 - alpha_teacher) * param.data
        )
    return ema_model


class _RefPSMT:
    """psmt.py PSMT.forward_and_adapt (feature extractor + classifier = the whole net here; its
    augmented view is the plain input in the reference itself)."""

    def __init__(
        self, model: nn.Module, fishers: dict[str, list[torch.Tensor]], lr: float, mt: float, perc: float
    ) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        self.model_ema = copy.deepcopy(model)
        for param in self.model_ema.parameters():
            param.detach_()
        self.model_states = [copy.deepcopy(model.state_dict())]
        self.fishers, self.fisher_alpha, self.mt, self.perc = fishers, 500, mt, perc
        self.sce = _RefSymmetricCrossEntropy()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        outputs_test = self.model(x)
        outputs_aug_test = self.model(x)
        outputs_ema = self.model_ema(x)
        loss = (0.5 * self.sce(outputs_test, outputs_ema) + 0.5 * self.sce(outputs_aug_test, outputs_ema)).mean()
        ewc_loss = 0
        for name, param in self.model.named_parameters():
            if name in self.fishers:
                ewc_loss += self.fisher_alpha * (self.fishers[name][0] * (param - self.fishers[name][1]) ** 2).sum()
        loss += ewc_loss
        loss.backward()
        fisher_dict = {}
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    fisher_dict[f"{nm}.{npp}"] = p.grad.data.clone().pow(2)
        threshold = _ref_find_quantile(torch.cat([v.reshape(-1) for v in fisher_dict.values()]), self.perc)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.model_ema = _ref_update_ema(self.model_ema, self.model, self.mt)
        masks = []
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    mask = (fisher_dict[f"{nm}.{npp}"] < threshold).float()
                    masks.append(mask)
                    with torch.no_grad():
                        p.data = self.model_states[0][f"{nm}.{npp}"] * mask + p * (1.0 - mask)
        self.model_ema = _ref_update_ema_two(self.model_ema, self.model, self.mt, masks)
        return loss.detach()


def _ref_fisher(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """psmt.py PSMT.__init__'s Fisher loop: squared CE gradients with the model's own argmax labels."""
    fishers: dict[str, list[torch.Tensor]] = {}
    loss_fn = nn.CrossEntropyLoss()
    for iter_, images in enumerate(batches, start=1):
        outputs = model(images)
        _, targets = outputs.max(1)
        loss_fn(outputs, targets).backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                fisher = param.grad.data.clone().detach() ** 2
                if iter_ > 1:
                    fisher = fisher + fishers[name][0]
                if iter_ == len(batches):
                    fisher = fisher / iter_
                fishers[name] = [fisher, param.data.clone().detach()]
        model.zero_grad()
    return fishers


@pytest.mark.parametrize("given_fisher", [True, False])
def test_psmt_steps_equal_the_reference(given_fisher: bool) -> None:
    """Loss, student and teacher after 3 steps (EWC active from the second), with the Fisher given
    (source data) or measured by medct on the case's first batch (the reference's estimator)."""
    source = _net().eval()
    batches = _batches(4)
    fisher_data = batches[:1] if not given_fisher else [batches[3]]
    fishers = _ref_fisher(copy.deepcopy(source), fisher_data)
    ref = _RefPSMT(copy.deepcopy(source), fishers, lr=1e-3, mt=0.9, perc=0.03)
    ours = PSMT(lr=1e-3, momentum=0.9, fisher={k: v[0] for k, v in fishers.items()} if given_fisher else None)
    ours.start(source)
    for x in batches[:3]:
        ref_loss = ref.forward_and_adapt(x)
        our_loss = ours.step(x)
        assert abs(our_loss - float(ref_loss)) <= TOL * max(1.0, abs(float(ref_loss)))
    _assert_close(ours.student, ref.model, "psmt student")
    _assert_close(ours.teacher, ref.model_ema, "psmt teacher")


def test_psmt_has_a_gradient_at_the_source_weights_and_restores_the_least_informative() -> None:
    source = _net().eval()
    ours = PSMT(lr=1e-3, momentum=0.9)
    ours.start(source)
    ours.step(_batches(1)[0])
    with torch.no_grad():
        moved = torch.cat(
            [(p - q).flatten() for p, q in zip(ours.student.parameters(), source.parameters(), strict=True)]
        )
    restored = float((moved == 0).float().mean())
    assert float(moved.abs().max()) > 1e-4  # the symmetric CE moves an identical student
    assert 0.02 <= restored < 0.2  # the 3 % least informative (and weights Adam left at 0) are back at source
