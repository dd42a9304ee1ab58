"""`medct export CKPT -o MODEL_DIR`: a Lightning checkpoint -> a model folder (safetensors + JSON)."""

from __future__ import annotations

import argparse

HELP = "export a Lightning checkpoint to a model folder (safetensors + JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="Lightning .ckpt written by `medct fit`")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--licence", default=None, help="licence of the weights, stored in medct.json")
    p.add_argument(
        "--intended-use",
        default=None,
        help="what the model is for, one sentence (medct.json; `medct segment` prints it)",
    )


def run(args: argparse.Namespace) -> int:
    from medct.checkpoint import export_lightning_checkpoint

    out = export_lightning_checkpoint(
        args.checkpoint, args.output, licence=args.licence, intended_use=args.intended_use
    )
    print(f"exported {args.checkpoint} -> {out}")
    return 0
