"""medct's SparK against nnssl's SparK3D: one masked forward, the loss and every gradient, on the
same nnU-Net ResEnc network, input, mask and weights.

Reference: MIC-DKFZ/nnssl 7044864,
  src/nnssl/architectures/spark_utils.py   `_get_active_ex_or_ii`, `sp_conv_forward`,
                                           `sp_bn_forward`, `convert_to_spark_cnn`
  src/nnssl/architectures/spark_model.py   `SparK3D` (use_mask_token=True)
  src/nnssl/training/loss/spark_loss.py    `SparkLoss`
nnssl's package imports its trainers (batchgenerators, blosc2, timm, a module-level mask global),
so the functions are ported here unchanged but for the global becoming a closure and timm's
`trunc_normal_` torch's. Two things are shared on purpose rather than compared:
  * the decoder: nnssl decodes with the ResEnc U-Net's own decoder, medct with SparK's plain U-Net
    decoder (pretrain/spark.py says why); both are dropped after pretraining, so the reference here
    runs medct's decoder module;
  * the input masking: SparK's code masks the input, nnssl's trainer does not (pretrain/spark.py);
    the reference gets the masked input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medct.nets.nnunet import NNUNetResEnc
from medct.pretrain.spark import SparKTask, random_cell_mask, upsample_mask

# ------------------------------------------------------------------ nnssl's sparse emulation, ported


class _Active:
    """Holds nnssl's module-level `spark_utils._cur_active` (B, 1, gx, gy, gz)."""

    mask: torch.Tensor


def _get_active_ex_or_ii(B, D, H, W, device, dtype):  # noqa: N803 - the reference's names
    cur = _Active.mask
    mask_D, mask_H, mask_W = cur.shape[2:]  # noqa: N806
    if D < mask_D and H < mask_H and W < mask_W:
        return torch.ones(B, 1, D, H, W, dtype=dtype, device=device)
    d_repeat, h_repeat, w_repeat = D // cur.shape[-3], H // cur.shape[-2], W // cur.shape[-1]
    return (
        cur.repeat_interleave(d_repeat, dim=2)
        .repeat_interleave(h_repeat, dim=3)
        .repeat_interleave(w_repeat, dim=4)
        .to(device=device, dtype=dtype)
    )


def _sp_conv_forward(self, x):
    x = super(type(self), self).forward(x)
    x *= _get_active_ex_or_ii(B=x.shape[0], D=x.shape[2], H=x.shape[3], W=x.shape[4], device=x.device, dtype=x.dtype)
    return x


def _sp_bn_forward(self, x):
    B, C = x.shape[0], x.shape[1]  # noqa: N806
    mask = _get_active_ex_or_ii(B=x.shape[0], D=x.shape[2], H=x.shape[3], W=x.shape[4], device=x.device, dtype=x.dtype)
    x_pre_in = torch.permute(x, (0, 2, 3, 4, 1))
    mask = torch.squeeze(mask, 1)
    L = int(torch.sum(mask, dim=(1, 2, 3))[0])  # noqa: N806
    mask_ids = torch.nonzero(mask, as_tuple=True)
    flat_values = x_pre_in[mask_ids]
    pre_nlc = torch.reshape(flat_values, (B, L, C))
    pre_ncl = torch.permute(pre_nlc, (0, 2, 1))
    post_ncl = super(type(self), self).forward(pre_ncl)
    post_nlc = torch.permute(post_ncl, (0, 2, 1))
    post_ncl = torch.reshape(post_nlc, (B * L, C))
    x_postin = torch.zeros_like(x_pre_in, dtype=x_pre_in.dtype, device=x_pre_in.device)
    x_postin[mask_ids] = post_ncl
    return torch.permute(x_postin, (0, 4, 1, 2, 3))


class _SparseConv3d(nn.Conv3d):
    forward = _sp_conv_forward


class _SparseAvgPooling(nn.AvgPool3d):
    forward = _sp_conv_forward


class _SparseInstanceNorm3d(nn.InstanceNorm1d):
    forward = _sp_bn_forward


def _convert_to_spark_cnn(m: nn.Module) -> nn.Module:
    oup = m
    if isinstance(m, nn.Conv3d):
        bias = m.bias is not None
        oup = _SparseConv3d(
            m.in_channels,
            m.out_channels,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=bias,
            padding_mode=m.padding_mode,
        )
        oup.weight.data.copy_(m.weight.data)
        if bias:
            oup.bias.data.copy_(m.bias.data)
    elif isinstance(m, nn.AvgPool3d):
        oup = _SparseAvgPooling(
            m.kernel_size,
            m.stride,
            m.padding,
            ceil_mode=m.ceil_mode,
            count_include_pad=m.count_include_pad,
            divisor_override=m.divisor_override,
        )
    elif isinstance(m, nn.InstanceNorm3d):
        oup = _SparseInstanceNorm3d(
            m.weight.shape[0],
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
        )
        oup.weight.data.copy_(m.weight.data)
        oup.bias.data.copy_(m.bias.data)
    for name, child in m.named_children():
        oup.add_module(name, _convert_to_spark_cnn(child))
    return oup


class _RefSparK3D(nn.Module):
    """spark_model.py SparK3D, use_mask_token=True (the densify layers; prints dropped)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, features_per_stage: list[int]) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for i, feats_per_stage in enumerate(features_per_stage):
            p = nn.Parameter(torch.zeros(1, feats_per_stage, 1, 1, 1))
            nn.init.trunc_normal_(p, mean=0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(p)
            self.densify_norms.append(_SparseInstanceNorm3d(feats_per_stage))
            if i == 0:
                densify_proj: nn.Module = nn.Identity()
            else:
                kernel_size = 1 if i <= 0 else 3
                densify_proj = nn.Conv3d(
                    feats_per_stage,
                    feats_per_stage,
                    kernel_size=kernel_size,
                    stride=1,
                    padding=kernel_size // 2,
                    bias=True,
                )
            self.densify_projs.append(densify_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea_bcffs = self.encoder(x)
        to_dec = []
        for i, bcfff in enumerate(fea_bcffs):
            if bcfff is not None:
                bcfff = self.densify_norms[i](bcfff)
                mask_tokens = self.mask_tokens[i].expand_as(bcfff)
                cur_shape = [bcfff.shape[0]] + list(bcfff.shape[2:])
                bcfff = torch.where(
                    _get_active_ex_or_ii(*cur_shape, device=bcfff.device, dtype=bcfff.dtype).expand_as(bcfff) == 1,
                    bcfff,
                    mask_tokens,
                )
                bcfff = self.densify_projs[i](bcfff)
            to_dec.append(bcfff)
        return self.decoder(to_dec)


def _ref_spark_loss(prediction: torch.Tensor, groundtruth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """spark_loss.py SparkLoss.forward."""
    out_D, out_H, out_W = prediction.shape[2], prediction.shape[3], prediction.shape[4]  # noqa: N806
    D, H, W = mask.shape[2], mask.shape[3], mask.shape[4]  # noqa: N806
    d_repeat, h_repeat, w_repeat = out_D // D, out_H // H, out_W // W
    loss_mask = (
        mask.repeat_interleave(d_repeat, dim=2).repeat_interleave(h_repeat, dim=3).repeat_interleave(w_repeat, dim=4)
    )
    loss_mask = 1 - loss_mask
    diff = (groundtruth - prediction) ** 2
    return torch.mean(diff[loss_mask.nonzero(as_tuple=True)])


# --------------------------------------------------------------------------------------- the tests

FEATURES = [4, 8, 8, 16, 16]  # 32^3 input: stages at 32, 16, 8, 4 and 2 voxels
PATCH = 32
STRIDE = 8  # a 4^3 mask grid: stages 0-3 masked, stage 4 (2^3) coarser than the grid, dense


def _pair(seed: int) -> tuple[SparKTask, _RefSparK3D]:
    torch.manual_seed(seed)
    net = NNUNetResEnc(
        in_channels=1, out_channels=2, n_stages=5, features_per_stage=FEATURES, n_blocks_per_stage=[1, 2, 1, 1, 1]
    )
    ref_encoder = _convert_to_spark_cnn(copy.deepcopy(net.encoder))
    task = SparKTask(net, mask_ratio=0.75, mask_stride=STRIDE, patch_size=(PATCH,) * 3)
    with torch.no_grad():  # medct's densify weights are random draws: give their values to the reference
        for d in task.densify:
            d.mask_token.normal_(0, 0.5)
            if isinstance(d.proj, nn.Conv3d):
                d.proj.weight.normal_(0, 0.2)
                d.proj.bias.normal_(0, 0.2)
    ref = _RefSparK3D(ref_encoder, task.decoder, FEATURES)
    with torch.no_grad():
        for i, d in enumerate(task.densify):
            ref.mask_tokens[i].copy_(d.mask_token)
            assert isinstance(d.proj, nn.Identity) == isinstance(ref.densify_projs[i], nn.Identity)
            if isinstance(d.proj, nn.Conv3d):
                ref.densify_projs[i].load_state_dict(d.proj.state_dict())
    return task, ref


def test_densify_layout_is_nnssl():
    task, ref = _pair(0)
    for i, (d, r) in enumerate(zip(task.densify, ref.densify_projs, strict=True)):
        assert type(d.proj) is type(r), i
        if isinstance(r, nn.Conv3d):
            assert d.proj.kernel_size == r.kernel_size == (3, 3, 3) and d.proj.padding == r.padding
    assert all(not d.norm.affine for d in task.densify)  # SparseInstanceNorm3d(channels): no affine
    # nnssl's create_blocky_mask masks int(ratio * cells) cells: 0.75 * 10 = 7.5 -> 7
    assert int(random_cell_mask(1, (10, 1, 1), 0.75).sum()) == 3


def test_masked_forward_loss_and_gradients_equal_nnssl():
    for seed in (0, 1):
        task, ref = _pair(seed)
        task.train()
        ref.train()
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(2, 1, PATCH, PATCH, PATCH, generator=g)
        visible = random_cell_mask(2, task.grid, 0.75, torch.Generator().manual_seed(seed + 10))  # (2, 1, 4, 4, 4)

        ours = task.reconstruct(x, visible)
        ours_loss = ((ours - x) ** 2 * (1 - upsample_mask(visible, x.shape[2:]))).sum() / (
            1 - upsample_mask(visible, x.shape[2:])
        ).sum()
        _Active.mask = visible
        theirs = ref(x * upsample_mask(visible, x.shape[2:]))  # the input masked, as SparK's code does
        theirs_loss = _ref_spark_loss(theirs, x, visible)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert abs(float(ours_loss.detach()) - float(theirs_loss.detach())) <= 1e-6 * max(1.0, float(theirs_loss))

        # the task's own loss (its random mask drawn from the same generator) equals the reference's
        again = task.loss(x, torch.Generator().manual_seed(seed + 10))
        assert abs(float(again) - float(theirs_loss)) <= 1e-6 * max(1.0, float(theirs_loss))

        # Encoder gradients by parameter name. DNA's ConvDropoutNormReLU holds its conv both as `conv` and
        # as `all_modules.0`; medct's hooks keep them one module, nnssl's conversion makes two and runs
        # only `all_modules` (the `conv` copy is dead there), so each shared tensor is compared under
        # the name the reference runs.
        ours_enc = dict(task.net.encoder.named_parameters(remove_duplicate=False))
        ref_enc = dict(ref.encoder.named_parameters(remove_duplicate=False))
        assert ours_enc.keys() == ref_enc.keys()
        names = list(ours_enc)
        dense = list(task.densify.named_parameters())
        ours_grads = torch.autograd.grad(
            again, [*ours_enc.values(), *(p for _, p in dense)], allow_unused=True, materialize_grads=False
        )
        theirs_grads = torch.autograd.grad(
            theirs_loss,
            [*ref_enc.values(), *ref.mask_tokens, *ref.densify_projs.parameters()],
            allow_unused=True,
        )
        n_enc = len(names)
        compared = 0
        for name, a, b in zip(names, ours_grads[:n_enc], theirs_grads[:n_enc], strict=True):
            assert a is not None and float(a.abs().sum()) > 0, name  # every encoder tensor learns in medct
            if b is None:  # the reference's dead copy: its live twin carries the same tensor
                twins = [k for k in names if k != name and ours_enc[k] is ours_enc[name]]
                assert any(theirs_grads[names.index(k)] is not None for k in twins), name
                continue
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
            compared += 1
        assert compared >= n_enc // 2
        ours_dense = dict(zip([n for n, _ in dense], ours_grads[n_enc:], strict=True))
        ref_tokens = theirs_grads[n_enc : n_enc + len(FEATURES)]
        ref_projs = theirs_grads[n_enc + len(FEATURES) :]
        for i, tok in enumerate(ref_tokens):
            if i == len(FEATURES) - 1:  # the dense stage has no masked position: its token gets no gradient
                assert ours_dense[f"{i}.mask_token"] is None and float(tok.abs().sum()) == 0
                continue
            torch.testing.assert_close(ours_dense[f"{i}.mask_token"], tok, rtol=1e-4, atol=1e-7)
        ours_proj = [v for k, v in ours_dense.items() if ".proj." in k]
        assert len(ours_proj) == len(ref_projs) == 2 * (len(FEATURES) - 1)
        for a, b in zip(ours_proj, ref_projs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
