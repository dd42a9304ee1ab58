"""Data-set reduction for pretraining: drop near-duplicate axial slices before SSL.

Wolf et al., "Less is More: Selective Reduction of CT Data for Self-Supervised Pre-Training of
Deep Learning Models with Contrastive Learning Improves Downstream Classification Performance",
2024. Consecutive CT slices are nearly identical; removing the redundant ones shortens
pretraining and (in their study) improves downstream results. Their best setting: a 64-bit
perceptual difference hash (dHash) per slice, and slices whose hash lies within Hamming distance
<= 6 of a kept slice are dropped. The embedding variant keeps a slice unless its embedding has
cosine similarity >= `threshold` with a kept one.

  * `dhash(slice)`: Krawetz's dHash (as `imagehash.dhash`): the slice averaged down to 8 x 9
    pixels, one bit per horizontally adjacent pair (left brighter than right) -> 64 bits.
  * `greedy_keep(codes, close)`: in slice order, keep the first remaining slice and drop every
    remaining slice close to it; repeat. Runs over all slices of the data set at once, so a
    re-scan of the same anatomy in another volume is caught too.
  * `reduce_datalist(items)`: per volume, the kept axial slice indices (along the volume's stored
    axis nearest to S-I, `axial_axis`) as an MSD datalist entry {"image": ..., "slices": [...]}.
    `medct.data.VolumeDataModule` reads that list and centres every training crop on a kept slice
    (`medct.transforms.generic_transforms`); volumes with no kept slice are left out.

A 3D method samples crops, not slices, so the time saved is the share of crop centres removed:
at a fixed number of epochs (or with steps scaled by the data), pretraining takes `kept_fraction`
of the time; `medct reduce` reports both. Slices are hashed in the HU window [-1000, 1000].
Hashes are written by hand (the `imagehash` package needs PIL and a per-slice round trip).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HASH_HAMMING = 6  # Wolf et al.'s best dHash setting
HU_WINDOW = (-1000.0, 1000.0)


def axial_axis(affine: np.ndarray) -> int:
    """The stored voxel axis whose direction is closest to S-I (RAS row 2 of the affine)."""
    direction = np.asarray(affine, dtype=np.float64)[:3, :3]
    direction = direction / np.linalg.norm(direction, axis=0, keepdims=True)
    return int(np.argmax(np.abs(direction[2])))


def _area_resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean over a rows x cols grid of blocks (an area / antialiased down-sampling)."""
    r_edges = np.linspace(0, img.shape[0], rows + 1).round().astype(int)
    c_edges = np.linspace(0, img.shape[1], cols + 1).round().astype(int)
    out = np.empty((rows, cols), dtype=np.float64)
    for i in range(rows):
        for j in range(cols):
            block = img[
                r_edges[i] : max(r_edges[i + 1], r_edges[i] + 1), c_edges[j] : max(c_edges[j + 1], c_edges[j] + 1)
            ]
            out[i, j] = block.mean()
    return out


def dhash(img: np.ndarray, size: int = 8) -> int:
    """64-bit difference hash of a 2D slice (size x size bits)."""
    small = _area_resize(np.asarray(img, dtype=np.float64), size, size + 1)  # (8, 9)
    bits = (small[:, :-1] > small[:, 1:]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def greedy_keep(n: int, close: Callable[[int, int], bool]) -> list[int]:
    """Indices kept by the greedy rule: keep the first remaining item, drop the remaining ones close to it."""
    remaining = list(range(n))
    kept: list[int] = []
    while remaining:
        first = remaining.pop(0)
        kept.append(first)
        remaining = [i for i in remaining if not close(first, i)]
    return kept


def slice_hashes(array: np.ndarray, axis: int) -> list[int]:
    """dHash of every slice of `array` along `axis`, in the HU window."""
    lo, hi = HU_WINDOW
    windowed = np.clip(np.asarray(array, dtype=np.float32), lo, hi)
    return [dhash(np.take(windowed, k, axis=axis)) for k in range(array.shape[axis])]


def slice_embeddings(array: np.ndarray, axis: int, embed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(n_slices, d) unit-norm embeddings from `embed(slice)`."""
    lo, hi = HU_WINDOW
    windowed = np.clip(np.asarray(array, dtype=np.float32), lo, hi)
    vecs = np.stack(
        [np.asarray(embed(np.take(windowed, k, axis=axis)), dtype=np.float64) for k in range(array.shape[axis])]
    )
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def thumbnail_embedding(img: np.ndarray, side: int = 32) -> np.ndarray:
    """A fixed slice embedding: the slice averaged down to side x side, zero-mean (cosine compares shape)."""
    small = _area_resize(img, side, side).flatten()
    return small - small.mean()


@dataclass
class Reduction:
    """What `reduce_datalist` kept."""

    items: list[dict[str, Any]]  # the reduced datalist: entries with "slices"; volumes with none dropped
    total_slices: int
    kept_slices: int
    per_volume: list[tuple[str, int, int]] = field(default_factory=list)  # (image, kept, total)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, the one-sentence reason) not read

    @property
    def kept_fraction(self) -> float:
        return self.kept_slices / max(self.total_slices, 1)


def reduce_datalist(
    items: Sequence[dict[str, Any]],
    method: str = "dhash",
    max_hamming: int = HASH_HAMMING,
    threshold: float = 0.95,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    read: Callable[[str], Any] | None = None,
) -> Reduction:
    """Greedy redundancy reduction over all axial slices of `items` (module docstring).

    method "dhash": slices within `max_hamming` bits of a kept slice are dropped; "embedding":
    slices whose embedding (`embed`, default `thumbnail_embedding`) has cosine >= `threshold` with
    a kept one. `read(path) -> Volume` defaults to `medct.io.read_volume`. A volume that cannot be
    read (any MedCTError) is left out and listed in `failed`; the others are reduced.
    """
    from medct.errors import ConfigError, MedCTError

    if method not in ("dhash", "embedding"):
        raise ConfigError(f"The reduction method must be dhash or embedding, got '{method}'.")
    if read is None:
        from medct.io import read_volume as read
    owner: list[tuple[int, int]] = []  # (volume index, slice index) of every slice in the data set
    codes: list[int] = []
    vecs: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    for v, item in enumerate(items):
        try:
            vol = read(str(item["image"]))
        except MedCTError as e:
            failed.append((str(item["image"]), str(e)))
            continue
        axis = axial_axis(vol.affine)
        n = vol.array.shape[axis]
        owner += [(v, k) for k in range(n)]
        if method == "dhash":
            codes += slice_hashes(vol.array, axis)
        else:
            vecs.append(slice_embeddings(vol.array, axis, embed or thumbnail_embedding))
    if not owner:
        raise MedCTError(f"None of the {len(items)} volumes could be read (e.g. {failed[0][1].rstrip('.')}).")
    if method == "dhash":
        kept = greedy_keep(len(codes), lambda i, j: hamming(codes[i], codes[j]) <= max_hamming)
    else:
        emb = np.concatenate(vecs)
        kept = greedy_keep(len(emb), lambda i, j: float(emb[i] @ emb[j]) >= threshold)
    by_volume: dict[int, list[int]] = {}
    for i in kept:
        v, k = owner[i]
        by_volume.setdefault(v, []).append(k)
    totals: dict[int, int] = {}
    for v, _ in owner:
        totals[v] = totals.get(v, 0) + 1
    out, per_volume = [], []
    unread = {path for path, _ in failed}
    for v, item in enumerate(items):
        if str(item["image"]) in unread:
            continue
        slices = sorted(by_volume.get(v, []))
        per_volume.append((str(item["image"]), len(slices), totals.get(v, 0)))
        if slices:
            out.append({**item, "slices": slices})
    return Reduction(out, len(owner), len(kept), per_volume, failed)


def write_reduced_datalist(reduction: Reduction, out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """An MSD-style JSON (paths absolute) with the reduced "training" list and a "reduction" summary."""
    import json

    from medct.paths import write_text_atomic

    doc = {
        "training": reduction.items,
        "reduction": {
            **meta,
            "total_slices": reduction.total_slices,
            "kept_slices": reduction.kept_slices,
            "kept_fraction": reduction.kept_fraction,
        },
    }
    path = Path(out)
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    return path


def encoder_embedding(encoder_dir: str | os.PathLike[str], side: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """Slice embeddings from a medct encoder folder: the slice (averaged down to side x side, in the
    card's HU window) repeated into a slab as thick as the encoder's total stride, every stage
    average-pooled and concatenated (the contrastive embedding of `medct.pretrain.contrastive`)."""
    import torch

    from medct.checkpoint import read_model_card
    from medct.nets import load_encoder_folder
    from medct.transforms import scale_intensity

    card = read_model_card(encoder_dir)
    net, _ = load_encoder_folder(encoder_dir)
    pre = card.preprocessing
    depth = 2 ** max(1, len(net.encoder_features(torch.zeros(1, 1, side, side, side))) - 1)

    def embed(img: np.ndarray) -> np.ndarray:
        small = _area_resize(img, side, side)
        scaled = scale_intensity(small, pre)
        slab = torch.from_numpy(scaled)[None, None, :, :, None].expand(1, 1, side, side, depth).contiguous()
        with torch.inference_mode():
            feats = net.encoder_features(slab)
        return torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)[0].numpy()

    return embed
