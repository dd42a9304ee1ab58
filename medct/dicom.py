"""DICOM series discovery, sorting, validation and RTSTRUCT rasterisation.

Reading is done with pydicom (pixel decoding of compressed transfer syntaxes by its pylibjpeg /
openjpeg / libjpeg plugins and its native RLE decoder); what pydicom does not do is assembling a
series into a 3D volume, which is done here:

- Slices are ordered along the slice normal n = row_dir x col_dir (the cross product of the two
  ImageOrientationPatient vectors), by the projection n . ImagePositionPatient, as in
  DICOM PS3.3 C.7.6.2.1.1 and dcm2niix / ITK's GDCMSeriesFileNames.
- The affine maps voxel (i, j, k) = (column, row, slice) to LPS as
  IPP_0 + i * row_dir * PixelSpacing[1] + j * col_dir * PixelSpacing[0] + k * step, with step the
  mean IPP difference between slices (equal to n * spacing for an untilted series; for a gantry tilt
  it keeps the true, sheared voxel positions where ITK would drop the shear), then LPS -> RAS.
- Voxels are stored with the modality LUT applied (HU = stored * RescaleSlope + RescaleIntercept).

RTSTRUCT (PS3.3 C.8.8.6): every CLOSED_PLANAR contour is a polygon in LPS millimetres. Contours of
one plane are filled together with the even-odd rule, so a contour inside another is a hole.

References: DICOM PS3.3 (https://dicom.nema.org/medical/dicom/current/output/html/part03.html);
pydicom (https://pydicom.github.io/pydicom/); Mason, "SU-E-T-33: pydicom" (Med Phys 2011).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medct.errors import (
    DicomSeriesError,
    GeometryMismatchError,
    InputPathError,
    InvalidVolumeError,
    UnreadableVolumeError,
)
from medct.paths import is_raw_dicom
from medct.volume import LPS_TO_RAS, Volume

# Modalities that carry no image slices (a structure set next to its CT is not a second series).
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "RTPLAN", "RTRECORD", "SEG", "SR", "PR", "KO", "REG", "DOC"})
# Header tags needed to group files into series (reading only these keeps discovery fast and
# never touches broken private tags such as POPI's (01F1,1026)).
_SCAN_TAGS = ["SeriesInstanceUID", "SeriesDescription", "Modality", "Rows", "Columns", "NumberOfFrames"]
# What identifies a series whose SeriesInstanceUID was removed (common after de-identification).
_IDENTITY_TAGS = [
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "SeriesNumber",
    "AcquisitionNumber",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
]
NO_UID_PREFIX = "no-uid-"  # series key of a series without SeriesInstanceUID
# Slice spacing tolerances: a gap above MISSING_FACTOR x median step means missing slices; any
# other deviation above max(UNEVEN_ABS_MM, UNEVEN_REL x median) is an uneven (unusable) spacing.
MISSING_FACTOR = 1.5
UNEVEN_ABS_MM = 0.01
UNEVEN_REL = 0.01
# Orientation vectors of the slices in one series must agree to this (direction cosines).
ORIENTATION_TOL = 1e-4


@dataclass
class _SeriesInfo:
    files: list[Path]
    description: str
    modality: str


def _scan(folder: Path, recursive: bool) -> dict[str, _SeriesInfo]:
    """Series UID -> files of image series under `folder`, reading headers only."""
    from pydicom.errors import InvalidDicomError

    series: dict[str, _SeriesInfo] = {}
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    for f in sorted(candidates):
        if not f.is_file():
            continue
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=_SCAN_TAGS + _IDENTITY_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
            continue  # not DICOM (or unreadably broken): silently skipped, as the docstring says
        modality = str(ds.get("Modality", "") or "")
        if modality in NON_IMAGE_MODALITIES or "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "") or _identity_key(ds)
        info = series.setdefault(uid, _SeriesInfo([], str(ds.get("SeriesDescription", "") or ""), modality))
        info.files.append(f)
    return series


def dcmread(path: Path, stop_before_pixels: bool = False, specific_tags: list[str] | None = None) -> Any:
    """pydicom.dcmread, also of data sets stored without the preamble (`force` only for files that
    start like a DICOM data set, so that random files are still refused)."""
    import pydicom

    raw = is_raw_dicom(path)
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags, force=raw)
    if raw and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # no file meta: the pixels are encoded as the data set was (an uncompressed syntax)
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else FileMetaDataset()
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        ds.file_meta = meta
    return ds


def _identity_key(ds: object) -> str:
    """A series key for slices without SeriesInstanceUID: what they share (study, frame of
    reference, series/acquisition number, orientation, pixel size, rows x columns, modality)."""
    import hashlib

    parts = [str(ds.get(t, "") or "") for t in (*_IDENTITY_TAGS, "Rows", "Columns", "Modality")]  # type: ignore[attr-defined]
    iop = ds.get("ImageOrientationPatient")  # type: ignore[attr-defined]
    if iop is not None and len(iop) == 6:  # rounded: float noise must not split a series
        parts[_IDENTITY_TAGS.index("ImageOrientationPatient")] = ",".join(f"{float(v):.4f}" for v in iop)
    return NO_UID_PREFIX + hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def find_dicom_series(folder: str | os.PathLike[str], recursive: bool = True) -> dict[str, list[Path]]:
    """Series Instance UID -> its image files, found under `folder` (headers only; non-DICOM skipped)."""
    return {uid: info.files for uid, info in _scan(Path(folder), recursive).items()}


def _describe(series: dict[str, _SeriesInfo]) -> str:
    return "; ".join(
        f"{uid} ({info.modality or '?'} '{info.description or 'no description'}', {len(info.files)} files)"
        for uid, info in series.items()
    )


def _floats(ds: object, tag: str, n: int, f: Path) -> np.ndarray:
    value = getattr(ds, tag, None)
    if value is None or len(value) != n:
        raise DicomSeriesError(f"{f} lacks a valid {tag}, so its slice cannot be placed in a 3D volume.")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _hu_dtype(slopes: np.ndarray, intercepts: np.ndarray, lo: float, hi: float) -> np.dtype:
    """int16/int32 when the modality LUT keeps integers in range, else float32."""
    if np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)):
        for cand in (np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
    return np.dtype(np.float32)


def read_dicom_series(folder_or_file: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read one DICOM image series as a `Volume` (HU, voxel (column, row, slice), RAS affine).

    `folder_or_file` is a folder (searched recursively) or one file, meaning its series (its
    folder is searched, not recursively). A folder with several series needs `series_uid`.
    Raises InputPathError (missing path, no DICOM images), DicomSeriesError (several series,
    missing/uneven/duplicate slices, inconsistent orientation or size), UnreadableVolumeError
    (pixels that cannot be decoded) or InvalidVolumeError (a single slice or colour images).
    """
    from pydicom.errors import InvalidDicomError

    p = Path(folder_or_file).expanduser()
    if not p.exists():
        raise InputPathError(f"{p} does not exist.")
    if p.is_file():
        try:
            head = dcmread(p, stop_before_pixels=True, specific_tags=_SCAN_TAGS + _IDENTITY_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError) as e:
            raise UnreadableVolumeError(f"{p} is not a readable DICOM file ({' '.join(str(e).split())}).") from e
        if str(head.get("Modality", "")) in NON_IMAGE_MODALITIES:
            raise UnreadableVolumeError(
                f"{p} is a DICOM {head.Modality} object, not an image slice (read an RTSTRUCT with read_rtstruct)."
            )
        series_uid = series_uid or str(head.get("SeriesInstanceUID", "") or "") or _identity_key(head)
        folder, series = p.parent, _scan(p.parent, recursive=False)
    else:
        folder, series = p, _scan(p, recursive=True)
    if not series:
        raise InputPathError(f"{folder} holds no DICOM image files.")
    if series_uid is None:
        if len(series) > 1:
            raise DicomSeriesError(
                f"{folder} holds {len(series)} DICOM series; choose one with --series-uid UID (medct segment) "
                f"or series_uid= (Python): {_describe(series)}."
            )
        series_uid = next(iter(series))
    if series_uid not in series:
        raise DicomSeriesError(f"Series {series_uid} is not in {folder}, which holds: {_describe(series)}.")
    files = series[series_uid].files
    return _assemble(files, folder, series_uid)


def _assemble(files: list[Path], folder: Path, series_uid: str) -> Volume:
    """Sort, validate and stack the slices of one series."""

    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    first = headers[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1 or len(files) == 1:
        frames = int(first.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DicomSeriesError(
                f"Series {series_uid} in {folder} is a multi-frame file; medct reads series of single-slice files."
            )
        raise InvalidVolumeError(
            f"Series {series_uid} in {folder} has a single slice, a 2D image; medct models are 3D."
        )
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise InvalidVolumeError(f"Series {series_uid} in {folder} holds colour images; medct needs grey-level CT/MR.")

    iop = _floats(first, "ImageOrientationPatient", 6, files[0])
    row_dir, col_dir = iop[:3], iop[3:]
    rows, cols = int(first.Rows), int(first.Columns)
    spacing = _floats(first, "PixelSpacing", 2, files[0])  # (between rows, between columns)
    for f, ds in zip(files, headers, strict=True):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomSeriesError(
                f"{f} is {ds.Rows}x{ds.Columns} pixels but its series {series_uid} has {rows}x{cols} slices."
            )
        if np.abs(_floats(ds, "ImageOrientationPatient", 6, f) - iop).max() > ORIENTATION_TOL:
            raise DicomSeriesError(f"{f} has another orientation than the rest of series {series_uid}.")
        if np.abs(_floats(ds, "PixelSpacing", 2, f) - spacing).max() > 1e-4:
            raise DicomSeriesError(f"{f} has another pixel spacing than the rest of series {series_uid}.")

    normal = np.cross(row_dir, col_dir)
    ipp = np.stack([_floats(ds, "ImagePositionPatient", 3, f) for f, ds in zip(files, headers, strict=True)])  # (N, 3)
    order = np.argsort(ipp @ normal, kind="stable")
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    ipp = ipp[order]
    pos = ipp @ normal  # (N,) slice positions along the normal, ascending
    steps = np.diff(pos)
    median = float(np.median(steps))
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DicomSeriesError(
            f"{files[i]} and {files[i + 1]} lie at the same position ({pos[i]:.2f} mm) in series {series_uid}; "
            "it mixes several acquisitions."
        )
    gaps = np.flatnonzero(steps > MISSING_FACTOR * median)
    if gaps.size:
        i = int(gaps[0])
        n_missing = int(round(steps[i] / median)) - 1
        raise DicomSeriesError(
            f"Series {series_uid} in {folder} misses about {n_missing} slice(s) between {files[i].name} "
            f"({pos[i]:.2f} mm) and {files[i + 1].name} ({pos[i + 1]:.2f} mm) (spacing {median:.3g} mm elsewhere)."
        )
    deviation = np.abs(steps - median)
    if deviation.max() > max(UNEVEN_ABS_MM, UNEVEN_REL * median):
        i = int(np.argmax(deviation))
        raise DicomSeriesError(
            f"Series {series_uid} in {folder} has uneven slice spacing ({steps.min():.4g} to {steps.max():.4g} mm, "
            f"worst between {files[i].name} and {files[i + 1].name})."
        )

    # Pixels: decode every slice (pydicom + pylibjpeg for compressed syntaxes) in its stored dtype, then
    # apply the modality LUT HU = stored * slope + intercept into the smallest dtype that holds the
    # actual HU range (int16 for most CT), one slice at a time (no float64 copy of the whole series).
    n = len(files)
    slopes = np.asarray([float(ds.get("RescaleSlope", 1) or 1) for ds in headers])
    intercepts = np.asarray([float(ds.get("RescaleIntercept", 0) or 0) for ds in headers])
    stored: list[np.ndarray] = []
    for f in files:
        ds = dcmread(f)
        try:
            px = ds.pixel_array  # (rows, cols)
        except Exception as e:  # pydicom raises many types (RuntimeError, NotImplementedError, ValueError, ...)
            syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
            raise UnreadableVolumeError(
                f"{f} has pixel data that cannot be decoded (transfer syntax {getattr(syntax, 'name', syntax)}: "
                f"{' '.join(str(e).split())[:160]})."
            ) from e
        if px.shape != (rows, cols):
            raise DicomSeriesError(f"{f} decodes to {px.shape} pixels instead of {rows}x{cols}.")
        stored.append(px)
    lo = np.array([float(px.min()) for px in stored]) * slopes + intercepts
    hi = np.array([float(px.max()) for px in stored]) * slopes + intercepts
    dtype = _hu_dtype(slopes, intercepts, float(np.minimum(lo, hi).min()), float(np.maximum(lo, hi).max()))
    array = np.empty((cols, rows, n), dtype=dtype, order="F")  # (X=columns, Y=rows, Z=slices)
    for k in range(n):
        px = stored[k].T  # (rows, cols) -> (X=columns, Y=rows)
        stored[k] = np.empty(0)  # free each raw slice as soon as it is converted
        if dtype.kind == "f":
            array[:, :, k] = px.astype(np.float64) * slopes[k] + intercepts[k]
        else:
            array[:, :, k] = px.astype(np.int64) * int(slopes[k]) + int(intercepts[k])

    step = (ipp[-1] - ipp[0]) / (n - 1)  # mean slice step in LPS mm (n * spacing when untilted)
    # Gantry tilt: slices step along the table, not along their normal; the affine then holds that
    # shear exactly (voxel (0, 0, k) is at slice k's ImagePositionPatient), nothing is resampled.
    tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0.0, 1.0))))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row, i.e. column index
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column, i.e. row index
    lps[:3, 2] = step
    lps[:3, 3] = ipp[0]
    meta: dict[str, object] = {
        "path": str(folder),
        "format": "dicom",
        "dtype": str(array.dtype),
        "series_uid": series_uid,
        "modality": str(first.get("Modality", "") or ""),
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "files": [str(f) for f in files],
        "sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for ds in headers],
        "notes": [f"gantry tilt {tilt:.1f} degrees: kept exactly as a sheared voxel grid"] if tilt > 0.05 else [],
    }
    for key, tag in (
        ("patient_id", "PatientID"),
        ("study_uid", "StudyInstanceUID"),
        ("frame_of_reference_uid", "FrameOfReferenceUID"),
    ):
        if first.get(tag):
            meta[key] = str(first.get(tag))
    return Volume(array=array, affine=LPS_TO_RAS @ lps, meta=meta)


# ----------------------------------------------------------------------------- RTSTRUCT


def fill_polygons_even_odd(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (U, V) mask of pixel centres inside `polygons` ((M, 2) arrays in (u, v) pixel units).

    Even-odd rule over all polygons together: a centre is inside when a ray from it along +u crosses
    an odd number of edges, so nested polygons are holes. Written here because matplotlib's
    contains_points fills one polygon at a time at O(pixels x vertices); this scanline version is
    O(edges x lines + pixels) and handles the XOR of overlapping polygons in one pass.
    """
    nu, nv = shape
    edges = [np.stack([poly, np.roll(poly, -1, axis=0)], axis=1) for poly in polygons if len(poly) >= 3]
    mask = np.zeros(shape, dtype=bool)
    if not edges:
        return mask
    e = np.concatenate(edges)  # (E, 2 ends, 2 coords (u, v))
    u0, v0, u1, v1 = e[:, 0, 0], e[:, 0, 1], e[:, 1, 0], e[:, 1, 1]
    lo = max(int(np.floor(min(v0.min(), v1.min()))), 0)
    hi = min(int(np.ceil(max(v0.max(), v1.max()))) + 1, nv)
    if lo >= hi:
        return mask
    vs = np.arange(lo, hi, dtype=np.float64)  # (V,) scanlines through pixel centres the polygons span
    # Edge crosses scanline v when its ends lie on different sides (half-open: v0 <= v < v1 or reverse).
    crosses = (v0[:, None] <= vs[None, :]) != (v1[:, None] <= vs[None, :])  # (E, V)
    ei, vi = np.nonzero(crosses)
    t = (vs[vi] - v0[ei]) / (v1[ei] - v0[ei])
    uc = u0[ei] + t * (u1[ei] - u0[ei])  # crossing abscissa
    # Centre u is inside iff an odd number of crossings lie at uc < u, i.e. at u >= floor(uc) + 1.
    start = np.clip(np.floor(uc).astype(np.int64) + 1, 0, nu)
    toggles = np.bincount(start * len(vs) + vi, minlength=(nu + 1) * len(vs)).reshape(nu + 1, len(vs))
    mask[:, lo:hi] = (np.cumsum(toggles[:nu], axis=0) % 2).astype(bool)
    return mask


def _contour_points(contour: object) -> np.ndarray:
    """(M, 3) ContourData in LPS mm, parsed from the raw bytes when possible.

    pydicom turns every DS value into a validated DSfloat object (~2 s for one structure set of
    ~400k numbers); numpy parses the backslash-separated text directly.
    """
    raw = contour.get_item("ContourData")  # type: ignore[attr-defined]
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        return np.array(value.decode("ascii").replace("\\", " ").split(), dtype=np.float64).reshape(-1, 3)
    return np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)  # type: ignore[attr-defined]


def read_rtstruct(
    path: str | os.PathLike[str], reference: Volume, roi_names: Sequence[str] | None = None
) -> tuple[Volume, dict[int, str]]:
    """Rasterise an RTSTRUCT onto `reference`'s grid: (uint8 label map, {label: ROI name}).

    Labels follow the StructureSetROISequence order from 1, or the order of `roi_names` when given
    (only those ROIs are drawn). Where ROIs overlap, the later label wins. Contours of one plane
    are filled with the even-odd rule (inner contours are holes); each plane goes to its nearest
    slice of the reference, which should be the image the contours were drawn on: slices of a finer
    grid that no contour plane falls on stay empty. Contours outside the grid are ignored.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path).expanduser()
    if not p.exists():
        raise InputPathError(f"{p} does not exist.")
    try:
        ds = pydicom.dcmread(p)
    except (InvalidDicomError, OSError, EOFError, ValueError) as e:
        raise UnreadableVolumeError(f"{p} is not a readable DICOM file ({' '.join(str(e).split())}).") from e
    if str(ds.get("Modality", "")) != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise UnreadableVolumeError(f"{p} is not a DICOM RTSTRUCT (modality {ds.get('Modality', 'unknown')}).")
    ref_for = reference.meta.get("frame_of_reference_uid")
    rt_for = {str(r.FrameOfReferenceUID) for r in ds.get("ReferencedFrameOfReferenceSequence", [])}
    if ref_for and rt_for and ref_for not in rt_for:
        raise GeometryMismatchError(f"{p} was drawn in another frame of reference than the reference image.")

    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    if roi_names is None:
        wanted = list(names.values())
    else:
        wanted = list(roi_names)
        unknown = [n for n in wanted if n not in names.values()]
        if unknown:
            raise InvalidVolumeError(f"{p} has no ROI named {unknown}; it holds {list(names.values())}.")
    label_of_name = {name: i + 1 for i, name in enumerate(wanted)}
    if len(label_of_name) > 255:
        raise InvalidVolumeError(f"{p} has {len(label_of_name)} ROIs, more than a uint8 label map holds.")

    to_index = np.linalg.inv(LPS_TO_RAS @ reference.affine)  # LPS mm -> voxel (i, j, k)
    shape = reference.shape
    labels = np.zeros(shape, dtype=np.uint8)
    contours_by_label: dict[int, list[np.ndarray]] = {}
    for rc in ds.get("ROIContourSequence", []):
        name = names.get(int(rc.ReferencedROINumber))
        if name not in label_of_name:
            continue
        polys = contours_by_label.setdefault(label_of_name[name], [])
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue  # points and open polylines enclose no area
            pts = _contour_points(c)  # (M, 3) LPS mm
            polys.append((to_index[:3, :3] @ pts.T + to_index[:3, 3:]).T)  # (M, 3) voxel (i, j, k)

    for label in sorted(contours_by_label):  # later labels overwrite earlier ones
        # Group polygons by plane: slice axis (the index axis they are constant along) and position.
        planes: dict[tuple[int, float], list[np.ndarray]] = {}
        for ijk in contours_by_label[label]:
            spread = np.ptp(ijk, axis=0)
            axis = int(np.argmin(spread))
            if spread[axis] > 0.1:
                raise GeometryMismatchError(
                    f"A contour of ROI '{wanted[label - 1]}' in {p} is not parallel to the slices of the reference grid."
                )
            planes.setdefault((axis, round(float(ijk[:, axis].mean()), 2)), []).append(ijk)
        for (axis, coord), polys in planes.items():
            s = int(round(coord))
            if not 0 <= s < shape[axis]:
                continue
            in_plane = [a for a in range(3) if a != axis]  # (u, v) index axes of this plane
            mask = fill_polygons_even_odd([q[:, in_plane] for q in polys], (shape[in_plane[0]], shape[in_plane[1]]))
            index: list[object] = [slice(None)] * 3
            index[axis] = s
            labels[tuple(index)][mask] = label
    meta = {"path": str(p), "format": "rtstruct", "dtype": "uint8", "source_reference": reference.meta.get("path")}
    return Volume(array=labels, affine=reference.affine.copy(), meta=meta), {v: k for k, v in label_of_name.items()}
