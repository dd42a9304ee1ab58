"""A new predictor and a new test-time adaptation method plug in from outside the core: a toy
job runs through the one folder runner, and a toy adaptation method registered here runs through
`medct segment --adapt` (DESIGN.md: a method reaches the core through a table it registers in)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medct.cli import main
from medct.io import read_volume, write_volume
from medct.runner import Case, discover_cases, prepare_output_folder, run_folder
from medct.volume import Volume


def _oblique_lps(shape: tuple[int, int, int] = (12, 10, 8)) -> Volume:
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-0.8, -1.1, 2.5]) @ rot  # LPS-like flips, anisotropic, oblique
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return Volume(np.random.default_rng(0).normal(0, 200, shape).astype(np.float32), affine)


class NegateJob:
    """A toy predictor's job: the output is the negated input, on the input's grid."""

    command = "negate"
    columns = ("mean",)

    def output_path(self, case: Case, out_dir: Path) -> Path:
        return out_dir / f"{case.name}{case.output_suffix}"

    def refuse(self, case: Case) -> str | None:
        return None

    def load(self, case: Case) -> Volume:
        from medct.io import validate_for_inference

        image = read_volume(case.path)
        validate_for_inference(image)
        return image

    def run(self, image: Volume, row: dict[str, object]) -> Volume:
        return image.with_array(-np.asarray(image.array))

    def write(self, case: Case, result: Volume, out_path: Path, row: dict[str, object]) -> None:
        write_volume(result, out_path)
        row["mean"] = f"{float(np.mean(result.array)):.3f}"

    def summarise_existing(self, case: Case, out_path: Path, row: dict[str, object]) -> None:
        row["mean"] = f"{float(np.mean(read_volume(out_path).array)):.3f}"


def test_a_toy_job_runs_through_the_folder_runner(tmp_path: Path) -> None:
    src = tmp_path / "in"
    vol = _oblique_lps()
    write_volume(vol, src / "a.nii.gz")
    write_volume(vol.with_array(vol.array * 2), src / "b.nii.gz")
    bad = vol.array.copy()
    bad[0, 0, 0] = np.nan
    write_volume(vol.with_array(bad), src / "c.nii.gz")
    ignored: list[tuple[Path, str]] = []
    cases = discover_cases(src, ignored)
    cases.append(Case("../escaped", src / "a.nii.gz", "file"))  # a name from someone else's datalist
    out = prepare_output_folder(tmp_path / "out")

    report = run_folder(cases, out, NegateJob(), ignored=ignored)
    assert report.done == ["a", "b"] and report.exit_code == 1
    assert [n for n, _ in report.failed] == ["c", "../escaped"]
    assert "NaN" in report.failed[0][1] and "refused" in report.failed[1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing beside -o
    result = read_volume(out / "a.nii.gz")
    np.testing.assert_allclose(result.affine, vol.affine, atol=1e-6)
    np.testing.assert_allclose(result.array, -vol.array, atol=1e-3)
    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert list(next(iter(rows.values())))[:8] == [
        "case", "status", "input", "output", "seconds", "network_seconds", "error", "note",
    ]  # fmt: skip
    assert rows["a"]["status"] == "done" and float(rows["a"]["mean"]) == float(f"{-vol.array.mean():.3f}")

    again = run_folder(discover_cases(src), out, NegateJob())  # outputs exist: skipped, summarised
    assert again.skipped == ["a", "b"] and again.failed == [("c", again.failed[0][1])]


class _ClassTwoEverywhere(nn.Module):
    """What the toy adaptation hands back: logits that say class 2 at every voxel."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], self.classes, *x.shape[2:]), dtype=x.dtype, device=x.device)
        logits[:, 2] = 10.0
        return logits + self.bias


class _Report:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def row(self) -> dict[str, str]:
        return {"adapt": "toy", "adapt_steps": str(self.steps)}


class ToyAdapter:
    def __init__(self, source: nn.Module, steps: int) -> None:
        self.classes = int(source.net_config["args"]["out_channels"])  # type: ignore[index]
        self.steps, self.cases = steps, 0

    def adapt(self, x: Any, body: Any) -> tuple[nn.Module, _Report]:
        self.cases += 1
        return _ClassTwoEverywhere(self.classes), _Report(self.steps)


def test_a_toy_adaptation_method_runs_through_segment_adapt(tmp_path: Path) -> None:
    from medct.adaptation import ADAPTATION_METHODS, register_adaptation
    from medct.phantom import write_cohort
    from tests.finetune.test_tta import _resenc_model

    write_cohort(tmp_path / "cohort", n=2, variant="cbct", seed=3, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
    model = _resenc_model(tmp_path / "model")
    made: list[ToyAdapter] = []

    def factory(source: object, options: Any) -> ToyAdapter:
        assert isinstance(source, nn.Module)
        made.append(ToyAdapter(source, options.steps))
        return made[-1]

    register_adaptation("toy", factory)
    try:
        argv = ["segment", "-m", str(model), "-i", str(tmp_path / "cohort" / "imagesTr"), "-o", str(tmp_path / "o")]
        assert main([*argv, "--adapt", "toy", "--adapt-steps", "3"]) == 0
    finally:
        del ADAPTATION_METHODS["toy"]
    assert len(made) == 1 and made[0].cases == 2  # one adapter per run, adapted on every case
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert [(r["adapt"], r["adapt_steps"]) for r in rows] == [("toy", "3")] * 2
    labels = read_volume(tmp_path / "o" / f"{rows[0]['case']}.nii.gz").array
    assert set(np.unique(labels)) <= {0, 2} and (labels == 2).any()  # the adapted network segmented it


def test_an_unregistered_adaptation_method_is_one_sentence(tmp_path: Path, capsys: Any) -> None:
    from tests.finetune.test_tta import _resenc_model

    model = _resenc_model(tmp_path / "model")
    write_volume(_oblique_lps((24, 24, 24)), tmp_path / "in" / "x.nii.gz")
    code = main(["segment", "-m", str(model), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--adapt", "nope"])
    err = capsys.readouterr().err
    assert code == 1 and "'nope' is not an adaptation method" in err and "tent" in err


def test_register_pairs_refuses_names_that_leave_the_output_folder(tmp_path: Path) -> None:
    import json

    pairs = [
        {"name": "../escaped_pair", "fixed": "f.nii.gz", "moving": "m.nii.gz"},
        {"name": str(tmp_path / "abs"), "fixed": "f.nii.gz", "moving": "m.nii.gz"},
        {"name": "", "fixed": "f.nii.gz", "moving": "m.nii.gz"},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "deep" / "out"
    assert main(["register", "--pairs", str(tmp_path / "pairs.json"), "-o", str(out)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "pairs.json"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed"] * 3 and all("is refused" in r["error"] for r in rows)
