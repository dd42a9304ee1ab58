"""Quick-look PNG of a volume and its labels: axial, coronal and sagittal planes side by side.

Display conventions (radiological, as PACS viewers show CT):
- axial: seen from the feet, patient's right on the image left, anterior up;
- coronal: seen from the front, patient's right on the image left, head up;
- sagittal: seen from the patient's left, anterior on the image left, head up.
The volume is first reoriented to RAS with nibabel's orientation tools (so any file axis order,
LPS or oblique-ish direction displays upright) and every plane is drawn with its physical
aspect ratio from the voxel spacing. Planes pass through the labels' centroid (or the volume
centre). Labels are overlaid with the tab20 colours but grey; the PNG is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medct.errors import GeometryMismatchError
from medct.paths import atomic_file
from medct.volume import Volume


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array reoriented so i->R, j->A, k->S, its (3,) spacing) using the closest axis codes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # file axes -> closest RAS axes
    ras = nib.orientations.apply_orientation(array, ornt)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ras_spacing = np.empty(3)
    for src_axis, (dst_axis, _) in enumerate(ornt):
        ras_spacing[int(dst_axis)] = spacing[src_axis]
    return ras, ras_spacing


def _planes(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """The three display images (rows, cols) of a RAS array, in radiological orientation."""
    i, j, k = centre
    return [
        vol[::-1, ::-1, k].T,  # axial: rows A (top) -> P, cols R (left) -> L
        vol[::-1, j, ::-1].T,  # coronal: rows S -> I, cols R -> L
        vol[i, ::-1, ::-1].T,  # sagittal: rows S -> I, cols A -> P
    ]


def save_preview(
    image: Volume,
    labels: Volume | None,
    path: str | os.PathLike[str],
    window: tuple[float, float] = (-160.0, 240.0),
    label_names: dict[int, str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG with the axial, coronal and sagittal planes of `image` (HU `window`) and `labels`.

    labels must share the image's grid (GeometryMismatchError otherwise); label_names adds a legend.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if labels is not None and (labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-3)):
        raise GeometryMismatchError("The labels and the image of a preview must share one voxel grid.")
    img, spacing = _to_ras(np.asarray(image.array), image.affine)
    lab = None if labels is None else _to_ras(np.asarray(labels.array).astype(np.int64), labels.affine)[0]
    if lab is not None and lab.any():
        centre = tuple(int(round(c)) for c in np.argwhere(lab > 0).mean(axis=0))
    else:
        centre = tuple(s // 2 for s in img.shape)
    si, sj, sk = spacing
    aspects = [sj / si, sk / si, sk / sj]  # pixel height / width of each display plane
    names = ["axial", "coronal", "sagittal"]

    img_planes = _planes(img, centre)  # type: ignore[arg-type]
    lab_planes = _planes(lab, centre) if lab is not None else [None] * 3  # type: ignore[arg-type]
    widths = [p.shape[1] * w for p, w in zip(img_planes, (si, si, sj), strict=True)]  # mm
    heights = [p.shape[0] * h for p, h in zip(img_planes, (sj, sk, sk), strict=True)]
    fig_h = 4.0
    fig_w = fig_h * sum(widths) / max(heights) + 0.4
    fig, axes = plt.subplots(1, 3, figsize=(fig_w, fig_h + 0.5), gridspec_kw={"width_ratios": widths})
    fig.patch.set_facecolor("black")
    # tab20 holds 10 dark/light pairs; the grey pair (14, 15) is dropped, as grey vanishes on CT.
    # Labels 1-9 take the dark colours, 10-18 the light ones, so neighbouring label numbers (e.g.
    # left/right organs) never get the two shades of one hue; the 18 colours repeat after that.
    hues = [h for h in range(10) if h != 7]
    tab20 = ListedColormap([plt.get_cmap("tab20").colors[2 * hues[c % 9] + c // 9] for c in range(18)])
    for ax, ip, lp, aspect, name in zip(axes, img_planes, lab_planes, aspects, names, strict=True):
        ax.imshow(ip, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
        if lp is not None and lp.any():
            overlay = np.ma.masked_where(lp == 0, (lp - 1) % 18)
            ax.imshow(overlay, cmap=tab20, vmin=0, vmax=17, alpha=0.45, aspect=aspect, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    if lab is not None and label_names:
        from matplotlib.patches import Patch

        present = sorted(int(v) for v in np.unique(lab) if v != 0)
        handles = [Patch(color=tab20((v - 1) % 18), label=label_names.get(v, str(v))) for v in present]
        if handles:
            fig.legend(
                handles=handles,
                loc="lower center",
                ncol=min(len(handles), 6),
                fontsize=7,
                frameon=False,
                labelcolor="white",
            )
    fig.tight_layout()

    out = Path(path)
    try:
        with atomic_file(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return out


def save_montage(
    image: Volume,
    path: str | os.PathLike[str],
    window: tuple[float, float] = (-160.0, 240.0),
    n_slices: int = 12,
    title: str | None = None,
) -> Path:
    """Write a PNG montage of `n_slices` evenly spaced axial slices (radiological view, feet first,
    inferior to superior), with a coronal plane through the centre; the PNG is written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img, (si, sj, sk) = _to_ras(np.asarray(image.array), image.affine)
    ks = np.linspace(0, img.shape[2] - 1, num=min(int(n_slices), img.shape[2]) + 2)[1:-1].round().astype(int)
    cols = min(6, len(ks))
    rows = -(-len(ks) // cols) + 1  # the last row: the coronal plane
    fig = plt.figure(figsize=(2.0 * cols, 2.0 * rows * sj / si + 0.4))
    fig.patch.set_facecolor("black")
    for n, k in enumerate(ks):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(img[::-1, ::-1, k].T, cmap="gray", vmin=window[0], vmax=window[1], aspect=sj / si)
        ax.set_title(f"z {k}", color="white", fontsize=7)
        ax.set_axis_off()
    ax = fig.add_subplot(rows, 1, rows)
    ax.imshow(img[::-1, img.shape[1] // 2, ::-1].T, cmap="gray", vmin=window[0], vmax=window[1], aspect=sk / si)
    ax.set_axis_off()
    if title:
        fig.suptitle(title if len(title) < 110 else title[:107] + "...", color="white", fontsize=8)
    out = Path(path)
    try:
        with atomic_file(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return out
