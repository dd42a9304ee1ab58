"""Patient-specific autoregressive prediction of respiratory motion from a 4D CT.

Lai et al., "Patient-Specific Autoregressive Models for Organ Motion Prediction in Radiotherapy"
(2025): the phases of a 4D CT are a sequence; a causal model predicts each next phase from the
earlier ones, pretrained on a population and fine-tuned on the one patient's observed phases, then
rolled out for future phases; it is compared with PCA-of-deformation motion models.

How medct does it:
  * every phase is represented by its displacement field from the reference phase (phase 0), found
    by registration (`register_phases`: IMPACT's optimiser on intensities, or Elastix B-splines) and
    resampled to a coarse RAS "motion grid" (8 mm by default; breathing fields are smooth);
  * `medct.nets.MotionTransformer` predicts field t + 1 from fields 0..t; `MotionTask` trains it
    on a population (`MotionDataModule`: phantom patients in memory, or a datalist of 4D scans);
  * `finetune` adapts a copy to one patient's observed phases (teacher-forced next-phase loss);
    `rollout` predicts k future fields, feeding each prediction back in (a sliding context);
  * a predicted image is the reference phase warped by the predicted field, so the anatomy is the
    patient's own (nothing is synthesised), and its labels move with it the same way;
  * baselines in the same representation: `copy_last`, `linear_extrapolation` and `PCAMotionModel`
    (PCA of the observed fields, scores driven by a breathing surrogate and its derivative).

Conventions: a field u_t is pull-back, RAS world mm: phase_t(p) = reference(p + u_t(p)), the
direction of `medct.registration` (fixed = phase t, moving = the reference) and of the phantoms.
Motion-grid arrays are (T, 3, x, y, z) float32, the three components being RAS vectors.

Modules, one concept each: `sequence` (reading a 4D scan, the motion grid, phase registration),
`baselines`, `task` (the AR model's rollout and fine-tuning, `MotionTask`), `data`
(`MotionDataModule`), `predictor` (`MotionPredictor`, previews). Every name is importable from
`medct.synthesis.motion` (recipes name `medct.synthesis.motion.MotionTask`).
"""

from medct.synthesis.motion.baselines import PCAMotionModel, copy_last, estimate_period, linear_extrapolation
from medct.synthesis.motion.data import MotionDataModule
from medct.synthesis.motion.predictor import MotionPrediction, MotionPredictor, save_sequence_previews
from medct.synthesis.motion.sequence import (
    MIN_PHASES,
    Method,
    Registration,
    from_motion_grid,
    motion_grid,
    order_phase_files,
    read_displacement,
    read_sequence,
    reference_channel,
    register_phases,
    to_motion_grid,
    warp_reference,
)
from medct.synthesis.motion.task import MotionTask, finetune, next_phase_loss, rollout

__all__ = [
    "MIN_PHASES",
    "Method",
    "MotionDataModule",
    "MotionPrediction",
    "MotionPredictor",
    "MotionTask",
    "PCAMotionModel",
    "Registration",
    "copy_last",
    "estimate_period",
    "finetune",
    "from_motion_grid",
    "linear_extrapolation",
    "motion_grid",
    "next_phase_loss",
    "order_phase_files",
    "read_displacement",
    "read_sequence",
    "reference_channel",
    "register_phases",
    "rollout",
    "save_sequence_previews",
    "to_motion_grid",
    "warp_reference",
]
