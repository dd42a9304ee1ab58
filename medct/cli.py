"""The `medct` command: one dispatcher for every verb.

Lightning verbs (fit, validate, test, predict) go to LightningCLI (`medct.lightning_cli`), with
YAML configs from configs/. The rest are plain argparse commands: segment, export, phantom, demo.
Importing this module imports no torch: each command imports what it needs when it runs.

A user mistake raises `MedCTError`; here it becomes one line on stderr and exit code 1 (the
traceback only with --debug).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
EXIT_USER_ERROR = 1


def _parse_triplet(text: str) -> tuple[float, float, float]:
    """'1.5' -> (1.5, 1.5, 1.5); '0.8,0.8,3' -> (0.8, 0.8, 3.0)."""
    parts = [float(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one or three numbers, got '{text}'")
    return parts[0], parts[1], parts[2]


def _int_triplet(text: str) -> tuple[int, int, int]:
    a, b, c = _parse_triplet(text)
    return int(a), int(b), int(c)


def build_parser() -> argparse.ArgumentParser:
    from medct import __version__

    parser = argparse.ArgumentParser(
        prog="medct",
        description="CT foundation models: train from YAML, segment folders of scans, export models.",
        epilog="Training verbs: medct fit|validate|test|predict --config configs/finetune/seg_phantom.yaml "
        "(Lightning CLI; see `medct fit --help`).",
    )
    parser.add_argument("--version", action="version", version=f"medct {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a file, a folder of scans or a DICOM folder with an exported model")
    seg.add_argument("-m", "--model", required=True, help="exported model folder (model.safetensors + medct.json)")
    seg.add_argument(
        "-i", "--input", required=True, help="a volume file, a folder of volumes, or a DICOM series folder"
    )
    seg.add_argument("-o", "--output", required=True, help="output folder (label maps, summary.csv, previews)")
    seg.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    seg.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: model's)")
    seg.add_argument("--sw-batch-size", type=int, default=None, help="patches per forward pass")
    seg.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower, smoother)")
    seg.add_argument("--overwrite", action="store_true", help="recompute cases whose output already exists")
    seg.add_argument("--preview", action="store_true", help="write a PNG (three planes, label overlay) per case")
    seg.add_argument("--series-uid", default=None, help="pick one series from a DICOM folder holding several")

    exp = sub.add_parser("export", help="export a Lightning checkpoint to a model folder (safetensors + JSON)")
    exp.add_argument("checkpoint", help="Lightning .ckpt written by `medct fit`")
    exp.add_argument("-o", "--output", required=True, help="model folder to write")
    exp.add_argument("--licence", default="unspecified", help="licence of the weights, stored in medct.json")

    ph = sub.add_parser("phantom", help="write a synthetic labelled CT cohort with a dataset.json")
    ph.add_argument("-o", "--output", required=True, help="cohort folder to write")
    ph.add_argument("-n", "--num-cases", type=int, default=20, help="number of cases")
    ph.add_argument("--variant", default="ct", choices=["ct", "cbct", "cbct_tst", "mr"], help="image appearance")
    ph.add_argument("--phase", default="venous", choices=["native", "arterial", "venous"], help="contrast phase")
    ph.add_argument("--seed", type=int, default=0, help="seed of the first case")
    ph.add_argument("--size", type=_int_triplet, default=(96, 96, 96), help="voxels, e.g. 96 or 128,128,64")
    ph.add_argument(
        "--spacing",
        type=_parse_triplet,
        default=None,
        help="mm, e.g. 3 or 1.5,1.5,3 (default: fit a 384 mm field of view)",
    )

    demo = sub.add_parser("demo", help="phantom cohort -> train a small segmenter -> export -> segment held-out cases")
    demo.add_argument("-o", "--output", default="demo_out", help="working folder of the demo")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (seconds)")
    return parser


def _run_plain(args: argparse.Namespace) -> int:
    if args.command == "segment":
        from medct.runner import segment_paths

        report = segment_paths(
            model_dir=args.model,
            input_path=args.input,
            output_dir=args.output,
            device=args.device,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            tta=args.tta,
            overwrite=args.overwrite,
            preview=args.preview,
            series_uid=args.series_uid,
            debug=args.debug,
        )
        return 0 if not report.failed else EXIT_USER_ERROR
    if args.command == "export":
        from medct.checkpoint import export_lightning_checkpoint

        out = export_lightning_checkpoint(args.checkpoint, args.output, licence=args.licence)
        print(f"exported {args.checkpoint} -> {out}")
        return 0
    if args.command == "phantom":
        from medct.phantom import write_cohort

        out = write_cohort(
            args.output,
            n=args.num_cases,
            variant=args.variant,
            phase=args.phase,
            seed=args.seed,
            shape=args.size,
            spacing=args.spacing,
        )
        print(f"wrote {args.num_cases} {args.variant} phantom cases to {out.parent} (datalist: {out.name})")
        return 0
    if args.command == "demo":
        from medct.demo import run_demo

        run_demo(args.output, epochs=args.epochs, quick=args.quick)
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `medct` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (before or after the command).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from medct.errors import MedCTError

    try:
        if argv and argv[0] in LIGHTNING_VERBS:
            from medct.lightning_cli import run_lightning

            run_lightning(argv)
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        args.debug = debug
        if args.command is None:
            parser.print_help()
            return 2
        return _run_plain(args)
    except MedCTError as e:
        if debug:
            raise
        print(f"medct: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("medct: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
