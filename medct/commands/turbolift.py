"""`medct turbolift --config CHAIN.yaml [-- LIGHTNING OVERRIDES]`: sequential fine-tuning over a chain.

`medct fit --config CHAIN.yaml [LIGHTNING OVERRIDES]` runs the same chain: a fit recipe with a
`turbolift:` section is recognised before LightningCLI sees it (`chain_recipe`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

HELP = "fine-tune through a chain of domains (CT -> CBCT -> ...), resumable, with the forgetting matrix"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a chain recipe (configs/finetune/turbolift_*.yaml)")
    p.add_argument("--output-dir", default=None, help="where the stages go (default: turbolift.output_dir)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="Lightning CLI arguments for every stage, after --, e.g. -- --trainer.accelerator=cpu",
    )


def chain_recipe(fit_args: Sequence[str]) -> tuple[str, list[str]] | None:
    """(the chain YAML, the other arguments) when the arguments of `medct fit` name exactly one
    --config and it has a `turbolift:` section; else None (a plain fit for LightningCLI)."""
    import yaml

    from medct.finetune.turbolift import CHAIN_KEY  # no torch import

    configs, rest = [], []
    it = iter(fit_args)
    for a in it:
        if a == "--config":
            configs.append(next(it, ""))
        elif a.startswith("--config="):
            configs.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    if len(configs) != 1 or not Path(configs[0]).is_file():
        return None  # LightningCLI reports a missing or odd --config in its own words
    try:
        cfg = yaml.safe_load(Path(configs[0]).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(cfg, dict) and CHAIN_KEY in cfg:
        return configs[0], rest
    return None


def run_and_report(config: str, overrides: Sequence[str], output_dir: str | None = None) -> int:
    """Run (or resume) the chain and print its measures."""
    from medct.finetune.turbolift import run_chain

    result = run_chain(config, overrides, output_dir)
    s = result.summary
    print(
        f"chain {' -> '.join(result.stages)}: Dice on every stage after the last, mean {s['average_dice']:.3f}; "
        f"backward transfer {s['backward_transfer']:+.3f}; mean forgetting {s['mean_forgetting']:.3f}"
    )
    print(f"wrote {result.output_dir / 'forgetting.csv'}, forgetting.png and summary.json")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_and_report(args.config, args.overrides, args.output_dir)
