"""IMPACT: feature-based image registration on medct's own encoders.

Boussot et al. 2025, "IMPACT: A Generic Semantic Loss for Multimodal Medical Image Registration"
(reference PyTorch code: github.com/vboussot/ImpactLoss). A frozen segmentation network gives
multi-layer features of the fixed image and of the warped moving image; the similarity is a
weighted L1 / L2 / cosine distance between them, per layer. Here the network is a medct model
(a segmentation model folder, or an SSL encoder folder from pretraining), so the features are of
the same kind as every downstream task's.

Two modes, as the paper:
  * "jacobian": the moving image is warped, then passed through the network at every step, so the
    gradient flows through the network (better for early, downsampling layers);
  * "static": the moving image's features are computed once and the feature maps are warped
    (cheaper; exact only for translation-equivariant features).

The transform is written by hand because no library in medct's stack optimises a displacement
against a network loss: a dense displacement u on the model's working grid (the fixed image in
RAS at the network's spacing), parametrised by a coarse control grid upsampled trilinearly
(a first-order B-spline), optimised with Adam, coarse to fine (control spacing schedule, e.g.
40 -> 20 -> 10 mm), with a diffusion penalty (mean squared gradient of u). It starts from an
optional Elastix transform (rigid/affine): the mapping of a fixed point x is T_init(x + u(x)).

The same distance is a training loss for synthetic CT (`impact_distance` on network features).
`export_torchscript` writes a medct encoder with the interface elastix's IMPACT metric loads
(raw intensities in, the model normalises itself, a list of feature maps out).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.precision import fp32_loss
from medct.volume import Volume

Metric = Literal["l1", "l2", "cosine"]
Mode = Literal["jacobian", "static"]


class FeatureModel(nn.Module):
    """Frozen multi-layer features of a medct network's encoder, from raw HU.

    net:    any registered medct network (it has `encoder_features`, shallow to deep).
    layers: which encoder stages to return (0 = full resolution, 1 = 1/2, ...).
    """

    def __init__(self, net: nn.Module, hu_min: float, hu_max: float, layers: Sequence[int] = (0, 1)) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self.layers = [int(i) for i in layers]

    def forward(self, hu: Tensor) -> list[Tensor]:  # (B, 1, X, Y, Z) HU -> [(B, C_l, X_l, Y_l, Z_l)]
        x = ((hu - self.hu_min) / (self.hu_max - self.hu_min)).clamp(0.0, 1.0)  # the model's own window
        feats = self.net.encoder_features(x)
        return [feats[i] for i in self.layers]


@dataclass
class FeatureSource:
    """A loaded feature model and the spacing its network was trained at."""

    model: FeatureModel
    spacing: tuple[float, float, float]
    name: str = ""


def load_feature_model(
    model_dir: str | os.PathLike[str], layers: Sequence[int] = (0, 1), device: str = "cpu"
) -> FeatureSource:
    """A segmentation model folder or an encoder folder as a frozen FeatureModel (HU window and
    spacing from its card)."""
    from medct.checkpoint import ENCODER_TASK, load_model_folder, read_model_card
    from medct.errors import ConfigError
    from medct.nets.encoder import load_encoder_folder

    card = read_model_card(model_dir)
    if card.task == ENCODER_TASK:
        net, _ = load_encoder_folder(model_dir, device=device)
    else:
        net, card = load_model_folder(model_dir, device=device)
    pre = card.preprocessing
    n_stages = len(net.encoder_features(torch.zeros(1, 1, *[32] * 3, device=device)))
    if not layers or max(layers) >= n_stages or min(layers) < 0:
        raise ConfigError(
            f"IMPACT layers {list(layers)} do not exist; {model_dir} has encoder stages 0..{n_stages - 1}."
        )
    model = FeatureModel(net, pre.hu_min, pre.hu_max, layers).to(device)
    return FeatureSource(model, tuple(float(s) for s in pre.spacing), str(model_dir))  # type: ignore[arg-type]


class _Intensity(nn.Module):
    """The windowed image itself as the one feature layer (no network)."""

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        return [x]


def intensity_source(spacing_mm: float = 6.0, hu_min: float = -1000.0, hu_max: float = 500.0) -> FeatureSource:
    """Raw intensities (HU window -> [0, 1]) as the features: the same optimiser as IMPACT with a
    plain intensity metric, for images of one modality and scanner, such as the phases of a 4D CT
    (`medct.synthesis.motion` registers every phase to the reference with it). No model needed."""
    model = FeatureModel(_Intensity(), hu_min, hu_max, layers=(0,))
    return FeatureSource(model, (float(spacing_mm),) * 3, "intensity")


# --------------------------------------------------------------------------- the distance


@fp32_loss
def impact_distance(
    feats_a: Sequence[Tensor],
    feats_b: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    metric: Metric = "l1",
    mask: Tensor | None = None,
) -> Tensor:
    """Weighted sum over layers of the mean feature distance (a scalar; 0 for identical features).

    metric: "l1" mean |a - b|, "l2" mean (a - b)^2 (both over channels and voxels), "cosine"
    mean (1 - cos(a, b)) over voxels. mask (B, 1, X, Y, Z): where to average (resized per layer).
    """
    w = list(weights) if weights is not None else [1.0] * len(feats_a)
    if not (len(w) == len(feats_a) == len(feats_b)):
        raise ValueError(f"{len(feats_a)} and {len(feats_b)} feature layers for {len(w)} weights")
    total = feats_a[0].new_zeros(())
    for wi, a, b in zip(w, feats_a, feats_b, strict=True):
        if metric == "l1":
            d = (a - b).abs().mean(dim=1, keepdim=True)
        elif metric == "l2":
            d = (a - b).pow(2).mean(dim=1, keepdim=True)
        elif metric == "cosine":
            d = 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)
        else:
            raise ValueError(f"unknown IMPACT metric {metric!r}; use l1, l2 or cosine")
        if mask is None:
            total = total + wi * d.mean()
        else:
            m = F.interpolate(mask.float(), size=d.shape[2:], mode="trilinear", align_corners=False)
            total = total + wi * (d * m).sum() / m.sum().clamp_min(1e-6)
    return total


# --------------------------------------------------------------------------- displacement


def _identity_grid(shape: Sequence[int], device: torch.device) -> Tensor:
    """(1, X, Y, Z, 3) voxel indices of a grid, in (i, j, k) order."""
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]


def _sample(img: Tensor, idx: Tensor, mode: str = "bilinear") -> Tensor:
    """img (B, C, X, Y, Z) sampled at voxel indices idx (B, X', Y', Z', 3) in (i, j, k) order."""
    size = torch.tensor(img.shape[2:], dtype=idx.dtype, device=idx.device)
    norm = 2.0 * idx / (size - 1).clamp_min(1) - 1.0
    # grid_sample's last axis is (W, H, D) = (k, j, i) for a (B, C, D=X, H=Y, W=Z) input
    return F.grid_sample(img, norm.flip(-1), mode=mode, padding_mode="border", align_corners=True)


def _dense(ctrl: Tensor, shape: Sequence[int]) -> Tensor:
    """Control grid (1, 3, cx, cy, cz) -> dense displacement (1, 3, X, Y, Z), trilinear."""
    return F.interpolate(ctrl, size=tuple(shape), mode="trilinear", align_corners=True)


def _diffusion(u: Tensor, spacing: Tensor) -> Tensor:
    """Mean squared spatial gradient of a (1, 3, X, Y, Z) displacement in mm (per mm)."""
    total = u.new_zeros(())
    for ax in range(3):
        d = torch.diff(u, dim=2 + ax) / spacing[ax]
        total = total + d.pow(2).mean()
    return total


@dataclass
class ImpactSettings:
    """Optimisation settings (the paper's CT/CBCT recommendation: early layers, which the
    FeatureModel's `layers` pick, and Jacobian mode)."""

    weights: tuple[float, ...] | None = None  # one per layer of the FeatureModel (default: all 1)
    metric: Metric = "l1"
    mode: Mode = "jacobian"
    control_spacing_mm: tuple[float, ...] = (40.0, 20.0, 10.0)
    iterations: tuple[int, ...] = (60, 60, 40)
    lr_mm: float = 0.5  # Adam step, in mm of control-point displacement
    smoothness: float = 1.0  # weight of the diffusion penalty
    seed: int = 0


@dataclass
class ImpactTransform:
    """x (fixed world) -> T_init(x + u(x)); u is stored on the fixed grid as RAS world mm."""

    displacement: Volume  # (X, Y, Z, 3) on the fixed grid, RAS mm, before the initial transform
    initial: object | None = None  # an ElastixTransform (rigid/affine), or None for identity
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def _moving_on_fixed(self, moving: Volume, kind: str, default: float | None) -> Volume:
        from medct.geometry import Grid, resample_volume

        if self.initial is not None:
            return self.initial.warp(moving, kind=kind, default=default)  # type: ignore[attr-defined]
        grid = Grid(self.displacement.shape, self.displacement.affine)
        if kind == "labels":
            return resample_volume(moving, grid, mode="nearest", padding=0.0)
        fill = float(np.asarray(moving.array).min()) if default is None else float(default)
        return resample_volume(moving, grid, mode="linear", padding=fill)

    def _index_displacement(self) -> Tensor:
        """u as (1, X, Y, Z, 3) fixed-voxel offsets."""
        lin = self.displacement.affine[:3, :3]
        vox = np.asarray(self.displacement.array, np.float64) @ np.linalg.inv(lin).T
        return torch.from_numpy(vox.astype(np.float32))[None]

    def warp(self, moving: Volume, kind: Literal["image", "labels"] = "image", default: float | None = None) -> Volume:
        """`moving` on the fixed grid through T (linear for images, nearest for labels)."""
        base = self._moving_on_fixed(moving, kind, default)
        arr = np.asarray(base.array)
        src = torch.from_numpy(arr.astype(np.float32))[None, None]
        idx = _identity_grid(base.shape, torch.device("cpu")) + self._index_displacement()
        out = _sample(src, idx, mode="nearest" if kind == "labels" else "bilinear")[0, 0].numpy()
        if kind == "labels" or np.issubdtype(arr.dtype, np.integer):
            out = np.rint(out)
        return base.with_array(out.astype(arr.dtype))

    def points_fixed_to_moving(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm of the fixed image -> T(x) in the moving image."""
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        aff = self.displacement.affine
        idx = (np.linalg.inv(aff) @ np.hstack([pts, np.ones((len(pts), 1))]).T)[:3].T
        field_t = torch.from_numpy(np.moveaxis(np.asarray(self.displacement.array, np.float32), -1, 0))[None]
        u = _sample(field_t, torch.from_numpy(idx.astype(np.float32))[None, :, None, None, :])
        moved = pts + u[0, :, :, 0, 0].T.numpy().astype(np.float64)
        if self.initial is not None:
            moved = self.initial.points_fixed_to_moving(moved)  # type: ignore[attr-defined]
        return moved

    def points_moving_to_fixed(self, points: np.ndarray, tol_mm: float = 1e-3) -> np.ndarray:
        """(N, 3) RAS mm of the moving image -> the fixed points x with T(x) = p (solved per point)."""
        from medct.registration.elastix import invert_points

        return invert_points(self.points_fixed_to_moving, points, tol_mm)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """displacement.nii.gz (u on the fixed grid, RAS mm vectors) and initial/ (elastix files)."""
        from medct.io import write_volume

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_volume(self.displacement, out / "displacement.nii.gz")
        if self.initial is not None:
            self.initial.save(out / "initial")  # type: ignore[attr-defined]
        return out

    def jacobian(self) -> Volume:
        """det(I + grad u) on the fixed grid, times the initial transform's (constant) determinant."""
        from medct.metrics import jacobian_determinant

        lin = self.displacement.affine[:3, :3]
        spacing = np.linalg.norm(lin, axis=0)
        frame = lin / spacing[None, :]  # world -> voxel-axis components: frame^T u
        u_axes = np.einsum("ba,xyzb->axyz", frame, np.asarray(self.displacement.array, np.float64))
        det = jacobian_determinant(u_axes, tuple(spacing))  # type: ignore[arg-type]
        if self.initial is not None:
            det = det * float(np.median(self.initial.jacobian().array))  # type: ignore[attr-defined]
        return self.displacement.with_array(det.astype(np.float32))

    def folding_fraction(self) -> float:
        return float(np.mean(self.jacobian().array <= 0.0))


def register_impact(
    fixed: Volume,
    moving: Volume,
    features: FeatureSource,
    settings: ImpactSettings | None = None,
    initial: object | None = None,
    fixed_mask: Volume | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> ImpactTransform:
    """Register `moving` to `fixed` by minimising the IMPACT distance of `features` (see module doc).

    initial: an ElastixTransform (e.g. `elastix.register(..., preset="affine")`) applied first.
    fixed_mask: where the distance is averaged (e.g. a CBCT's field of view), on the fixed grid.
    precision: auto (None), bf16 or fp32 for the feature network's forward passes
    (`medct.precision`); the distance, the regulariser and the displacement stay float32.
    """
    from medct.geometry import Grid, network_grid, resample_volume
    from medct.precision import autocast, resolve_precision
    from medct.registration.elastix import check_pair

    s = settings or ImpactSettings()
    check_pair(fixed, moving)
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    dev = torch.device(device)
    prec = resolve_precision(precision, dev)
    fixed_grid = Grid(fixed.shape, fixed.affine)
    identity = ImpactTransform(Volume(np.zeros((*fixed.shape, 3), np.float32), fixed.affine.copy()), initial)
    moving_on_fixed = identity._moving_on_fixed(moving, "image", None)
    # the network's working grid: the fixed image in RAS at the network's spacing
    work = network_grid(fixed.affine, fixed.shape, features.spacing)
    fill_f = float(np.asarray(fixed.array).min())
    f_w = resample_volume(fixed, work, padding=fill_f).array
    m_w = resample_volume(moving_on_fixed, work, padding=float(np.asarray(moving_on_fixed.array).min())).array
    f_t = torch.from_numpy(np.asarray(f_w, np.float32))[None, None].to(dev)
    m_t = torch.from_numpy(np.asarray(m_w, np.float32))[None, None].to(dev)
    mask_t = None
    if fixed_mask is not None:
        mk = resample_volume(
            fixed_mask.with_array((np.asarray(fixed_mask.array) > 0).astype(np.float32)), work, padding=0.0
        )
        mask_t = torch.from_numpy(np.asarray(mk.array, np.float32))[None, None].to(dev)
    spacing = torch.tensor(features.spacing, dtype=torch.float32, device=dev)
    model = features.model.to(dev)
    with torch.no_grad(), autocast(dev, prec):
        f_feats = [f.detach().float() for f in model(f_t)]
        m_feats_static = [f.detach().float() for f in model(m_t)] if s.mode == "static" else None
    base = _identity_grid(work.shape, dev)
    ctrl: Tensor | None = None
    history: list[float] = []
    for spacing_mm, iters in zip(s.control_spacing_mm, s.iterations, strict=True):
        csize = [
            max(2, int(round(n * sp / spacing_mm)) + 1) for n, sp in zip(work.shape, features.spacing, strict=True)
        ]
        init = torch.zeros(1, 3, *csize, device=dev) if ctrl is None else _dense(ctrl.detach(), csize)
        ctrl = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([ctrl], lr=s.lr_mm)
        for _ in range(iters):
            opt.zero_grad()
            u_mm = _dense(ctrl, work.shape)  # (1, 3, X, Y, Z) mm along the working grid's RAS axes
            idx = base + (u_mm / spacing[None, :, None, None, None]).permute(0, 2, 3, 4, 1)
            if s.mode == "jacobian":
                with autocast(dev, prec):
                    warped_feats = model(_sample(m_t, idx))
            else:
                assert m_feats_static is not None
                warped_feats = []
                for mf in m_feats_static:  # warp each feature map with u at its resolution
                    scale = torch.tensor(mf.shape[2:], dtype=torch.float32, device=dev) / torch.tensor(
                        work.shape, dtype=torch.float32, device=dev
                    )
                    u_l = F.interpolate(u_mm, size=mf.shape[2:], mode="trilinear", align_corners=True)
                    idx_l = _identity_grid(mf.shape[2:], dev) + (
                        u_l / spacing[None, :, None, None, None] * scale[None, :, None, None, None]
                    ).permute(0, 2, 3, 4, 1)
                    warped_feats.append(_sample(mf, idx_l))
            sim = impact_distance(f_feats, warped_feats, s.weights, s.metric, mask_t)
            loss = sim + s.smoothness * _diffusion(u_mm, spacing)
            loss.backward()
            opt.step()
            history.append(float(sim.detach()))
    assert ctrl is not None
    with torch.no_grad():
        u_mm = _dense(ctrl, work.shape)[0].permute(1, 2, 3, 0).cpu().numpy()  # (X, Y, Z, 3) along work axes
    # working-grid axes are RAS-aligned (network_grid), so the mm components are world RAS vectors
    frame = work.affine[:3, :3] / np.linalg.norm(work.affine[:3, :3], axis=0)[None, :]
    u_world = u_mm @ frame.T
    disp = resample_volume(Volume(u_world.astype(np.float32), work.affine), fixed_grid, padding="border")
    return ImpactTransform(disp, initial, history, time.perf_counter() - t0)


# --------------------------------------------------------------------------- TorchScript export


class _ElastixImpactModel(nn.Module):
    """The interface of elastix's IMPACT metric (ImpactLoss TorchScript models):
    forward(x (B, C, Z, Y, X) raw intensities, nb_layers tensor, stats, direction) -> list of feature
    maps (B, C_l, Z_l, Y_l, X_l). The medct encoder works in (X, Y, Z): the axes are permuted in and out."""

    def __init__(self, traced: nn.Module, hu_min: float, hu_max: float, n_layers: int) -> None:
        super().__init__()
        self.encoder = traced
        self.hu_min, self.hu_max, self.n_layers = hu_min, hu_max, n_layers

    def forward(
        self,
        x: Tensor,
        nb_layers_tensor: Tensor = torch.tensor([0]),  # noqa: B008 - TorchScript needs literal defaults
        stats: Tensor = torch.tensor([]),  # noqa: B008
        direction: Tensor = torch.tensor([]),  # noqa: B008
    ) -> list[Tensor]:
        n = int(nb_layers_tensor.item()) if nb_layers_tensor.numel() > 0 else self.n_layers
        if n <= 0:
            n = self.n_layers
        hu = x[:, :1].permute(0, 1, 4, 3, 2)  # (B, 1, Z, Y, X) -> (B, 1, X, Y, Z)
        v = ((hu - self.hu_min) / (self.hu_max - self.hu_min)).clamp(0.0, 1.0)
        feats: list[Tensor] = self.encoder(v)
        out: list[Tensor] = []
        for i in range(min(n, len(feats))):
            out.append(feats[i].permute(0, 1, 4, 3, 2))
        return out


class _EncoderFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.net.encoder_features(x))


def export_torchscript(
    model_dir: str | os.PathLike[str], path: str | os.PathLike[str], example_size: Sequence[int] = (64, 64, 64)
) -> Path:
    """Write a medct model's encoder as a TorchScript feature model for elastix's IMPACT metric.

    The encoder is traced at `example_size` (X, Y, Z; multiples of the network's downsampling) and
    wrapped in a scripted module with the ImpactLoss interface; input in raw HU (the model applies
    its card's window), output all encoder stages, shallow to deep, or the first nb_layers.
    """
    from medct.paths import atomic_file

    src = load_feature_model(model_dir, layers=(0,))
    net = src.model.net
    example = torch.zeros(1, 1, *example_size)
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI blocks compare shapes in Python while tracing; the trace still holds for other
        # sizes (tests/registration/test_impact.py checks one), so that warning is not the user's.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_EncoderFeatures(net).eval(), example, strict=False, check_trace=False)
        n_layers = len(net.encoder_features(example))
    scripted = torch.jit.script(_ElastixImpactModel(traced, src.model.hu_min, src.model.hu_max, n_layers))
    out = Path(path)
    with atomic_file(out, suffix=".pt") as tmp:
        scripted.save(str(tmp))
    return out


__all__ = [
    "FeatureModel",
    "FeatureSource",
    "ImpactSettings",
    "ImpactTransform",
    "export_torchscript",
    "impact_distance",
    "load_feature_model",
    "register_impact",
]


def register_on_encoder(
    fixed: Volume,
    moving: Volume,
    features: FeatureSource,
    init: str | None = "affine",
    settings: ImpactSettings | None = None,
    fixed_mask: Volume | None = None,
    threads: int | None = None,
    precision: str | None = None,
) -> ImpactTransform:
    """IMPACT as `medct register --preset impact`, the API (`medct.api.register(method="impact")`)
    and synthetic CT's pair alignment run it: an Elastix `init` preset first (`elastix.parse_preset`
    grammar; None or "none": from the identity), then `register_impact` on `features`."""
    from medct.registration import elastix

    initial = None
    if init is not None and init != "none":
        initial = elastix.register(fixed, moving, preset=init, fixed_mask=fixed_mask, number_of_threads=threads)
    return register_impact(fixed, moving, features, settings, initial, fixed_mask=fixed_mask, precision=precision)
