"""The `medct` command: one dispatcher for every verb.

Lightning verbs (fit, validate, test, predict) go to LightningCLI (`medct.lightning_cli`), with
YAML configs from configs/. The rest are plain argparse commands, one module each, listed in
`medct.commands.COMMANDS` (segment, export, phantom, demo, ...); `medct fit` with a Turbolift chain
recipe (a `turbolift:` section) runs the chain (`medct.commands.turbolift`). Importing this module imports no torch:
each command imports what it needs when it runs. A bad option value is refused by argparse with
one line (exit 2).

A user mistake raises `MedCTError`; here it becomes one line on stderr and exit code 1 (the
traceback only with --debug); 2 for an option value the machine cannot honour (`--precision bf16`
without bf16: `PrecisionUnavailableError`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
EXIT_USER_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every plain verb, from the table in `medct.commands`."""
    import importlib

    from medct import __version__
    from medct.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="medct",
        description="CT foundation models: train from YAML, segment folders of scans, export models.",
        epilog="Training verbs: medct fit|validate|test|predict --config seg_phantom (a recipe `medct configs` "
        "lists, or a YAML path; Lightning CLI, see `medct fit --help`).",
    )
    parser.add_argument("--version", action="version", version=f"medct {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(verb, help=module.HELP, description=module.HELP))
    return parser


def _run_plain(args: argparse.Namespace) -> int:
    import importlib

    from medct.commands import COMMANDS

    return int(importlib.import_module(COMMANDS[args.command]).run(args))


def _os_error_sentence(e: OSError) -> str:
    """The system's reason in one sentence; a full disk names the folder, not a temporary's name."""
    import errno

    from medct.paths import TEMP_PREFIX

    if e.errno == errno.ENOSPC:
        folder = Path(e.filename).parent if e.filename else None
        while folder is not None and folder.name.startswith(TEMP_PREFIX):  # a staging folder: name its target's
            folder = folder.parent
        where = f" of {folder}" if folder is not None else ""
        return f"No space left on the disk{where}; free space and run again (finished outputs are kept)."
    where = f" ('{e.filename}')" if e.filename else ""
    return f"{e.strerror or e}{where}."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `medct` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (before or after the command).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from medct.errors import MedCTError

    try:
        if argv and argv[0] in (*LIGHTNING_VERBS, "turbolift"):
            from medct.recipes import resolve_config_args  # a recipe's name or a path

            argv = [argv[0], *resolve_config_args(argv[1:])]
        if argv and argv[0] == "fit":
            from medct.commands.turbolift import chain_recipe, run_and_report

            chain = chain_recipe(argv[1:])
            if chain is not None:  # a Turbolift chain recipe: every stage is a fit
                return run_and_report(*chain)
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
        return int(getattr(e, "exit_code", EXIT_USER_ERROR))
    except OSError as e:  # the system refused (disk full, permissions, ...): no traceback either
        if debug:
            raise
        print(f"medct: error: {_os_error_sentence(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("medct: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
