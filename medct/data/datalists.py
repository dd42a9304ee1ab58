"""Datalists: MSD dataset.json, nnU-Net raw folders, plain folders of volumes, and seeded splits.

Datalists are MONAI-style lists of dicts with the keys a task needs (`KEY_SETS`), read from
  * an MSD `dataset.json` ("training" list of paths relative to the JSON, optional "validation"
    list, "labels" {"0": "background", ...}, "modality" {"0": "CT"}; Antonelli et al., "The Medical
    Segmentation Decathlon", Nat. Commun. 2022), given as `datalist` or found in `data_dir`;
  * an nnU-Net raw folder: imagesTr/NAME_0000.nii.gz paired with labelsTr/NAME.nii.gz (Isensee et
    al., Nat. Methods 2021); nnU-Net v2's dataset.json ("labels" {"background": 0, ...}) names the
    classes;
  * for ("image",) only: any folder of volumes (`list_volume_folder`), or a reduced datalist
    written by `medct reduce` (entries with "slices": training crops are centred on those).
Without a "validation" list the training list is split by a seeded shuffle: a fraction, or fold
k of n (`split_datalist`). No torch here: the CLI and the benchmarks read datalists cheaply.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medct.errors import ConfigError, InputPathError
from medct.paths import VOLUME_SUFFIXES, volume_stem

DATASET_JSON = "dataset.json"

Datalist = list[dict[str, Any]]

# The key sets a task may ask for (see medct.data), and what each key holds.
KEY_SETS: tuple[tuple[str, ...], ...] = (
    ("image",),
    ("image", "label"),
    ("image", "target"),
    ("image", "text"),
    ("fixed", "moving"),
    ("phases",),
    ("phases", "label"),
)
PATH_KEYS = ("image", "label", "target", "fixed", "moving")


def _strip_suffix(name: str) -> tuple[str, str] | None:
    stem = volume_stem(name)
    return None if stem is None else (stem, name[len(stem) :])


def _resolve(base: Path, rel: str, where: Path) -> str:
    p = (base / rel).resolve()
    if not p.exists():
        raise InputPathError(f"{where} lists {rel}, which does not exist under {base}.")
    return str(p)


def _resolve_item(item: dict[str, Any], base: Path, where: Path) -> dict[str, Any]:
    """Paths of a datalist entry made absolute; a "text" that names a .txt file is read."""
    entry = dict(item)
    for key in PATH_KEYS:
        if key in entry:
            entry[key] = _resolve(base, str(entry[key]), where)
    if "phases" in entry:
        phases = entry["phases"]
        entry["phases"] = (
            [_resolve(base, str(p), where) for p in phases]
            if isinstance(phases, list)
            else _resolve(base, str(phases), where)
        )
    text = entry.get("text")
    if isinstance(text, str) and text.endswith(".txt") and (base / text).is_file():
        entry["text"] = (base / text).read_text(encoding="utf-8").strip()
    return entry


def read_msd_datalist(dataset_json: str | os.PathLike[str], key: str = "training") -> Datalist | None:
    """The `key` list of an MSD-style dataset.json with absolute paths, or None if it has no such list.

    Entries are dicts of any of the keys in KEY_SETS; paths are relative to the JSON's folder.
    """
    path = Path(dataset_json)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputPathError(f"{path} is not a readable JSON file ({e}).") from e
    items = meta.get(key)
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InputPathError(f'{path}: \'{key}\' must be a list of {{"image": ..., "label": ...}} entries.')
    return [_resolve_item(item, path.parent, path) for item in items]


def list_volume_folder(folder: str | os.PathLike[str]) -> Datalist:
    """{"image": path} for every volume file and DICOM series folder directly under `folder`
    (sorted; hidden entries skipped): an unlabelled folder as a pretraining datalist."""
    from medct.io import is_dicom_file

    root = Path(folder)
    items: Datalist = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and volume_stem(entry) is not None:
            items.append({"image": str(entry.resolve())})
        elif entry.is_dir() and any(f.is_file() and is_dicom_file(f) for f in entry.rglob("*")):
            items.append({"image": str(entry.resolve())})
    if not items:
        raise InputPathError(f"{root} holds no volumes ({', '.join(VOLUME_SUFFIXES)}) or DICOM series folders.")
    return items


def pair_nnunet_folder(data_dir: str | os.PathLike[str]) -> Datalist:
    """Pair imagesTr/NAME_0000.<ext> with labelsTr/NAME.<ext>; unpaired cases raise InputPathError."""
    root = Path(data_dir)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise InputPathError(
            f"{root} has neither a {DATASET_JSON} with a 'training' list nor imagesTr/ and labelsTr/ folders."
        )
    images: dict[str, Path] = {}
    for f in sorted(images_dir.iterdir()):
        split = _strip_suffix(f.name)
        if split is None:
            continue
        stem = split[0]
        if not stem[-5:-4] == "_" or not stem[-4:].isdigit():
            raise InputPathError(f"{f} is not named NAME_0000{split[1]} as nnU-Net expects in imagesTr.")
        if stem[-4:] != "0000":
            raise InputPathError(f"{f} is a second input channel; medct segments single-channel CT.")
        images[stem[:-5]] = f
    labels = {s[0]: f for f in sorted(labels_dir.iterdir()) if (s := _strip_suffix(f.name)) is not None}
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"no label for {', '.join(no_label[:5])}" + (" ..." if len(no_label) > 5 else ""))
        if no_image:
            parts.append(f"no image for {', '.join(no_image[:5])}" + (" ..." if len(no_image) > 5 else ""))
        raise InputPathError(f"{root} has unpaired cases ({'; '.join(parts)}).")
    if not images:
        raise InputPathError(f"{images_dir} holds no images ({', '.join(VOLUME_SUFFIXES)}).")
    return [{"image": str(images[n].resolve()), "label": str(labels[n].resolve())} for n in sorted(images)]


def read_label_names(dataset_json: str | os.PathLike[str]) -> list[str] | None:
    """Class names by index (0 = background) from MSD {"0": "bg"} or nnU-Net v2 {"bg": 0} labels."""
    path = Path(dataset_json)
    if not path.is_file():
        return None
    labels = json.loads(path.read_text()).get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    by_index: dict[int, str] = {}
    for k, v in labels.items():
        if str(k).isdigit():  # MSD: index -> name
            by_index[int(k)] = str(v)
        elif isinstance(v, int):  # nnU-Net v2: name -> index
            by_index[v] = str(k)
        elif isinstance(v, list) and len(v) == 1 and isinstance(v[0], int):  # v2 region with one label
            by_index[v[0]] = str(k)
        else:
            raise InputPathError(f"{path}: cannot read label '{k}': {v!r} as a class index.")
    return [by_index.get(i, f"label_{i}") for i in range(max(by_index) + 1)]


def find_datalist(
    data_dir: str | os.PathLike[str], keys: Sequence[str] = ("image", "label")
) -> tuple[Datalist, Datalist | None]:
    """(training, validation or None) of a dataset folder: MSD dataset.json first, else nnU-Net
    pairing (keys with "label"), else every volume in the folder (keys ("image",))."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputPathError(f"Dataset folder {root} does not exist.")
    ds_json = root / DATASET_JSON
    if ds_json.is_file():
        train = read_msd_datalist(ds_json, "training")
        if train is not None:
            return train, read_msd_datalist(ds_json, "validation")
    if tuple(keys) == ("image",) and not (root / "imagesTr").is_dir():
        return list_volume_folder(root), None
    if tuple(keys) == ("image",):
        return list_volume_folder(root / "imagesTr"), None
    return pair_nnunet_folder(root), None


def split_datalist(
    items: Sequence[dict[str, str]],
    val_fraction: float = 0.2,
    seed: int = 0,
    fold: int | None = None,
    num_folds: int = 5,
) -> tuple[Datalist, Datalist]:
    """Seeded shuffle, then fold `fold` of `num_folds` (if given) or the last `val_fraction` is validation.

    At least one case goes to each side when there are two or more cases.
    """
    order = list(items)
    random.Random(seed).shuffle(order)
    n = len(order)
    if n < 2:
        raise InputPathError(f"A dataset needs at least 2 labelled cases to split off validation; it has {n}.")
    if fold is not None:
        if not 0 <= fold < num_folds:
            raise ConfigError(f"data.fold must lie in [0, {num_folds}) for {num_folds} folds, got {fold}.")
        val = order[fold::num_folds]
        val_ids = {id(x) for x in val}
        return [x for x in order if id(x) not in val_ids], val
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return order[: n - n_val], order[n - n_val :]


def _phantom_label_names(labels: Any) -> list[str]:
    """medct.phantom.LABELS ({index: name} or a list by index) -> names by index, background first."""
    if isinstance(labels, dict):
        by_index = {int(k): str(v) for k, v in labels.items()}
        by_index.setdefault(0, "background")
        return [by_index.get(i, f"label_{i}") for i in range(max(by_index) + 1)]
    names = [str(n) for n in labels]
    return names if names and names[0] == "background" else ["background", *names]
