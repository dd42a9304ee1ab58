"""Packaged recipes by name: `medct configs`, `medct configs copy`, `medct fit --config NAME`."""

from __future__ import annotations

from pathlib import Path

import pytest

from medct.cli import main
from medct.errors import InputPathError
from medct.recipes import find_recipe, list_recipes, resolve_config, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]


def test_every_yaml_of_configs_is_a_recipe() -> None:
    found = {f"{r.area}/{r.name}.yaml" for r in list_recipes()}
    assert found == {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").glob("*/*.yaml")}
    assert len({r.name for r in list_recipes()}) == len(found)  # a bare name is unambiguous


@pytest.mark.parametrize("name", ["seg_phantom", "seg_phantom.yaml", "finetune/seg_phantom"])
def test_a_recipe_is_found_by_name(name: str) -> None:
    recipe = find_recipe(name)
    assert recipe is not None
    assert recipe.path.read_bytes() == (ROOT / "configs/finetune/seg_phantom.yaml").read_bytes()


def test_config_argument_accepts_a_name_or_a_path(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("seed_everything: 1\n")
    args = resolve_config_args(["--config", "spark", f"--config={own}", "--trainer.max_epochs=1", "--", "--config"])
    assert Path(args[1]).read_bytes() == (ROOT / "configs/pretrain/spark.yaml").read_bytes()
    assert args[2:] == [f"--config={own}", "--trainer.max_epochs=1", "--", "--config"]
    with pytest.raises(InputPathError, match="medct configs"):
        resolve_config("no_such_recipe")


def test_configs_lists_and_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(r.name in listing for r in list_recipes())
    dest = tmp_path / "my.yaml"
    assert main(["configs", "copy", "seg_phantom", str(dest)]) == 0
    assert dest.read_bytes() == (ROOT / "configs/finetune/seg_phantom.yaml").read_bytes()
    assert main(["configs", "copy", "seg_phantom", str(dest)]) == 1  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["configs", "copy", "nope", str(tmp_path / "x.yaml")]) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_fit_with_an_unknown_recipe_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", "no_such_recipe"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a file nor a recipe" in err
