"""medct.dicom: series reading against the NIfTI conversion and SimpleITK, broken series, RTSTRUCT."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as MplPath

from medct.dicom import fill_polygons_even_odd, find_dicom_series, read_dicom_series, read_rtstruct
from medct.errors import DicomSeriesError, InputPathError, InvalidVolumeError, MedCTError, UnreadableVolumeError
from medct.io import Volume, read_volume

FIRST_SLICE = 65  # planct_dicom_subset20 holds planct.nii.gz slices z = 65..84 (MANIFEST.md)


@pytest.fixture(scope="module")
def pancreas(shared_data: Path) -> Path:
    return shared_data / "pancreas_ct_cbct"


@pytest.fixture(scope="module")
def subset20(pancreas: Path) -> Path:
    return pancreas / "planct_dicom_subset20"


def _raises_one_line(cls: type[MedCTError], fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(cls) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_matches_sitk(vol: Volume, folder: Path) -> None:
    img = _sitk_series(folder)
    np.testing.assert_allclose(vol.origin_lps, img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(vol.spacing, img.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(vol.direction_lps.ravel(), img.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayViewFromImage(img).transpose(2, 1, 0))  # (z,y,x)->(x,y,z)


def test_subset20_equals_nifti_and_sitk(pancreas: Path, subset20: Path) -> None:
    vol = read_volume(subset20)
    nifti = read_volume(pancreas / "planct.nii.gz")
    assert vol.shape == (512, 512, 20)
    assert vol.array.dtype == np.int16  # 12-bit stored + intercept -1000 fits int16 HU
    # Both are stored in the same (LPS) index order, so slices z = 65..84 match voxel for voxel.
    np.testing.assert_array_equal(vol.array, nifti.array[:, :, FIRST_SLICE : FIRST_SLICE + 20])
    shifted = nifti.affine.copy()
    shifted[:3, 3] = (nifti.affine @ np.array([0.0, 0.0, FIRST_SLICE, 1.0]))[:3]  # world position of slice 65
    np.testing.assert_allclose(vol.affine, shifted, rtol=0, atol=1e-3)
    _assert_matches_sitk(vol, subset20)
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "CT"
    assert vol.meta["patient_id"] == "Pancreas-CT-CB_001"
    assert vol.meta["series_uid"] in find_dicom_series(subset20)
    assert len(vol.meta["files"]) == 20


def test_one_file_means_its_series(subset20: Path) -> None:
    whole = read_dicom_series(subset20)
    one = read_volume(subset20 / "1-060.dcm")
    np.testing.assert_array_equal(one.array, whole.array)
    np.testing.assert_array_equal(one.affine, whole.affine)


def test_popi_private_tag_and_recursive_search(shared_data: Path, tmp_path: Path) -> None:
    popi = shared_data / "popi_phase00_10slices_dicom"
    nested = tmp_path / "patient" / "study" / "series"
    shutil.copytree(popi, nested)
    (tmp_path / "patient" / "README.txt").write_text("not dicom")
    (nested / "thumbs.db").write_bytes(b"\x00" * 300)
    series = find_dicom_series(tmp_path)
    assert len(series) == 1 and len(next(iter(series.values()))) == 10
    vol = read_volume(tmp_path)
    assert vol.shape == (512, 512, 10)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0))
    _assert_matches_sitk(vol, popi)


def test_oblique_anisotropic_series_matches_sitk(shared_data: Path, tmp_path: Path) -> None:
    """Rows/columns conventions: rewrite POPI as an oblique series with 0.7 x 1.3 mm pixels, reversed order."""
    popi = shared_data / "popi_phase00_10slices_dicom"
    folder = tmp_path / "oblique"
    folder.mkdir()
    angle = np.deg2rad(20.0)
    row_dir = np.array([np.cos(angle), np.sin(angle), 0.0])  # direction of increasing column index
    col_dir = np.array([-np.sin(angle) * 0.6, np.cos(angle) * 0.6, 0.8])  # increasing row index
    col_dir -= row_dir * (row_dir @ col_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-120.0, -80.5, 40.25])
    for k, f in enumerate(sorted(popi.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin - k * 2.5 * normal]  # file order runs against n
        ds.PixelSpacing = ["0.7", "1.3"]  # (between rows, between columns)
        ds.save_as(folder / f"img{k:02d}.dcm")
    vol = read_volume(folder)
    _assert_matches_sitk(vol, folder)
    np.testing.assert_allclose(vol.spacing, (1.3, 0.7, 2.5), atol=1e-6)
    np.testing.assert_allclose(vol.direction_lps[:, 0], row_dir, atol=1e-6)
    np.testing.assert_allclose(vol.origin_lps, origin - 9 * 2.5 * normal, atol=1e-4)


def _copy(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def _names(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir())


def test_missing_slice(subset20: Path, tmp_path: Path) -> None:
    names = _names(subset20)
    folder = _copy(subset20, tmp_path / "gap", names[:9] + names[10:])
    msg = _raises_one_line(DicomSeriesError, read_volume, folder)
    assert "misses about 1 slice" in msg
    assert "1-058.dcm" in msg and "1-060.dcm" in msg  # names the neighbours of the hole (1-059.dcm)


def test_uneven_spacing_duplicates_orientation_size(subset20: Path, tmp_path: Path) -> None:
    names = _names(subset20)

    def edited(tag: str, value: object) -> Path:
        folder = _copy(subset20, tmp_path / tag, names)
        ds = pydicom.dcmread(folder / names[7])
        setattr(ds, tag, value)
        ds.save_as(folder / names[7])
        return folder

    ipp = [float(v) for v in pydicom.dcmread(subset20 / names[7]).ImagePositionPatient]
    assert "uneven" in _raises_one_line(
        DicomSeriesError, read_volume, edited("ImagePositionPatient", [*ipp[:2], ipp[2] + 0.5])
    )
    assert "orientation" in _raises_one_line(
        DicomSeriesError, read_volume, edited("ImageOrientationPatient", [1, 0, 0, 0, 0.8, 0.6])
    )
    assert "pixel spacing" in _raises_one_line(DicomSeriesError, read_volume, edited("PixelSpacing", [0.9, 0.9]))
    dup = _copy(subset20, tmp_path / "dup", names)
    shutil.copy(subset20 / names[3], dup / "copy.dcm")
    assert "same position" in _raises_one_line(DicomSeriesError, read_volume, dup)
    single = _copy(subset20, tmp_path / "single", names[:1])
    assert "2D" in _raises_one_line(InvalidVolumeError, read_volume, single)


def test_two_series_need_a_uid(subset20: Path, shared_data: Path, tmp_path: Path) -> None:
    popi = shared_data / "popi_phase00_10slices_dicom"
    both = _copy(subset20, tmp_path / "both", _names(subset20))
    _copy(popi, both, _names(popi))
    series = find_dicom_series(both)
    assert sorted(len(v) for v in series.values()) == [10, 20]
    msg = _raises_one_line(DicomSeriesError, read_volume, both)
    for uid in series:
        assert uid in msg
    assert "PANCREAS DI" in msg and "20 files" in msg and "10 files" in msg
    uid20 = next(uid for uid, files in series.items() if len(files) == 20)
    np.testing.assert_array_equal(read_volume(both, series_uid=uid20).array, read_volume(subset20).array)
    _raises_one_line(DicomSeriesError, read_volume, both, series_uid="1.2.3.4")
    # A single file still means its own series, even in a mixed folder.
    assert read_volume(both / "00-slice000.dcm").shape == (512, 512, 10)


def test_series_without_series_uid_are_grouped_by_what_identifies_them(
    subset20: Path, shared_data: Path, tmp_path: Path
) -> None:
    """De-identified slices without SeriesInstanceUID: one series per frame of reference,
    orientation, size, ...; read exactly as with their UIDs; two of them need --series-uid."""
    both = tmp_path / "both"
    both.mkdir()
    for src in (subset20, shared_data / "popi_phase00_10slices_dicom"):
        for f in sorted(src.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            del ds.SeriesInstanceUID
            ds.save_as(both / f"{src.name}_{f.name}")
    series = find_dicom_series(both)
    assert sorted(len(v) for v in series.values()) == [10, 20]
    assert all(uid.startswith("no-uid-") for uid in series)
    msg = _raises_one_line(DicomSeriesError, read_volume, both)
    assert "--series-uid" in msg and all(uid in msg for uid in series)
    uid20 = next(uid for uid, files in series.items() if len(files) == 20)
    np.testing.assert_array_equal(read_volume(both, series_uid=uid20).array, read_volume(subset20).array)
    one = tmp_path / "one"
    one.mkdir()
    for f in series[uid20]:
        shutil.copy(f, one / f.name)
    vol = read_volume(one)
    np.testing.assert_allclose(vol.affine, read_volume(subset20).affine, atol=1e-6)
    assert read_volume(one / sorted(p.name for p in one.iterdir())[0]).shape == vol.shape  # a file: its series


def test_no_dicom_and_missing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    _raises_one_line(InputPathError, read_dicom_series, tmp_path)
    _raises_one_line(InputPathError, read_dicom_series, tmp_path / "nope")
    _raises_one_line(UnreadableVolumeError, read_dicom_series, tmp_path / "a.txt")


def test_compressed_series(subset20: Path, tmp_path: Path) -> None:
    """RLE Lossless (pydicom's native encoder), JPEG 2000 lossless (pylibjpeg-openjpeg) and JPEG-LS
    lossless (encoded with pyjpegls, a test-only dependency) slices in one series."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    names = _names(subset20)
    folder = _copy(subset20, tmp_path / "compressed", names)
    syntax_cycle = (RLELossless, JPEG2000Lossless, JPEGLSLossless)
    for i, name in enumerate(names[:9]):
        ds = pydicom.dcmread(folder / name)
        ds.compress(syntax_cycle[i % 3])
        ds.save_as(folder / name)
    syntaxes = {pydicom.dcmread(folder / n).file_meta.TransferSyntaxUID for n in names}
    assert set(syntax_cycle) <= syntaxes
    compressed, original = read_volume(folder), read_volume(subset20)
    np.testing.assert_array_equal(compressed.array, original.array)
    np.testing.assert_array_equal(compressed.affine, original.affine)
    # Users have no pyjpegls: JPEG-LS must also decode through the runtime dependency pylibjpeg-libjpeg.
    jls = folder / names[2]
    assert pydicom.dcmread(jls).file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(
        pixel_array(jls, decoding_plugin="pylibjpeg"), pydicom.dcmread(subset20 / names[2]).pixel_array
    )


def test_rescale_slope_gives_float_hu(subset20: Path, tmp_path: Path) -> None:
    names = _names(subset20)
    folder = _copy(subset20, tmp_path / "slope", names)
    for n in names:
        ds = pydicom.dcmread(folder / n)
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.25
        ds.save_as(folder / n)
    vol = read_volume(folder)
    assert vol.array.dtype == np.float32  # non-integer slope
    raw = read_volume(subset20).array.astype(np.float64) + 1000.0  # stored values (intercept was -1000)
    np.testing.assert_allclose(vol.array, raw * 0.5 - 1024.25, atol=1e-3)


# ----------------------------------------------------------------------------- RTSTRUCT


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def test_even_odd_fill_matches_matplotlib() -> None:
    rng = np.random.default_rng(3)
    outer = np.array([[2.3, 3.1], [40.7, 5.2], [37.2, 44.9], [6.1, 38.4]])
    hole = np.array([[12.5, 14.0], [25.0, 13.2], [22.8, 27.6], [13.1, 25.5]])
    star = 30 + np.c_[np.cos(np.linspace(0, 4 * np.pi, 5)), np.sin(np.linspace(0, 4 * np.pi, 5))] * 20
    grid = np.stack(np.meshgrid(np.arange(48), np.arange(50), indexing="ij"), -1).reshape(-1, 2)
    for polys in ([outer], [outer, hole], [rng.uniform(-5, 55, size=(40, 2))], [star]):
        ours = fill_polygons_even_odd(polys, (48, 50))
        ref = np.zeros(48 * 50, dtype=bool)
        for poly in polys:  # even-odd across polygons: XOR of each polygon's own even-odd fill
            ref ^= MplPath(poly).contains_points(grid)
        assert ours.sum() > 0
        # Centres exactly on an edge may go either way; random vertices put none there.
        assert (ours.ravel() != ref).sum() <= 2, (ours.ravel() != ref).sum()
    with_hole = fill_polygons_even_odd([outer, hole], (48, 50))
    assert not with_hole[18, 20] and with_hole[8, 30]


def _label_names(pancreas: Path) -> list[str]:
    names = json.loads((pancreas / "label_map.json").read_text())["planct_labels"]
    return [names[str(i)] for i in range(1, len(names) + 1)]


def test_rtstruct_on_dicom_subset_fast(pancreas: Path, subset20: Path) -> None:
    reference = read_volume(subset20)  # 20 slices: the fast variant
    truth = read_volume(pancreas / "planct_labels.nii.gz").array[:, :, FIRST_SLICE : FIRST_SLICE + 20]
    labels, index = read_rtstruct(pancreas / "rtstruct_dicom" / "RS_planct_BSPC.dcm", reference, _label_names(pancreas))
    assert labels.array.dtype == np.uint8 and labels.shape == reference.shape
    np.testing.assert_array_equal(labels.affine, reference.affine)
    assert index == dict(enumerate(_label_names(pancreas), start=1))
    for label, name in index.items():
        if (truth == label).sum() > 1000:  # structures present on these 20 slices
            dice = _dice(labels.array == label, truth == label)
            print(f"subset20 {name}: Dice {dice:.4f}")
            assert dice > 0.9, (name, dice)


def test_rtstruct_full_volume(pancreas: Path) -> None:
    reference = read_volume(pancreas / "planct.nii.gz")
    truth = read_volume(pancreas / "planct_labels.nii.gz").array
    start = time.perf_counter()
    labels, index = read_rtstruct(pancreas / "rtstruct_dicom" / "RS_planct_BSPC.dcm", reference, _label_names(pancreas))
    print(f"rasterised 512x512x134 in {time.perf_counter() - start:.2f} s")
    for label, name in index.items():
        dice = _dice(labels.array == label, truth == label)
        print(f"planct {name}: Dice {dice:.4f}")
        assert dice > 0.9, (name, dice)
    # Without a selection every ROI is drawn in file order, the later ROI winning overlaps.
    everything, all_index = read_rtstruct(pancreas / "rtstruct_dicom" / "RS_planct_BSPC.dcm", reference)
    assert list(all_index.values()) == ["Bowel_sm_planCT", "LUNG_L", "LUNG_R", "ROI", "Stomach_duo_planCT"]
    stomach = labels.array == 1
    np.testing.assert_array_equal(everything.array[stomach], 5)  # the stomach (last) wins over "ROI"


def test_rtstruct_errors(pancreas: Path, subset20: Path) -> None:
    reference = read_volume(subset20)
    rs = pancreas / "rtstruct_dicom" / "RS_planct_BSPC.dcm"
    _raises_one_line(InvalidVolumeError, read_rtstruct, rs, reference, ["Liver"])
    _raises_one_line(UnreadableVolumeError, read_rtstruct, subset20 / "1-050.dcm", reference)
    _raises_one_line(InputPathError, read_rtstruct, pancreas / "nope.dcm", reference)
    assert "RTSTRUCT" in _raises_one_line(UnreadableVolumeError, read_volume, rs)  # not an image series


def test_files_without_preamble_are_read(subset20: Path, tmp_path: Path) -> None:
    """DICOM data sets written without the 128-byte preamble and 'DICM' read as the same series;
    a random file still does not count as DICOM."""
    from medct.io import is_dicom_file

    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(subset20.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        with open(raw / f.name, "wb") as out:  # no preamble, no file meta: the bare data set
            fp = pydicom.filebase.DicomFileLike(out)
            fp.is_implicit_VR, fp.is_little_endian = True, True
            pydicom.filewriter.write_dataset(fp, pydicom.Dataset(ds))
        assert (raw / f.name).read_bytes()[128:132] != b"DICM"
    assert all(is_dicom_file(p) for p in raw.iterdir())
    np.testing.assert_array_equal(read_volume(raw).array, read_volume(subset20).array)
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    assert not is_dicom_file(tmp_path / "noise.bin")


def test_gantry_tilt_is_kept_exactly_as_a_sheared_grid(subset20: Path, tmp_path: Path) -> None:
    """A tilted acquisition (slices step along the table, not along their normal) is neither
    'missing slices' nor resampled: the affine puts every slice at its ImagePositionPatient, and a
    note names the tilt; the NIfTI written from it keeps the shear."""
    from medct.io import write_volume

    tilted = tmp_path / "tilted"
    tilted.mkdir()
    tilt = np.radians(12.0)
    files = sorted(subset20.glob("*.dcm"))
    z0 = float(pydicom.dcmread(files[0]).ImagePositionPatient[2])
    positions = []
    for f in files:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - z0) * np.tan(tilt), z]  # sheared along y with the table
        ds.GantryDetectorTilt = 12.0
        positions.append(ds.ImagePositionPatient)
        ds.save_as(tilted / f.name)
    vol = read_volume(tilted)
    assert "gantry tilt 12.0 degrees" in vol.meta["notes"][0]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine  # RAS -> LPS
    order = np.argsort([float(p[2]) for p in positions])
    for k, i in enumerate(order):  # voxel (0, 0, k) sits at slice k's position
        np.testing.assert_allclose(lps[:3, 3] + k * lps[:3, 2], [float(v) for v in positions[i]], atol=1e-4)
    np.testing.assert_array_equal(vol.array, read_volume(subset20).array)
    back = read_volume(write_volume(vol, tmp_path / "tilted.nii.gz"))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
