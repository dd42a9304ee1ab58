"""`medct segment -m MODEL -i INPUT -o OUT`: segment a file, a folder of scans or a DICOM folder."""

from __future__ import annotations

import argparse

from medct.commands import types

HELP = "segment a file, a folder of scans or a DICOM folder with an exported model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="exported model folder (model.safetensors + medct.json)")
    p.add_argument("-i", "--input", required=True, help="a volume file, a folder of volumes, or a DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="output folder (label maps, summary.csv, previews)")
    p.add_argument("--device", type=types.device, default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument(
        "--overlap", type=types.overlap, default=None, help="sliding-window overlap in [0, 1) (default: model's)"
    )
    p.add_argument("--sw-batch-size", type=types.positive_int, default=None, help="patches per forward pass")
    types.add_precision_argument(p)
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower, smoother)")
    p.add_argument(
        "--keep-outside-body",
        action="store_true",
        help="CT/CBCT: also write labels outside the patient's body (for label sets that lie there; "
        "default: the model card's inference.body_only, true unless it says otherwise)",
    )
    p.add_argument(
        "--adapt",
        default=None,
        metavar="METHOD",
        help="test-time adaptation to scanner shift on a copy of the model (the folder is not changed): "
        "tent, cotta, psmt, or any method registered in medct.adaptation",
    )
    p.add_argument("--adapt-steps", type=types.positive_int, default=10, help="adaptation steps per case (default 10)")
    p.add_argument(
        "--adapt-reset",
        default="case",
        choices=["case", "never"],
        help="start each case from the model's weights (case) or adapt continually along the folder (never)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute cases whose output already exists")
    p.add_argument("--preview", action="store_true", help="write a PNG (three planes, label overlay) per case")
    p.add_argument("--series-uid", default=None, help="pick one series from a DICOM folder holding several")
    p.add_argument(
        "--output-format",
        default="nifti",
        choices=["nifti", "dicom-seg", "rtstruct"],
        help="label maps as NIfTI/MHA/NRRD (like the input; DICOM -> .nii.gz), or for DICOM inputs a "
        "DICOM-SEG or RTSTRUCT file referencing the source series (default: nifti)",
    )


def run(args: argparse.Namespace) -> int:
    from medct.segment_job import segment_paths

    if args.adapt is not None:
        import medct.finetune.tta  # noqa: F401 - registers tent, cotta and psmt in medct.adaptation
    report = segment_paths(
        model_dir=args.model,
        input_path=args.input,
        output_dir=args.output,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        precision=args.precision,
        body_only=False if args.keep_outside_body else None,
        overwrite=args.overwrite,
        preview=args.preview,
        series_uid=args.series_uid,
        debug=args.debug,
        output_format=args.output_format,
        adapt=args.adapt,
        adapt_steps=args.adapt_steps,
        adapt_reset=args.adapt_reset,
    )
    return report.exit_code
