"""Cohorts on disk (`write_cohort`): nnU-Net/MSD layout with a dataset.json and per-case text."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from medct.errors import MedCTError
from medct.io import write_volume
from medct.paths import write_text_atomic
from medct.phantom.appearance import _check
from medct.phantom.render import make_phantom
from medct.phantom.reports import report
from medct.phantom.spec import LABELS, PHASES, Appearance, ContrastPhase, GridSpec, Variant

LESION_LABEL = next(k for k, v in LABELS.items() if v == "lesion")


def write_cohort(
    out_dir: str | os.PathLike[str],
    n: int = 20,
    variant: Variant = "ct",
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] | None = None,
    phase: ContrastPhase | Literal["mixed"] = "venous",
    lesions: bool | int | None = None,
    axcodes: str = "RAS",
    noise_hu: float = 12.0,
    phases: tuple[ContrastPhase, ...] | None = None,
    varied_reports: bool = False,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write n cases as imagesTr/case_XXXX_0000.nii.gz + labelsTr/case_XXXX.nii.gz and an MSD-style
    dataset.json (labels, modality, training list with per-case text and seed, and the volume-level
    attributes "lesion" (present/absent in the label map), "phase" and "variant"). With `phases`
    (e.g. ("native", "arterial", "venous")) every case is written once per contrast phase, same
    anatomy, as nnU-Net channels case_XXXX_0000, _0001, ...; the entry lists them as "phases" (the
    multimodal input of BM-MAE) and "image" is the first. Returns the
    dataset.json path. Images are int16 (CT/CBCT) or float32 (MR); labels uint8.

    phase "mixed": each case gets its own seeded contrast phase (the text-to-CT corpus).
    varied_reports: each case's text in its own seeded wording (`medct.phantom.reports.report`).
    Entries also carry the attributes the text states: "liver_size" (small/normal/enlarged),
    "spleen" (normal/enlarged) and "lesion_sites" (the sites joined by "; ", "" for none).
    center_mm: world RAS point at the centre of the grid (e.g. (0, 0, -40) for the upper abdomen).
    """
    if n < 1:
        raise MedCTError(f"A cohort needs at least one case, got n={n}.")
    base_phase: ContrastPhase = "venous" if phase == "mixed" else phase
    _check(variant, base_phase, noise_hu, "float32")
    grid = GridSpec(
        shape=tuple(shape),  # type: ignore[arg-type]
        spacing=None if spacing is None else tuple(spacing),  # type: ignore[arg-type]
        axcodes=axcodes,
        center_mm=tuple(float(c) for c in center_mm),  # type: ignore[arg-type]
    )
    dtype = "float32" if variant == "mr" else "int16"
    look = Appearance(variant=variant, phase=base_phase, noise_hu=noise_hu, dtype=dtype)
    grid.affine()  # a bad shape/spacing/axcodes fails before anything is written
    root = Path(out_dir).expanduser()
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        if phase == "mixed":  # own stream: the anatomy of each seed stays what it is
            pick = np.random.default_rng(np.random.SeedSequence([case_seed, 31])).integers(len(PHASES))
            look = replace(look, phase=PHASES[int(pick)])
        c = make_phantom(case_seed, grid, look, lesions)
        img_rel, lab_rel = f"imagesTr/case_{i:04d}_0000.nii.gz", f"labelsTr/case_{i:04d}.nii.gz"
        channels: list[str] = []
        for k, ph in enumerate(phases or ()):  # the same patient (seed) in each contrast phase
            channel = make_phantom(case_seed, grid, replace(look, phase=ph), lesions)
            channels.append(f"imagesTr/case_{i:04d}_{k:04d}.nii.gz")
            write_volume(channel.image, root / channels[-1])
            if k == 0:
                c = channel
        if not channels:
            write_volume(c.image, root / img_rel)
        write_volume(c.label, root / lab_rel)
        # volume-level attributes (classification targets): what the case shows, from its label map
        shows_lesion = bool((c.label.array == LESION_LABEL).any())
        training.append(
            {
                "image": img_rel,
                "label": lab_rel,
                "text": report(c.findings, style=case_seed) if varied_reports else c.text,
                "seed": case_seed,
                "lesion": "present" if shows_lesion else "absent",
                "phase": look.phase if not phases else phases[0],
                "liver_size": c.findings.liver_size,
                "spleen": "enlarged" if c.findings.spleen_enlarged else "normal",
                "lesion_sites": "; ".join(c.findings.lesion_sites),
                "variant": variant,
                **({"phases": channels, "phase_names": list(phases or ())} if channels else {}),
            }
        )
    modality = look.modality
    dataset = {
        "name": f"medct_phantom_{variant}",
        "description": f"medct synthetic phantom cohort ({variant}, {phase} phase), cohort seed {seed}",
        "reference": "medct.phantom",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path = root / "dataset.json"
    write_text_atomic(path, json.dumps(dataset, indent=2))  # never a half-written dataset.json
    return path
