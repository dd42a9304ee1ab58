"""medct.io: exact-geometry round trips, real files of every format, and every bad input."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medct.errors import GeometryMismatchError, InputPathError, InvalidVolumeError, MedCTError, UnreadableVolumeError
from medct.io import LPS_TO_RAS, Volume, check_same_grid, read_volume, validate_for_inference, write_volume

EXTS = [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"]


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(
    direction_lps: np.ndarray, spacing: tuple[float, float, float], origin_lps: tuple[float, ...]
) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = direction_lps * np.asarray(spacing)[None, :]
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


# Origins stay within ~100 mm: NIfTI stores the sform as float32 (~4e-6 mm resolution at 50 mm),
# which is what bounds the 1e-5 tolerance below; ITK formats keep float64 text/binary.
GEOMETRIES = {
    # identity LPS direction: stored like DICOM/ITK data (RAS affine has -x, -y)
    "lps": _affine(np.eye(3), (0.8, 0.8, 2.0), (-41.5, -23.25, 60.75)),
    "oblique": _affine(_rotation(0.3, -0.2, 0.7), (1.1, 0.9, 1.7), (12.0, -37.5, 8.25)),
    "anisotropic": _affine(np.diag([1.0, -1.0, -1.0]), (0.5, 0.7, 5.0), (-3.5, 55.0, -71.0)),
}


def _synthetic(dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        return rng.normal(0, 300, size=(9, 7, 5)).astype(np.float32)
    return rng.integers(-1024, 3000, size=(9, 7, 5)).astype(dtype)


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_round_trip_synthetic(tmp_path: Path, ext: str, geometry: str, dtype: str) -> None:
    vol = Volume(array=_synthetic(dtype), affine=GEOMETRIES[geometry])
    out = write_volume(vol, tmp_path / "sub" / f"vol{ext}")  # parent folder is created
    back = read_volume(out)
    assert back.array.dtype == vol.array.dtype
    assert back.shape == vol.shape
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    assert back.meta["format"] == {".mhd": "mha", ".mha": "mha", ".nrrd": "nrrd"}.get(ext, "nifti")
    # Nothing but the output (and an .mhd's data file) is left in the folder: no temp files.
    expected = {out.name} | ({"vol.raw"} if ext == ".mhd" else set())
    assert {f.name for f in out.parent.iterdir()} == expected


def test_nifti_codes_and_best_affine_kept(tmp_path: Path) -> None:
    affine = GEOMETRIES["oblique"]
    img = nib.Nifti1Image(_synthetic("int16"), affine)
    img.set_qform(affine, code=2)  # aligned
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=0)  # a decoy sform that must be ignored
    src = tmp_path / "codes.nii.gz"
    nib.save(img, src)
    vol = read_volume(src)
    np.testing.assert_allclose(vol.affine, nib.load(src).affine, atol=0)  # nibabel's best affine
    assert (vol.meta["qform_code"], vol.meta["sform_code"]) == (2, 0)
    out = write_volume(vol, tmp_path / "again.nii")
    hdr = nib.load(out).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 0)
    np.testing.assert_allclose(read_volume(out).affine, vol.affine, atol=1e-5)
    # Without codes in meta both are scanner (1).
    hdr = nib.load(write_volume(Volume(vol.array, vol.affine), tmp_path / "plain.nii.gz")).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 1)


def test_write_dtype_and_compression(tmp_path: Path) -> None:
    vol = Volume(array=np.tile(np.arange(40, dtype=np.float64), (30, 20, 1)), affine=GEOMETRIES["lps"])
    fast = write_volume(vol, tmp_path / "l1.nii.gz", dtype="int16", compress_level=1)
    small = write_volume(vol, tmp_path / "l9.nii.gz", dtype="int16", compress_level=9)
    assert small.stat().st_size <= fast.stat().st_size
    back = read_volume(small)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    mha = read_volume(write_volume(vol, tmp_path / "c.mha", compress_level=6))
    np.testing.assert_array_equal(mha.array, vol.array)
    labels = Volume(array=vol.array > 20, affine=vol.affine)  # bool is written as uint8
    assert read_volume(write_volume(labels, tmp_path / "mask.nii.gz")).array.dtype == np.uint8
    with pytest.raises(InputPathError):
        write_volume(vol, tmp_path / "out.png")


def test_real_files_round_trip(shared_data: Path, tmp_path: Path) -> None:
    sources = {
        "mha": shared_data / "elastix_lung_small" / "3DCT_lung_baseline_small.mha",
        "nii.gz": shared_data / "pancreas_ct_cbct" / "crop_cbct_fov" / "planct_crop.nii.gz",
        "dicom": shared_data / "popi_phase00_10slices_dicom",
    }
    for name, src in sources.items():
        vol = read_volume(src)
        assert vol.meta["format"] == {"mha": "mha", "nii.gz": "nifti", "dicom": "dicom"}[name]
        assert vol.meta["dtype"] == str(vol.array.dtype)
        for ext in (".nii.gz", ".mha", ".nrrd"):
            back = read_volume(write_volume(vol, tmp_path / f"{name}{ext}"))
            np.testing.assert_array_equal(back.array, vol.array)
            # float32 sform: real origins of a few hundred mm keep ~3e-5 mm; ITK formats are exact.
            atol = 1e-4 if ext == ".nii.gz" else 1e-9
            np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=atol)
    mha = read_volume(sources["mha"])
    itk = sitk.ReadImage(str(sources["mha"]))
    np.testing.assert_allclose(mha.origin_lps, itk.GetOrigin())
    np.testing.assert_allclose(mha.spacing, itk.GetSpacing())
    assert mha.array[3, 5, 7] == sitk.GetArrayViewFromImage(itk)[7, 5, 3]  # (x, y, z) vs ITK's (z, y, x)


# ----------------------------------------------------------------------------- bad input


def _raises_one_line(cls: type[MedCTError], fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(cls) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    assert "does not exist" in _raises_one_line(InputPathError, read_volume, tmp_path / "nope.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises_one_line(InputPathError, read_volume, empty)
    (empty / "notes.txt").write_text("no dicom here")
    _raises_one_line(InputPathError, read_volume, empty)


def test_non_image_and_truncated_files(tmp_path: Path, shared_data: Path) -> None:
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("this is not an image")
    assert str(fake) in _raises_one_line(UnreadableVolumeError, read_volume, fake)
    plain = tmp_path / "fake.nii"
    plain.write_bytes(b"\x00" * 10)
    _raises_one_line(UnreadableVolumeError, read_volume, plain)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    _raises_one_line(UnreadableVolumeError, read_volume, txt)
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_text("ObjectType = Image\nNDims = 3\n")
    _raises_one_line(UnreadableVolumeError, read_volume, bad_mha)
    real = (shared_data / "totalseg" / "example_ct_sm.nii.gz").read_bytes()
    cut = tmp_path / "truncated.nii.gz"
    cut.write_bytes(real[: len(real) // 2])
    _raises_one_line(UnreadableVolumeError, read_volume, cut)
    # Valid gzip stream of a truncated NIfTI (header intact, voxels missing).
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(real)[:5000]))
    _raises_one_line(UnreadableVolumeError, read_volume, short)


def test_validate_for_inference() -> None:
    arr = _synthetic("float32")
    validate_for_inference(Volume(arr, np.eye(4)))
    validate_for_inference(Volume(_synthetic("int16"), np.eye(4)))
    nan = arr.copy()
    nan[1, 2, 3] = np.nan
    nan[0, 0, 0] = np.inf
    assert "2 NaN" in _raises_one_line(InvalidVolumeError, validate_for_inference, Volume(nan, np.eye(4)))
    const = Volume(np.full((4, 4, 4), -1000, np.int16), np.eye(4), {"path": "c.nii.gz"})
    assert "constant" in _raises_one_line(InvalidVolumeError, validate_for_inference, const)


def test_dimensionality(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    assert "2D" in _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 1), np.int16), np.eye(4)), tmp_path / "slab.nii.gz")
    assert "3D" in _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "slab.nii.gz")
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(tmp_path / "flat.mha"))
    _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "flat.mha")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5, 3), np.int16), np.eye(4)), tmp_path / "time.nii.gz")
    assert "4D" in _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "time.nii.gz")
    # A trailing singleton dimension is squeezed, keeping the affine.
    data = _synthetic("int16")[..., None]
    nib.save(nib.Nifti1Image(data, GEOMETRIES["oblique"]), tmp_path / "one.nii.gz")
    vol = read_volume(tmp_path / "one.nii.gz")
    assert vol.shape == (9, 7, 5) and vol.array.ndim == 3
    np.testing.assert_array_equal(vol.array, data[..., 0])
    np.testing.assert_allclose(vol.affine, GEOMETRIES["oblique"], atol=1e-5)


def test_check_same_grid() -> None:
    image = Volume(_synthetic("int16"), GEOMETRIES["anisotropic"])
    check_same_grid(image, image.with_array(np.zeros(image.shape, np.uint8)), "label and image")
    nudged = image.affine.copy()
    nudged[0, 3] += 1e-6  # float32 storage noise is not a mismatch
    check_same_grid(image, Volume(image.array, nudged), "label and image")
    shifted = image.affine.copy()
    shifted[2, 3] += 0.5
    msg = _raises_one_line(
        GeometryMismatchError, check_same_grid, image, Volume(image.array, shifted), "label and image"
    )
    assert "label and image" in msg
    other_shape = Volume(np.zeros((9, 7, 6), np.uint8), image.affine)
    _raises_one_line(GeometryMismatchError, check_same_grid, image, other_shape, "label and image")
    scaled = image.affine.copy()
    scaled[:3, 0] *= 1.0001  # 0.5 mm x 1e-4 x 8 voxels = 4e-4 mm at the far corner
    _raises_one_line(GeometryMismatchError, check_same_grid, image, Volume(image.array, scaled), "pair")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume(_synthetic("int16"), GEOMETRIES["lps"])
    keep = write_volume(vol, tmp_path / "case.nii.gz")
    before = keep.read_bytes()

    def broken_to_file_map(self, file_map, dtype=None):  # type: ignore[no-untyped-def]
        file_map["image"].fileobj.write(b"partial header bytes")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken_to_file_map)
    with pytest.raises(OSError, match="disk full"):
        write_volume(vol.with_array(vol.array + 1), tmp_path / "case.nii.gz")
    with pytest.raises(OSError):
        write_volume(vol, tmp_path / "new.nii")
    assert [f.name for f in tmp_path.iterdir()] == ["case.nii.gz"]  # no temp files, no partial output
    assert keep.read_bytes() == before  # the previous output is untouched

    def broken_itk_write(*args, **kwargs):  # type: ignore[no-untyped-def]
        Path(args[1]).write_bytes(b"half")
        raise RuntimeError("ITK ERROR: cannot write")

    monkeypatch.setattr(sitk, "WriteImage", broken_itk_write)
    with pytest.raises(RuntimeError):
        write_volume(vol, tmp_path / "x.mhd")
    assert [f.name for f in tmp_path.iterdir()] == ["case.nii.gz"]


def test_copy_of_shared_file_reads_identically(shared_data: Path, tmp_path: Path) -> None:
    """A read is a pure function of the bytes (not of the path or its extension case)."""
    src = shared_data / "totalseg" / "example_ct_sm.nii.gz"
    dst = tmp_path / "CT.NII.GZ"
    shutil.copy(src, dst)
    a, b = read_volume(src), read_volume(dst)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import subprocess

    from medct.paths import TEMP_PREFIX, atomic_file, remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that has ended
    stale_file = tmp_path / f"{TEMP_PREFIX}{dead.pid}-summary.csv.abc123"
    stale_file.write_text("")
    stale_dir = tmp_path / f"{TEMP_PREFIX}{dead.pid}-model.xyz"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-case.nii.gz.q1w2e3.nii.gz"
    live.write_text("")
    mine = tmp_path / ".hidden_user_file"
    mine.write_text("")
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted([stale_file.name, stale_dir.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])
    # finished atomic writes have the permissions a plain open() would give, not mkstemp's 0600
    with atomic_file(tmp_path / "summary.csv") as tmp:
        tmp.write_text("a,b\n")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "summary.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_removes_what_a_killed_write_of_the_same_name_left(tmp_path: Path) -> None:
    """Commands that write one file (export, reduce, a checkpoint) run no folder sweep: the next
    atomic write of a name removes the dead writers' temporaries of that name, and only those."""
    import subprocess

    from medct.paths import TEMP_PREFIX, atomic_file, atomic_folder

    dead = subprocess.Popen(["true"])
    dead.wait()
    of_ckpt = tmp_path / f"{TEMP_PREFIX}{dead.pid}-last.ckpt.k9.ckpt"
    of_model = tmp_path / f"{TEMP_PREFIX}{dead.pid}-model.x1"
    of_other = tmp_path / f"{TEMP_PREFIX}{dead.pid}-last.ckpt-v1.ckpt.k9.ckpt"  # another file's
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-last.ckpt.live.ckpt"
    for f in (of_ckpt, of_other, live):
        f.write_bytes(b"half")
    (of_model / "weights").mkdir(parents=True)
    with atomic_file(tmp_path / "last.ckpt") as tmp:
        tmp.write_bytes(b"whole")
    with atomic_folder(tmp_path / "model") as stage:
        (stage / "card.json").write_text("{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["last.ckpt", "model", of_other.name, live.name])


def test_claim_is_one_holder_and_taken_over_from_a_dead_one(tmp_path: Path) -> None:
    import subprocess

    from medct.paths import claim

    lock = tmp_path / ".medct-claim-chain"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(str(sleeper.pid))
        assert claim(lock) == sleeper.pid  # a live holder keeps it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert claim(lock) == 0 and lock.read_text() == str(os.getpid())  # its holder died: ours now
    assert claim(lock) == os.getpid()  # one claim per holder, ours included


def test_nifti_headers_that_do_not_place_the_voxels_are_refused_or_noted(tmp_path: Path) -> None:
    """Zero pixdim under a qform, a zero sform column: one sentence; qform and sform that disagree:
    the sform is used and a note says so."""
    data = np.random.default_rng(0).normal(0, 100, (8, 7, 6)).astype(np.float32)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    img = nib.Nifti1Image(data, aff)
    img.set_sform(None, code=0)
    img.set_qform(aff, code=1)
    nib.save(img, tmp_path / "zero_pixdim.nii")
    raw = bytearray((tmp_path / "zero_pixdim.nii").read_bytes())
    raw[76 + 3 * 4 : 76 + 4 * 4] = struct.pack("<f", 0.0)  # pixdim[3] (nibabel's save would recompute it)
    (tmp_path / "zero_pixdim.nii").write_bytes(bytes(raw))
    message = _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "zero_pixdim.nii")
    assert "voxel size must be positive" in message

    bad = aff.copy()
    bad[:3, 2] = 0.0
    img = nib.Nifti1Image(data, aff)
    img.set_sform(bad, code=1)
    nib.save(img, tmp_path / "zero_column.nii.gz")
    assert "degenerate sform" in _raises_one_line(InvalidVolumeError, read_volume, tmp_path / "zero_column.nii.gz")

    shifted = aff.copy()
    shifted[:3, 3] += (5.0, 0.0, 0.0)
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(shifted, code=1)
    nib.save(img, tmp_path / "disagree.nii.gz")
    vol = read_volume(tmp_path / "disagree.nii.gz")
    np.testing.assert_allclose(vol.affine, shifted, atol=1e-5)
    assert "disagree" in vol.meta["notes"][0] and "used the sform" in vol.meta["notes"][0]
    assert read_volume(write_volume(vol, tmp_path / "agree.nii.gz")).meta["notes"] == []  # written consistently
