"""Benchmark result files that cannot mislead (issue 37): what each committed result holds, a
command that reruns anywhere, quick runs kept apart, and the one goal rule."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402


def _committed() -> list[Path]:
    """The result files git tracks (all of bench/results outside a git checkout), quick ones excluded."""
    out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True)
    files = [ROOT / f for f in out.stdout.split()] if out.returncode == 0 and out.stdout else RESULTS.glob("*.json")
    return sorted(p for p in files if p.suffix == ".json" and not p.stem.endswith("_quick"))


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.name)
def test_a_committed_result_says_what_it_holds(path: Path) -> None:
    d = json.loads(path.read_text())
    assert d["run"] == "full", "a committed result is a full run (quick runs write <name>_quick.json)"
    assert {"commit", "dirty"} <= set(d["git"]) and (d["git"]["commit"] or d["git"].get("committed_in"))
    assert {"cpu", "cores", "torch"} <= set(d["machine"]) and "wall_s" in d and d["date"]
    assert "met" in d["goal"] or all("met" in g for g in d["goal"].values())
    words = shlex.split(d["command"])
    assert words[:2] == ["python", f"bench/{d['benchmark']}.py"] or words[1].startswith("bench/")
    for w in words[2:]:
        value = w.split("=", 1)[1] if w.startswith("--") and "=" in w else w
        if "/" not in value:
            continue
        resolved = (ROOT / value).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: the command names {value}, outside the repository"


def test_no_quick_result_is_committed() -> None:
    out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True)
    assert not [f for f in out.stdout.split() if f.endswith("_quick.json")]


def test_quick_runs_never_replace_a_full_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = tmp_path / "thing.json"
    full.write_text('{"run": "full"}\n')
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "thing.py"), "--quick", "--out", str(full)])
    written = _common.write_result(full, "thing", {"goal": {"met": None}}, quick=True)
    assert written == tmp_path / "thing_quick.json" and json.loads(full.read_text()) == {"run": "full"}
    d = json.loads(written.read_text())
    assert d["run"] == "quick" and d["command"].startswith("python bench/thing.py --quick --out ")
    assert d["git"]["commit"] and d["wall_s"] >= 0


def test_a_command_naming_a_path_outside_the_repository_is_flagged() -> None:
    command, outside = _common.command_line([str(ROOT / "bench" / "x.py"), "--models", "/root/.cache/medct/m1"])
    assert command == "python bench/x.py --models /root/.cache/medct/m1" and outside == ["/root/.cache/medct/m1"]
    command, outside = _common.command_line([str(ROOT / "bench" / "x.py"), f"--out={ROOT / 'bench' / 'r.json'}"])
    assert command == "python bench/x.py --out=bench/r.json" and not outside


def test_goal_rule_needs_the_difference_beyond_its_spread() -> None:
    # phantom_to_real's old "met": +0.0006 Dice on a seed spread of 0.007
    within = _common.paired_goal("t", [0.9294, 0.9160, 0.9275], 0.9237)
    assert within["met"] is False and within["judged_by"] == "difference within its spread"
    clear = _common.paired_goal("t", [0.71, 0.73, 0.72], [0.61, 0.60, 0.62])
    assert clear["met"] is True and clear["mean_difference"] == pytest.approx(0.11)
    agree = _common.paired_goal("t", [0.2, 0.5, 0.21], [0.19, 0.1, 0.2])  # wide spread, but every seed agrees
    assert agree["met"] is True and agree["judged_by"] == "every seed agrees"
    assert _common.paired_goal("t", [0.9], [0.1])["met"] is None  # one seed: not judged
    assert _common.paired_goal("t", [0.9], 0.1, min_pairs=1)["met"] is True  # a deterministic measurement
    assert _common.paired_goal("t", [0.72, 0.73, 0.74], [0.65, 0.66, 0.64], margin=0.1)["met"] is False
    assert _common.all_met([{"met": True}, {"met": None}]) is None
    assert _common.all_met([{"met": True}, {"met": False}, {"met": None}]) is False
