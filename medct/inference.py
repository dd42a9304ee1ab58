"""Predictor: whole-volume segmentation with the input's exact geometry restored.

Pipeline of `Predictor.predict(volume)` = `finish(run(prepare(volume)))` (a folder run does
`prepare` on its reader thread and `finish` on its writer thread, overlapping the network):

1. Network grid (prepare): exactly MONAI's `Orientationd(RAS)` + `Spacingd(card spacing)` grid,
   computed as MONAI's `zoom_affine` / `compute_shape_offset` do (transcribed in medct.geometry,
   tested equal to MONAI's; obliquity is kept as MONAI keeps it).
2. One trilinear resample (float32) from the input voxels straight into that grid
   with the composed index->index affine, then HU clip/scale (as `medct.transforms`).
3. Sliding window (run): MONAI's tiles and Gaussian weights (`medct.sliding_window`) under
   `torch.inference_mode`; bf16 autocast where the device has bf16 (`medct.precision`: CUDA, CPUs
   with AMX / AVX-512 BF16), channels_last_3d on CPU; optional flip
   TTA (softmax averaged, each flip undone before averaging). CT/CBCT: the network runs on the box
   of the patient's body (a coarse HU > -500 mask without the couch, see `body_mask`, made in
   prepare) plus the margin training crops keep (as TotalSegmentator's --body_seg crops), and tiles
   in it that do not touch the body are neither run nor blended (see `Predictor`). Stitching moves
   to the CPU when the output would not fit on the GPU, and after a CUDA out-of-memory error.
4. Back to the input's own voxels (finish): trilinear interpolation of the class scores (logits; mean
   probabilities with TTA) then argmax, chunked along the last axis. Only points whose 8
   neighbouring network voxels disagree on the class are interpolated over all C channels:
   elsewhere the answer is provably that shared class (see `argmax_resample_chunks`).
   CT/CBCT: no label is written outside the patient's body (the same body mask, mapped to each
   input voxel); the labelled volume this removes is the label map's `meta["outside_body_ml"]`
   (summary.csv `outside_body_ml`). Off with `body_only=False` or the card's
   `inference["body_only"]: false`, for label sets that lie outside the body.
   Labels the card lists in `inference["keep_largest"]` keep only their largest connected
   component (nnU-Net's post-processing).
   Output: uint8 labels with the input's exact shape and affine (LPS, oblique, anisotropic, ...).

Why not MONAI's Compose + Invertd: those resample in float64 and invert full-resolution C-channel
logits (for a 512x512x134 CT and 12 classes: ~10 GB peak memory, ~25 s of post-processing on 2
cores); one composed float32 resample per direction samples the very same points.
bench/segment.py measures both on a real CT.

Refs: sliding-window Gaussian blending and mirroring TTA as in nnU-Net (Isensee et al., Nat.
Methods 2021); MONAI `sliding_window_inference`.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medct.body import BODY_HU, TISSUE_HU, BodyMask, body_mask, body_threshold
from medct.card import ModelCard
from medct.errors import ConfigError, InvalidVolumeError, ModelFolderError
from medct.geometry import (
    Grid,
    argmax_resample_chunks,
    axis_aligned,
    float_tensor,
    map_box,
    network_grid,
    resample_chunks,
    resample_separable,
)
from medct.io import check_hu, validate_for_inference
from medct.precision import Precision, autocast, channels_last, resolve_precision
from medct.predictor import auto_device, load_for_task, resolve_device
from medct.transforms import BODY_MARGIN_VOXELS

__all__ = [
    "DEFAULT_OVERLAP",
    "Predictor",
    "Prepared",
    "Scores",
    "auto_device",
    "check_flag",
    "check_overlap",
    "resolve_device",
]
from medct.sliding_window import DEFAULT_OVERLAP, check_overlap, sliding_window
from medct.volume import Volume


def check_flag(name: str, value: object) -> bool:
    """A True/False option; anything else (e.g. the string "no", which Python counts as true) is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def stitch_device(device: torch.device, num_classes: int, voxels: int, free_bytes: int) -> torch.device:
    """Where MONAI stitches the sliding-window output: on `device` if the float32 output and its
    weight map ((C + 2) x voxels x 4 bytes) take under half of its free memory, else in host memory
    (the patches still run on `device`)."""
    need = (num_classes + 2) * voxels * 4
    return device if need < free_bytes // 2 else torch.device("cpu")


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with each Conv -> BatchNorm pair folded into one convolution
    (torch.fx's `fuse`), or `net` itself when it has no BatchNorm or cannot be traced by torch.fx.

    Same outputs up to float rounding (~1e-5); saves one pass over every activation per folded
    pair: ~8 % of the bench UNet's CPU time per 96^3 tile (0.206 vs 0.223 s, measured). Instance
    norm (resenc_unet, segresnet) normalises by each input's own statistics and cannot be folded.
    """
    from torch.fx.experimental.optimization import fuse

    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # no running statistics (TENT's batch statistics, `track_running_stats=False`): nothing to fold
    if net.training or not norms or any(m.running_mean is None for m in norms):
        return net
    try:
        return fuse(net)
    # A network whose forward has data-dependent Python control flow cannot be traced symbolically;
    # fx raises a variety of errors for that. Folding is only a speed-up, so run it unfolded.
    except Exception:  # noqa: BLE001
        return net


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` in channels_last_3d layout. With one channel a contiguous (B, 1, D, H, W) tensor already
    has that memory order: only the channel stride is restated (no copy; `.contiguous(...)` copied,
    37 ms per batch of four 96^3 patches)."""
    if x.shape[1] == 1 and x.is_contiguous():
        return x.as_strided(x.shape, (x.stride(0), 1, *x.stride()[2:]))
    return x.contiguous(memory_format=torch.channels_last_3d)


def outside_body(
    mask: BodyMask, index_map: np.ndarray, lo: np.ndarray, idx: np.ndarray, values: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bool: which input voxels `idx` (N, 3) lie outside the body `mask` (on the network grid;
    `index_map` takes an input index relative to `lo` to a network index, as `Scores` holds it).
    With `values` (N,), the voxels' own input values: on the mask's fringe (its outline's layer, whose
    cells are as coarse as the network grid, 4 mm for a 4 mm model, and what no tissue encloses, such
    as a couch pad), a voxel must itself be tissue (> TISSUE_HU,
    -250 HU: skin and fat are, air, a couch pad and the couch's carbon skin are not) to count as
    inside, so no label rim is left on what lies against the skin."""
    net = (idx - np.asarray(lo)) @ index_map[:3, :3].T + index_map[:3, 3]  # (N, 3) network voxel index
    coarse = np.rint(net).astype(np.int64) // mask.stride
    coarse = np.clip(coarse, 0, np.asarray(mask.inside.shape) - 1)
    c = (coarse[:, 0], coarse[:, 1], coarse[:, 2])
    out = ~mask.inside[c]
    if values is not None and mask.fringe is not None:
        out |= mask.fringe[c] & (values <= TISSUE_HU)
    return out


def clear_outside_body(
    box: np.ndarray, mask: BodyMask, index_map: np.ndarray, values: np.ndarray | None = None, slab: int = 16
) -> int:
    """Set the labels of `box` (the input voxels Scores covers, edited in place) outside the body to
    background; returns how many labelled voxels that cleared. `values`: the input's values on the
    same box (see `outside_body`). Only labelled voxels are looked up, `slab` axial slices at a
    time (memory stays bounded on large scans)."""
    removed = 0
    for z0 in range(0, box.shape[2], slab):
        part = box[:, :, z0 : z0 + slab]  # a view
        idx = np.argwhere(part != 0)  # (N, 3) labelled voxels of the slab
        if len(idx) == 0:
            continue
        idx[:, 2] += z0
        own = None if values is None else np.asarray(values[idx[:, 0], idx[:, 1], idx[:, 2]], dtype=np.float32)
        out = outside_body(mask, index_map, np.zeros(3, np.int64), idx, own)
        hit = idx[out]
        box[hit[:, 0], hit[:, 1], hit[:, 2]] = 0
        removed += len(hit)
    return removed


def keep_largest_components(labels: np.ndarray, label_ids: Sequence[int]) -> None:
    """In place: for each of `label_ids`, only its largest 26-connected component keeps the label;
    the other components become background (0).

    scipy.ndimage rather than MONAI's KeepLargestConnectedComponent: that one needs scikit-image
    (or cuCIM), which is not a medct dependency, and would import all of MONAI into inference."""
    from scipy import ndimage

    for i in label_ids:
        components, n = ndimage.label(labels == i, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[(components != 0) & (components != int(sizes.argmax()))] = 0


@dataclass(frozen=True)
class Prepared:
    """`Predictor.prepare`'s result: the input, its network grid, the network input
    (1, 1, D, H, W) float32 in [0, 1], the body mask on that grid (None: run every tile; empty:
    an all-air input, run none) and notes for the user."""

    volume: Volume
    grid: Grid
    x: torch.Tensor
    body: BodyMask | None
    notes: tuple[str, ...] = ()  # what a user should know about this case (summary.csv "note")
    mask: BodyMask | None = None  # body_only: where labels may be written (None: everywhere)


@dataclass(frozen=True)
class Scores:
    """`Predictor.run`'s result: (C, D, H, W) class scores on the network grid (logits; mean
    probabilities with TTA), the (4, 4) map from input voxel index (relative to `lo`) to score
    index, and the input box [lo, hi] outside of which every label is background (only skipped
    tiles cover it)."""

    volume: Volume
    scores: torch.Tensor
    index_map: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    notes: tuple[str, ...] = ()
    mask: BodyMask | None = None  # body_only: where labels may be written, on the network grid


DEFAULT_BF16_TOLERANCE = 0.99  # mean label Dice bf16 vs fp32 below which a model runs in fp32


@dataclass
class BF16Check:
    """The bf16-vs-fp32 label check of a model not validated in bf16 (`Predictor`, precision auto).
    Mutable on purpose: the Predictor's shallow copies share it, so a run checks once."""

    pending: bool
    tolerance: float
    dice: float | None = None  # the measured agreement, once checked
    failed: bool = False  # True: bf16 labels were off, the model runs in fp32


def label_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Dice (`medct.metrics.dice_per_label`) over the foreground labels present in either
    label map; 1.0 when neither has one."""
    from medct.metrics import dice_per_label

    dice = dice_per_label(a.cpu().numpy(), b.cpu().numpy())
    return float(np.mean(list(dice.values()))) if dice else 1.0


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """Sliding-window segmentation of whole volumes with a network and its model card.

    net:           a segmentation `nn.Module`, (B, 1, D, H, W) -> (B, C, D, H, W) logits.
    card:          its ModelCard (preprocessing, patch size, labels).
    device:        "cuda", "mps", "cpu" or None (auto: cuda > mps > cpu).
    overlap:       sliding-window overlap in [0, 1); None -> card.inference["overlap"] or 0.5.
    sw_batch_size: patches per forward pass; None -> card.inference["sw_batch_size"] or 4.
    tta:           flip test-time augmentation over `tta_axes` (2^len(axes) passes).
    tta_axes:      network-space (RAS) axes to mirror; default A-P and S-I only, because a left-right
                   mirror turns a left organ into a right one for a model that learned laterality.
    precision:     "auto" (None), "bf16" or "fp32": `medct.precision.resolve_precision` for the device.
                   With auto on a bf16 device, a model whose card does not say it was validated in
                   bf16 (`inference["precision"]`) is checked on the first volume it runs: if its
                   bf16 labels agree with its fp32 labels by less than the card's
                   `inference["bf16_tolerance"]` (mean Dice, default 0.99) it runs in fp32 from
                   then on, and that case's notes say so (`BF16Check`).
    keep_largest:  label names of which only the largest connected component (26-connected) is
                   kept, the rest set to background (nnU-Net's post-processing); None ->
                   card.inference["keep_largest"] or none.
    skip_air:      CT/CBCT: the network runs on the box of the patient's body (see `body_mask`) plus
                   the margin training crops keep (`BODY_MARGIN_VOXELS`), and only on the tiles in
                   it that touch the body; what only skipped tiles cover (air, couch) is background.
                   So the network sees no more air around the body than in training (a model trained
                   on body crops labels air it never saw), and a wide field of view costs nothing.
                   The tiles start at the box, so scores differ from a whole-grid run (False) by the
                   blending of other tile positions. `predict_proba` always runs the whole grid.
    body_only:     CT/CBCT only: no label outside the patient's body (`body_mask`: couch removed,
                   holes filled); None -> card.inference["body_only"] or True. A model trained on
                   clean phantom air otherwise labels the air and couch of real scans (issue 39).
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
        precision: str | None = None,
        keep_largest: Sequence[str] | None = None,
        skip_air: bool = True,
        body_only: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.net = fold_batch_norm(net.to(self.device).eval())
        # channels_last_3d on CPU: oneDNN's 3D convolutions run ~15 % faster in NDHWC (measured on
        # the bench's resenc_unet, 96^3 patches, 1.25-1.40 vs 1.59-1.60 CPU-s per patch). Not on
        # GPU: unmeasured there. Note: converts the given module's parameters in place.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.net = channels_last(self.net)
        self.card = card
        if card.task != "segmentation":
            raise ModelFolderError(f"This is a '{card.task}' model; segmentation needs a 'segmentation' model.")
        self.overlap = check_overlap(card.inference.get("overlap", DEFAULT_OVERLAP) if overlap is None else overlap)
        # 4 patches per pass: on CPU 2-8 measured within noise of each other, 1 was ~20 % slower.
        batch = card.inference.get("sw_batch_size", 4) if sw_batch_size is None else sw_batch_size
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ConfigError(f"sw_batch_size must be a whole number >= 1, got {batch!r}.")
        self.sw_batch_size = int(batch)
        self.tta = check_flag("tta", tta)
        self.tta_axes = tuple(int(a) for a in tta_axes)
        self.precision: Precision = resolve_precision(precision, self.device)
        validated = card.inference.get("precision") == "bf16"
        # shared by the shallow copies (with_net, with_options): a run checks its model once
        self.bf16_check = BF16Check(
            pending=self.precision == "bf16" and precision in (None, "auto") and not validated,
            tolerance=float(card.inference.get("bf16_tolerance", DEFAULT_BF16_TOLERANCE)),
        )
        self.skip_air = bool(skip_air)
        self.body_only = check_flag(
            "body_only", card.inference.get("body_only", True) if body_only is None else body_only
        )
        names = card.inference.get("keep_largest", []) if keep_largest is None else keep_largest
        ids = {name: i for i, name in card.labels.items() if i != 0}
        unknown = [n for n in names if n not in ids]
        if unknown:
            raise ModelFolderError(
                f"keep_largest names {unknown}, which are not labels of this model ({', '.join(ids)})."
            )
        self.keep_largest = tuple(ids[n] for n in names)
        # seconds spent in network forward passes so far (the bench's "network time"; CUDA synchronised)
        self.forward_seconds = 0.0

    @classmethod
    def from_folder(
        cls,
        model_dir: str | os.PathLike[str],
        device: str | torch.device | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool = False,
        precision: str | None = None,
        body_only: bool | None = None,
    ) -> Predictor:
        """A Predictor for an exported model folder (model.safetensors + medct.json)."""
        net, card, dev = load_for_task(model_dir, "segmentation", "segmentation", device)
        return cls(
            net, card, device=dev, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, precision=precision,
            body_only=body_only,
        )  # fmt: skip

    def with_options(
        self, overlap: float | None = None, tta: bool | None = None, body_only: bool | None = None
    ) -> Predictor:
        """A shallow copy (same network) with another overlap, TTA or body constraint setting."""
        other = copy.copy(self)
        if body_only is not None:
            other.body_only = check_flag("body_only", body_only)
        if overlap is not None:
            other.overlap = check_overlap(overlap)
        if tta is not None:
            other.tta = check_flag("tta", tta)
        return other

    def with_net(self, net: nn.Module) -> Predictor:
        """A shallow copy that runs another network of the same card (e.g. a test-time-adapted copy):
        moved to the device, eval mode, batch norm folded, channels_last on CPU, as in __init__."""
        other = copy.copy(self)
        other.net = fold_batch_norm(net.to(self.device).eval())
        if self.channels_last:
            other.net = channels_last(other.net)
        other.forward_seconds = 0.0
        return other

    @property
    def num_classes(self) -> int:
        return max(self.card.labels) + 1

    # -- public ------------------------------------------------------------------------------

    def predict(self, volume: Volume) -> Volume:
        """uint8 label map on the input's exact grid (same shape and affine, meta copied); what a
        user should know about the case (e.g. an all-air input) comes as a UserWarning."""
        scores = self.run(self.prepare(volume))
        for note in scores.notes:
            warnings.warn(f"{volume.meta.get('path', 'the volume')}: {note}", UserWarning, stacklevel=2)
        return self.finish(scores)

    def predict_proba(self, volume: Volume) -> Volume:
        """(X, Y, Z, C) float32 class probabilities on the input's exact grid (every tile is run).
        Memory: C x 4 bytes per input voxel; use `predict` for label maps."""
        prepared = self.prepare(volume, skip_air=False)
        proba = np.zeros((*volume.shape, self.num_classes), dtype=np.float32)
        if prepared.body is not None and prepared.body.empty:  # all air: certainly background
            proba[..., 0] = 1.0
            return volume.with_array(proba)
        scores = self.run(prepared)
        lo, hi = scores.lo, scores.hi
        with torch.inference_mode():
            for zs, chunk in resample_chunks(scores.scores, scores.index_map, hi - lo + 1):
                p = chunk if self.tta else torch.softmax(chunk, dim=0)  # TTA scores are probabilities already
                proba[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] + zs.start : lo[2] + zs.stop] = (
                    p.permute(1, 2, 3, 0).float().cpu().numpy()
                )
        if prepared.mask is not None:  # outside the body: certainly background
            for z0 in range(0, volume.shape[2], 8):
                part = proba[:, :, z0 : z0 + 8]  # a view
                idx = np.argwhere(np.ones(part.shape[:3], bool))  # (N, 3) every voxel of the slab
                idx[:, 2] += z0
                own = np.asarray(volume.array[:, :, z0 : z0 + 8], dtype=np.float32).reshape(-1)
                out = outside_body(prepared.mask, scores.index_map, scores.lo, idx, own).reshape(part.shape[:3])
                part[out] = 0.0
                part[out, 0] = 1.0
        return volume.with_array(proba)

    # -- the three steps of predict: a folder run overlaps prepare and finish with the network --

    def prepare(self, volume: Volume, skip_air: bool | None = None) -> Prepared:
        """Check the input, resample it onto the network grid and scale it, find the body (CT)."""
        self._check(volume)
        pre = self.card.preprocessing
        grid = network_grid(volume.affine, volume.shape, pre.spacing)
        with torch.inference_mode():
            x = self._network_input(volume, grid)  # (1, 1, D, H, W)
        body, mask, notes = None, None, tuple(str(n) for n in volume.meta.get("notes", ()))  # e.g. the reader's
        if pre.modality.upper() in ("CT", "CBCT"):
            threshold = body_threshold(pre.hu_min, pre.hu_max)  # BODY_HU on the network's [0, 1] scale
            tissue = body_threshold(pre.hu_min, pre.hu_max, TISSUE_HU)
            body = body_mask(x[0, 0].cpu().numpy(), pre.spacing, threshold, tissue)
            mask = body if self.body_only and not body.empty else None
            if body.empty:  # nothing but air: no organ can be there, whatever a network would say
                notes += (f"no body found (no voxel above {BODY_HU:g} HU): empty label map",)
            elif not (self.skip_air if skip_air is None else skip_air):
                body = None
        if (
            body is not None
            and not body.empty
            and any(g < p for g, p in zip(grid.shape, self.card.patch_size, strict=True))
        ):
            body = None  # MONAI pads volumes smaller than a patch into one tile: always run it
        return Prepared(volume, grid, x, body, notes, mask)

    def run(self, prepared: Prepared) -> Scores:
        """The network over the tiles that touch the body: class scores on the network grid."""
        volume, grid, body = prepared.volume, prepared.grid, prepared.body
        if body is not None and body.empty:  # all air: background everywhere, no tile runs
            zeros = torch.zeros((self.num_classes, 1, 1, 1))
            zeros[0] = 1.0
            return Scores(volume, zeros, np.eye(4), np.zeros(3, int), np.zeros(3, int), prepared.notes)
        grid_to_in = np.linalg.inv(volume.affine) @ grid.affine  # network index -> input index
        x, mask = prepared.x, prepared.mask
        if body is not None:  # the body's box plus the margin training crops keep (TotalSegmentator's
            # --body_seg crop): the network never sees more air than it was trained with, and less runs
            lo_g, hi_g = body.crop_box(grid.shape, BODY_MARGIN_VOXELS, self.card.patch_size)
            x = x[:, :, lo_g[0] : hi_g[0], lo_g[1] : hi_g[1], lo_g[2] : hi_g[2]].contiguous()
            body, mask = body.shifted(lo_g), None if mask is None else mask.shifted(lo_g)
            to_grid = np.eye(4)
            to_grid[:3, 3] = lo_g
            grid_to_in = grid_to_in @ to_grid  # from here on "network index" is an index of the crop
        ran: list[tuple[np.ndarray, np.ndarray]] = []  # network-index boxes of the tiles that ran

        def keep(tile: tuple[slice, ...]) -> bool:
            lo, hi = np.array([t.start for t in tile]), np.array([t.stop - 1 for t in tile])
            if body is None or body.touches(lo, hi):
                ran.append((lo, hi))
                return True
            return False

        notes = prepared.notes
        with torch.inference_mode():
            scores = self._sliding_window(x, keep)[0]  # (C, D, H, W)
            if self.bf16_check.pending:
                scores, note = self._check_bf16(scores, x, keep)
                notes = (*notes, note) if note else notes
        if ran:  # only the input voxels some computed tile covers can be other than background
            lo, hi = map_box(grid_to_in, np.min([b[0] for b in ran], 0), np.max([b[1] for b in ran], 0), volume.shape)
        else:
            lo, hi = np.zeros(3, int), np.zeros(3, int)
        shift = np.eye(4)
        shift[:3, 3] = lo
        return Scores(volume, scores, np.linalg.inv(grid_to_in) @ shift, lo, hi, notes, mask)

    def finish(self, scores: Scores) -> Volume:
        """Class scores -> uint8 label map on the input's exact grid (trilinear scores, argmax)."""
        volume, lo, hi = scores.volume, scores.lo, scores.hi
        labels = np.zeros(volume.shape, dtype=np.uint8)
        with torch.inference_mode():
            for zs, lab in argmax_resample_chunks(scores.scores, scores.index_map, hi - lo + 1):
                labels[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] + zs.start : lo[2] + zs.stop] = lab.cpu().numpy()
        box = labels[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]  # a view: edited in place
        removed = 0
        if scores.mask is not None:
            values = volume.array[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
            removed = clear_outside_body(box, scores.mask, scores.index_map, values)
        if self.keep_largest:
            keep_largest_components(box, self.keep_largest)
        out = volume.with_array(labels)
        if scores.mask is not None:
            out.meta["outside_body_ml"] = removed * abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _check(self, volume: Volume) -> None:
        if volume.array.ndim != 3:
            raise InvalidVolumeError(
                f"{volume.meta.get('path', 'The volume')} has shape {volume.array.shape}; a 3D (X, Y, Z) volume is needed."
            )
        validate_for_inference(volume)
        if self.card.preprocessing.modality.upper() == "CT":  # CBCT is not HU-calibrated; MR has no HU
            check_hu(volume)

    def _network_input(self, volume: Volume, grid: Grid) -> torch.Tensor:
        """(1, 1, D, H, W) float32 in [0, 1]: the input resampled onto `grid`, HU clipped and scaled."""
        pre = self.card.preprocessing
        grid_to_in = np.linalg.inv(volume.affine) @ grid.affine  # network index -> input index
        # Only the input voxels the grid touches (+1 for trilinear neighbours) are converted to float.
        lo, hi = map_box(grid_to_in, np.zeros(3), np.asarray(grid.shape) - 1, volume.shape)
        lo, hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, np.asarray(volume.shape) - 1)
        sub = np.asarray(volume.array[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1])
        src = float_tensor(sub)[None]  # (1, x, y, z) HU, in the array's own memory order
        if self.device.type == "cuda":
            src = src.to(self.device)
        shift = np.eye(4)
        shift[:3, 3] = -lo
        index_map = shift @ grid_to_in
        if axis_aligned(index_map):  # the usual case: RAS/LPS/... scans, only flips and scaling
            out = resample_separable(src, index_map, grid.shape)[None]
        else:
            out = torch.empty((1, 1, *grid.shape), dtype=torch.float32, device=src.device)
            for zs, chunk in resample_chunks(src, index_map, grid.shape):
                out[0, :, :, :, zs] = chunk
        # Same as MONAI ScaleIntensityRange(a_min, a_max, 0, 1, clip=True) after Spacingd.
        out.sub_(pre.hu_min).div_(pre.hu_max - pre.hu_min).clamp_(
            0.0, 1.0
        )  # medct.intensity.scale_window, in place on the tensor
        return out

    @property
    def run_precision(self) -> Precision:
        """The precision the network runs at now: `precision`, or fp32 after a failed bf16 check."""
        return "fp32" if self.bf16_check.failed else self.precision

    def _forward(self, x: torch.Tensor, precision: Precision | None = None) -> torch.Tensor:
        """(B, 1, d, h, w) -> (B, C, d, h, w) float32 logits, or mean softmax over flips with TTA."""
        start = time.perf_counter()
        try:
            return self._forward_untimed(x, precision or self.run_precision)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.forward_seconds += time.perf_counter() - start

    def _forward_untimed(self, x: torch.Tensor, precision: Precision) -> torch.Tensor:
        if self.channels_last:
            x = _channels_last(x)
        with autocast(self.device, precision):
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

    def _check_bf16(
        self, scores: torch.Tensor, x: torch.Tensor, keep: Callable[[tuple[slice, ...]], bool]
    ) -> tuple[torch.Tensor, str | None]:
        """The first volume of a model not validated in bf16: run it in fp32 too and compare the
        labels (argmax, `label_agreement`); below the tolerance, fp32 from now on and this case's fp32
        scores. (scores, the note for the case or None)."""
        check = self.bf16_check
        check.pending = False
        reference = self._sliding_window(x, keep, "fp32")[0]
        dice = label_agreement(scores.argmax(0), reference.argmax(0))
        check.dice = dice
        if dice >= check.tolerance:
            return scores, None
        check.failed = True
        return reference, (
            f"bf16 labels of this model differ from fp32 (mean Dice {dice:.3f} < the card's tolerance "
            f"{check.tolerance:g}): it runs in fp32"
        )

    def _sliding_window(
        self, x: torch.Tensor, keep: Callable[[tuple[slice, ...]], bool], precision: Precision | None = None
    ) -> torch.Tensor:
        """Gaussian-blended sliding window over the tiles `keep` accepts; (1, C, D, H, W) float32.

        medct.sliding_window (MONAI's tiles and weights, rejected tiles neither run nor blended);
        MONAI's sliding_window_inference itself for volumes smaller than a patch, which it pads.
        """
        patch = tuple(self.card.patch_size)

        def forward(tiles: torch.Tensor) -> torch.Tensor:
            return self._forward(tiles, precision)

        def run(inputs: torch.Tensor, stitch: torch.device) -> torch.Tensor:
            if any(g < p for g, p in zip(inputs.shape[2:], patch, strict=True)):
                from monai.inferers import sliding_window_inference

                full = (slice(0, int(g)) for g in inputs.shape[2:])
                keep(tuple(full))  # records the one padded tile (body is None here)
                out = sliding_window_inference(
                    inputs, patch, self.sw_batch_size, forward, self.overlap, mode="gaussian",
                    sw_device=self.device, device=stitch,
                )  # fmt: skip
                return out  # type: ignore[return-value]
            return sliding_window(
                inputs, patch, self.overlap, self.sw_batch_size, forward, self.num_classes,
                keep=keep, tile_device=self.device, device=stitch, channels_last=self.channels_last,
            )  # fmt: skip

        if self.device.type != "cuda":
            return run(x, self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        stitch = stitch_device(self.device, self.num_classes, x[0, 0].numel(), free)
        try:
            return run(x, stitch)
        except torch.cuda.OutOfMemoryError:
            if stitch.type == "cpu":
                raise
            torch.cuda.empty_cache()
            return run(x.cpu(), torch.device("cpu"))
