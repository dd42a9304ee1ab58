"""Package layout of medct (metadata, dependencies and scripts live in pyproject.toml).

medct's sub-packages sit in top-level folders of the checkout (pretrain/ is `medct.pretrain`, ...)
and the YAML recipes in configs/ ship as `medct.configs`. pyproject.toml's `packages.find` cannot
map several folders to one package prefix, so the packages are found here, from the tree: a new
sub-package folder (one with an `__init__.py`) ships without anyone listing it.
`tests/test_packaging.py` builds the wheel and fails when a package folder of the tree is missing.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# package prefix -> folder of the checkout
FOLDERS: dict[str, str] = {
    "medct": "medct",
    "medct.pretrain": "pretrain",
    "medct.finetune": "finetune",
    "medct.synthesis": "synthesis",
    "medct.registration": "registration",
    "medct.configs": "configs",  # the recipes (package data; `medct configs` lists them)
}
# package data: the recipes and the datalists they name, one folder per area (finetune/, ...)
PACKAGE_DATA = {"medct.configs": ["*/*.yaml", "*/*.json"]}


def packages_and_dirs() -> tuple[list[str], dict[str, str]]:
    """Every package of the tree and its folder (setuptools' `packages` and `package_dir`)."""
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for prefix, folder in FOLDERS.items():
        for name in [prefix, *(f"{prefix}.{sub}" for sub in find_packages(HERE / folder))]:
            packages.append(name)
            package_dir[name] = str(Path(folder, *name.split(".")[len(prefix.split(".")) :]))
    return packages, package_dir


if __name__ == "__main__":
    packages, package_dir = packages_and_dirs()
    setup(
        packages=packages,
        package_dir=package_dir,
        package_data=PACKAGE_DATA,
        include_package_data=False,
    )
