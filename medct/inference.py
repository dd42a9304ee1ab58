"""Predictor: whole-volume segmentation with the input's exact geometry restored.

Pipeline of `Predictor.predict(volume)`:

1. Body box (CT only): voxels above -500 HU, opened with a ~10 mm box on a ~6 mm copy to cut the
   couch and its thin rails off, largest component, bounding box + 16 mm margin. Everything outside
   the box is labelled background. (The network still sees a margin of air around the body.)
2. Network grid: exactly MONAI's `Orientationd(RAS)` + `Spacingd(card spacing)` grid (built with
   MONAI's own `zoom_affine` / `compute_shape_offset`, so obliquity is kept as MONAI keeps it),
   restricted to the body box.
3. One trilinear resample (`grid_sample`, float32) from the input voxels straight into that
   grid with the composed index->index affine, then HU clip/scale (as `medct.transforms`).
4. MONAI `sliding_window_inference` (Gaussian blending) under `torch.inference_mode`; bf16
   autocast on CUDA, fp32 + channels_last_3d on CPU; optional flip TTA (softmax averaged, each
   flip undone before averaging). Stitching moves to the CPU when the output would not fit on the
   GPU, and after a CUDA out-of-memory error.
5. Back to the input's own voxels inside the body box: trilinear interpolation of the class
   scores (logits; mean probabilities with TTA) then argmax, chunked along the last axis. Only
   points whose 8 neighbouring network voxels disagree on the class are interpolated over all C
   channels: elsewhere the answer is provably that shared class (see `argmax_resample_chunks`).
   Output: uint8 labels with the input's exact shape and affine (LPS, oblique, anisotropic, ...).

Why not MONAI's Compose + Invertd: that resamples in float64 over the whole field of view and
inverts full-resolution C-channel logits (for a 512x512x134 CT and 12 classes: ~10 GB peak
memory, ~25 s of post-processing on 2 cores); one composed float32 resample per direction over
the body box samples the very same points. bench/segment.py measures both on a real CT.

Refs: sliding-window Gaussian blending and mirroring TTA as in nnU-Net (Isensee et al., Nat.
Methods 2021); MONAI `sliding_window_inference`.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medct.checkpoint import ModelCard, load_model_folder
from medct.errors import InvalidVolumeError
from medct.io import Volume, validate_for_inference

DEFAULT_OVERLAP = 0.5  # nnU-Net's tile step of half a patch
BODY_HU = -500.0  # air < -500 HU < every tissue
BODY_COARSE_MM = 6.0  # voxel size of the coarse copy the body box is found on
BODY_OPEN_MM = 10.0  # opening radius: removes couch plates/rails thinner than ~2 cm
BODY_MARGIN_MM = 16.0  # air kept around the body box (network context; MONAI crops with 8 voxels)
CHUNK_VOXELS = 1 << 22  # output voxels per resampling chunk: bounds the (N, 3) grid + (C, N) scores


def auto_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A voxel grid: (3,) shape and (4, 4) voxel -> RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def crop(self, lo: Sequence[int], hi: Sequence[int]) -> Grid:
        """Sub-grid of voxels lo..hi (inclusive) of this grid."""
        shift = np.eye(4)
        shift[:3, 3] = lo
        shape = tuple(int(h - low + 1) for low, h in zip(lo, hi, strict=True))
        return Grid(shape, self.affine @ shift)  # type: ignore[arg-type]


def network_grid(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> Grid:
    """The grid MONAI's Orientation(axcodes="RAS") then Spacing(pixdim=spacing) produce for an input.

    Built with nibabel/MONAI's own functions (the ones those transforms call) so that medct and a
    MONAI pipeline sample the network input at the very same points.
    """
    import nibabel as nib
    from monai.data.utils import compute_shape_offset, zoom_affine

    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    oriented_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    oriented_shape = [0, 0, 0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        oriented_shape[int(dst_axis)] = int(shape[src_axis])
    new_affine = zoom_affine(oriented_affine, np.asarray(spacing, dtype=np.float64), diagonal=False)
    out_shape, offset = compute_shape_offset(oriented_shape, oriented_affine, new_affine, scale_extent=False)
    new_affine[:3, 3] = offset[:3]
    return Grid(tuple(int(s) for s in out_shape), new_affine)  # type: ignore[arg-type]


def _box_corners(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """(4, 8) homogeneous corners of the index box lo..hi."""
    c = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi, strict=True)], indexing="ij"), dtype=np.float64).reshape(
        3, -1
    )
    return np.vstack([c, np.ones((1, 8))])


def map_box(
    index_map: np.ndarray, lo: Sequence[int], hi: Sequence[int], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Index box of grid A (lo..hi) -> enclosing index box in grid B, clipped to B's `shape`.

    index_map: (4, 4) voxel index of A -> voxel index of B.
    """
    pts = (index_map @ _box_corners(lo, hi))[:3]  # (3, 8)
    new_lo = np.clip(np.floor(pts.min(axis=1) + 1e-6), 0, np.asarray(shape) - 1).astype(int)
    new_hi = np.clip(np.ceil(pts.max(axis=1) - 1e-6), 0, np.asarray(shape) - 1).astype(int)
    return new_lo, np.maximum(new_hi, new_lo)


def body_box(vol: Volume, threshold: float = BODY_HU) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index box (lo, hi) of the patient's body in `vol`, with BODY_MARGIN_MM of margin.

    Found on a coarse (~6 mm) copy: voxels above `threshold` HU, a grey opening with a box of
    ~BODY_OPEN_MM radius (cuts off the couch plate and rails, which are thinner than the body),
    largest connected component. Falls back to the plain threshold when the opening removes
    everything (tiny phantoms), and to the whole volume when nothing is above the threshold.
    """
    from scipy import ndimage

    shape = np.asarray(vol.shape)
    spacing = np.asarray(vol.spacing)
    stride = np.maximum(1, np.round(BODY_COARSE_MM / spacing)).astype(int)
    coarse = np.asarray(vol.array[:: stride[0], :: stride[1], :: stride[2]]) > threshold  # (x, y, z)
    if not coarse.any():
        return np.zeros(3, int), shape - 1
    size = 2 * np.ceil(BODY_OPEN_MM / (spacing * stride)).astype(int) + 1
    # minimum then maximum filter = binary opening with a box; separable in scipy, so fast.
    opened = ndimage.maximum_filter(ndimage.minimum_filter(coarse.view(np.uint8), size=size), size=size) > 0
    mask = opened if opened.any() else coarse
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    lo = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)])
    hi = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[-1] for ax in range(3)])
    margin = np.ceil(BODY_MARGIN_MM / spacing).astype(int)
    # The body's edge lies between a coarse sample inside and the next one outside.
    lo = np.maximum(lo * stride - (stride - 1) - margin, 0)
    hi = np.minimum(hi * stride + (stride - 1) + margin, shape - 1)
    return lo, hi


def _index_coords(
    index_map: np.ndarray, out_shape: Sequence[int], device: torch.device, chunk_voxels: int = CHUNK_VOXELS
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Source voxel coordinates of every output voxel, chunk by chunk along the output's last axis.

    index_map: (4, 4) output voxel index -> source voxel index. Yields (slice of the last axis,
    (X, Y, z_chunk, 3) float32 source coordinates in (i, j, k) order).
    """
    X, Y, Z = (int(s) for s in out_shape)
    m = torch.as_tensor(index_map[:3], dtype=torch.float32, device=device)  # (3, 4)
    ii = torch.arange(X, dtype=torch.float32, device=device)
    jj = torch.arange(Y, dtype=torch.float32, device=device)
    base = ii[:, None, None, None] * m[:, 0] + jj[None, :, None, None] * m[:, 1] + m[:, 3]  # (X, Y, 1, 3)
    step = max(1, chunk_voxels // max(X * Y, 1))
    for k0 in range(0, Z, step):
        k1 = min(Z, k0 + step)
        kk = torch.arange(k0, k1, dtype=torch.float32, device=device)
        yield slice(k0, k1), base + kk[None, None, :, None] * m[:, 2]  # (X, Y, kc, 3)


def _normalised(coords: torch.Tensor, src_shape: Sequence[int]) -> torch.Tensor:
    """(..., 3) source (i, j, k) coordinates -> grid_sample's [-1, 1] (align_corners=True) in (k, j, i) order."""
    # (a size-1 axis maps every normalised value to its only voxel, so any finite value will do)
    scale = torch.tensor([2.0 / max(int(s) - 1, 1) for s in src_shape], device=coords.device)
    return (coords * scale - 1.0).flip(-1)


def resample_chunks(
    src: torch.Tensor, index_map: np.ndarray, out_shape: Sequence[int], chunk_voxels: int = CHUNK_VOXELS
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Trilinear samples of `src` at every voxel of an output grid, chunk by chunk along its last axis.

    src:       (C, X, Y, Z) float tensor on the device to compute on.
    index_map: (4, 4) output voxel index -> `src` voxel index (composed from the two affines).
    Yields (slice of the output's last axis, (C, x, y, z_chunk) samples). Outside `src` the nearest
    border value is used (MONAI Spacingd's default `padding_mode="border"`).

    Written by hand (rather than MONAI SpatialResample) to resample in chunks with one composed
    float32 transform: the full-resolution C-channel output of a CT never has to exist at once.
    """
    src_shape = src.shape[1:]
    for zs, coords in _index_coords(index_map, out_shape, src.device, chunk_voxels):
        grid = _normalised(coords, src_shape)[None]  # (1, X, Y, kc, 3)
        out = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
        yield zs, out[0]  # (C, X, Y, kc)


def argmax_resample_chunks(
    scores: torch.Tensor, index_map: np.ndarray, out_shape: Sequence[int], chunk_voxels: int = CHUNK_VOXELS
) -> Iterator[tuple[slice, torch.Tensor]]:
    """argmax over classes of the trilinearly resampled `scores`, without resampling most voxels.

    scores: (C, X, Y, Z) class scores; yields (slice of the output's last axis, (x, y, z_chunk) uint8).
    Exact shortcut: where all 8 source voxels around an output point share one argmax class c,
    every trilinear mix of them (the same convex weights for every channel) keeps class c on top,
    so the label is c. Only points in cells with mixed labels (organ borders, a few per cent of a
    CT) are resampled over all C channels. Same result as `resample_chunks` + argmax, several
    times faster and without a C-channel full-resolution array.
    """
    src_shape = torch.tensor(scores.shape[1:], device=scores.device)
    labels = scores.argmax(dim=0).to(torch.uint8)  # (X, Y, Z)
    # cell (a, b, c) spans voxels a..a+1 etc.; replicate the last voxel so a cell exists at the border.
    lab_f = F.pad(labels[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")
    hi = F.max_pool3d(lab_f, 2, stride=1)
    lo = -F.max_pool3d(-lab_f, 2, stride=1)
    mixed = (hi != lo)[0, 0]  # (X, Y, Z) cell has several labels
    strides = torch.tensor([labels.shape[1] * labels.shape[2], labels.shape[2], 1], device=scores.device)
    lab_flat, mixed_flat = labels.reshape(-1), mixed.reshape(-1)
    for zs, coords in _index_coords(index_map, out_shape, scores.device, chunk_voxels):
        coords = torch.minimum(coords.clamp_(min=0.0), (src_shape - 1).float())  # border padding
        cell = (coords.floor().long() * strides).sum(-1)  # (x, y, kc) flat index of the cell's low corner
        out = lab_flat[cell]
        need = mixed_flat[cell]
        if need.any():
            pts = coords[need]  # (N, 3)
            grid = _normalised(pts, scores.shape[1:])[None, :, None, None]  # (1, N, 1, 1, 3)
            vals = F.grid_sample(scores[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
            out[need] = vals[0, :, :, 0, 0].argmax(dim=0).to(torch.uint8)  # (C, N) -> (N,)
        yield zs, out


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """Sliding-window segmentation of whole volumes with a network and its model card.

    net:           a segmentation `nn.Module`, (B, 1, D, H, W) -> (B, C, D, H, W) logits.
    card:          its ModelCard (preprocessing, patch size, labels).
    device:        "cuda", "mps", "cpu" or None (auto: cuda > mps > cpu).
    overlap:       sliding-window overlap in [0, 1); None -> card.extra["overlap"] or 0.5.
    sw_batch_size: patches per forward pass; None -> card.extra["sw_batch_size"] or 4.
    tta:           flip test-time augmentation over `tta_axes` (2^len(axes) passes).
    tta_axes:      network-space (RAS) axes to mirror; default A-P and S-I only, because a left-right
                   mirror turns a left organ into a right one for a model that learned laterality.
    amp:           bf16 autocast; None -> on for CUDA, off (fp32) elsewhere.
    crop_to_body:  CT only: run the network on the body box and label the rest background.
    """

    def __init__(
        self,
        net: nn.Module,
        card: ModelCard,
        device: str | torch.device | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool = False,
        tta_axes: Sequence[int] = (1, 2),
        amp: bool | None = None,
        crop_to_body: bool = True,
    ) -> None:
        self.device = torch.device(device) if device is not None else auto_device()
        self.net = net.to(self.device).eval()
        # channels_last_3d on CPU: oneDNN's 3D convolutions run ~15 % faster in NDHWC (measured on
        # the bench's resenc_unet, 96^3 patches, 1.25-1.40 vs 1.59-1.60 CPU-s per patch). Not on
        # GPU: unmeasured there. Note: converts the given module's parameters in place.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.card = card
        self.overlap = float(card.extra.get("overlap", DEFAULT_OVERLAP) if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        # 4 patches per pass: on CPU 2-8 measured within noise of each other, 1 was ~20 % slower.
        self.sw_batch_size = int(card.extra.get("sw_batch_size", 4) if sw_batch_size is None else sw_batch_size)
        self.tta = bool(tta)
        self.tta_axes = tuple(int(a) for a in tta_axes)
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.crop_to_body = bool(crop_to_body)

    @classmethod
    def from_folder(
        cls,
        model_dir: str | os.PathLike[str],
        device: str | torch.device | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool = False,
        amp: bool | None = None,
    ) -> Predictor:
        """A Predictor for an exported model folder (model.safetensors + medct.json)."""
        dev = torch.device(device) if device is not None else auto_device()
        net, card = load_model_folder(model_dir, device="cpu")
        return cls(net, card, device=dev, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, amp=amp)

    def with_options(self, overlap: float | None = None, tta: bool | None = None) -> Predictor:
        """A shallow copy (same network) with another overlap and/or TTA setting."""
        other = copy.copy(self)
        if overlap is not None:
            if not 0.0 <= overlap < 1.0:
                raise ValueError(f"overlap must be in [0, 1), got {overlap}")
            other.overlap = float(overlap)
        if tta is not None:
            other.tta = bool(tta)
        return other

    @property
    def num_classes(self) -> int:
        return max(self.card.labels) + 1

    # -- public ------------------------------------------------------------------------------

    def predict(self, volume: Volume) -> Volume:
        """uint8 label map on the input's exact grid (same shape and affine, meta copied)."""
        labels = np.zeros(volume.shape, dtype=np.uint8)
        with torch.inference_mode():
            scores, out_map, lo, hi = self._network_scores(volume)
            for zs, lab in argmax_resample_chunks(scores, out_map, hi - lo + 1):
                labels[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] + zs.start : lo[2] + zs.stop] = lab.cpu().numpy()
        return volume.with_array(labels)

    def predict_proba(self, volume: Volume) -> Volume:
        """(X, Y, Z, C) float32 class probabilities on the input's exact grid (background 1 outside
        the body box). Memory: C x 4 bytes per input voxel; use `predict` for label maps."""
        proba = np.zeros((*volume.shape, self.num_classes), dtype=np.float32)
        proba[..., 0] = 1.0
        with torch.inference_mode():
            scores, out_map, lo, hi = self._network_scores(volume)
            for zs, chunk in resample_chunks(scores, out_map, hi - lo + 1):
                p = chunk if self.tta else torch.softmax(chunk, dim=0)  # TTA scores are probabilities already
                proba[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] + zs.start : lo[2] + zs.stop] = (
                    p.permute(1, 2, 3, 0).float().cpu().numpy()
                )
        return volume.with_array(proba)

    # -- steps -------------------------------------------------------------------------------

    def _check(self, volume: Volume) -> None:
        if volume.array.ndim != 3:
            raise InvalidVolumeError(
                f"{volume.meta.get('path', 'The volume')} has shape {volume.array.shape}; a 3D (X, Y, Z) volume is needed."
            )
        validate_for_inference(volume)

    def _network_scores(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Class scores on the network grid of the body box.

        Returns (C, D, H, W) scores (logits; mean probabilities with TTA), the (4, 4) map from
        input voxel index (relative to the box) to score index, and the box (lo, hi) in input voxels.
        """
        self._check(volume)
        pre = self.card.preprocessing
        full = network_grid(volume.affine, volume.shape, pre.spacing)
        if self.crop_to_body and pre.modality.upper() in ("CT", "CBCT"):
            in_lo, in_hi = body_box(volume)
        else:
            in_lo, in_hi = np.zeros(3, int), np.asarray(volume.shape) - 1
        in_to_net = np.linalg.inv(full.affine) @ volume.affine  # input index -> full network index
        net_lo, net_hi = map_box(in_to_net, in_lo, in_hi, full.shape)
        grid = full.crop(net_lo, net_hi)  # the network grid restricted to the body box

        x = self._network_input(volume, grid)  # (1, 1, D, H, W)
        scores = self._sliding_window(x)[0]  # (C, D, H, W)
        shift = np.eye(4)
        shift[:3, 3] = in_lo
        return scores, np.linalg.inv(grid.affine) @ volume.affine @ shift, in_lo, in_hi

    def _network_input(self, volume: Volume, grid: Grid) -> torch.Tensor:
        """(1, 1, D, H, W) float32 in [0, 1]: the input resampled onto `grid`, HU clipped and scaled."""
        pre = self.card.preprocessing
        grid_to_in = np.linalg.inv(volume.affine) @ grid.affine  # network index -> input index
        # Only the input voxels the grid touches (+1 for trilinear neighbours) are converted to float.
        lo, hi = map_box(grid_to_in, np.zeros(3), np.asarray(grid.shape) - 1, volume.shape)
        lo, hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, np.asarray(volume.shape) - 1)
        sub = np.asarray(volume.array[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1])
        src = torch.from_numpy(np.ascontiguousarray(sub, dtype=np.float32))[None]  # (1, x, y, z) HU
        if self.device.type == "cuda":
            src = src.to(self.device)
        shift = np.eye(4)
        shift[:3, 3] = -lo
        out = torch.empty((1, 1, *grid.shape), dtype=torch.float32, device=src.device)
        for zs, chunk in resample_chunks(src, shift @ grid_to_in, grid.shape):
            out[0, :, :, :, zs] = chunk
        # Same as MONAI ScaleIntensityRange(a_min, a_max, 0, 1, clip=True) after Spacingd.
        out.sub_(pre.hu_min).div_(pre.hu_max - pre.hu_min).clamp_(0.0, 1.0)
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, d, h, w) -> (B, C, d, h, w) float32 logits, or mean softmax over flips with TTA."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if not self.tta:
                return self.net(x).float()
            dims = [2 + a for a in self.tta_axes]
            flips = [list(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
            acc: torch.Tensor | None = None
            for f in flips:
                y = self.net(torch.flip(x, f) if f else x).float()
                p = torch.softmax(torch.flip(y, f) if f else y, dim=1)  # the flip is undone before averaging
                acc = p if acc is None else acc + p
            assert acc is not None
            return acc / len(flips)

    def _sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI sliding_window_inference with Gaussian blending; returns (1, C, D, H, W) float32."""
        from monai.inferers import sliding_window_inference

        def run(inputs: torch.Tensor, stitch: torch.device) -> torch.Tensor:
            with torch.inference_mode():
                out = sliding_window_inference(
                    inputs,
                    roi_size=self.card.patch_size,
                    sw_batch_size=self.sw_batch_size,
                    predictor=self._forward,
                    overlap=self.overlap,
                    mode="gaussian",
                    sw_device=self.device,
                    device=stitch,
                )
            return out  # type: ignore[return-value]

        if self.device.type != "cuda":
            return run(x, self.device)
        # Output + weight map in float32 on the GPU if they take under half its free memory,
        # else stitch in host memory (patches still run on the GPU).
        free, _ = torch.cuda.mem_get_info(self.device)
        need = (self.num_classes + 2) * x[0, 0].numel() * 4
        stitch = self.device if need < free // 2 else torch.device("cpu")
        try:
            return run(x, stitch)
        except torch.cuda.OutOfMemoryError:
            if stitch.type == "cpu":
                raise
            torch.cuda.empty_cache()
            return run(x.cpu(), torch.device("cpu"))
