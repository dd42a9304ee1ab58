"""`medct demo`: phantom cohort -> train a small segmenter -> export -> segment held-out cases."""

from __future__ import annotations

import argparse

from medct.commands import types

HELP = "phantom cohort -> train a small segmenter -> export -> segment held-out cases"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo_out", help="working folder of the demo")
    p.add_argument("--epochs", type=types.positive_int, default=None, help="training epochs (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (seconds)")


def run(args: argparse.Namespace) -> int:
    from medct.demo import run_demo

    run_demo(args.output, epochs=args.epochs, quick=args.quick)
    return 0
