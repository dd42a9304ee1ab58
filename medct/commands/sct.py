"""`medct sct -m MODEL -i FILE|FOLDER -o OUT`: synthetic CT of CBCT or MR scans.

Writes OUT/<case>.nii.gz (int16 HU in [-1024, 3071] on the input's exact grid; NIfTI/MHA/NRRD as
the input, DICOM series -> .nii.gz), OUT/<case>.png with --preview, and OUT/summary.csv. A folder
run finishes the good cases and lists the bad ones; outputs are written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medct.commands import types

HELP = "synthetic CT from CBCT or MR scans (a file, a folder or a DICOM series) with an exported sCT model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="exported synthetic-CT model folder (task 'sct')")
    p.add_argument(
        "-i", "--input", required=True, help="a CBCT/MR volume file, a folder of them, or a DICOM series folder"
    )
    p.add_argument("-o", "--output", required=True, help="output folder (synthetic CTs, summary.csv, previews)")
    p.add_argument("--device", type=types.device, default=None, help="cuda, mps or cpu (default: best available)")
    types.add_precision_argument(p)
    p.add_argument("--no-tta", action="store_true", help="no flip test-time augmentation (4x faster)")
    p.add_argument("--overwrite", action="store_true", help="recompute cases whose output already exists")
    p.add_argument("--preview", action="store_true", help="write a PNG (three planes) of each synthetic CT")


class SCTJob:
    """The folder runner's job for a synthetic-CT predictor: read + check, predict, write (+ PNG)."""

    command = "sct"
    columns: tuple[str, ...] = ()

    def __init__(self, predictor: Any, preview: bool) -> None:
        self.predictor, self.preview = predictor, preview

    def output_path(self, case: Any, out_dir: Path) -> Path:
        return out_dir / f"{case.name}{case.output_suffix}"

    def refuse(self, case: Any) -> str | None:
        return None

    def load(self, case: Any) -> Any:
        from medct.io import read_volume
        from medct.segment_job import check_modality

        image = read_volume(case.path)
        check_modality(image.meta.get("modality"), self.predictor.modality, case.path)
        return image

    def run(self, image: Any, row: dict[str, object]) -> Any:
        return self.predictor.predict(image)

    def write(self, case: Any, sct: Any, out_path: Path, row: dict[str, object]) -> None:
        from medct.io import write_volume

        write_volume(sct, out_path)
        if self.preview:
            from medct.preview import save_preview

            title = f"sCT {case.name}"
            save_preview(sct, None, out_path.parent / f"{case.name}.png", window=(-400.0, 1200.0), title=title)

    def summarise_existing(self, case: Any, out_path: Path, row: dict[str, object]) -> None:
        return None


def run(args: argparse.Namespace) -> int:
    from medct.runner import discover_cases, prepare_output_folder, run_folder
    from medct.synthesis.sct import SCTPredictor

    ignored: list[tuple[Path, str]] = []
    cases = discover_cases(args.input, ignored)  # path errors before the model loads
    predictor = SCTPredictor.from_folder(args.model, device=args.device, precision=args.precision)
    if args.no_tta:
        predictor.tta = False
    out_dir = prepare_output_folder(args.output)
    job = SCTJob(predictor, args.preview)
    report = run_folder(cases, out_dir, job, overwrite=args.overwrite, debug=args.debug, ignored=ignored)
    return report.exit_code
