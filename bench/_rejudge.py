"""Judge the committed full results again under `_common.paired_goal` from the numbers they store.

Issue 37 replaced each benchmark's own "met" logic (means compared without their spread) by one rule.
A rerun of every benchmark takes hours of CPU; the per-seed numbers a verdict needs are in the
result files already, so this recomputes each file's `goal` with the benchmark's own `judge` and
records the earlier verdict under `goal_rejudged` (the measurements themselves are not repeated, and
the file says so). Files written before result files recorded their run get `run`, `git` (the
commit that committed the file: the code commit it ran from is not known) and `wall_s`.

Usage: python bench/_rejudge.py   (prints file, old met, new met)
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual_pretrain  # noqa: E402
import motion  # noqa: E402
import phantom_to_real  # noqa: E402
import pretrain_throughput  # noqa: E402, F401  (imported for symmetry: its goal has no stored per-step values)
import sct  # noqa: E402
import segment  # noqa: E402
import ssl_transfer  # noqa: E402
import text2ct  # noqa: E402
import tta  # noqa: E402
import turbolift  # noqa: E402
from _common import GOAL_RULE, ROOT, all_met, paired_goal  # noqa: E402

import registration  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _arms(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["arm"] for r in rows}, key=lambda a: (a != "scratch", a))


def _segment(d: dict[str, Any]) -> dict[str, Any]:
    return {
        arm: segment.judge(d["rows"], d["agreement"], arm, t)
        for arm, t in (("nnunet", segment.TARGET_DICE_NNUNET), ("monai", segment.TARGET_DICE))
    }


def _throughput(d: dict[str, Any]) -> dict[str, Any]:
    checks = {
        r["method"]: paired_goal(f"{r['method']}: data waiting < 10 %", [0.10], [r["data_wait_fraction"]], min_pairs=1)
        for r in d["rows"]
    }
    return {**d["goal"], "checks": checks, "met": all_met(list(checks.values()))}


def _folder(d: dict[str, Any]) -> dict[str, Any]:
    g = d["goal"]
    ratio = g["measured"]["wall_over_network"]
    return {**g, **paired_goal("wall / network <= 1.15", [1.15], [ratio], min_pairs=1), "measured": g["measured"]}


JUDGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "continual_pretrain": lambda d: continual_pretrain.judge(d["rows"]),
    "motion": lambda d: motion.judge(*(d["goal"][k] for k in ("ar_arm", "ar_per_seed_mm", "copy_last_mm", "pca_mm"))),
    "phantom_to_real": lambda d: phantom_to_real.judge(d["rows"]),
    "pretrain_throughput": _throughput,
    "registration": lambda d: registration.judge(d["real"]),
    "robustness": lambda d: {
        **d["goal"],
        "rule": "a count over the whole corpus, no spread: met only when every case is handled",
    },
    "sct": sct.judge,
    "segment": _segment,
    "segment_folder": _folder,
    "ssl_transfer": lambda d: ssl_transfer.judge(d["segmentation_rows"], _arms(d["segmentation_rows"])),
    "text2ct": text2ct.judge,
    "tta": lambda d: tta.judge(d["phantom"]["rows"], d["phantom"]["gains"]),
    "turbolift": lambda d: (
        turbolift.judge(d["phantom"]["rows"], "cbct_tst", "ct")
        if "phantom" in d
        else turbolift.judge(d["real"]["rows"], "cbct", "planct")
    ),
}


def _met(goal: dict[str, Any]) -> Any:
    if "met" in goal:
        return goal["met"]
    return {k: v.get("met") for k, v in goal.items() if isinstance(v, dict)}


def _committed_in(path: Path) -> str | None:
    out = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or None


def main() -> int:
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem.endswith("_quick"):
            continue
        d = json.loads(path.read_text())
        if "goal_rejudged" in d or d.get("git", {}).get("commit"):
            print(f"{path.name:<28} written under the rule already")
            continue
        old = d["goal"]
        new = JUDGES[d["benchmark"]](d)
        if d["benchmark"] == "turbolift" and "real_goal" in d:
            d["real_goal"] = turbolift.judge(d["real"]["rows"], "cbct", "planct")
        wall = (
            d.get("seconds")
            or (60 * d["minutes"] if "minutes" in d else None)
            or (60 * d["total_minutes"] if "total_minutes" in d else None)
        )
        head = {
            "benchmark": d.pop("benchmark"),
            "command": d.pop("command"),
            "run": "full",
            "git": {"commit": None, "committed_in": _committed_in(path), "dirty": None},
            "date": d.pop("date"),
            "wall_s": round(wall, 1) if wall else None,
        }
        d.pop("goal")
        d = {**head, **d}
        d["goal"] = new
        d["goal_rejudged"] = {
            "date": dt.date.today().isoformat(),
            "by": "bench/_rejudge.py: the stored per-seed numbers judged by _common.paired_goal; not rerun",
            "rule": GOAL_RULE,
            "previous_goal": old,
        }
        path.write_text(json.dumps(d, indent=2) + "\n")
        print(f"{path.name:<28} met {json.dumps(_met(old)):<40} -> {json.dumps(_met(new))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
