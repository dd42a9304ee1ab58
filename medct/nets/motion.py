"""The causal motion network of `medct.synthesis.motion` (output kind "motion").

`motion_transformer`: a spatio-temporal transformer over displacement-field tokens that predicts the
next phase's displacement from the previous ones (Lai et al., "Patient-Specific Autoregressive Models
for Organ Motion Prediction in Radiotherapy", 2025: 4D CT phases as a token sequence, next-phase
prediction, autoregressive roll-out).

    fields (B, T, 3, X, Y, Z) mm from the reference phase, image (B, 1, X, Y, Z) in [0, 1]
      -> (B, T, 3, X, Y, Z): output t is the prediction of field t + 1 from fields 0..t.

Each phase's field (with the reference image as a fourth channel, so motion can depend on anatomy)
is cut into patch^3 tokens (a strided convolution). A block mixes tokens (1) across time at each
location, with causal self-attention (a token sees its own and earlier phases only), (2) across space
within each phase, with a depthwise 3x3x3 convolution plus the phase's mean token (breathing is
coherent over the whole trunk), (3) through an MLP. Factorising attention this way keeps the cost
linear in the number of spatial tokens (a whole-trunk CT at 8 mm has thousands), where full
space-time attention would be quadratic in T x tokens. The head predicts the change from the
current field (residual, zero-initialised: the untrained network is the copy-last baseline).

Written by hand: MONAI and torch have transformer blocks but no causal spatio-temporal model of
vector fields; the pieces used (nn.MultiheadAttention, Conv3d, LayerNorm) are torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.nets.registry import record_config, register_net


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_t = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_s = nn.LayerNorm(dim)
        self.spatial = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.glob = nn.Linear(dim, dim)
        self.norm_m = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:  # h (B, T, x, y, z, C)
        b, t, x, y, z, c = h.shape
        seq = h.permute(0, 2, 3, 4, 1, 5).reshape(b * x * y * z, t, c)  # one sequence per location
        q = self.norm_t(seq)
        seq = seq + self.attn(q, q, q, attn_mask=mask, need_weights=False)[0]
        h = seq.reshape(b, x, y, z, t, c).permute(0, 4, 1, 2, 3, 5)
        s = self.norm_s(h)
        conv = self.spatial(s.reshape(b * t, x, y, z, c).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        h = h + conv.reshape(b, t, x, y, z, c) + self.glob(s.mean(dim=(2, 3, 4), keepdim=True))
        return h + self.mlp(self.norm_m(h))


@register_net("motion_transformer", tiny_args={"dim": 16, "depth": 1, "heads": 2}, tiny_size=8, output="motion")
class MotionTransformer(nn.Module):
    """Causal next-phase displacement predictor (see the module docstring).

    patch: token size in motion-grid voxels; max_phases: the longest context (learned time
    embedding); scale_mm: fields are divided by it inside the network (unit-scale inputs).
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        patch: int = 4,
        max_phases: int = 32,
        mlp_ratio: float = 2.0,
        scale_mm: float = 10.0,
    ) -> None:
        super().__init__()
        self.patch, self.max_phases, self.scale_mm = int(patch), int(max_phases), float(scale_mm)
        self.embed = nn.Conv3d(4, dim, kernel_size=patch, stride=patch)
        self.time = nn.Parameter(torch.zeros(max_phases, dim))
        nn.init.normal_(self.time, std=0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3 * patch**3)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        record_config(self, MotionTransformer, locals())

    def forward(self, fields: Tensor, image: Tensor) -> Tensor:
        b, t, _, x, y, z = fields.shape
        if t > self.max_phases:
            raise ValueError(f"{t} phases given; this network's context holds at most {self.max_phases}")
        p = self.patch
        pad = [(-n) % p for n in (x, y, z)]
        u = fields / self.scale_mm
        inp = torch.cat([u, image[:, None].expand(b, t, 1, x, y, z)], dim=2).reshape(b * t, 4, x, y, z)
        inp = F.pad(inp, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        tok = self.embed(inp)  # (B*T, C, x/p, y/p, z/p)
        gx, gy, gz = tok.shape[2:]
        h = tok.permute(0, 2, 3, 4, 1).reshape(b, t, gx, gy, gz, -1) + self.time[:t, None, None, None, :]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=fields.device), diagonal=1)  # True = hidden
        for blk in self.blocks:
            h = blk(h, mask)
        d = self.head(self.norm(h))  # (B, T, gx, gy, gz, 3 p^3)
        d = d.reshape(b, t, gx, gy, gz, 3, p, p, p).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
        d = d.reshape(b, t, 3, gx * p, gy * p, gz * p)[..., :x, :y, :z]
        return fields + d * self.scale_mm
