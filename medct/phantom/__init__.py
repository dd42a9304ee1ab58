"""Synthetic labelled CT phantoms: seeded, fast, in physical millimetres.

A phantom is a torso (skin, subcutaneous fat, muscle wall, ribs, spine, sternum) on a couch, holding
lungs with vessel and airway trees, heart, aorta, IVC, liver with portal/hepatic veins and
gallbladder, spleen, stomach with an air-fluid level, kidneys (cortex, medulla, sinus), bowel and
optional liver/kidney lesions. Every structure is an implicit function of world RAS millimetres
(ellipsoids, tapered tubes, planes), evaluated on whatever voxel grid is asked for, so one seed is
one patient at any size, spacing, axis order (RAS, LPS, ...) or oblique rotation. Per-case anatomy
varies through seeded parameters (organ sizes, positions, rotations, body habitus) and a smooth
random deformation of the coordinates. The image is a table lookup of tissue class -> intensity
(per variant and contrast phase), then partial-volume blur and correlated noise. Around the body,
what real scans have there, fitted to the scans in shared/data (tests/test_phantom_surroundings.py):
a carbon-and-foam couch (flat sandwich plate or curved cradle on a base) with an optional mattress,
arms up or down, and for CT a scanner: streaks from dense bone, air clipped to the scanner's floor
(or not), and the vendor's padding value outside the circular reconstruction field.

Variants (parameters, not copies): "ct" (HU), "cbct" / "cbct_tst" (scatter-like contrast loss and
cupping, streaks, rings, more noise, truncated circular field of view set to -1000, uncalibrated
gain/offset), "mr" (T1-like contrast in arbitrary units, bone and air dark, multiplicative bias
field, Rician noise). Contrast phases: native / arterial / venous. `make_breathing` adds a
diaphragm-driven respiratory deformation. Each case gets a radiology-style text computed from its
own label map.

Sources of the numbers and models:
- Unenhanced HU of abdominal tissues: Lamba et al., "CT Hounsfield numbers of soft tissues on
  unenhanced abdominal CT scans", Abdom Imaging 2014; contrast-phase enhancement: Bae,
  "Intravenous contrast medium administration and scan timing at CT", Radiology 2010.
- Breathing: Lujan et al., Med Phys 1999 (z(t) = z0 - b cos^2n(pi t / tau), here n = 1 as
  sin^2 from end-exhale); diaphragm-driven motion decaying upwards in the lung as in the XCAT
  phantom (Segars et al., Med Phys 2010), which also inspired building anatomy from analytic shapes.
- CBCT degradations: Siewerdsen & Jaffray, Med Phys 2001 (scatter -> cupping, contrast loss);
  Schulze et al., Dentomaxillofac Radiol 2011 (streaks, rings, truncation).
- MR bias field as a smooth multiplicative field: Sled et al., IEEE TMI 1998 (N3); Rician
  magnitude noise: Gudbjartsson & Patz, MRM 1995.

Coordinates: world = RAS+ millimetres (nibabel/NIfTI/MONAI): +x points to the patient's Right,
+y Anterior, +z Superior (nibabel.aff2axcodes(eye(4)) == ("R", "A", "S")). So organs on the
patient's LEFT (spleen, left kidney, left lung, most of the stomach, heart apex) sit at world
x < 0, and the liver at x > 0. Gravity (supine patient on the table) points to -y.

Package layout (one concern per module): spec (labels, tissues, dataclasses, GridSpec and
Appearance), params (seeded patients), anatomy (implicit shapes -> label/tissue maps), appearance
(tissue -> intensity per variant, noise), reports (text), render (one case), breathing (4D),
breathing4d (several irregular breaths with hysteresis, by warping any CT: motion prediction),
cohort (writing a dataset). `make_phantom(seed, GridSpec(...), Appearance(...))` is the entry point.

Why hand-written rather than a library: MONAI/TorchIO synthesise only blobs (monai.data.
synthetic.create_test_image_3d) or augment existing images; XCAT is closed and heavy. Nothing
offline provides labelled multi-organ CT with CBCT/MR/4D variants.
"""

from __future__ import annotations

from medct.phantom.breathing import make_breathing
from medct.phantom.cohort import write_cohort
from medct.phantom.params import sample_params
from medct.phantom.render import make_phantom, render_phantom
from medct.phantom.reports import describe
from medct.phantom.spec import (
    FOV_MM,
    LABEL_IDS,
    LABELS,
    MODALITY_OF_VARIANT,
    PHASES,
    VARIANTS,
    Appearance,
    ContrastPhase,
    Ellipsoid,
    GridSpec,
    Lesion,
    PhantomCase,
    PhantomParams,
    Variant,
    grid_affine,
)

__all__ = [
    "FOV_MM",
    "LABELS",
    "LABEL_IDS",
    "MODALITY_OF_VARIANT",
    "PHASES",
    "VARIANTS",
    "Appearance",
    "ContrastPhase",
    "Ellipsoid",
    "GridSpec",
    "Lesion",
    "PhantomCase",
    "PhantomParams",
    "Variant",
    "describe",
    "grid_affine",
    "make_breathing",
    "make_phantom",
    "render_phantom",
    "sample_params",
    "write_cohort",
]
