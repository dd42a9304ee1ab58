"""The `medct` verbs other than Lightning's: one module per command, listed in COMMANDS.

Each module defines
    HELP: str                                   one line for `medct --help`
    add_arguments(parser) -> None               its options (argparse; validated by `types`)
    run(args) -> int                            the exit code; user mistakes raise MedCTError
and imports nothing heavy at module level (torch, MONAI, ...) so that `medct --help` stays fast.
A new verb (`register`, `generate`, `sct`, `motion`, ...) is one new module and one entry here.
"""

from __future__ import annotations

# verb -> module defining HELP, add_arguments and run (in the order `medct --help` lists them)
COMMANDS: dict[str, str] = {
    "segment": "medct.commands.segment",
    "export": "medct.commands.export",
    "reduce": "medct.commands.reduce",
    "turbolift": "medct.commands.turbolift",
    "register": "medct.commands.register",
    "sct": "medct.commands.sct",
    "generate": "medct.commands.generate",
    "motion": "medct.commands.motion",
    "phantom": "medct.commands.phantom",
    "demo": "medct.commands.demo",
    "configs": "medct.commands.configs",
}
