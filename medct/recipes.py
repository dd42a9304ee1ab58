"""The recipes medct ships: YAML files of `medct.configs` (configs/ of the checkout), found by name.

`medct fit --config seg_phantom` and `medct fit --config configs/finetune/seg_phantom.yaml` run the
same recipe; a name works from any folder and in an installed medct (the recipes are package data of
the wheel). A recipe's name is its file stem (unique across areas) or `area/stem`. No torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medct.errors import InputPathError

PACKAGE = "medct.configs"


@dataclass(frozen=True)
class Recipe:
    """One packaged recipe: `name` (file stem), `area` (finetune, pretrain, synthesis), its file."""

    name: str
    area: str
    path: Path

    def summary(self, width: int = 100) -> str:
        """The first sentence of the recipe's leading comment (what it trains)."""
        words: list[str] = []
        for line in self.path.read_text().splitlines():
            if not line.startswith("#") or line.startswith("#  "):  # the comment ends, or a command line
                break
            words.append(line.lstrip("#").strip())
        text = " ".join(words)
        end = re.search(r"(?<! al)\.\s", text)  # a full stop that does not end "et al."
        text = text if end is None else text[: end.start() + 1]
        return text if len(text) <= width else text[: text.rfind(" ", 0, width - 3)] + " ..."


def recipes_root() -> Path:
    """The folder holding the packaged recipes (configs/ of the checkout or of the install)."""
    return Path(str(resources.files(PACKAGE)))


def list_recipes() -> list[Recipe]:
    """Every packaged recipe, by area then name."""
    root = recipes_root()
    return [Recipe(p.stem, p.parent.name, p) for p in sorted(root.glob("*/*.yaml"))]


def find_recipe(name: str) -> Recipe | None:
    """The packaged recipe called `name` (`seg_phantom`, `finetune/seg_phantom`, with or without
    `.yaml`), or None."""
    key = re.sub(r"\.ya?ml$", "", name.strip())
    for r in list_recipes():
        if key in (r.name, f"{r.area}/{r.name}"):
            return r
    return None


def resolve_config(value: str) -> str:
    """A `--config` value as a file path: an existing file as given, else a packaged recipe's file.

    Raises InputPathError (one sentence) when it is neither."""
    if Path(value).is_file():
        return value
    recipe = find_recipe(value)
    if recipe is not None:
        return str(recipe.path)
    if "/" in value or "\\" in value or re.search(r"\.ya?ml$", value):  # meant as a file
        raise InputPathError(f"the --config file '{value}' does not exist (and no recipe medct ships has that name).")
    raise InputPathError(
        f"--config '{value}' is neither a file nor a recipe medct ships; `medct configs` lists the recipes."
    )


def resolve_config_args(args: list[str]) -> list[str]:
    """`args` with every `--config VALUE` / `--config=VALUE` made a file path (`resolve_config`)."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--":  # what follows belongs to another parser (`medct turbolift ... -- OVERRIDES`)
            out += [a, *it]
            break
        if a == "--config":
            value = next(it, None)
            out += [a] if value is None else [a, resolve_config(value)]
        elif a.startswith("--config="):
            out.append("--config=" + resolve_config(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out
