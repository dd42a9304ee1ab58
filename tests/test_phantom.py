"""medct.phantom: determinism, anatomy, geometry, variants, breathing, text and cohort writing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medct.errors import MedCTError
from medct.phantom import (
    FOV_MM,
    LABELS,
    Appearance,
    GridSpec,
    PhantomCase,
    describe,
    grid_affine,
    make_breathing,
    make_phantom,
    sample_params,
    write_cohort,
)

ORGANS = [k for k in LABELS if k not in (0, 11)]
GRID_FIELDS = {"shape", "spacing", "axcodes", "oblique_deg", "center_mm"}


def _specs(kw: dict) -> tuple[GridSpec, Appearance]:
    """Flat keyword arguments -> the two frozen specs make_phantom takes."""
    grid = GridSpec(**{k: v for k, v in kw.items() if k in GRID_FIELDS})
    return grid, Appearance(**{k: v for k, v in kw.items() if k not in GRID_FIELDS})


def _case(seed: int, lesions: bool | int | None = None, **kw) -> PhantomCase:
    return make_phantom(seed, *_specs(kw), lesions=lesions)


def _breathing(seed: int, n_phases: int, amplitude_mm: float | None = None, period_s: float | None = None, **kw):
    return make_breathing(seed, n_phases, *_specs(kw), amplitude_mm=amplitude_mm, period_s=period_s)


def _volumes_ml(case: PhantomCase) -> np.ndarray:
    return np.bincount(case.label.array.ravel(), minlength=len(LABELS)) * np.prod(case.label.spacing) / 1000.0


def _centroid_world(case: PhantomCase, label: int) -> np.ndarray:
    idx = np.argwhere(case.label.array == label).mean(axis=0)
    return case.label.affine[:3, :3] @ idx + case.label.affine[:3, 3]


@pytest.fixture(scope="module")
def native() -> PhantomCase:
    return _case(1, shape=(64, 64, 64), phase="native", lesions=1)


@pytest.fixture(scope="module")
def venous() -> PhantomCase:
    return _case(1, shape=(64, 64, 64), phase="venous", lesions=1)


def test_written_cohort_says_what_its_label_indices_mean(tmp_path):
    """A cohort a user trains on names its labels in dataset.json as medct.phantom.LABELS, and its
    label maps hold those indices and no other (index 0 background, every organ drawn)."""
    from medct.data import read_label_names
    from medct.phantom import write_cohort

    path = write_cohort(tmp_path / "c", n=2, seed=0, shape=(48, 48, 48), spacing=(8.0, 8.0, 8.0))
    names = read_label_names(path)
    assert names == [LABELS[i] for i in range(len(LABELS))] and names[0] == "background"
    for entry in json.loads(path.read_text())["training"]:
        values = set(np.unique(np.asarray(nib.load(path.parent / entry["label"]).dataobj)).astype(int).tolist())
        assert values <= set(LABELS) and {0, 1, 2, 9} <= values  # background, liver, spleen, spine at least


def test_deterministic_per_seed_and_seeds_differ():
    a = _case(7, shape=(40, 40, 40))
    b = _case(7, shape=(40, 40, 40))
    c = _case(8, shape=(40, 40, 40))
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.label.array, b.label.array)
    assert a.text == b.text and a.params == b.params
    assert not np.array_equal(a.label.array, c.label.array)
    assert a.params != c.params
    # asking for lesions changes the lesions only, not the rest of the patient
    assert sample_params(7, lesions=0).liver_right == sample_params(7, lesions=3).liver_right


def test_every_organ_present_with_plausible_native_hu(native):
    lab, img = native.label.array, native.image.array
    assert native.image.array.dtype == np.float32 and lab.dtype == np.uint8
    assert set(np.unique(lab)) == set(LABELS)  # lesions=1: all 12 labels
    mean = {LABELS[k]: float(img[lab == k].mean()) for k in LABELS if k}
    expected = {
        "liver": (45, 75),
        "spleen": (35, 60),
        "kidney_left": (15, 45),
        "kidney_right": (15, 45),
        "aorta": (20, 55),
        # aerated lung with vessels; per-patient density (the real planning CT: median -749 HU)
        "lung_left": (-900, -650),
        "lung_right": (-900, -650),
        "spine": (200, 800),
        "ribs": (150, 900),
        "stomach": (-600, 40),  # wall + fluid + air
    }
    for name, (lo, hi) in expected.items():
        assert lo <= mean[name] <= hi, (name, mean[name])
    outside = img[0, 0, :]  # grid corner column: air, or the padding beyond the reconstruction circle
    assert abs(float(outside.mean()) + 1000.0) < 15.0 or np.all(outside == native.params.padding_hu)


def test_contrast_phases(native, venous):
    arterial = _case(1, shape=(64, 64, 64), phase="arterial", lesions=1)

    def mean(c: PhantomCase, k: int) -> float:
        return float(c.image.array[c.label.array == k].mean())

    assert mean(arterial, 6) > mean(native, 6) + 150  # aorta
    assert mean(arterial, 6) > mean(venous, 6) + 60
    assert 90 <= mean(venous, 1) <= 135  # portal venous liver
    assert mean(venous, 3) > mean(native, 3) + 70  # kidneys enhance
    assert mean(arterial, 2) > mean(native, 2) + 40  # spleen
    assert np.array_equal(arterial.label.array, native.label.array)  # same anatomy


def test_organ_volumes_plausible(venous):
    v = _volumes_ml(venous)
    ranges = {
        1: (1000, 2700),
        2: (80, 700),
        3: (60, 300),
        4: (60, 300),
        5: (80, 700),
        6: (50, 450),
        7: (700, 3500),
        8: (700, 3500),
        9: (200, 900),
        10: (100, 800),
    }
    for k, (lo, hi) in ranges.items():
        assert lo <= v[k] <= hi, (LABELS[k], v[k])
    assert 0 < v[11] < 20


@pytest.mark.parametrize(
    "axcodes,oblique",
    [("RAS", 0.0), ("LPS", 0.0), ("PIR", 0.0), ("LPS", 15.0), ("RAS", (10.0, -8.0, 20.0))],
)
def test_geometry(axcodes, oblique):
    shape, spacing = (40, 36, 32), (9.0, 10.0, 11.0)
    c = _case(2, shape=shape, spacing=spacing, axcodes=axcodes, oblique_deg=oblique, center_mm=(5.0, -3.0, 10.0))
    for v in (c.image, c.label):
        assert v.shape == shape
        np.testing.assert_allclose(v.spacing, spacing)
        assert "".join(nib.aff2axcodes(v.affine)) == axcodes
    assert np.array_equal(c.image.affine, c.label.affine)
    centre = c.image.affine @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], (5.0, -3.0, 10.0), atol=1e-9)
    lin = c.image.affine[:3, :3] / np.asarray(spacing)
    np.testing.assert_allclose(lin.T @ lin, np.eye(3), atol=1e-12)  # orthonormal directions
    if oblique != 0.0:
        assert np.count_nonzero(np.abs(lin) > 1e-6) > 3  # really oblique
    assert grid_affine((64, 64, 64)) == pytest.approx(grid_affine((64, 64, 64), spacing=(FOV_MM / 64,) * 3))


def test_same_patient_on_different_grids():
    ref = _volumes_ml(_case(4, shape=(64, 64, 64), lesions=0))
    grids = [
        dict(shape=(48, 48, 48)),  # 8 mm
        dict(shape=(96, 80, 64), spacing=(4.0, 4.8, 6.0), axcodes="LPS"),
        dict(shape=(56, 56, 56), spacing=(7.0, 7.0, 7.0), axcodes="LPS", oblique_deg=(0.0, 0.0, 25.0)),
    ]
    for g in grids:
        v = _volumes_ml(_case(4, lesions=0, **g))
        for k in (1, 2, 3, 4, 5, 6, 7, 8):
            assert abs(v[k] / ref[k] - 1.0) < 0.1, (g, LABELS[k], v[k], ref[k])


def test_left_right_is_patient_left_right():
    # RAS+: +x points to the patient's Right, so patient-left organs have world x < 0.
    for axcodes in ("RAS", "LPS"):
        c = _case(3, shape=(48, 48, 48), axcodes=axcodes)
        x = {k: _centroid_world(c, k)[0] for k in (1, 2, 3, 4, 5, 7, 8)}
        assert x[2] < 0 and x[3] < 0 and x[7] < 0 and x[5] < 0  # spleen, left kidney, left lung, stomach
        assert x[1] > 0 and x[4] > 0 and x[8] > 0  # liver, right kidney, right lung
    # in the LPS array, index 0 grows towards the patient's Left: the spleen sits at higher i than the liver
    lps = _case(3, shape=(48, 48, 48), axcodes="LPS")
    assert nib.aff2axcodes(lps.label.affine)[0] == "L"
    i = {k: np.argwhere(lps.label.array == k)[:, 0].mean() for k in (1, 2)}
    assert i[2] > i[1]


def test_text_reports_liver_volume_and_lesions(venous):
    v = _volumes_ml(venous)
    assert "One " in venous.text and "lesion in the" in venous.text and " mm " in venous.text
    in_liver = "liver lobe" in venous.text
    assert f"Liver {v[1] + (v[11] if in_liver else 0.0):.0f} mL" in venous.text  # lesions count to their organ
    assert "portal venous phase" in venous.text
    none = _case(1, shape=(48, 48, 48), lesions=0)
    assert not np.any(none.label.array == 11)
    assert "No focal liver or renal lesion" in none.text
    assert venous.image.meta["text"] == venous.text


def test_describe_counts_lesions_from_labels():
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[5:35, 5:35, 5:35] = 1  # liver, 27 mL at 1 mm
    lab[8:14, 8:14, 8:14] = 11  # two separate lesions
    lab[20:30, 20:30, 20:30] = 11
    affine = np.eye(4)
    affine[:3, 3] = (100.0, 0.0, 0.0)  # all on the patient's right
    clean = np.where(lab == 11, 30.0, 110.0).astype(np.float32)
    from medct.io import Volume

    text = describe(Volume(lab, affine), clean, "ct", "venous")
    assert "Two focal lesions" in text
    assert text.count("hypodense lesion in the right liver lobe") == 2
    assert "12 mm" in text and "7 mm" in text  # equivalent-sphere diameters of 1000 and 216 mm^3
    assert "Liver 27 mL" in text  # the liver's volume includes its lesions
    assert "Spleen" not in text  # absent organs are not reported as 0 mL


def test_cbct_variants(venous):
    ct = _case(1, shape=(64, 64, 64), lesions=1)
    cb = _case(1, shape=(64, 64, 64), variant="cbct", lesions=1)
    tst = _case(1, shape=(64, 64, 64), variant="cbct_tst", lesions=1)
    assert np.array_equal(cb.label.array, ct.label.array)
    assert cb.image.meta["modality"] == "CBCT"
    # truncated circular field of view (radius 150 / 125 mm about the grid's S axis), exactly -1000 outside
    idx = np.indices(cb.image.shape).reshape(3, -1)
    w = cb.image.affine[:3, :3] @ idx + cb.image.affine[:3, 3:4]
    r = np.hypot(w[0], w[1]).reshape(cb.image.shape)
    assert np.all(cb.image.array[r > 151.0] == -1000.0)
    assert np.all(tst.image.array[r > 126.0] == -1000.0)
    assert np.any((ct.image.array > -500.0) & (r > 151.0))  # the body is truncated

    def noise(c: PhantomCase) -> float:
        inner = ndimage.binary_erosion(c.label.array == 1, iterations=2)
        resid = c.image.array - ndimage.uniform_filter(c.image.array, 3)
        return float(resid[inner].std())

    def kidney_liver_cnr(c: PhantomCase) -> float:
        a, lab = c.image.array, c.label.array
        return abs(float(a[(lab == 3) | (lab == 4)].mean() - a[lab == 1].mean())) / noise(c)

    assert noise(cb) > 1.3 * noise(ct)
    assert noise(tst) > 1.5 * noise(ct)
    assert kidney_liver_cnr(cb) < 0.7 * kidney_liver_cnr(ct)  # lower soft-tissue contrast, more noise
    assert kidney_liver_cnr(tst) < 0.7 * kidney_liver_cnr(ct)


def test_mr_variant():
    ct = _case(1, shape=(64, 64, 64))
    mr = _case(1, shape=(64, 64, 64), variant="mr")
    a, lab = mr.image.array, mr.label.array
    assert np.array_equal(lab, ct.label.array)
    assert mr.image.meta["modality"] == "MR"
    assert a.min() >= 0.0  # magnitude image, arbitrary units: no HU
    assert float(a[0, 0, :].mean()) < 50.0  # air is dark, not -1000
    liver, spine = float(a[lab == 1].mean()), float(a[lab == 9].mean())
    assert spine < 0.6 * liver  # bone dark
    assert float(a[(lab == 7) | (lab == 8)].mean()) < 0.2 * liver  # lungs dark
    assert "MR" in mr.text


def test_breathing_moves_diaphragm_and_organs():
    amp = 16.0
    phases = _breathing(5, 4, shape=(48, 48, 64), amplitude_mm=amp, period_s=4.0)
    assert len(phases) == 4
    shifts = [c.image.meta["diaphragm_shift_mm"] for c in phases]
    assert shifts[0] == 0.0 and shifts[2] == pytest.approx(amp)
    assert all(c.image.meta["amplitude_mm"] == amp for c in phases)
    assert phases[1].image.meta["time_s"] == pytest.approx(1.0)
    # phase 0 is the end-exhale reference: the same case as make_phantom
    ref = _case(5, shape=(48, 48, 64))
    assert np.array_equal(ref.label.array, phases[0].label.array)
    assert np.array_equal(ref.image.array, phases[0].image.array)
    inhale = phases[2]
    for k in (1, 2, 3, 4):  # liver, spleen, kidneys translate caudally with the diaphragm
        dz = _centroid_world(inhale, k)[2] - _centroid_world(phases[0], k)[2]
        assert -amp - 3.0 < dz < -amp + 3.0, (LABELS[k], dz)
    assert abs(_centroid_world(inhale, 9)[2] - _centroid_world(phases[0], 9)[2]) < 0.5  # spine does not move
    dz_lung = _centroid_world(inhale, 8)[2] - _centroid_world(phases[0], 8)[2]
    assert -amp < dz_lung < -1.0  # lungs stretch: less than the diaphragm
    # displacement field: inhale(x) == exhale(x + d(x)) for the moving labels
    d = inhale.displacement
    assert d is not None and d.shape == inhale.label.shape and d.array.shape[-1] == 3
    assert np.array_equal(d.affine, inhale.label.affine)
    assert float(d.array[..., 2].max()) == pytest.approx(amp, abs=0.5)
    lab0, lab2 = phases[0].label.array, inhale.label.array
    idx = np.indices(lab2.shape).reshape(3, -1)
    w = inhale.label.affine[:3, :3] @ idx + inhale.label.affine[:3, 3:4] + d.array.reshape(-1, 3).T
    inv = np.linalg.inv(inhale.label.affine)
    src = inv[:3, :3] @ w + inv[:3, 3:4]
    warped = ndimage.map_coordinates(lab0, src, order=0, mode="nearest").reshape(lab2.shape)

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())

    for k in (1, 2):
        assert dice(warped == k, lab2 == k) > 0.93
        assert dice(warped == k, lab2 == k) > dice(lab0 == k, lab2 == k) + 0.1
    assert "Respiratory phase 3 of 4" in inhale.text


def test_write_cohort_reads_back(tmp_path):
    from medct.io import read_volume

    path = write_cohort(tmp_path / "cohort", n=2, variant="ct", seed=3, shape=(32, 32, 32), spacing=(12.0, 12.0, 12.0))
    assert path == tmp_path / "cohort" / "dataset.json"
    ds = json.loads(path.read_text())
    assert ds["labels"] == {str(k): v for k, v in LABELS.items()}
    assert ds["numTraining"] == 2 and len(ds["training"]) == 2
    assert ds["modality"] == {"0": "CT"}
    first = ds["training"][0]
    assert first["image"] == "imagesTr/case_0000_0000.nii.gz" and first["label"] == "labelsTr/case_0000.nii.gz"
    assert "Liver" in first["text"]
    img = read_volume(path.parent / first["image"])
    lab = read_volume(path.parent / first["label"])
    assert img.shape == lab.shape == (32, 32, 32)
    np.testing.assert_allclose(img.affine, lab.affine, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (12.0, 12.0, 12.0), atol=1e-4)
    assert set(np.unique(lab.array)) <= set(LABELS)
    again = _case(first["seed"], shape=(32, 32, 32), spacing=(12.0, 12.0, 12.0), dtype="int16")
    assert np.array_equal(np.asarray(img.array), again.image.array)
    assert np.array_equal(np.asarray(lab.array), again.label.array)
    assert ds["training"][0]["seed"] != ds["training"][1]["seed"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="xray"),
        dict(phase="delayed"),
        dict(axcodes="RRS"),
        dict(spacing=(1.0, -1.0, 1.0)),
        dict(shape=(1, 32, 32)),
        dict(lesions=-1),
        dict(dtype="float64"),
    ],
)
def test_user_errors_are_medct_errors(kwargs):
    args = dict(shape=(24, 24, 24)) | kwargs
    with pytest.raises(MedCTError):
        _case(0, **args)


def test_surroundings_vary_without_changing_the_anatomy():
    """Couch (plate or cradle, mattress), arms and lung density come from their own random stream:
    every kind occurs across seeds, and a case with arms down keeps the organs of its seed."""
    params = [sample_params(s) for s in range(40)]
    assert {p.table for p in params} == {"plate", "cradle"}
    assert {p.arms for p in params} == {"up", "down"}
    assert {p.mattress for p in params} == {True, False}
    down = next(s for s, p in enumerate(params) if p.arms == "down")
    case = _case(down, shape=(96, 96, 48), spacing=(5.0, 5.0, 8.0), lesions=0)
    img, lab = case.image.array, case.label.array
    # arm tissue beside the trunk: above -500 HU outside the skin, both sides, never labelled
    x_world = case.image.affine[0, 0] * np.arange(96) + case.image.affine[0, 3]
    beside = np.abs(x_world) > params[down].body_half_width + params[down].arm_gap_mm + 10
    assert (img[beside] > -500).mean() > 0.05 and not lab[beside].any()
    from dataclasses import replace

    from medct.phantom import render_phantom

    raised = render_phantom(
        replace(sample_params(down, lesions=0), arms="up"), GridSpec(shape=(96, 96, 48), spacing=(5.0, 5.0, 8.0))
    )
    assert np.array_equal(raised.label.array, lab)  # the arms add tissue, not labels or moved organs
    assert (raised.image.array[beside] > -500).mean() < (img[beside] > -500).mean()
