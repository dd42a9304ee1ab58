"""`medct sct -m MODEL -i FILE|FOLDER -o OUT`: synthetic CT of CBCT or MR scans.

Writes OUT/<case>.nii.gz (int16 HU in [-1024, 3071] on the input's exact grid; NIfTI/MHA/NRRD as
the input, DICOM series -> .nii.gz), OUT/<case>.png with --preview, and OUT/summary.csv. A folder
run finishes the good cases and lists the bad ones; outputs are written atomically.
"""

from __future__ import annotations

import argparse

from medct.commands import types

HELP = "synthetic CT from CBCT or MR scans (a file, a folder or a DICOM series) with an exported sCT model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="exported synthetic-CT model folder (task 'sct')")
    p.add_argument(
        "-i", "--input", required=True, help="a CBCT/MR volume file, a folder of them, or a DICOM series folder"
    )
    p.add_argument("-o", "--output", required=True, help="output folder (synthetic CTs, summary.csv, previews)")
    p.add_argument("--device", type=types.device, default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--no-tta", action="store_true", help="no flip test-time augmentation (4x faster)")
    p.add_argument("--overwrite", action="store_true", help="recompute cases whose output already exists")
    p.add_argument("--preview", action="store_true", help="write a PNG (three planes) of each synthetic CT")


def run(args: argparse.Namespace) -> int:
    import csv
    import sys
    import time
    import traceback

    from medct.errors import MedCTError
    from medct.io import read_volume
    from medct.paths import atomic_file
    from medct.runner import _check_modality, discover_cases, prepare_output_folder
    from medct.synthesis.sct import SCTPredictor

    ignored: list = []
    cases = discover_cases(args.input, ignored)  # path errors before the model loads
    predictor = SCTPredictor.from_folder(args.model, device=args.device)
    if args.no_tta:
        predictor.tta = False
    out_dir = prepare_output_folder(args.output)
    rows: list[dict[str, str]] = []
    failed: list[tuple[str, str]] = []
    for case in cases:
        out = out_dir / f"{case.name}{case.output_suffix}"
        row = {"case": case.name, "input": str(case.path), "output": str(out), "status": "", "seconds": "", "error": ""}
        start = time.perf_counter()
        try:
            if out.exists() and not args.overwrite:
                row["status"] = "skipped (exists)"
            else:
                image = read_volume(case.path)
                _check_modality(image.meta.get("modality"), predictor.modality, case.path)
                sct = predictor.predict(image)
                from medct.io import write_volume

                write_volume(sct, out)
                if args.preview:
                    from medct.preview import save_preview

                    save_preview(
                        sct, None, out_dir / f"{case.name}.png", window=(-400.0, 1200.0), title=f"sCT {case.name}"
                    )
                row["status"] = "done"
        except Exception as e:  # noqa: BLE001 - a folder run keeps going past any bad case
            if not isinstance(e, MedCTError) and args.debug:
                traceback.print_exception(e)
            msg = str(e) if isinstance(e, MedCTError) else f"{type(e).__name__}: {e}".splitlines()[0]
            row.update(status="failed", error=msg)
            failed.append((case.name, msg))
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
    for path, reason in ignored:
        rows.append({"case": path.name, "input": str(path), "status": "ignored", "error": reason})
    fields = ["case", "status", "input", "output", "seconds", "error"]
    with atomic_file(out_dir / "summary.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    done = sum(r["status"] == "done" for r in rows)
    print(f"medct sct: {done} synthesised, {len(failed)} failed; results in {out_dir}", file=sys.stderr)
    for name, msg in failed:
        print(f"  failed {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0
