"""Read and write volumes with their exact geometry.

One entry point per direction: `read_volume` (NIfTI via nibabel, MHA/MHD/NRRD via SimpleITK,
DICOM series via `medct.dicom`) and `write_volume` (by extension, atomic). Every reader returns a
`Volume`: the voxels in the file's own index order and a 4x4 voxel -> RAS+ affine (the nibabel /
MONAI convention), so nothing is reoriented on the way in or out and outputs carry the input's
geometry bit for bit (NIfTI: up to the float32 storage of its sform).

Conventions and sources:
- NIfTI-1 header (qform/sform and their codes): https://nifti.nimh.nih.gov/nifti-1 ; nibabel's
  `img.affine` is the "best" affine (sform if sform_code > 0, else qform, else pixdim only).
- ITK images: world = origin + direction @ diag(spacing) @ index, in LPS millimetres
  (https://simpleitk.readthedocs.io/en/master/fundamentalConcepts.html); SimpleITK's numpy view
  is indexed (z, y, x), hence the transposes below.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import sys
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medct.errors import GeometryMismatchError, InputPathError, InvalidVolumeError, UnreadableVolumeError
from medct.paths import DICOM_SUFFIXES, NIFTI_SUFFIXES, atomic_files_in, is_dicom_file
from medct.volume import LPS_TO_RAS, Volume

__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "read_volume",
    "write_volume",
    "validate_for_inference",
    "check_same_grid",
    "is_dicom_file",
    "read_phases",
]

# Largest misplacement (mm) of any grid corner for two volumes to count as sharing a grid.
GRID_TOLERANCE_MM = 1e-4
# ITK file suffix -> the format name used in messages and metadata
_ITK_FORMATS = {".mha": "mha", ".mhd": "mha", ".nrrd": "nrrd", ".nhdr": "nrrd"}


# ----------------------------------------------------------------------------- helpers


def _format_of(path: Path) -> str | None:
    """'nifti' | 'mha' | 'nrrd' | 'dicom' from the file name, None when unknown."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in _ITK_FORMATS:
        return _ITK_FORMATS[path.suffix.lower()]
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return None


def affine_from_itk(origin_lps: np.ndarray, spacing: np.ndarray, direction_lps: np.ndarray) -> np.ndarray:
    """(4, 4) voxel -> RAS affine from ITK's LPS origin (3,), spacing (3,) and direction (3, 3)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction_lps, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _as_3d(array_shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3D shape to use for an image of `array_shape`, or InvalidVolumeError (2D / 4D)."""
    shape = list(array_shape)
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton dims (NIfTI time/vector axes)
        shape.pop()
    dims = "x".join(str(s) for s in array_shape)
    if len(shape) > 3:
        raise InvalidVolumeError(
            f"{path} is a {len(shape)}D image ({dims}); medct needs a single 3D volume, so split it first."
        )
    if len(shape) < 3 or min(shape) < 2:
        raise InvalidVolumeError(
            f"{path} is a 2D image ({dims}); medct models are 3D and need at least 2 voxels along every axis."
        )
    return shape[0], shape[1], shape[2]


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        # nibabel logs "pixdim[1,2,3] should be non-zero; setting 0 dims to 1" and goes on with 1 mm;
        # medct refuses that header in one sentence instead (_nifti_affine), so the log is muted
        nib_log = logging.getLogger("nibabel.global")
        level = nib_log.level
        nib_log.setLevel(logging.CRITICAL)
        try:
            img = nib.load(path)
        finally:
            nib_log.setLevel(level)
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
            raise ImageFileError(f"not a NIfTI image: {type(img).__name__}")
        shape = _as_3d(tuple(img.shape), path)
        array = np.asanyarray(img.dataobj).reshape(shape, order="A")  # (X, Y, Z); scl_slope/inter applied
    except InvalidVolumeError:
        raise
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError, TypeError) as e:
        raise UnreadableVolumeError(
            f"{path} is not a readable NIfTI image (truncated or corrupt file: {_one_line(e)})."
        ) from e
    header = img.header
    affine, notes = _nifti_affine(img, path, shape)
    meta = {
        "path": str(path),
        "format": "nifti",
        "dtype": str(array.dtype),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "notes": notes,
    }
    return Volume(array=array, affine=affine, meta=meta)


QFORM_SFORM_TOLERANCE_MM = 0.1  # float32 quaternions of one affine agree far closer than this


def _nifti_affine(img: Any, path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """The voxel -> RAS affine of a NIfTI image, the way nibabel and ITK choose it (sform when its
    code is set, else qform, else pixdim only), refused when degenerate (a zero or non-finite
    column: a zero pixdim, a zero sform column), with a note when qform and sform disagree."""
    header = img.header
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    source = "sform" if s_code > 0 else "qform" if q_code > 0 else "pixdim"
    if source != "sform":  # the qform and the pixdim-only affine scale by pixdim[1:4]
        import nibabel as nib

        # nibabel silently loads a zero pixdim as 1 mm: read the header as it is in the file
        with nib.openers.ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
            raise InvalidVolumeError(
                f"{path} has voxel sizes pixdim {np.round(pixdim, 4).tolist()} in its NIfTI header (the {source} uses them); "
                "a voxel size must be positive, fix the header."
            )
    affine = np.asarray(img.affine, dtype=np.float64)
    columns = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(columns < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidVolumeError(
            f"{path} has a degenerate {source} in its NIfTI header (voxel axis lengths {np.round(columns, 6).tolist()} mm); "
            "it does not say where the voxels are, fix the header."
        )
    notes: list[str] = []
    if q_code > 0 and s_code > 0:
        qform = np.asarray(header.get_qform(), dtype=np.float64)
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
        corners = np.vstack([corners, np.ones((1, corners.shape[1]))])  # (4, 8)
        apart = float(np.abs((qform - affine) @ corners).max())
        if not np.isfinite(apart) or apart > QFORM_SFORM_TOLERANCE_MM:
            notes.append(
                f"qform and sform of the NIfTI header disagree (corners up to {apart:.3g} mm apart); "
                "used the sform (as nibabel does)"
            )
    return affine, notes


# ITK's MetaIO/NRRD readers print why they fail ("data not read completely", "ElementType required")
# to the C++ stderr and raise only "File cannot be read". medct reads with file descriptor 2 sent
# to a temporary file, so the reason goes into the one sentence instead of above it. The lock
# serialises ITK reads (fd 2 is one per process); a progress bar repaint in that moment is lost.
_ITK_STDERR_LOCK = threading.Lock()


def _itk_read_capturing_stderr(path: Path) -> tuple[Any, RuntimeError | None, str]:
    """(SimpleITK image or None, SimpleITK's exception or None, what ITK printed while reading)."""
    import SimpleITK as sitk

    img, error = None, None
    with _ITK_STDERR_LOCK, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    return img, error, text


def _itk_reason(printed: str) -> str:
    """ITK's own lines about a failed read, without tqdm repaints and MetaIO's generic follow-ups."""
    generic = (
        "MetaObject: Read: MET_Read Failed",
        "MetaImage: Read: Cannot parse file",
        "MetaImage: M_Read: Error parsing",
    )
    lines = [ln.strip() for ln in printed.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and "|" not in ln and not ln.startswith(generic)]
    return "; ".join(ln.rstrip(".") for ln in lines[:2])


def _read_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk

    img, error, printed = _itk_read_capturing_stderr(path)
    if error is not None:
        reason = _itk_reason(printed) or _one_line(error)
        raise UnreadableVolumeError(f"{path} is not a readable {fmt.upper()} image ({reason}).") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidVolumeError(
            f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; medct needs a scalar 3D volume."
        )
    size = img.GetSize()  # ITK order (x, y, z[, t])
    _as_3d(tuple(size), path)
    ndim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (t, z, y, x) or (z, y, x)
    while arr.ndim > 3:  # singleton trailing ITK dims (checked by _as_3d) come first in numpy order
        arr = arr[0]
    array = arr.transpose(2, 1, 0)  # (X, Y, Z)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    affine = affine_from_itk(np.asarray(img.GetOrigin())[:3], np.asarray(img.GetSpacing())[:3], direction)
    meta = {"path": str(path), "format": fmt, "dtype": str(array.dtype)}
    return Volume(array=array, affine=affine, meta=meta)


def _one_line(e: BaseException) -> str:
    """An exception's message squeezed onto one short line (for wrapping into one sentence)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "ITK ERROR:" in text:  # drop SimpleITK's source path and object address: "...: ITK ERROR: X(0x..): msg"
        text = re.sub(r"^\S+\(0x[0-9a-f]+\):\s*", "", text.rsplit("ITK ERROR:", 1)[1].strip())
        text = text.split(" Reason:")[0]  # ITK appends a stale errno string ("No such file ...")
    text = text.rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read a 3D volume with its geometry.

    .nii / .nii.gz (nibabel, the header's best affine), .mha / .mhd / .nrrd (SimpleITK), a DICOM
    series folder, or one DICOM file meaning its whole series (`series_uid` picks a series when a
    folder holds several). Raises InputPathError (missing path, folder without DICOM),
    UnreadableVolumeError (not an image, truncated, corrupt) or InvalidVolumeError (2D, 4D).
    NaN/constant voxels are not checked here: see `validate_for_inference`.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputPathError(f"{p} does not exist.")
    if p.is_dir():
        from medct.dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    fmt = _format_of(p)
    if fmt is None and is_dicom_file(p):
        fmt = "dicom"
    if fmt == "nifti":
        return _read_nifti(p)
    if fmt in ("mha", "nrrd"):
        return _read_itk(p, fmt)
    if fmt == "dicom":
        from medct.dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    raise UnreadableVolumeError(
        f"{p} is not a supported image (use .nii, .nii.gz, .mha, .mhd, .nrrd or a DICOM series folder)."
    )


def read_phases(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Volume]:
    """The ordered phases of a 4D scan: a list of 3D volume paths (in that order) or one 4D NIfTI
    (phases along its 4th axis). Every phase must share the first one's grid; at least 2 phases.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if not p.exists():
            raise InputPathError(f"{p} does not exist.")
        if not p.name.lower().endswith(NIFTI_SUFFIXES):
            raise InvalidVolumeError(f"{p}: a 4D scan in one file must be a 4D NIfTI; else list its phase files.")
        import nibabel as nib

        try:
            img = nib.load(p)
            data = np.asanyarray(img.dataobj)
        except Exception as e:  # nibabel raises many types for broken files
            raise UnreadableVolumeError(f"{p} is not a readable NIfTI image ({_one_line(e)}).") from e
        if data.ndim != 4:
            raise InvalidVolumeError(f"{p} has shape {data.shape}; a 4D scan needs (X, Y, Z, phases).")
        affine = np.asarray(img.affine, dtype=np.float64)
        vols = [
            Volume(np.ascontiguousarray(data[..., t]), affine.copy(), {"path": f"{p}[{t}]", "format": "nifti"})
            for t in range(data.shape[3])
        ]
    else:
        vols = [read_volume(v) for v in source]
    if len(vols) < 2:
        raise InvalidVolumeError(f"A 4D scan needs at least 2 phases, got {len(vols)}.")
    for v in vols[1:]:
        check_same_grid(vols[0], v, what=f"phases {vols[0].meta.get('path')} and {v.meta.get('path')}")
    return vols


def check_finite(arr: np.ndarray, where: str) -> None:
    """Raise InvalidVolumeError when a float array holds NaN or infinite voxels (inference and training)."""
    if np.issubdtype(arr.dtype, np.inexact):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise InvalidVolumeError(f"{where} contains {bad} NaN or infinite voxels; fix or mask them first.")


def validate_for_inference(vol: Volume) -> None:
    """Raise InvalidVolumeError when `vol` holds NaN/inf voxels or is constant (nothing to segment)."""
    where = vol.meta.get("path", "the volume")
    arr = vol.array
    check_finite(arr, where)
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise InvalidVolumeError(f"{where} is constant (every voxel is {lo}); it holds no image to process.")


def check_hu(vol: Volume) -> None:
    """Raise InvalidVolumeError when `vol`, given to a CT model, cannot be CT in Hounsfield units.

    Every CT in HU has voxels below 0 HU (air -1000, lung -800, fat -100). Nothing below 0 is what
    a CT stored without its rescale (0..4095 with air near 0-24, RescaleIntercept -1024 lost or
    absent), an MR image or a [0, 1]-normalised array look like; segmenting them as HU would give
    confident nonsense, so they are refused rather than guessed at.
    """
    lo, hi = float(vol.array.min()), float(vol.array.max())
    if lo >= 0.0:
        where = vol.meta.get("path", "the volume")
        raise InvalidVolumeError(
            f"{where} has values {lo:g}..{hi:g} and none below 0, so it is not CT in HU (air is -1000 HU): "
            "a CT stored without RescaleSlope/Intercept (HU = stored - 1024 for most scanners), or not a CT; "
            "convert it to HU first."
        )


def check_same_grid(a: Volume, b: Volume, what: str) -> None:
    """Raise GeometryMismatchError unless `a` and `b` share shape and affine (corners within 1e-4 mm).

    `what` names the pair in the message, e.g. "label and image of case_001".
    """
    if a.shape != b.shape:
        raise GeometryMismatchError(f"The {what} have different shapes ({a.shape} vs {b.shape}).")
    # World position of every grid corner: a linear-part difference matters in proportion to the extent.
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in a.shape], indexing="ij")).reshape(3, -1)  # (3, 8)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])  # (4, 8)
    shift = float(np.abs((a.affine - b.affine) @ corners).max())
    if not np.isfinite(shift) or shift > GRID_TOLERANCE_MM:
        raise GeometryMismatchError(
            f"The {what} are on different voxel grids (corners up to {shift:.4g} mm apart); resample one onto the other."
        )


# ----------------------------------------------------------------------------- writing


def _nifti_dtype(array: np.ndarray, dtype: np.dtype | None) -> np.dtype:
    """The on-disk dtype: `dtype`, else the array's own, made NIfTI-compatible without loss."""
    if dtype is not None:
        return np.dtype(dtype)
    dt = array.dtype
    if dt == np.bool_:
        return np.dtype(np.uint8)
    if dt in (np.int64, np.uint64) and array.size:
        lo, hi = array.min(), array.max()
        for cand in (np.int16, np.int32) if dt == np.int64 else (np.uint16, np.uint32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
    return dt


def _write_nifti(vol: Volume, path: Path, dtype: np.dtype | None, compress_level: int | None) -> None:
    import nibabel as nib

    on_disk = _nifti_dtype(vol.array, dtype)
    img = nib.Nifti1Image(np.asarray(vol.array).astype(on_disk, copy=False), vol.affine)
    header = img.header
    header.set_data_dtype(on_disk)
    qcode = int(vol.meta.get("qform_code", 1))
    scode = int(vol.meta.get("sform_code", 1))
    if qcode == 0 and scode == 0:
        # A file without geometry codes would be read back with a pixdim-only affine: the grid
        # would be lost, so state the affine as scanner coordinates instead.
        qcode = scode = 1
    img.set_qform(vol.affine, code=qcode)
    img.set_sform(vol.affine, code=scode)
    if scode == 0 and not np.allclose(img.get_qform(), vol.affine, atol=1e-4):
        # The qform cannot hold a shear; keep the exact affine in the sform instead.
        img.set_sform(vol.affine, code=qcode)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    level = 1 if compress_level is None else int(compress_level)  # nibabel's own default is 1
    with open(path, "wb") as raw:
        if path.name.lower().endswith(".gz"):
            # nibabel's save() has no compression argument, so write the single-file image into our own
            # gzip stream; mtime=0 and no file name in the gzip header keep outputs reproducible.
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0) as gz:
                img.to_file_map({"image": nib.FileHolder(fileobj=gz)})
        else:
            img.to_file_map({"image": nib.FileHolder(fileobj=raw)})


def _write_itk(vol: Volume, path: Path, dtype: np.dtype | None, compress_level: int | None) -> None:
    import SimpleITK as sitk

    arr = np.asarray(vol.array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # (Z, Y, X) for ITK
    img.SetSpacing([float(s) for s in vol.spacing])
    img.SetOrigin([float(v) for v in vol.origin_lps])
    img.SetDirection([float(v) for v in vol.direction_lps.ravel()])
    if compress_level is None:
        sitk.WriteImage(img, str(path), useCompression=False)
    else:
        sitk.WriteImage(img, str(path), useCompression=compress_level > 0, compressionLevel=int(compress_level))


def write_volume(
    vol: Volume,
    path: str | os.PathLike[str],
    *,
    dtype: np.dtype | str | None = None,
    compress_level: int | None = None,
) -> Path:
    """Write `vol` with its exact geometry; the format follows the extension. Returns the path.

    .nii / .nii.gz (nibabel: sform and qform both set from the affine, codes from
    `vol.meta['qform_code'/'sform_code']` when present, else 1 = scanner), .mha / .mhd / .nrrd
    (SimpleITK: origin/spacing/direction from the affine). `dtype` casts the voxels;
    `compress_level` (0-9) sets gzip/ITK compression (default: gzip level 1 for .nii.gz, none for
    ITK formats). The write is atomic: the file(s) are written into a temporary folder next to the
    target, then moved into place with os.replace; on failure nothing is left behind.
    """
    p = Path(path).expanduser()
    fmt = _format_of(p)
    if fmt not in ("nifti", "mha", "nrrd"):
        raise InputPathError(f"Cannot write {p}: use a .nii, .nii.gz, .mha, .mhd or .nrrd file name.")
    p.parent.mkdir(parents=True, exist_ok=True)
    np_dtype = None if dtype is None else np.dtype(dtype)
    # A staging folder (not a temporary file name): the writer sees the final file name, so it picks
    # the right format and an .mhd header names its final .raw/.zraw data file; the header moves last.
    with atomic_files_in(p.parent, p.name) as stage:
        if fmt == "nifti":
            _write_nifti(vol, stage / p.name, np_dtype, compress_level)
        else:
            _write_itk(vol, stage / p.name, np_dtype, compress_level)
    return p


MAX_LABEL = 255  # class indices of a label map: 0..255 (cached and written as uint8)


def check_label_values(array: np.ndarray, where: str) -> None:
    """InvalidVolumeError in one sentence unless `array` holds class indices: finite, whole numbers
    in [0, MAX_LABEL] (a training label map, `register --moving-labels`)."""
    a = np.asarray(array)
    if a.size == 0:
        raise InvalidVolumeError(f"{where} is empty.")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InvalidVolumeError(f"{where} holds NaN or infinite values; a label map must hold class indices.")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
        raise InvalidVolumeError(f"{where} holds non-integer values; a label map must hold class indices.")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > MAX_LABEL:
        raise InvalidVolumeError(f"{where} holds values in [{lo}, {hi}]; class indices must lie in [0, {MAX_LABEL}].")
