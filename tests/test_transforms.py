"""medct.transforms builders: geometry (RAS, spacing, world positions kept), labels, patches, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medct.errors import GeometryMismatchError, InvalidVolumeError
from medct.transforms import (
    LoadVolumed,
    Preprocessing,
    infer_transforms,
    scale_intensity,
    train_transforms,
    val_transforms,
)

SHAPE = (80, 70, 12)
SPACING = (0.8, 0.9, 2.5)
MARKER_IJK = np.array([32.0, 30.0, 5.0])  # centre of the bright labelled sphere (label 2)


def _lps_affine() -> np.ndarray:
    """i runs to the patient's left, j to posterior, k superior: an LPS-stored, anisotropic grid."""
    aff = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    aff[:3, 3] = [30.0, 25.0, -40.0]
    return aff


def _case(tmp_path, suffix=".nii.gz"):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(float)
    mm = ijk * np.array(SPACING)
    centre_mm = (np.array(SHAPE) - 1) / 2 * np.array(SPACING)
    body = np.linalg.norm((mm - centre_mm)[..., :2], axis=-1) < 16.0
    image = np.where(body, 30.0, -1000.0).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    organ = np.linalg.norm(mm - centre_mm - [6, 0, 0], axis=-1) < 6.0
    marker = np.linalg.norm(mm - MARKER_IJK * np.array(SPACING), axis=-1) < 4.0
    image[organ], label[organ] = 80, 1
    image[marker], label[marker] = 900, 2
    aff = _lps_affine()
    paths = {}
    for key, arr in (("image", image), ("label", label)):
        p = tmp_path / f"{key}{suffix}"
        if suffix == ".nii.gz":
            nib.save(nib.Nifti1Image(arr, aff), str(p))
        else:  # ITK: (z, y, x) array, LPS origin/direction
            img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
            img.SetSpacing(SPACING)
            img.SetOrigin(lps[:3, 3].tolist())
            img.SetDirection((lps[:3, :3] / np.array(SPACING)).ravel().tolist())
            sitk.WriteImage(img, str(p))
        paths[key] = str(p)
    return paths, image, label


def _world(aff, ijk):
    return (np.asarray(aff) @ np.append(ijk, 1.0))[:3]


PRE = Preprocessing(spacing=(1.5, 1.5, 1.5), hu_min=-1000.0, hu_max=1000.0)


def test_load_volumed_metatensor_geometry(tmp_path):
    paths, image, label = _case(tmp_path)
    d = LoadVolumed(keys=("image", "label"))(paths)
    img, lab = d["image"], d["label"]
    assert img.shape == (1, *SHAPE) and img.dtype == torch.float32 and lab.dtype == torch.uint8
    np.testing.assert_allclose(img.affine.numpy(), _lps_affine())
    np.testing.assert_array_equal(img[0].numpy(), image.astype(np.float32))
    np.testing.assert_array_equal(lab[0].numpy(), label)
    assert img.meta["filename_or_obj"] == paths["image"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_infer_transforms_to_ras_target_spacing_keeps_world_positions(tmp_path, suffix):
    paths, _, _ = _case(tmp_path, suffix)
    out = infer_transforms(PRE)({"image": paths["image"]})["image"]
    aff = out.affine.numpy()
    np.testing.assert_allclose(aff[:3, :3], np.diag(PRE.spacing), atol=1e-6)  # RAS, 1.5 mm
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # the bright marker sits at the same world position before and after
    x = out[0].numpy()
    centroid = np.argwhere(x > scale_intensity(np.array([700.0]), PRE)[0]).mean(0)
    np.testing.assert_allclose(_world(aff, centroid), _world(_lps_affine(), MARKER_IJK), atol=1.0)
    extent_in = np.array(SHAPE) * np.array(SPACING)
    np.testing.assert_allclose(np.array(out.shape[1:]) * 1.5, extent_in, atol=1.5)


def test_nifti_and_mha_give_identical_tensors(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = infer_transforms(PRE)({"image": _case(tmp_path / "a")[0]["image"]})
    b = infer_transforms(PRE)({"image": _case(tmp_path / "b", ".mha")[0]["image"]})
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())
    np.testing.assert_allclose(a["image"].affine.numpy(), b["image"].affine.numpy(), atol=1e-5)


def test_val_transforms_keep_labels_and_crop_to_body(tmp_path):
    paths, _, label = _case(tmp_path)
    d = val_transforms(PRE)(paths)
    img, lab = d["image"], d["label"]
    assert img.shape == lab.shape and img.dtype == lab.dtype == torch.float32
    assert set(torch.unique(lab).tolist()) == {0.0, 1.0, 2.0}  # nearest: no new values
    # label volume (mm^3) survives resampling and cropping
    for c in (1, 2):
        vol_in = (label == c).sum() * np.prod(SPACING)
        vol_out = float((lab == c).sum()) * 1.5**3
        assert abs(vol_out - vol_in) / vol_in < 0.25
    # cropped to the body: air columns at the in-plane corners are gone
    full = infer_transforms(PRE)({"image": paths["image"]})["image"]
    assert img.shape[1] * img.shape[2] < full.shape[1] * full.shape[2]
    assert img.shape[3] == full.shape[3]  # the cylinder spans every slice


def test_train_transforms_patches(tmp_path):
    paths, _, _ = _case(tmp_path)
    xform = train_transforms(PRE, patch_size=(16, 16, 16), num_samples=3, pos=1.0, neg=0.0, augment=True)
    xform.set_random_state(0)
    samples = xform(paths)
    assert isinstance(samples, list) and len(samples) == 3
    for s in samples:
        assert s["image"].shape == (1, 16, 16, 16) and s["label"].shape == (1, 16, 16, 16)
        assert s["image"].dtype == torch.float32 and not hasattr(s["image"], "affine")
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0, 2.0}
        assert (s["label"] > 0).any()  # pos=1, neg=0: every patch is centred on foreground


def test_train_transforms_pad_small_volumes(tmp_path):
    paths, _, _ = _case(tmp_path)
    samples = train_transforms(PRE, patch_size=(48, 48, 48), num_samples=1, augment=False)(paths)
    assert samples[0]["image"].shape == (1, 48, 48, 48)


def test_load_rejects_mismatched_grid_and_bad_labels(tmp_path):
    paths, image, label = _case(tmp_path)
    shifted = _lps_affine()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(label, shifted), str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(GeometryMismatchError):
        LoadVolumed()({"image": paths["image"], "label": str(tmp_path / "shifted.nii.gz")})
    nib.save(nib.Nifti1Image(label.astype(np.float32) * 0.5, _lps_affine()), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(InvalidVolumeError, match="non-integer"):
        LoadVolumed()({"image": paths["image"], "label": str(tmp_path / "soft.nii.gz")})


def test_intensity_scaling_matches_scale_intensity(tmp_path):
    paths, image, _ = _case(tmp_path)
    pre = Preprocessing(spacing=SPACING, hu_min=-200.0, hu_max=300.0)
    out = infer_transforms(pre)({"image": paths["image"]})["image"]
    # LPS -> RAS flips i and j; spacing is unchanged so values are the scaled input, flipped
    expected = scale_intensity(image, pre)[::-1, ::-1, :]
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_label_crops_draw_each_class_equally_with_num_classes(tmp_path):
    """nnU-Net's foreground oversampling: with num_classes a label-centred crop first draws a class
    the case holds, so the small marker (label 2, 4 mm) is centred as often as the organ (6 mm);
    MONAI's pos/neg crop centres on any labelled voxel, i.e. mostly the larger organ."""
    paths, _, _ = _case(tmp_path)

    def marker_share(num_classes: int | None) -> float:
        xform = train_transforms(
            PRE, patch_size=(8, 8, 8), num_samples=300, pos=1.0, neg=0.0, augment=False, num_classes=num_classes
        )
        xform.set_random_state(0)
        centres = [int(s["label"][0, 4, 4, 4]) for s in xform(paths)]
        assert all(c in (1, 2) for c in centres)  # pos=1, neg=0: every crop is centred on a label
        return centres.count(2) / len(centres)

    per_class, any_label = marker_share(3), marker_share(None)  # measured: 0.44 and 0.27
    assert per_class > any_label + 0.1 and any_label < 0.32  # (volume share of the marker: 0.23)
