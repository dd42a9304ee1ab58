"""`medct motion -m MODEL -i 4D_INPUT -o OUT --predict K`: predict the next K respiratory phases.

INPUT is a 4D NIfTI, a folder of phase volumes (ordered by the phase number in each name) or
several phase files in order; phase 0 is the reference. Every observed phase is registered to it,
the motion model (fine-tuned on this patient's phases, --finetune-steps) rolls out K more fields,
and each predicted phase is the reference warped by its field, so the anatomy is the patient's.
OUT (a folder) gets predicted_phase_TT.nii.gz and displacement_TT.nii.gz (X, Y, Z, 3 RAS mm,
pull-back to phase 0: phase_T(p) = reference(p + u(p))) on the input grid, sequence.png (a coronal
strip, predicted phases in red), sequence.gif, summary.json (written last) and the folder runner's
summary.csv; every file is written atomically. OUT holding a summary.json is done: the run is
skipped unless --overwrite.
--method copy-last | linear | pca runs a baseline instead (no model needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medct.commands import types

HELP = "predict future respiratory phases of a 4D CT (patient-specific autoregressive motion model)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="exported motion model folder (task 'motion')")
    p.add_argument("-i", "--input", nargs="+", required=True, help="a 4D NIfTI, a folder of phases, or phase files")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--predict", type=int, required=True, metavar="K", help="how many future phases to predict")
    p.add_argument(
        "--finetune-steps", type=int, default=None, help="patient-specific fine-tuning steps (default: the model's)"
    )
    p.add_argument(
        "--method", choices=("ar", "copy-last", "linear", "pca"), default="ar", help="predictor (default ar)"
    )
    p.add_argument("--registration", choices=("intensity", "elastix"), default=None, help="phase registration")
    p.add_argument("--seed", type=int, default=0, help="seed of registration sampling and fine-tuning")
    p.add_argument("--device", type=types.device, default=None, help="cuda, mps or cpu (default: best available)")
    types.add_precision_argument(p)
    p.add_argument("--no-gif", action="store_true", help="do not write sequence.gif")
    p.add_argument("--overwrite", action="store_true", help="predict again when OUT already holds a summary.json")


class MotionJob:
    """The folder runner's job for one 4D scan: its phases (read and checked before the output
    folder is made) in, the predicted phases, their displacement fields, the previews and
    summary.json out. summary.json is written last: its existence means the case is done."""

    command = "motion"
    columns = ("method", "observed_phases", "predicted_phases")

    def __init__(self, predictor: Any, args: argparse.Namespace) -> None:
        self.predictor, self.args = predictor, args

    def output_path(self, case: Any, out_dir: Path) -> Path:
        return out_dir / "summary.json"

    def refuse(self, case: Any) -> str | None:
        return None

    def load(self, case: Any) -> Any:
        return case.data["phases"]

    def run(self, phases: Any, row: dict[str, object]) -> Any:
        a = self.args
        res = self.predictor.predict(phases, a.predict, a.method, a.finetune_steps, a.registration, a.seed)
        row.update(method=res.method, observed_phases=len(res.observed), predicted_phases=len(res.phases))
        row["network_seconds"] = float(res.seconds.get("prediction", 0.0))
        return res

    def write(self, case: Any, res: Any, out_path: Path, row: dict[str, object]) -> None:
        from medct.io import write_volume
        from medct.paths import write_text_atomic
        from medct.synthesis.motion import save_sequence_previews

        out, m = out_path.parent, len(res.observed)
        files = []
        for j, (img, disp) in enumerate(zip(res.phases, res.displacements, strict=True)):
            t = m + j
            image, field = f"predicted_phase_{t:02d}.nii.gz", f"displacement_{t:02d}.nii.gz"
            write_volume(img, out / image)
            write_volume(disp, out / field)
            files.append({"phase": t, "image": image, "displacement": field})
        gif = None if self.args.no_gif else out / "sequence.gif"
        save_sequence_previews([*res.observed, *res.phases], m, out / "sequence.png", gif)
        summary = {"method": res.method, "observed_phases": m, "predicted": files, "seconds": res.seconds}
        write_text_atomic(out_path, json.dumps(summary, indent=2) + "\n")

    def summarise_existing(self, case: Any, out_path: Path, row: dict[str, object]) -> None:
        try:
            done = json.loads(out_path.read_text())
            row.update(
                method=done["method"], observed_phases=done["observed_phases"], predicted_phases=len(done["predicted"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            row["note"] = "summary.json unreadable"


def run(args: argparse.Namespace) -> int:
    from medct.errors import ConfigError
    from medct.runner import Case, prepare_output_folder, run_folder
    from medct.synthesis.motion import MotionPredictor, read_sequence

    if args.predict < 1:
        raise ConfigError(f"--predict must be at least 1 phase, got {args.predict}.")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, got {args.finetune_steps}.")
    if args.method == "ar" and args.model is None:
        raise ConfigError("The autoregressive method needs a motion model: pass -m MODEL (or --method pca).")
    source = args.input[0] if len(args.input) == 1 else list(args.input)
    if args.model is not None:
        predictor = MotionPredictor.from_folder(args.model, device=args.device, precision=args.precision)
    else:
        predictor = MotionPredictor(
            None, None, "cpu" if args.device is None else str(args.device), precision=args.precision
        )
    phases = read_sequence(source)  # a missing file, too few phases, grids that differ: before any output
    first = Path(args.input[0])
    name = (
        first.name.removesuffix(".gz").removesuffix(".nii") if first.is_file() and len(args.input) == 1 else first.name
    )
    case = Case(name or "sequence", first, "entry", {"phases": phases})
    out_dir = prepare_output_folder(args.output)
    report = run_folder([case], out_dir, MotionJob(predictor, args), overwrite=args.overwrite, debug=args.debug)
    return report.exit_code
