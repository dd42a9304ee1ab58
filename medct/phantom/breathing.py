"""Respiratory 4D series (`make_breathing`): diaphragm-driven motion over one breathing cycle."""

from __future__ import annotations

import math

import numpy as np

from medct.errors import MedCTError
from medct.phantom.params import sample_params
from medct.phantom.render import render_phantom
from medct.phantom.spec import DEFAULT_GRID, DEFAULT_LOOK, Appearance, GridSpec, PhantomCase, PhantomParams
from medct.volume import Volume


def make_breathing(
    case: PhantomParams | int,
    n_phases: int = 10,
    grid: GridSpec = DEFAULT_GRID,
    look: Appearance = DEFAULT_LOOK,
    amplitude_mm: float | None = None,
    period_s: float | None = None,
) -> list[PhantomCase]:
    """A respiratory 4D series: n_phases equally spaced over one breathing cycle, phase 0 = end-exhale
    (identical to `make_phantom`'s anatomy), diaphragm shift d_k = A sin^2(pi k / n) caudally.

    Each case's image.meta holds respiratory_phase, time_s, diaphragm_shift_mm, amplitude_mm,
    period_s; case.displacement maps each phase to the end-exhale reference (see PhantomCase).
    """
    params = sample_params(case) if isinstance(case, int | np.integer) else case
    amp = params.breathing_amplitude_mm if amplitude_mm is None else float(amplitude_mm)
    period = params.breathing_period_s if period_s is None else float(period_s)
    if n_phases < 1:
        raise MedCTError(f"n_phases must be at least 1, got {n_phases}.")
    if not (0.0 <= amp <= 40.0):
        raise MedCTError(f"The breathing amplitude must be between 0 and 40 mm, got {amp}.")
    out = []
    for k in range(n_phases):
        shift = amp * math.sin(math.pi * k / n_phases) ** 2
        c = render_phantom(params, grid, look, diaphragm_shift_mm=shift if k else 0.0, noise_stream=k)
        extra = {
            "respiratory_phase": k,
            "n_phases": n_phases,
            "time_s": period * k / n_phases,
            "diaphragm_shift_mm": shift,
            "amplitude_mm": amp,
            "period_s": period,
        }
        for v in (c.image, c.label):
            v.meta.update(extra)
        if c.displacement is None:  # end-exhale: the identity map
            c.displacement = Volume(
                array=np.zeros((*c.label.shape, 3), np.float32),
                affine=c.label.affine.copy(),
                meta={**c.label.meta, "kind": "displacement_ras_mm"},
            )
        else:
            c.displacement.meta.update(extra)
        pct = 100.0 * shift / amp if amp > 0 else 0.0
        c.text = (
            c.text
            + f" Respiratory phase {k + 1} of {n_phases} ({pct:.0f}% inspiration, diaphragm {shift:.1f} mm caudal of end-exhale)."
        )
        c.image.meta["text"] = c.text
        out.append(c)
    return out
