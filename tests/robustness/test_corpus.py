"""Every case of the robustness corpus (tests/robustness/corpus.py): exit code, one sentence
without a traceback, nothing left behind, exact geometry of what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from .corpus import CASES, run_case

PARAMS = [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_corpus_case(case, model_dir: Path, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outcome = run_case(case, tmp_path / "work", model_dir)
    if outcome.skipped:
        pytest.skip(f"{case.name}: {outcome.why}")
    assert outcome.ok, f"{case.name}: {outcome.why} -- {outcome.message}"
