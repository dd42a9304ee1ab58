"""Helpers every benchmark shares: the machine description, the result file and the goal rule.

A result file says what it holds (`write_result`): the command line (paths relative to the
repository, so it reruns on any machine), the git commit, full or quick, the machine and the wall
time. A `--quick` run writes `bench/results/<name>_quick.json` (ignored by git) and never replaces
the committed full result. A goal that compares arms is judged by one rule (`paired_goal`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START = time.monotonic()  # the benchmark imports this module first: its wall time counts from here

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDCT_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medct"


def machine() -> dict[str, object]:
    """CPU model, cores, GPU if any, and the versions that matter for the numbers."""
    import monai
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }


def git_commit() -> dict[str, Any]:
    """The commit the benchmark ran from and whether the tree had uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    return {"commit": sha or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None}


GIT = git_commit()  # read when the benchmark starts: the code it runs, not a later checkout


def command_line(argv: Sequence[str]) -> tuple[str, list[str]]:
    """`python bench/x.py ...` with every path inside the repository made relative to it, and the
    arguments that name a path outside it (a command that names one cannot rerun elsewhere)."""
    words, outside = [], []
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if i == 0 or os.path.isabs(value) or os.path.exists(value):
            path = Path(value).resolve()
            if path.is_relative_to(ROOT):
                a = a[: len(a) - len(value)] + os.path.relpath(path, ROOT)
            elif os.path.isabs(value) or ".." in Path(value).parts:
                outside.append(a)
        words.append(a)
    return "python " + " ".join(words), outside


def result_path(path: Path, quick: bool) -> Path:
    """Where a result goes: `path` for a full run, `<stem>_quick.json` beside it for a quick one."""
    if quick and not path.stem.endswith("_quick"):
        return path.with_name(f"{path.stem}_quick{path.suffix}")
    return path


def write_result(path: Path, name: str, body: dict[str, Any], quick: bool) -> Path:
    """The result JSON (atomic) with what it holds first: command, commit, run (full or quick),
    date, wall time and machine. A quick run goes to `<stem>_quick.json` (`result_path`)."""
    command, outside = command_line(sys.argv)
    if outside:
        print(f"note: the command names paths outside the repository ({' '.join(outside)}): it cannot rerun elsewhere")
    path = result_path(Path(path), quick)
    result = {
        "benchmark": name,
        "command": command,
        "run": "quick" if quick else "full",
        "git": GIT,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - START, 1),
        "machine": machine(),
        **body,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    if not quick:  # a full result changes the README's Results table: regenerate it (bench/summary.py)
        import summary

        summary.main([])
    return path


GOAL_RULE = (
    "met only when the arms differ by more than their spread: the paired differences (one per seed "
    "or repeat; positive = the goal's direction, after its margin) have a mean above two standard "
    "errors, or every one of at least 3 is positive; fewer than 2 pairs: not judged (met null)"
)


def paired_goal(
    target: str,
    better: Sequence[float],
    worse: Sequence[float] | float,
    margin: float = 0.0,
    min_pairs: int = 2,
) -> dict[str, Any]:
    """Judge "`better` exceeds `worse` by more than `margin`" over paired seeds (GOAL_RULE).

    `better` and `worse` are per-seed values in the goal's direction (pass the error of the
    baseline as `better`-side negatives, or swap the arms, for lower-is-better measures); a single
    `worse` number is a fixed baseline or threshold. `min_pairs=1` for a deterministic measurement
    (one run says it all). Returns the target, the rule, the differences, their mean, sd and
    standard error, how the rule was met (or not) and `met` (True, False or None: not judged)."""
    b = [float(v) for v in better]
    w = [float(worse)] * len(b) if isinstance(worse, int | float) else [float(v) for v in worse]
    if len(b) != len(w):
        raise ValueError(f"paired goal needs as many values on both sides, got {len(b)} and {len(w)}")
    diffs = [x - y - margin for x, y in zip(b, w, strict=True) if math.isfinite(x - y)]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    se = sd / math.sqrt(n) if n > 1 else 0.0
    if n < min_pairs:
        met, how = None, f"{n} pair(s): not judged"
    elif n == 1:
        met, how = diffs[0] > 0, "one deterministic measurement"
    elif mean > 2 * se and mean > 0:
        met, how = True, "mean difference > 2 standard errors"
    elif n >= 3 and all(d > 0 for d in diffs):
        met, how = True, "every seed agrees"
    else:
        met, how = False, "difference within its spread" if mean > 0 else "difference not in the goal's direction"
    return {
        "target": target,
        "rule": GOAL_RULE,
        "margin": margin,
        "differences": [round(d, 6) for d in diffs],
        "mean_difference": round(mean, 6),
        "sd": round(sd, 6),
        "se": round(se, 6),
        "n": n,
        "judged_by": how,
        "met": met,
    }


def all_met(goals: Sequence[dict[str, Any]]) -> bool | None:
    """True when every goal is met, False when one is not, None when none failed but one was not judged."""
    values = [g["met"] for g in goals]
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there are none)."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def quiet_lightning() -> None:
    """Silence warnings and Lightning's per-fit banners (GPU available, tips, model summaries)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_trainer(
    max_steps: int,
    root: Path | None = None,
    callbacks: list[Any] | None = None,
    validate: bool = False,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> Any:
    """One benchmark arm's Lightning Trainer: one device, no logger, progress bar, model summary or
    checkpoints, no sanity validation; validation batches only with `validate` (then all of them,
    run by `trainer.validate` or at the end of an epoch)."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1.0 if validate else 0,
        check_val_every_n_epoch=10**6 if validate else 1,  # validation by trainer.validate after fit
        num_sanity_val_steps=0,
        default_root_dir=str(root) if root is not None else None,
        callbacks=list(callbacks or []),
    )


class StepTimer:
    """Lightning callback: per step, the data waiting before it, its compute seconds and its loss."""

    def __new__(cls) -> Any:  # built lazily so that importing this file does not import Lightning
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def __init__(self) -> None:
                self.waits: list[float] = []
                self.steps: list[float] = []
                self.losses: list[float] = []
                self._end: float | None = None
                self._start = 0.0

            def on_train_batch_start(self, *args: Any) -> None:
                self._start = time.perf_counter()
                if self._end is not None:
                    self.waits.append(self._start - self._end)

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
                self._end = time.perf_counter()
                self.steps.append(self._end - self._start)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss) if loss is not None else math.nan)

        return _Timer()
