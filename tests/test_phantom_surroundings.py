"""The phantom around the body against the real scans in ../shared/data (issue 39): air noise and
clipping, the couch's HU profile, the reconstruction circle's padding. One measurement, applied to
the real scan and to a phantom rendered on the real scan's grid with that scanner's settings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from medct.io import read_volume
from medct.phantom import render_phantom, sample_params
from medct.phantom.spec import Appearance, GridSpec

AIR_CLEARANCE_MM = 20.0  # air voxels counted: at least this far (in-plane) from anything denser than -900 HU


def air_stats(hu: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    """Mean, sd and the share at the lowest value of the air clear of the body, couch and padding."""
    dense = hu > -900
    far = ndimage.distance_transform_edt(~dense, sampling=(spacing[0], spacing[1], 1e6)) > AIR_CLEARANCE_MM
    v = hu[far & (hu > -1500)]  # -2048 / -3024 padding is not air
    floor = float(v.min())
    return {"mean": float(v.mean()), "sd": float(v.std()), "at_floor": float((v == floor).mean()), "floor": floor}


def couch_profile(hu: np.ndarray, posterior_axis_sign: int) -> np.ndarray:
    """Median HU along the anterior-posterior axis (array axis 1), posterior last, over the central
    fifth of the left-right axis and all slices."""
    nx = hu.shape[0]
    prof = np.median(hu[2 * nx // 5 : 3 * nx // 5], axis=(0, 2))
    return prof if posterior_axis_sign > 0 else prof[::-1]


def couch_stats(prof: np.ndarray, step_mm: float) -> dict[str, float]:
    """The couch under the back in a median AP profile: from the first value below -500 HU behind the
    skin to the first 5 mm of air (< -950): its thickness, its highest HU (the skins) and its median HU."""
    runs, n = ndimage.label(prof > -200)
    body = 1 + int(np.argmax(np.bincount(runs)[1:]))  # the longest run of tissue is the body
    skin = int(np.where(runs == body)[0].max())
    start = skin + int(np.argmax(prof[skin:] < -500))
    air = prof[start:] < -950
    run = max(1, round(5.0 / step_mm))
    end = start + next(i for i in range(len(air)) if air[i : i + run].all())
    band = prof[start:end]
    return {"thickness_mm": (end - start) * step_mm, "peak": float(band.max()), "median": float(np.median(band))}


def _planning_ct_like(seed: int, real) -> np.ndarray:
    """A phantom on the planning CT's grid (512 x 512, 1.07 mm, 6 slices at 3 mm, LPS), lying on a
    flat couch on a thin pad as that patient does, with that scanner's air floor and padding (-1000 HU)."""
    p = replace(
        sample_params(seed),
        table="plate",
        mattress=True,
        table_gap_mm=5.0,
        couch_mm=33.0,
        arms="up",
        padding_hu=-1000.0,
        air_floor_hu=-1000.0,
        recon_fov_mm=550.0,
    )
    spacing = tuple(float(s) for s in real.spacing)
    grid = GridSpec(shape=(512, 512, 6), spacing=spacing, axcodes="LPS", center_mm=(0.0, -40.0, 0.0))
    return render_phantom(p, grid, Appearance(variant="ct")).image.array


@pytest.fixture(scope="module")
def planct(shared_data):
    """The planning CT (its middle 30 slices, abdomen) and two phantoms on its grid."""
    vol = read_volume(shared_data / "pancreas_ct_cbct" / "planct.nii.gz")
    return vol, vol.array[:, :, 55:85].astype(np.float32), [_planning_ct_like(seed, vol) for seed in (0, 1)]


def test_air_matches_the_planning_ct(planct):
    vol, real, phantoms = planct
    spacing = np.asarray(vol.spacing)
    want = air_stats(real, spacing)
    for img in phantoms:
        got = air_stats(img, spacing)
        assert got["floor"] == want["floor"] == -1000.0
        assert abs(got["mean"] - want["mean"]) < 5.0, (got, want)
        assert 0.5 * want["sd"] < got["sd"] < 2.0 * want["sd"], (got, want)
        assert abs(got["at_floor"] - want["at_floor"]) < 0.2, (got, want)


def test_couch_matches_the_planning_ct(planct):
    vol, real, phantoms = planct
    step = float(vol.spacing[1])
    want = couch_stats(couch_profile(real, +1), step)  # LPS: array axis 1 runs to the back
    assert -450 < want["peak"] < -200 and -850 < want["median"] < -600 and 30 < want["thickness_mm"] < 50, want
    for img in phantoms:
        got = couch_stats(couch_profile(img, +1), step)
        assert abs(got["peak"] - want["peak"]) < 100.0, (got, want)
        assert abs(got["median"] - want["median"]) < 60.0, (got, want)
        assert abs(got["thickness_mm"] - want["thickness_mm"]) < 12.0, (got, want)


def test_unclipped_air_matches_the_totalsegmentator_ct(shared_data):
    """The TotalSegmentator example is not clipped (air down to -1207 HU): a phantom from a scanner
    without a floor has air of the same spread, on the same 3 mm grid."""
    vol = read_volume(shared_data / "totalseg" / "example_ct.nii.gz")
    spacing = np.asarray(vol.spacing)
    want = air_stats(vol.array.astype(np.float32), spacing)
    p = replace(sample_params(2), air_floor_hu=None, padding_hu=-1024.0, recon_fov_mm=500.0, arms="up")
    grid = GridSpec(shape=(160, 160, 12), spacing=tuple(float(s) for s in spacing), axcodes="RAS")
    got = air_stats(render_phantom(p, grid, Appearance(variant="ct")).image.array, spacing)
    assert got["at_floor"] < 0.01 and want["at_floor"] < 0.01, (got, want)
    assert abs(got["mean"] - want["mean"]) < 15.0, (got, want)
    assert 0.5 * want["sd"] < got["sd"] < 2.0 * want["sd"], (got, want)


def test_padding_outside_the_reconstruction_circle():
    """Where the grid reaches past the reconstructed circle, the vendor's padding value, and nothing
    below the air floor inside it."""
    p = replace(sample_params(4), padding_hu=-3024.0, air_floor_hu=-1024.0, recon_fov_mm=400.0)
    img = render_phantom(p, GridSpec(shape=(64, 64, 4), spacing=(8.0, 8.0, 8.0))).image.array
    i, j = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    r = np.hypot(i, j) * 8.0
    assert np.all(img[r > 205] == -3024.0) and np.all(img[r < 195] >= -1024.0)
