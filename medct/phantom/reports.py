"""Radiology-style text of a case, computed from its own label map (`describe`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from medct.phantom.spec import LABEL_IDS, LABELS
from medct.volume import Volume

_NUM = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _find_lesions(
    lab: np.ndarray, affine: np.ndarray, clean: np.ndarray | None
) -> list[tuple[float, str, np.ndarray, float | None]]:
    """Connected lesion components: (equivalent diameter mm, host organ, world centre, mean contrast
    to the host organ in `clean` or None), host = the most frequent organ label around the component."""
    les = LABEL_IDS["lesion"]
    vox_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    where = np.nonzero(lab == les)
    if len(where[0]) == 0:
        return []
    box = tuple(slice(max(int(ix.min()) - 3, 0), int(ix.max()) + 4) for ix in where)  # label only this box
    comps, _n = ndimage.label(lab[box] == les, structure=np.ones((3, 3, 3)))
    out = []
    for i, obj in enumerate(ndimage.find_objects(comps), start=1):
        local = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(obj, comps.shape, strict=True))
        comp = comps[local] == i  # (x, y, z) crop around component i
        full = tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(local, box, strict=True))
        ring = ndimage.binary_dilation(comp, iterations=2) & ~comp
        neigh = lab[full][ring]
        neigh = neigh[(neigh != 0) & (neigh != les)]
        organ = LABELS[int(np.bincount(neigh).argmax())] if neigh.size else "abdomen"
        diam = (6.0 * float(comp.sum()) * vox_mm3 / math.pi) ** (1.0 / 3.0)
        centre = np.array([np.mean(ix) + s.start for ix, s in zip(np.nonzero(comp), full, strict=True)])
        contrast = None
        if clean is not None and organ in LABEL_IDS:
            contrast = float(clean[full][comp].mean()) - float(clean[lab == LABEL_IDS[organ]].mean())
        out.append((diam, organ, affine[:3, :3] @ centre + affine[:3, 3], contrast))
    return out


def describe(
    label: Volume, clean: np.ndarray | None, variant: str = "ct", phase: str = "venous", liver_split_x: float = 20.0
) -> str:
    """Radiology-style text computed from a label map: organ volumes in mL (including the lesions they
    hold), lesion count, size (equivalent-sphere diameter), site and density.

    clean: the noise-free image on the same grid, used to call lesions hypo-/hyperdense; None skips it.
    liver_split_x: world x (RAS mm) of the plane separating right (x > split) and left liver lobes.
    """
    lab = np.asarray(label.array)
    vox_ml = float(abs(np.linalg.det(label.affine[:3, :3]))) / 1000.0
    vol = np.bincount(lab.ravel(), minlength=len(LABELS)) * vox_ml
    header = {
        ("ct", "native"): "Non-contrast abdominal CT.",
        ("ct", "arterial"): "Contrast-enhanced abdominal CT, arterial phase.",
        ("ct", "venous"): "Contrast-enhanced abdominal CT, portal venous phase.",
    }.get((variant, phase))
    if header is None:
        header = {
            "cbct": "Cone-beam CT of the abdomen, limited field of view, intensities not calibrated to HU.",
            "cbct_tst": "Low-quality cone-beam CT of the abdomen with strong artefacts, limited field of view.",
            "mr": "T1-weighted MR of the abdomen (arbitrary units).",
        }[variant]
    dens = ("hypointense", "hyperintense", "isointense") if variant == "mr" else ("hypodense", "hyperdense", "isodense")
    lesions = _find_lesions(lab, label.affine, clean)
    found: list[str] = []
    for diam, organ, centre, contrast in lesions:
        if organ in LABEL_IDS:  # an organ's volume includes its lesions
            vol[LABEL_IDS[organ]] += math.pi / 6.0 * diam**3 / 1000.0
        if organ == "liver":
            site = "the right liver lobe" if centre[0] > liver_split_x else "the left liver lobe"
        elif organ.startswith("kidney_"):
            site = "the " + organ.removeprefix("kidney_") + " kidney"
        else:
            site = "the " + organ.replace("_", " ")
        word = "" if contrast is None else (dens[0] if contrast < -10 else dens[1] if contrast > 10 else dens[2])
        found.append(f"{diam:.0f} mm {word + ' ' if word else ''}lesion in {site}")
    liver = vol[LABEL_IDS["liver"]]
    if liver > 0:
        size = "enlarged (hepatomegaly)" if liver > 2000 else ("small" if liver < 900 else "normal size")
        parts = [header, f"Liver {liver:.0f} mL, {size}."]
    else:
        parts = [header, "Liver not in the field of view."]
    if len(found) == 1:
        parts.append(f"One {found[0]}.")
    elif found:
        parts.append(f"{_NUM.get(len(found), str(len(found)))} focal lesions: " + "; ".join(found) + ".")
    else:
        parts.append("No focal liver or renal lesion.")
    spleen = vol[LABEL_IDS["spleen"]]
    if spleen > 0:
        parts.append(f"Spleen {spleen:.0f} mL" + (", enlarged (splenomegaly)." if spleen > 400 else ", normal size."))
    kl, kr = vol[LABEL_IDS["kidney_left"]], vol[LABEL_IDS["kidney_right"]]
    if kl > 0 and kr > 0:
        kid_word = "normal in size" if min(kl, kr) > 80 and max(kl, kr) < 260 else "of abnormal size"
        parts.append(f"Kidneys {kid_word} (left {kl:.0f} mL, right {kr:.0f} mL).")
    if vol[LABEL_IDS["lung_left"]] > 0 and vol[LABEL_IDS["lung_right"]] > 0:
        parts.append("Lung bases clear.")
    return " ".join(parts)
