"""`python killed_child.py MEDCT ARGS...`: run one medct command line and kill this process with
SIGKILL at the worst moment of a crash, the instant the Nth medct temporary whose final name ends
with MATCH is complete but not yet renamed into place.

MEDCT_KILL_AT=N and MEDCT_KILL_MATCH=suffix (environment) choose the moment. The kill is real
(SIGKILL: no finally blocks, no atexit, no flush), only its moment is chosen, by wrapping
`os.replace`, the call every medct atomic write ends with (medct.paths). Used by the corpus's
"killed for real" cases (tests/robustness/corpus.py); nothing in medct knows about it.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    at = int(os.environ["MEDCT_KILL_AT"])
    match = os.environ.get("MEDCT_KILL_MATCH", "")
    seen = 0
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        nonlocal seen
        if ".medct-tmp-" in os.fspath(src) and os.fspath(dst).endswith(match):
            seen += 1
            if seen == at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace  # type: ignore[assignment]
    from medct.cli import main as medct

    return medct(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
