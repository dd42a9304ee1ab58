"""The README's Results section is the one `bench/summary.py` generates from bench/results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_are_the_generated_table() -> None:
    summary = _summary()
    assert summary.main(["--check"]) == 0, "run `python bench/summary.py` and commit README.md"
    rows = [ln for ln in summary.current((ROOT / "README.md").read_text()).splitlines() if ln.startswith("| `")]
    results = [p for p in (ROOT / "bench" / "results").glob("*.json") if not p.name.endswith("_quick.json")]
    assert len(rows) == len(results) > 0  # one row per committed full result


def test_verdict_follows_the_goal_and_its_checks(tmp_path: Path) -> None:
    """A goal's own `met` decides; without one, its leaf checks do; checks not judged give no verdict."""
    summary = _summary()
    check = {"target": "a beats b", "mean_difference": 0.1, "se": 0.01, "n": 3}
    assert summary.verdict({"met": False, "x": {**check, "met": True}, "y": {**check, "met": False}}) == (
        "not met (1 of 2 checks)"
    )
    assert summary.verdict({"x": {**check, "met": True}}) == "met"
    assert summary.verdict({"x": {**check, "met": None}}) == "no verdict"
    assert summary.headline({"x": {**check, "met": True}}) == "a beats b: 0.1 +- 0.01 (n 3)"
    assert summary.headline({"measured": {"handled": 61, "fraction": 1.0}}) == "handled 61, fraction 1"
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"benchmark": "toy", "date": "2026-12-07T00:00:00", "git": {"commit": "abcdef123"},
                                "goal": {"target": "x | y", "met": True}}))  # fmt: skip
    assert summary.row(path) == [
        "`toy`",
        "x / y",
        "met",
        "",
        "2026-12-07",
        "abcdef1",
        "[toy.json](bench/results/toy.json)",
    ]


def test_command_table_names_every_command_and_its_examples_parse() -> None:
    """README's "What medct does" table has a row for every command medct has, and each example
    is a command line the CLI's parser accepts (Lightning verbs: a recipe that exists)."""
    import re
    import shlex

    from medct.cli import LIGHTNING_VERBS, build_parser
    from medct.commands import COMMANDS

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What medct does") : text.index("## Set-up")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| `medct ")]
    named = {re.match(r"\| `medct (\w+)", ln).group(1) for ln in rows}
    assert set(COMMANDS) <= named and "fit" in named
    parser = build_parser()
    for ln in rows:
        example = ln.rstrip(" |").rsplit("| `", 1)[1].rstrip("`")
        argv = shlex.split(example)[1:]
        if argv[0] in (*LIGHTNING_VERBS, "turbolift"):
            assert (ROOT / argv[argv.index("--config") + 1]).is_file(), example
            continue
        parser.parse_args(argv)  # SystemExit (argparse's exit 2) fails the test
