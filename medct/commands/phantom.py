"""`medct phantom -o DIR`: write a synthetic labelled CT cohort with a dataset.json."""

from __future__ import annotations

import argparse

from medct.commands import types

HELP = "write a synthetic labelled CT cohort with a dataset.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="cohort folder to write")
    p.add_argument("-n", "--num-cases", type=types.positive_int, default=20, help="number of cases")
    p.add_argument("--variant", default="ct", choices=["ct", "cbct", "cbct_tst", "mr"], help="image appearance")
    p.add_argument("--phase", default="venous", choices=["native", "arterial", "venous"], help="contrast phase")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case")
    p.add_argument("--size", type=types.int_triplet, default=(96, 96, 96), help="voxels, e.g. 96 or 128,128,64")
    p.add_argument(
        "--spacing",
        type=types.triplet,
        default=None,
        help="mm, e.g. 3 or 1.5,1.5,3 (default: fit a 384 mm field of view)",
    )


def run(args: argparse.Namespace) -> int:
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
