"""DICOM-SEG and RTSTRUCT output: exact round trips on the real planning-CT series, through the
writers and through `medct segment --output-format`, read back by medct, pydicom and highdicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medct.cli import main
from medct.dicom import read_rtstruct
from medct.dicom_out import read_dicom_seg, write_dicom_seg, write_rtstruct
from medct.io import read_volume

NAMES = {0: "background", 1: "stomach_duodenum", 2: "small_bowel", 3: "lung_left", 4: "lung_right"}


@pytest.fixture(scope="module")
def series(shared_data: Path) -> Path:
    return shared_data / "pancreas_ct_cbct" / "planct_dicom_subset20"


@pytest.fixture(scope="module")
def manual(shared_data: Path, series: Path):
    """The expert contours of slices 65..84 (what the 20-slice series holds) on the series' grid."""
    ref = read_volume(series)
    full = read_volume(shared_data / "pancreas_ct_cbct" / "planct_labels.nii.gz")
    return ref, ref.with_array(np.ascontiguousarray(full.array[:, :, 65:85], dtype=np.uint8))


def _rtstruct_by_number(path: Path, ref):
    labels, by_label = read_rtstruct(path, ref)
    number = {str(r.ROIName): int(r.ROINumber) for r in pydicom.dcmread(path).StructureSetROISequence}
    lut = np.zeros(256, np.uint8)
    for label, name in by_label.items():
        lut[label] = number[name]
    return lut[np.asarray(labels.array)]


def test_writers_round_trip_real_contours_exactly(manual, tmp_path: Path) -> None:
    ref, lab = manual
    assert len(np.unique(lab.array)) >= 3  # several organs cross these slices
    seg_path = write_dicom_seg(lab, ref, NAMES, tmp_path / "seg.dcm")
    back, names = read_dicom_seg(seg_path, ref)
    np.testing.assert_array_equal(back.array, lab.array)
    assert names == {k: v for k, v in NAMES.items() if k}
    rs_path = write_rtstruct(lab, ref, NAMES, tmp_path / "rs.dcm")
    np.testing.assert_array_equal(_rtstruct_by_number(rs_path, ref), lab.array)

    # both reference the source series slice by slice, in the patient's frame of reference
    src_uids = set(ref.meta["sop_instance_uids"])
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == ref.meta["frame_of_reference_uid"]
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= src_uids
    rs = pydicom.dcmread(rs_path)
    assert rs.Modality == "RTSTRUCT" and rs.PatientID == seg.PatientID
    contour_refs = {
        c.ContourImageSequence[0].ReferencedSOPInstanceUID for rc in rs.ROIContourSequence for c in rc.ContourSequence
    }
    assert contour_refs <= src_uids and len(contour_refs) > 1


def test_non_dicom_grids_are_refused(manual, tmp_path: Path) -> None:
    from medct.errors import InvalidVolumeError

    ref, lab = manual
    nifti_ref = ref.with_array(ref.array)
    nifti_ref.meta = {"path": "x.nii.gz", "format": "nifti"}
    with pytest.raises(InvalidVolumeError, match="not a DICOM series"):
        write_dicom_seg(lab, nifti_ref, NAMES, tmp_path / "s.dcm")
    with pytest.raises(InvalidVolumeError, match="not on the grid"):
        write_rtstruct(_shifted(lab), ref, NAMES, tmp_path / "r.dcm")
    assert not list(tmp_path.iterdir())


def _shifted(vol):
    moved = vol.with_array(vol.array)
    moved.affine = vol.affine.copy()
    moved.affine[2, 3] += 3.0
    return moved


def test_segment_output_formats_agree_with_nifti(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medct segment` on the real DICOM series: the DICOM-SEG and RTSTRUCT outputs hold, voxel for
    voxel, the labels of the NIfTI output; a NIfTI input in the same folder fails with one sentence."""
    from .conftest import make_model_folder

    # a 'model' that labels every tile touching the body (a random one gives 10^5 speckle contours)
    model_dir = make_model_folder(tmp_path / "model", patch=(16, 16, 8), constant_class=1)
    outputs = {}
    for fmt in ("nifti", "dicom-seg", "rtstruct"):
        out = tmp_path / fmt
        code = main(["segment", "-m", str(model_dir), "-i", str(series), "-o", str(out), "--output-format", fmt])
        assert code == 0, capsys.readouterr().err
        outputs[fmt] = out
    ref = read_volume(series)
    nifti = read_volume(next(outputs["nifti"].glob("*.nii.gz"))).array
    assert 0.05 < (nifti == 1).mean() < 0.95  # a labelled region with a border: the comparison is not empty
    seg, _ = read_dicom_seg(next(outputs["dicom-seg"].glob("*_seg.dcm")), ref)
    np.testing.assert_array_equal(seg.array, nifti)
    np.testing.assert_array_equal(_rtstruct_by_number(next(outputs["rtstruct"].glob("*_rtstruct.dcm")), ref), nifti)
    # the summary of an existing DICOM output is read back from it (skipped, same volumes)
    first = (outputs["dicom-seg"] / "summary.csv").read_text()
    assert (
        main(
            [
                "segment",
                "-m",
                str(model_dir),
                "-i",
                str(series),
                "-o",
                str(outputs["dicom-seg"]),
                "--output-format",
                "dicom-seg",
            ]
        )
        == 0
    )
    again = (outputs["dicom-seg"] / "summary.csv").read_text()
    import csv

    before, after = next(csv.DictReader(first.splitlines())), next(csv.DictReader(again.splitlines()))
    assert after["status"].startswith("skipped") and [after[k] for k in ("blob_ml", "rod_ml")] == [
        before[k] for k in ("blob_ml", "rod_ml")
    ]
    # what the body constraint removed is known when the labels are made, not from an existing output
    assert float(before["outside_body_ml"]) > 0 and after["outside_body_ml"] == ""

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "series").symlink_to(series, target_is_directory=True)
    (mixed / "scan.nii.gz").symlink_to(next(outputs["nifti"].glob("*.nii.gz")))
    capsys.readouterr()
    code = main(
        ["segment", "-m", str(model_dir), "-i", str(mixed), "-o", str(tmp_path / "m"), "--output-format", "rtstruct"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "1 segmented" in err and "needs DICOM input" in err and "Traceback" not in err
