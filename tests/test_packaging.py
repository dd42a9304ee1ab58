"""The wheel users install: every package folder of the tree and every recipe inside it, one version,
and the same wheel from an sdist (issue 37). The wheel is built offline from the dev environment
(`--no-isolation`); `.ci/wheel` installs it in a fresh venv and runs it outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import medct

ROOT = Path(__file__).resolve().parents[1]
# folder of the checkout -> the package it ships as (setup.py's FOLDERS, written out again here so
# that the test does not reuse the code it checks)
SHIPPED_AS = {
    "medct": "medct",
    "pretrain": "medct/pretrain",
    "finetune": "medct/finetune",
    "synthesis": "medct/synthesis",
    "registration": "medct/registration",
    "configs": "medct/configs",
}


def _build(args: list[str], out: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), *args],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return sorted(out.iterdir())


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, a wheel built from the tree and a wheel built from the sdist."""
    tree = _build(["--wheel"], tmp_path_factory.mktemp("tree"))
    both = _build([], tmp_path_factory.mktemp("sdist"))  # sdist, then the wheel from it
    return {
        "tree_wheel": tree[0],
        "sdist": next(p for p in both if p.name.endswith(".tar.gz")),
        "sdist_wheel": next(p for p in both if p.suffix == ".whl"),
    }


def _names(wheel: Path) -> set[str]:
    return set(zipfile.ZipFile(wheel).namelist())


def _tree_files() -> dict[str, Path]:
    """Every file a user needs, as the wheel should name it: each .py of the package folders and
    each recipe / datalist of configs/."""
    files = {}
    for folder, package in SHIPPED_AS.items():
        patterns = ["*/*.yaml", "*/*.json", "__init__.py"] if folder == "configs" else ["**/*.py"]
        for pattern in patterns:
            for path in (ROOT / folder).glob(pattern):
                if "__pycache__" not in path.parts:
                    files[f"{package}/{path.relative_to(ROOT / folder).as_posix()}"] = path
    return files


def test_every_package_folder_and_recipe_is_in_the_wheel(dists: dict[str, Path]) -> None:
    names = _names(dists["tree_wheel"])
    missing = sorted(set(_tree_files()) - names)
    assert not missing, f"in the tree but not in the wheel: {missing}"
    folders = {n.rsplit("/", 1)[0] for n in _tree_files() if n.endswith(".py")}
    assert {"medct/commands", "medct/nets", "medct/phantom"} <= folders  # the ones once missed
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_sdist_builds_the_same_wheel(dists: dict[str, Path]) -> None:
    def payload(wheel: Path) -> dict[str, bytes]:
        z = zipfile.ZipFile(wheel)
        return {n: z.read(n) for n in z.namelist() if not n.endswith(".dist-info/RECORD")}

    assert payload(dists["sdist_wheel"]) == payload(dists["tree_wheel"])


def test_one_version(dists: dict[str, Path]) -> None:
    z = zipfile.ZipFile(dists["tree_wheel"])
    metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {medct.__version__}\n" in metadata
    assert dists["tree_wheel"].name.startswith(f"medct-{medct.__version__}-")
    out = subprocess.run([sys.executable, "-m", "medct.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"medct {medct.__version__}"
