"""`medct turbolift --config CHAIN.yaml [-- LIGHTNING OVERRIDES]`: sequential fine-tuning over a chain."""

from __future__ import annotations

import argparse

HELP = "fine-tune through a chain of domains (CT -> CBCT -> ...), resumable, with the forgetting matrix"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a chain recipe (configs/finetune/turbolift_*.yaml)")
    p.add_argument("--output-dir", default=None, help="where the stages go (default: turbolift.output_dir)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="Lightning CLI arguments for every stage, after --, e.g. -- --trainer.accelerator=cpu",
    )


def run(args: argparse.Namespace) -> int:
    from medct.finetune.turbolift import run_chain

    result = run_chain(args.config, args.overrides, args.output_dir)
    s = result.summary
    print(
        f"chain {' -> '.join(result.stages)}: Dice on every stage after the last, mean {s['average_dice']:.3f}; "
        f"backward transfer {s['backward_transfer']:+.3f}; mean forgetting {s['mean_forgetting']:.3f}"
    )
    print(f"wrote {result.output_dir / 'forgetting.csv'}, forgetting.png and summary.json")
    return 0
