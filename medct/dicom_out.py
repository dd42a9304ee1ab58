"""Label maps out as DICOM: DICOM-SEG (highdicom) and RTSTRUCT, referencing the source series.

Both writers take the label map on the grid of a DICOM series read by `medct.io.read_volume`
(its `meta["files"]` are the slices in the volume's k order) and the class names of the model card.

- DICOM-SEG (PS3.3 A.51): highdicom's `Segmentation`, type BINARY (what every SEG reader
  supports), one segment per foreground class of the card in label order, frames only where a
  segment is present (highdicom's `omit_empty_frames`). Read back with `read_dicom_seg`, which asks
  highdicom for the label map of every source slice.
- RTSTRUCT (PS3.3 A.19): written with pydicom, because neither highdicom nor pydicom writes
  structure sets. Each class is one ROI; each connected region of each slice is a CLOSED_PLANAR
  polygon traced by marching squares (contourpy, matplotlib's contour engine) at level 0.5 of the
  zero-padded binary mask. Those polygons run between pixel centres and through no centre, so the
  even-odd fill of `medct.dicom.read_rtstruct` gives the very same pixels back: the round trip is
  exact (tested on the real planning CT series).

Codes: segments and ROIs carry the card's class names; the segmented property is the generic
SNOMED "Anatomical Structure" / "Organ" pair (no per-organ code table in medct yet).
Every file is written atomically (`medct.paths.atomic_file`).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from medct.errors import InvalidVolumeError
from medct.paths import atomic_file
from medct.volume import LPS_TO_RAS, Volume

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA = 0x30060050  # (3006,0050) Contour Data
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, referenced by RT structure sets
OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")
# Display colours of ROIs (tab10 in 0..255), cycled.
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _source_datasets(reference: Volume) -> list:
    """The source slices (headers and pixels) in the volume's k order."""
    from medct.dicom import dcmread

    files = reference.meta.get("files")
    if reference.meta.get("format") != "dicom" or not files:
        raise InvalidVolumeError(
            f"{reference.meta.get('path', 'The input')} is not a DICOM series; DICOM-SEG and RTSTRUCT "
            "outputs need DICOM input (use --output-format nifti)."
        )
    if not reference.meta.get("series_uid") or str(reference.meta["series_uid"]).startswith("no-uid-"):
        raise InvalidVolumeError(
            f"{reference.meta.get('path', 'The input')} has no SeriesInstanceUID for a DICOM-SEG or RTSTRUCT "
            "to reference (use --output-format nifti)."
        )
    return [dcmread(Path(f)) for f in files]


def _check_grid(labels: Volume, reference: Volume) -> None:
    if labels.shape != reference.shape or not np.allclose(labels.affine, reference.affine, atol=1e-4):
        raise InvalidVolumeError("The label map is not on the grid of its source DICOM series.")


def write_dicom_seg(
    labels: Volume, reference: Volume, names: dict[int, str], path: str | os.PathLike[str], series_number: int = 901
) -> Path:
    """Write `labels` (uint8 class indices on the `reference` series' grid) as a DICOM-SEG file."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medct import __version__

    _check_grid(labels, reference)
    sources = _source_datasets(reference)
    numbers = sorted(i for i in names if i != 0)
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise InvalidVolumeError(f"DICOM-SEG needs class numbers 1..N, the model card has {numbers}.")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medct", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=names[n][:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=names[n][:64],
        )
        for n in numbers
    ]
    frames = np.ascontiguousarray(np.asarray(labels.array, dtype=np.uint8).transpose(2, 1, 0))  # (slices, rows, cols)
    if int(frames.max(initial=0)) > numbers[-1]:
        raise InvalidVolumeError(f"The label map holds class {int(frames.max())}, beyond the card's {numbers[-1]}.")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medct",
        manufacturer_model_name="medct segment",
        software_versions=__version__,
        device_serial_number="0",
        series_description="medct segmentation",
    )
    out = Path(path)
    with atomic_file(out) as tmp:
        seg.save_as(tmp)
    return out


def read_dicom_seg(path: str | os.PathLike[str], reference: Volume) -> tuple[Volume, dict[int, str]]:
    """A DICOM-SEG file as a uint8 label map on the grid of its source series `reference` (read by
    `medct.io.read_volume`), and its segment names by number."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = list(reference.meta["sop_instance_uids"])
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True, dtype=np.uint8
    )  # (slices, rows, cols) segment numbers
    names = {int(d.segment_number): str(d.segment_label) for d in seg.SegmentSequence}
    array = np.ascontiguousarray(frames.transpose(2, 1, 0))  # (X=cols, Y=rows, Z=slices)
    meta = {"path": str(path), "format": "dicom-seg", "dtype": "uint8"}
    return Volume(array=array, affine=reference.affine.copy(), meta=meta), names


def _slice_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (M, 2) in (i, j) index coordinates around the True pixels of a 2D (i, j) mask:
    marching squares at level 0.5 on the zero-padded mask (holes come out as inner polygons)."""
    from contourpy import LineType, contour_generator

    padded = np.pad(mask.astype(np.float64), 1)
    # contourpy's z is indexed (y, x): rows = j, columns = i
    gen = contour_generator(z=padded.T, line_type=LineType.Separate)
    polys = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64) - 1.0  # (M, 2) as (x = i, y = j), padding removed
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]  # DICOM closes CLOSED_PLANAR contours implicitly
        pts = _drop_collinear(pts)
        if len(pts) >= 3:
            polys.append(pts)
    return polys


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """The polygon without its points that lie on the straight line through their neighbours (the
    same polygon, so the same fill): marching squares on pixels gives long straight runs."""
    if len(pts) < 4:
        return pts
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0])
    keep = np.abs(cross) > 1e-9
    return pts[keep] if keep.sum() >= 3 else pts


def _decimal_strings(values: np.ndarray) -> bytes:
    """A DS value of many numbers as raw bytes ('1.250\\-3.000\\...', even length).

    Built by hand and stored as a raw element: pydicom would otherwise turn each number into a
    validated DSfloat object, which takes minutes for the ~10^6 coordinates of a CT's structures.
    Millimetres to 3 decimals: every contour runs >= 0.35 pixel from the nearest pixel centre, far
    beyond that rounding, so the fill is unchanged."""
    text = "\\".join(f"{v:.3f}" for v in values.ravel()).encode("ascii")
    return text + b" " if len(text) % 2 else text


def write_rtstruct(
    labels: Volume, reference: Volume, names: dict[int, str], path: str | os.PathLike[str], series_number: int = 902
) -> Path:
    """Write `labels` (uint8 class indices on the `reference` series' grid) as an RTSTRUCT file."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from medct import __version__

    _check_grid(labels, reference)
    sources = _source_datasets(reference)
    first = sources[0]
    lab = np.asarray(labels.array)
    to_lps = LPS_TO_RAS @ labels.affine  # voxel (i, j, k) -> LPS mm
    now = datetime.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    # Implicit VR (DICOM's default transfer syntax): 4-byte value lengths, as a long contour's
    # ContourData can pass the 64 kB that explicit VR allows a DS element.
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for tag in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, tag, first.get(tag, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "medct segmentation"
    ds.InstanceNumber = 1
    ds.Manufacturer = "medct"
    ds.SoftwareVersions = __version__
    ds.StructureSetLabel = "medct"
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    for_uid = str(first.get("FrameOfReferenceUID", ""))

    def image_ref(src: Dataset) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID = src.SOPClassUID
        r.ReferencedSOPInstanceUID = src.SOPInstanceUID
        return r

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence([image_ref(s) for s in sources])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = for_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    rois, contours, observations = [], [], []
    for n, number in enumerate(sorted(i for i in names if i != 0)):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = names[number][:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        items = []
        for k in np.flatnonzero((lab == number).any(axis=(0, 1))):
            for pts in _slice_polygons(lab[:, :, k] == number):
                ijk = np.column_stack([pts, np.full(len(pts), float(k)), np.ones(len(pts))])  # (M, 4)
                lps = (to_lps @ ijk.T)[:3].T  # (M, 3) mm
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(sources[int(k)])])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(lps)
                data = _decimal_strings(lps)
                c[CONTOUR_DATA] = RawDataElement(CONTOUR_DATA, "DS", len(data), data, 0, True, True)
                items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = list(_COLOURS[n % len(_COLOURS)])
        rc.ContourSequence = Sequence(items)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)

    out = Path(path)
    with atomic_file(out) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return out
