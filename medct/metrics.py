"""Evaluation metrics for segmentation, synthesis and registration.

- Dice per label from two label maps (Dice 1945). Convention when a label is absent from BOTH maps:
  the score is undefined; by default it is NaN so that `np.nanmean` skips it (the Metrics Reloaded
  recommendation, Maier-Hein et al. 2024, Nat. Methods), or `empty_score=1.0` to count agreement on
  absence as perfect (what nnU-Net's summary does). Present in one map only -> 0.0.
- HD95: MONAI `compute_hausdorff_distance(percentile=95)` on edge voxels with physical spacing
  (symmetric: max of the two directed 95th percentiles). NaN when both are empty, inf when one is.
- MAE / PSNR / SSIM, optionally restricted to a mask (synthetic CT is scored inside the body).
  SSIM uses MONAI `compute_ssim_and_cs` (Wang et al. 2004, Gaussian 11-voxel window, sigma 1.5);
  the masked mean averages the SSIM map over mask voxels whose window lies inside the volume.
- SynthRAD2025 scores (`synthrad_scores`): outside the mask both images are set to -1024 HU; MAE in
  HU unclipped over the mask; PSNR with both clipped to [-1024, 3071], data range 4095, over the
  mask; masked MS-SSIM over 5 scales (`ms_ssim_masked`), as github.com/SynthRAD2025/evaluation
  (image_metrics.py) computes them.
- TRE: Euclidean distance between corresponding landmarks in mm.
- Jacobian determinant of x -> x + u(x) from a displacement field by central differences
  (`np.gradient`), and the fraction of voxels where it is <= 0 (folding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Spacing = tuple[float, float, float]


# --- segmentation -----------------------------------------------------------------------------


def _labels_of(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {ref.shape}")
    if labels is not None:
        return [int(lab) for lab in labels]
    present = np.union1d(np.unique(pred), np.unique(ref))
    return [int(lab) for lab in present if lab != 0]


def dice_per_label(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] | None = None, empty_score: float = float("nan")
) -> dict[int, float]:
    """Dice of each label between two integer label maps of the same shape.

    labels: which labels to score (default: every non-zero label present in either map).
    empty_score: the value when a label is absent from both maps (NaN by default; see module doc).
    """
    out: dict[int, float] = {}
    for lab in _labels_of(pred, ref, labels):
        p, r = pred == lab, ref == lab
        denom = int(p.sum()) + int(r.sum())
        out[lab] = empty_score if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


def hd95_per_label(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0), labels: Sequence[int] | None = None
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm) of each label between two label maps.

    Both empty -> NaN; exactly one empty -> inf.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    out: dict[int, float] = {}
    for lab in _labels_of(pred, ref, labels):
        p, r = pred == lab, ref == lab
        if not p.any() and not r.any():
            out[lab] = float("nan")
        elif not p.any() or not r.any():
            out[lab] = float("inf")
        else:
            # (B=1, C=1, X, Y, Z) binary masks, as MONAI expects one-hot input.
            pt = torch.from_numpy(p)[None, None]
            rt = torch.from_numpy(r)[None, None]
            hd = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=list(spacing))
            out[lab] = float(hd.item())
    return out


# --- image similarity (synthesis) --------------------------------------------------------------


def _masked(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != ref.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {ref.shape}")
    p, r = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if mask is None:
        return p.ravel(), r.ravel()
    m = np.asarray(mask, dtype=bool)
    if m.shape != p.shape:
        raise ValueError(f"mask shape {m.shape} does not match images {p.shape}")
    if not m.any():
        raise ValueError("mask is empty")
    return p[m], r[m]


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error (image units, e.g. HU), over `mask` if given."""
    p, r = _masked(pred, ref, mask)
    return float(np.mean(np.abs(p - r)))


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), MSE over `mask` if given.

    data_range: the span of valid values (e.g. 2000 for HU clipped to [-1000, 1000]); inf if identical.
    """
    p, r = _masked(pred, ref, mask)
    mse = float(np.mean((p - r) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    data_range: float,
    mask: np.ndarray | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
) -> float:
    """Structural similarity of two 2D/3D images (MONAI's Gaussian-window SSIM), mean over `mask`.

    The SSIM map is only defined where the whole window fits ("valid" convolution); the mask is
    cropped by win_size // 2 on every side to match. Images smaller than the window are an error.
    """
    import torch
    from monai.metrics.regression import compute_ssim_and_cs

    if pred.shape != ref.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {ref.shape}")
    nd = pred.ndim
    if any(s < win_size for s in pred.shape):
        raise ValueError(f"images {pred.shape} are smaller than the SSIM window {win_size}")
    # (B=1, C=1, *spatial)
    p = torch.as_tensor(np.asarray(pred, dtype=np.float32))[None, None]
    r = torch.as_tensor(np.asarray(ref, dtype=np.float32))[None, None]
    ssim_map, _ = compute_ssim_and_cs(p, r, nd, [win_size] * nd, [sigma] * nd, data_range=data_range)
    smap = ssim_map[0, 0].double().numpy()  # (*spatial - win_size + 1)
    if mask is None:
        return float(smap.mean())
    h = win_size // 2
    m = np.asarray(mask, dtype=bool)[tuple(slice(h, s - h) for s in pred.shape)]
    if not m.any():
        raise ValueError("mask has no voxel where the SSIM window fits inside the image")
    return float(smap[m].mean())


SYNTHRAD_HU = (-1024.0, 3071.0)  # the SynthRAD2025 evaluation's fixed dynamic range
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003, Eq. 7


def _ssim_components(a: np.ndarray, b: np.ndarray, data_range: float, luminance: float, cs_weight: float) -> np.ndarray:
    """SSIM map l^luminance * (c * s)^cs_weight with a 7-voxel uniform window and sample covariance
    (scikit-image's defaults, which the SynthRAD2025 code uses), every factor clipped at 0."""
    from scipy.ndimage import uniform_filter

    win = 7
    cov_norm = win**a.ndim / (win**a.ndim - 1)
    ux, uy = uniform_filter(a, win), uniform_filter(b, win)
    vx = cov_norm * (uniform_filter(a * a, win) - ux * ux)
    vy = cov_norm * (uniform_filter(b * b, win) - uy * uy)
    vxy = cov_norm * (uniform_filter(a * b, win) - ux * uy)
    sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    c3 = c2 / 2
    lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
    con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
    struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
    return lum**luminance * con**cs_weight * struct**cs_weight


def ms_ssim_masked(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, hu_range: tuple[float, float] = SYNTHRAD_HU
) -> float:
    """Masked multi-scale SSIM of two 3D CT volumes (HU), as the SynthRAD2025 evaluation.

    Both images are clipped to `hu_range`, set to its minimum outside the mask and shifted to start
    at 0; volumes smaller than 97 voxels along an axis are edge-padded to 97 (five scales need it).
    At each of the 5 scales the SSIM map (`_ssim_components`, the contrast and structure terms raised
    to that scale's MS-SSIM weight) is averaged over the mask, 3 voxels in from the border; then the
    images are smoothed with a 2x2x2 box and subsampled by 2, the mask subsampled. The result is the
    product of the 5 masked means, each clipped to [0, 1]. As in that code, the luminance term has
    weight 0 at every scale (its weights list puts 0.1333 at a 6th scale that is never reached), so
    the figures here are comparable with the challenge's.
    """
    from scipy.signal import fftconvolve

    if pred.shape != ref.shape or np.shape(mask) != ref.shape or ref.ndim != 3:
        raise ValueError(f"MS-SSIM needs three 3D arrays of one shape, got {pred.shape}, {ref.shape}, {np.shape(mask)}")
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("mask is empty")
    lo, hi = hu_range
    g = np.where(m, np.clip(np.asarray(ref, np.float64), lo, hi), lo) - lo
    p = np.where(m, np.clip(np.asarray(pred, np.float64), lo, hi), lo) - lo
    pad = [(max(97 - n, 0) // 2, max(97 - n, 0) - max(97 - n, 0) // 2) for n in g.shape]
    g, p = np.pad(g, pad, mode="edge"), np.pad(p, pad, mode="edge")
    m = np.pad(m, pad, mode="edge")
    box = np.ones((2, 2, 2)) / 8.0
    values = []
    for w in MS_SSIM_WEIGHTS:
        smap = _ssim_components(g, p, hi - lo, luminance=0.0, cs_weight=w)
        inner, minner = smap[3:-3, 3:-3, 3:-3], m[3:-3, 3:-3, 3:-3]
        values.append(float(np.clip(inner[minner].mean(), 0.0, 1.0)) if minner.any() else 0.0)
        g, p = (fftconvolve(x, box, mode="same")[::2, ::2, ::2] for x in (g, p))
        m = m[::2, ::2, ::2]
    return float(np.prod(values))


def synthrad_scores(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE (HU), PSNR (dB) and MS-SSIM of a synthetic CT against the CT inside `mask`, as the
    SynthRAD2025 evaluation: outside the mask both are -1024 HU; MAE unclipped; PSNR with both
    clipped to [-1024, 3071] and data range 4095; `ms_ssim_masked`."""
    m = np.asarray(mask) > 0
    lo, hi = SYNTHRAD_HU
    s = np.where(m, np.asarray(sct, np.float64), lo)
    c = np.where(m, np.asarray(ct, np.float64), lo)
    return {
        "mae": mae(s, c, m),
        "psnr": psnr(np.clip(s, lo, hi), np.clip(c, lo, hi), data_range=hi - lo, mask=m),
        "ms_ssim": ms_ssim_masked(s, c, m),
    }


# --- registration ------------------------------------------------------------------------------


def tre(points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """Target registration error: (N,) Euclidean distances between corresponding (N, 3) points (mm)."""
    a, b = np.asarray(points_a, dtype=np.float64), np.asarray(points_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"point sets must both be (N, D), got {a.shape} and {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def jacobian_determinant(displacement: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0)) -> np.ndarray:
    """det(I + grad u) of a (3, X, Y, Z) displacement field u in mm along the i, j, k voxel axes.

    Derivatives are central differences (one-sided at the border) with the voxel spacing.
    Returns (X, Y, Z).
    """
    u = np.asarray(displacement, dtype=np.float64)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"displacement must be (3, X, Y, Z), got {u.shape}")
    # jac[a, b] = d u_a / d x_b + delta_ab   -> (3, 3, X, Y, Z)
    jac = np.stack([np.stack(np.gradient(u[a], *spacing, axis=(0, 1, 2)), axis=0) for a in range(3)], axis=0)
    jac += np.eye(3)[:, :, None, None, None]
    # move the 3x3 to the end for np.linalg.det: (X, Y, Z, 3, 3)
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def folding_fraction(
    displacement: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0), mask: np.ndarray | None = None
) -> float:
    """Fraction of voxels (within `mask` if given) where the Jacobian determinant is <= 0."""
    det = jacobian_determinant(displacement, spacing)
    if mask is not None:
        det = det[np.asarray(mask, dtype=bool)]
    return float(np.mean(det <= 0.0))
