"""`medct configs [copy NAME DEST]`: list the recipes medct ships, or copy one out to edit.

medct configs                              # name, area and what each recipe trains
medct configs copy seg_phantom my.yaml     # then: medct fit --config my.yaml
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "list the YAML recipes medct ships, or copy one out (medct configs copy seg_phantom my.yaml)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list", help="list (default) or copy")
    p.add_argument("name", nargs="?", help="copy: the recipe's name, e.g. seg_phantom (see `medct configs`)")
    p.add_argument("dest", nargs="?", help="copy: the file (or folder) to write")
    p.add_argument("--force", action="store_true", help="copy: replace an existing file")


def run(args: argparse.Namespace) -> int:
    from medct.errors import InputPathError, MedCTError
    from medct.paths import atomic_file
    from medct.recipes import find_recipe, list_recipes

    if args.action == "list":
        if args.name or args.dest:
            raise MedCTError("`medct configs` takes no names; to copy one: medct configs copy NAME DEST.")
        recipes = list_recipes()
        width = max(len(r.name) for r in recipes)
        for r in recipes:
            print(f"{r.name:<{width}}  {r.area:<9}  {r.summary()}")
        print("\nrun one: medct fit --config NAME; edit one: medct configs copy NAME my.yaml")
        return 0
    if not args.name or not args.dest:
        raise MedCTError("copy needs a recipe name and a destination: medct configs copy seg_phantom my.yaml.")
    recipe = find_recipe(args.name)
    if recipe is None:
        raise InputPathError(f"medct ships no recipe called '{args.name}'; `medct configs` lists them.")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / recipe.path.name
    if not dest.parent.is_dir():
        raise InputPathError(f"the folder '{dest.parent}' of the destination does not exist.")
    if dest.exists() and not args.force:
        raise MedCTError(f"'{dest}' exists; pass --force to replace it.")
    with atomic_file(dest) as tmp:
        shutil.copyfile(recipe.path, tmp)
    print(f"wrote {dest} (recipe {recipe.area}/{recipe.name}); run it: medct fit --config {dest}")
    return 0
