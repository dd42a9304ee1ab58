"""`medct motion -m MODEL -i 4D_INPUT -o OUT --predict K`: predict the next K respiratory phases.

INPUT is a 4D NIfTI, a folder of phase volumes (ordered by the phase number in each name) or
several phase files in order; phase 0 is the reference. Every observed phase is registered to it,
the motion model (fine-tuned on this patient's phases, --finetune-steps) rolls out K more fields,
and each predicted phase is the reference warped by its field, so the anatomy is the patient's.
OUT (a folder) gets predicted_phase_TT.nii.gz and displacement_TT.nii.gz (X, Y, Z, 3 RAS mm,
pull-back to phase 0: phase_T(p) = reference(p + u(p))) on the input grid, sequence.png (a coronal
strip, predicted phases in red), sequence.gif and summary.json; every file is written atomically.
--method copy-last | linear | pca runs a baseline instead (no model needed).
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--no-gif", action="store_true", help="do not write sequence.gif")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from medct.errors import ConfigError
    from medct.io import write_volume
    from medct.paths import atomic_file
    from medct.synthesis.motion import MotionPredictor, save_sequence_previews

    if args.predict < 1:
        raise ConfigError(f"--predict must be at least 1 phase, got {args.predict}.")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, got {args.finetune_steps}.")
    if args.method == "ar" and args.model is None:
        raise ConfigError("The autoregressive method needs a motion model: pass -m MODEL (or --method pca).")
    source = args.input[0] if len(args.input) == 1 else list(args.input)
    if args.model is not None:
        predictor = MotionPredictor.from_folder(args.model, device=args.device)
    else:
        predictor = MotionPredictor(None, None, "cpu" if args.device is None else str(args.device))
    res = predictor.predict(source, args.predict, args.method, args.finetune_steps, args.registration, args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    m = len(res.observed)
    files = []
    for j, (img, disp) in enumerate(zip(res.phases, res.displacements, strict=True)):
        t = m + j
        write_volume(img, out / f"predicted_phase_{t:02d}.nii.gz")
        write_volume(disp, out / f"displacement_{t:02d}.nii.gz")
        files.append(
            {"phase": t, "image": f"predicted_phase_{t:02d}.nii.gz", "displacement": f"displacement_{t:02d}.nii.gz"}
        )
    save_sequence_previews(
        [*res.observed, *res.phases], m, out / "sequence.png", None if args.no_gif else out / "sequence.gif"
    )
    summary = {"method": res.method, "observed_phases": m, "predicted": files, "seconds": res.seconds}
    with atomic_file(out / "summary.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    secs = sum(res.seconds.values())
    print(
        f"medct motion: {args.predict} phases predicted from {m} ({res.method}, {secs:.1f} s) -> {out}", file=sys.stderr
    )
    return 0
