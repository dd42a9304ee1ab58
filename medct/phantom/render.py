"""One case: `render_phantom(params, grid, look)` and `make_phantom(seed, grid, look)`."""

from __future__ import annotations

import numpy as np

from medct.phantom.anatomy import _render
from medct.phantom.appearance import _check, _image
from medct.phantom.params import sample_params
from medct.phantom.reports import findings, report
from medct.phantom.spec import DEFAULT_GRID, DEFAULT_LOOK, Appearance, GridSpec, PhantomCase, PhantomParams, _rng
from medct.volume import Volume


def render_phantom(
    params: PhantomParams,
    grid: GridSpec = DEFAULT_GRID,
    look: Appearance = DEFAULT_LOOK,
    diaphragm_shift_mm: float = 0.0,
    noise_stream: int = 0,
) -> PhantomCase:
    """Render `params` on `grid` with appearance `look`. diaphragm_shift_mm > 0 moves the diaphragm
    and the organs under it caudally (inspiration); noise_stream picks an independent noise realisation."""
    _check(look.variant, look.phase, look.noise_hu, look.dtype)
    affine = grid.affine()
    shape_t = tuple(int(s) for s in grid.shape)
    cv, tex, bias, extra, vz = _render(params, affine, shape_t, float(diaphragm_shift_mm), look.variant == "mr")  # type: ignore[arg-type]
    rng = _rng(params.seed, 100 + int(noise_stream))
    img, clean = _image(cv, tex, bias, extra, params, affine, look.variant, look.phase, look.noise_hu, rng)
    if look.dtype == "int16":
        img = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
    meta = {
        "modality": look.modality,
        "variant": look.variant,
        "phase": look.phase,
        "seed": params.seed,
        "source": "medct.phantom",
    }
    label = Volume(array=cv.label, affine=affine.copy(), meta=dict(meta))
    found = findings(label, clean, look.variant, look.phase, liver_split_x=params.liver_right.center[0] - 50.0)
    text = report(found)
    image = Volume(array=img, affine=affine.copy(), meta={**meta, "text": text})
    disp = None
    if vz is not None:
        d = np.zeros((*shape_t, 3), np.float32)  # (X, Y, Z, 3) RAS mm, pull-back to end-exhale
        d[..., 2] = np.where(cv.moving, vz, 0.0)
        disp = Volume(array=d, affine=affine.copy(), meta={**meta, "kind": "displacement_ras_mm"})
    return PhantomCase(image=image, label=label, text=text, params=params, displacement=disp, findings=found)


def make_phantom(
    seed: int = 0,
    grid: GridSpec = DEFAULT_GRID,
    look: Appearance = DEFAULT_LOOK,
    lesions: bool | int | None = None,
) -> PhantomCase:
    """One synthetic labelled case: the patient of `seed` on `grid` with appearance `look`.

    lesions: None random (0-3), True 1-3, False none, int exactly that many (liver or kidney).

    >>> case = make_phantom(3, GridSpec(shape=(64, 64, 64), axcodes="LPS"), Appearance(variant="cbct"))
    """
    return render_phantom(sample_params(seed, lesions), grid, look)
