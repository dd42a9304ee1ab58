"""Radiology-style text of a case, computed from its own label map (`describe`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Findings:
    """What a case's report states, computed from its label map (`findings`): the text of `describe`
    and the attributes text-to-CT is scored on (`medct.synthesis`, bench/text2ct.py)."""

    variant: str
    phase: str
    liver_ml: float
    spleen_ml: float
    kidney_left_ml: float
    kidney_right_ml: float
    lungs: bool
    lesions: tuple[tuple[float, str, str], ...]  # (diameter mm, density word or "", site)

    @property
    def liver_size(self) -> str:
        """ "absent", "small", "normal" or "enlarged" (the bins the report names)."""
        return liver_size_bin(self.liver_ml)

    @property
    def spleen_enlarged(self) -> bool:
        return self.spleen_ml > SPLEEN_ENLARGED_ML

    @property
    def lesion_sites(self) -> tuple[str, ...]:
        return tuple(site for _d, _w, site in self.lesions)


# The bins are set on the phantom's anatomy (segmented volumes of 180 cases, 3 cohort seeds, on the
# 4 mm upper-abdomen grid): the torso bounds the liver, so "enlarged" livers (params.py's scale
# 1.18-1.3) measure 1650-2150 mL against 1000-1920 mL for the others; > 1800 mL is the top ~6% and
# < 1150 mL the bottom ~7%. Spleens separate: normal <= 275 mL, enlarged >= 296 mL (~14%).
LIVER_SMALL_ML, LIVER_ENLARGED_ML, SPLEEN_ENLARGED_ML = 1150.0, 1800.0, 285.0


def liver_size_bin(liver_ml: float) -> str:
    """The report's liver size words by volume: < 1150 mL small, > 1800 mL enlarged, else normal."""
    if liver_ml <= 0:
        return "absent"
    return "enlarged" if liver_ml > LIVER_ENLARGED_ML else ("small" if liver_ml < LIVER_SMALL_ML else "normal")


def findings(
    label: Volume, clean: np.ndarray | None, variant: str = "ct", phase: str = "venous", liver_split_x: float = 20.0
) -> Findings:
    """Organ volumes in mL (including the lesions they hold), lesions (size as the equivalent-sphere
    diameter, site, density against the host organ in `clean`; None skips the density) of a label map.

    liver_split_x: world x (RAS mm) of the plane separating right (x > split) and left liver lobes.
    """
    lab = np.asarray(label.array)
    vox_ml = float(abs(np.linalg.det(label.affine[:3, :3]))) / 1000.0
    vol = np.bincount(lab.ravel(), minlength=len(LABELS)) * vox_ml
    dens = ("hypointense", "hyperintense", "isointense") if variant == "mr" else ("hypodense", "hyperdense", "isodense")
    found: list[tuple[float, str, str]] = []
    for diam, organ, centre, contrast in _find_lesions(lab, label.affine, clean):
        if organ in LABEL_IDS:  # an organ's volume includes its lesions
            vol[LABEL_IDS[organ]] += math.pi / 6.0 * diam**3 / 1000.0
        if organ == "liver":
            site = "the right liver lobe" if centre[0] > liver_split_x else "the left liver lobe"
        elif organ.startswith("kidney_"):
            site = "the " + organ.removeprefix("kidney_") + " kidney"
        else:
            site = "the " + organ.replace("_", " ")
        word = "" if contrast is None else (dens[0] if contrast < -10 else dens[1] if contrast > 10 else dens[2])
        found.append((float(diam), word, site))
    return Findings(
        variant=variant,
        phase=phase,
        liver_ml=float(vol[LABEL_IDS["liver"]]),
        spleen_ml=float(vol[LABEL_IDS["spleen"]]),
        kidney_left_ml=float(vol[LABEL_IDS["kidney_left"]]),
        kidney_right_ml=float(vol[LABEL_IDS["kidney_right"]]),
        lungs=bool(vol[LABEL_IDS["lung_left"]] > 0 and vol[LABEL_IDS["lung_right"]] > 0),
        lesions=tuple(found),
    )


def describe(
    label: Volume, clean: np.ndarray | None, variant: str = "ct", phase: str = "venous", liver_split_x: float = 20.0
) -> str:
    """Radiology-style text computed from a label map (`findings`, rendered by `report`)."""
    return report(findings(label, clean, variant, phase, liver_split_x))


_HEADERS = {
    ("ct", "native"): (
        "Non-contrast abdominal CT.",
        "Unenhanced CT of the abdomen.",
        "CT abdomen without IV contrast.",
    ),
    ("ct", "arterial"): (
        "Contrast-enhanced abdominal CT, arterial phase.",
        "Arterial phase contrast-enhanced CT of the abdomen.",
        "CT abdomen with IV contrast in the late arterial phase.",
    ),
    ("ct", "venous"): (
        "Contrast-enhanced abdominal CT, portal venous phase.",
        "Portal venous phase CT of the abdomen with IV contrast.",
        "Contrast-enhanced CT abdomen acquired in the portal venous phase.",
    ),
    ("cbct", ""): ("Cone-beam CT of the abdomen, limited field of view, intensities not calibrated to HU.",),
    ("cbct_tst", ""): ("Low-quality cone-beam CT of the abdomen with strong artefacts, limited field of view.",),
    ("mr", ""): ("T1-weighted MR of the abdomen (arbitrary units).",),
}
_LIVER = {  # size word -> phrasings; {v} = volume in mL
    "enlarged": (
        "Liver {v} mL, enlarged (hepatomegaly).",
        "Hepatomegaly, liver volume {v} mL.",
        "The liver is enlarged ({v} mL).",
    ),
    "small": ("Liver {v} mL, small.", "Small liver, {v} mL.", "The liver is small ({v} mL)."),
    "normal": ("Liver {v} mL, normal size.", "Normal-sized liver ({v} mL).", "The liver is normal in size, {v} mL."),
}
_ONE_LESION = ("One {l}.", "A {l} is seen.", "Solitary {l}.")
_NO_LESION = (
    "No focal liver or renal lesion.",
    "No focal lesion in the liver or kidneys.",
    "Liver and kidneys without focal lesions.",
)
_SPLEEN = {
    True: ("Spleen {v} mL, enlarged (splenomegaly).", "Splenomegaly ({v} mL).", "The spleen is enlarged, {v} mL."),
    False: ("Spleen {v} mL, normal size.", "Normal spleen ({v} mL).", "The spleen is normal in size, {v} mL."),
}


def report(f: Findings, style: int | None = None) -> str:
    """The text of `f`. style None: medct's fixed wording; an int seeds a choice among equivalent
    phrasings of every sentence (header, liver, lesions, spleen, kidneys) and of the order of the
    organ sentences, so that a text-to-CT model learns the facts rather than one template. Every
    wording states the same facts: phase, liver volume and size word, each lesion's size, density
    and site, spleen volume and size word, kidney volumes."""
    rng = None if style is None else np.random.default_rng(np.random.SeedSequence([int(style), 917]))

    def say(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    header = say(_HEADERS.get((f.variant, f.phase)) or _HEADERS[(f.variant, "")])
    if f.liver_ml > 0:
        liver = say(_LIVER[f.liver_size]).format(v=f"{f.liver_ml:.0f}")
    else:
        liver = "Liver not in the field of view."
    words = [f"{d:.0f} mm {w + ' ' if w else ''}lesion in {site}" for d, w, site in f.lesions]
    if len(words) == 1:
        lesions = say(_ONE_LESION).format(l=words[0])
        lesions = lesions[0].upper() + lesions[1:]
    elif words:
        lesions = f"{_NUM.get(len(words), str(len(words)))} focal lesions: " + "; ".join(words) + "."
    else:
        lesions = say(_NO_LESION)
    organs: list[str] = []
    if f.spleen_ml > 0:
        organs.append(say(_SPLEEN[f.spleen_enlarged]).format(v=f"{f.spleen_ml:.0f}"))
    kl, kr = f.kidney_left_ml, f.kidney_right_ml
    if kl > 0 and kr > 0:
        kid_word = "normal in size" if min(kl, kr) > 80 and max(kl, kr) < 260 else "of abnormal size"
        organs.append(f"Kidneys {kid_word} (left {kl:.0f} mL, right {kr:.0f} mL).")
    if rng is not None and len(organs) == 2 and rng.random() < 0.5:
        organs.reverse()
    parts = [header, liver, lesions, *organs]
    if f.lungs:
        parts.append("Lung bases clear.")
    return " ".join(parts)
