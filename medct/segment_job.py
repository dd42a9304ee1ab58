"""`medct segment`'s work on one case, run over a folder by the one folder runner (`medct.runner`).

`SegmentJob` reads and prepares a case (`Predictor.prepare`: network grid, body mask) on the
reader thread, runs the network (optionally after test-time adaptation through
`medct.adaptation`'s table) on the main thread, and on the writer thread puts the labels back on
the input's own grid (`Predictor.finish`) and writes them: NIfTI/MHA/NRRD inputs keep their format,
DICOM series are written as NIfTI, or with `output_format` "dicom-seg" / "rtstruct" as a DICOM-SEG
or RTSTRUCT file referencing the source series (`medct.dicom_out`; DICOM inputs only). Its
summary.csv columns are the volume of each label in mL, the labelled volume that the body
constraint removed (`outside_body_ml`: a model that labels air shows here), the precision the
network ran at (`precision`: bf16 or fp32, see `medct.precision`) and, when it adapts, the
adaptation's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medct.errors import ConfigError, InvalidVolumeError
from medct.runner import Case, RunReport, discover_cases, prepare_output_folder, run_folder
from medct.volume import Volume

DICOM_OUTPUT_SUFFIX = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def label_volumes_ml(
    labels: np.ndarray, spacing: tuple[float, float, float], names: dict[int, str]
) -> dict[str, float]:
    """Volume in mL of each named foreground label (0 is background)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    import torch  # loaded already by the inference that made `labels`; kept out of `import medct.cli`

    # torch's bincount counts uint8 directly; numpy's first copies the volume to int64 (~35x slower)
    counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(labels)).reshape(-1), minlength=max(names) + 1)
    return {name: float(counts[i]) * voxel_ml for i, name in sorted(names.items()) if i != 0}


class SegmentJob:
    """The folder runner's job for a segmentation `Predictor` (see the module docstring)."""

    command = "segment"

    def __init__(
        self,
        predictor: Any,
        output_format: str = "nifti",
        preview: bool = False,
        series_uid: str | None = None,
        adapter: Any | None = None,
    ) -> None:
        from medct.adaptation import ADAPT_COLUMNS

        self.predictor, self.output_format, self.preview = predictor, output_format, preview
        self.series_uid, self.adapter = series_uid, adapter
        self.names = {i: n for i, n in predictor.card.labels.items() if i != 0}
        self.columns: Sequence[str] = (
            [f"{n}_ml" for n in self.names.values()]
            + ["outside_body_ml"]  # labelled volume the body constraint removed (empty when off / MR)
            + ["precision"]  # bf16 or fp32: what the network ran at (medct.precision)
            + (list(ADAPT_COLUMNS) if adapter is not None else [])
        )

    def output_path(self, case: Case, out_dir: Path) -> Path:
        suffix = case.output_suffix if self.output_format == "nifti" else DICOM_OUTPUT_SUFFIX[self.output_format]
        return out_dir / f"{case.name}{suffix}"

    def refuse(self, case: Case) -> str | None:
        if self.output_format != "nifti" and case.kind != "dicom":
            return f"'{case.path}' is not a DICOM series; --output-format {self.output_format} needs DICOM input."
        return None

    def load(self, case: Case) -> Any:
        from medct.io import read_volume, validate_for_inference

        image = read_volume(case.path, series_uid=self.series_uid) if case.kind == "dicom" else read_volume(case.path)
        check_modality(image.meta.get("modality"), self.predictor.card.preprocessing.modality, case.path)
        validate_for_inference(image)
        return self.predictor.prepare(image)

    def run(self, prepared: Any, row: dict[str, object]) -> Any:
        predictor = self.predictor
        if self.adapter is not None and not (prepared.body is not None and prepared.body.empty):
            adapted, info = self.adapter.adapt(prepared.x, prepared.body)
            row.update(info.row())
            predictor = predictor.with_net(adapted)
        t_forward = predictor.forward_seconds
        scores = predictor.run(prepared)
        row["precision"] = predictor.run_precision
        row["network_seconds"] = predictor.forward_seconds - t_forward  # float: summed exactly, "%.2f" in the CSV
        return scores

    def write(self, case: Case, scores: Any, out_path: Path, row: dict[str, object]) -> None:
        image = scores.volume
        labels = self.predictor.finish(scores)
        if scores.notes:
            row["note"] = "; ".join(scores.notes)
        _write_output(labels, image, self.predictor.card.labels, out_path, self.output_format)
        if self.preview:
            from medct.preview import save_preview

            save_preview(image, labels, out_path.parent / f"{case.name}.png")
        self._volumes(labels, row)
        if "outside_body_ml" in labels.meta:
            row["outside_body_ml"] = f"{labels.meta['outside_body_ml']:.2f}"

    def summarise_existing(self, case: Case, out_path: Path, row: dict[str, object]) -> None:
        self._volumes(_read_output(out_path, self.output_format, case, self.series_uid), row)

    def _volumes(self, labels: Volume, row: dict[str, object]) -> None:
        volumes = label_volumes_ml(np.asarray(labels.array), labels.spacing, self.names)
        row.update({f"{n}_ml": f"{v:.2f}" for n, v in volumes.items()})


def segment_paths(
    model_dir: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    device: str | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    tta: bool = False,
    precision: str | None = None,
    body_only: bool | None = None,
    overwrite: bool = False,
    preview: bool = False,
    series_uid: str | None = None,
    debug: bool = False,
    output_format: str = "nifti",
    pipeline: bool = True,
    adapt: str | None = None,
    adapt_steps: int = 10,
    adapt_reset: str = "case",
    adapt_seed: int = 0,
) -> RunReport:
    """Segment every case under `input_path` into `output_dir` (`medct segment`).

    pipeline: read the next case and write the previous one on two threads while the network runs
    (False: one step after the other, as bench/segment_folder.py compares). body_only: no label
    outside the patient's body (None: the model card's `inference.body_only`, default true).
    adapt: a test-time adaptation method of `medct.adaptation`'s table (tent, cotta, psmt once
    `medct.finetune.tta` is imported) run on a copy of the model before each case, `adapt_steps`
    steps, reset to the source weights per case or never (continual along the folder, in the
    order the cases are listed); `adapt_seed` seeds the draw of adaptation patches. precision:
    auto (None), bf16 or fp32 (`medct.precision`), for the network and the adaptation's forwards."""
    from medct.dicom_out import OUTPUT_FORMATS
    from medct.inference import Predictor

    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got '{output_format}'.")
    ignored: list[tuple[Path, str]] = []
    cases = discover_cases(input_path, ignored)  # path errors surface before the model loads
    predictor = Predictor.from_folder(
        model_dir, device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, precision=precision,
        body_only=body_only,
    )  # fmt: skip
    adapter = None
    if adapt is not None:  # a method from medct.adaptation's table (the command imports the methods)
        from medct.adaptation import AdaptOptions, make_adapter
        from medct.checkpoint import load_model_folder

        options = AdaptOptions(
            adapt, tuple(predictor.card.patch_size), steps=adapt_steps, batch=predictor.sw_batch_size,  # type: ignore[arg-type]
            reset=adapt_reset, device=str(predictor.device), seed=adapt_seed,  # type: ignore[arg-type]
            precision=predictor.precision,
        )  # fmt: skip
        source, _ = load_model_folder(model_dir, device="cpu")  # unfolded batch norm: what adaptation trains
        adapter = make_adapter(source, options)
    out_dir = prepare_output_folder(output_dir)
    if predictor.card.intended_use:
        print(f"medct segment: the model's intended use: {predictor.card.intended_use}", file=sys.stderr)
    job = SegmentJob(predictor, output_format, preview, series_uid, adapter)
    return run_folder(cases, out_dir, job, overwrite=overwrite, pipeline=pipeline, debug=debug, ignored=ignored)


def check_modality(found: object, expected: str, path: Path) -> None:
    """A DICOM header that names another modality than the model's is a user mistake."""
    if not found or not isinstance(found, str):
        return
    ok = {"CT": {"CT"}, "CBCT": {"CT", "RTIMAGE"}, "MR": {"MR"}}.get(expected, {expected})
    if found.upper() not in ok:
        raise InvalidVolumeError(f"'{path}' is a {found} scan but this model expects {expected}.")


def _write_output(labels: Volume, image: Volume, names: dict[int, str], path: Path, output_format: str) -> None:
    from medct.io import write_volume

    if output_format == "nifti":
        write_volume(labels, path)
        return
    from medct.dicom_out import write_dicom_seg, write_rtstruct

    writer = write_dicom_seg if output_format == "dicom-seg" else write_rtstruct
    writer(labels, image, names, path)


def _read_output(path: Path, output_format: str, case: Case, series_uid: str | None) -> Volume:
    """An existing output read back as a label map (for the summary of a skipped case)."""
    from medct.io import read_volume

    if output_format == "nifti":
        return read_volume(path)
    from medct.dicom import read_rtstruct
    from medct.dicom_out import read_dicom_seg

    reference = read_volume(case.path, series_uid=series_uid)
    if output_format == "dicom-seg":
        return read_dicom_seg(path, reference)[0]
    labels, by_label = read_rtstruct(path, reference)
    # read_rtstruct numbers ROIs by their order; the summary wants the card's numbers, which the
    # RTSTRUCT keeps as ROINumber: re-read the mapping from the file's ROI numbers.
    import pydicom

    number_of = {str(r.ROIName): int(r.ROINumber) for r in pydicom.dcmread(path).StructureSetROISequence}
    lut = np.zeros(256, np.uint8)
    for label, name in by_label.items():
        lut[label] = number_of[name]
    return labels.with_array(lut[np.asarray(labels.array)])
