"""Segmentation datalists, disk caching and the LightningDataModule that feeds `medct fit`.

Datalists are MONAI-style lists of {"image": path, "label": path} dicts, read from
  * an MSD `dataset.json` ("training" list of relative paths, optional "validation" list and
    "labels" {"0": "background", ...}; Antonelli et al., "The Medical Segmentation Decathlon",
    Nat. Commun. 2022), or
  * an nnU-Net raw folder: imagesTr/NAME_0000.nii.gz paired with labelsTr/NAME.nii.gz (Isensee et
    al., Nat. Methods 2021); nnU-Net v2's dataset.json ("labels" {"background": 0, ...}) names the
    classes.
Without a "validation" list the training list is split by a seeded shuffle: a fraction, or fold
k of n.

Caching (`cache_dir`): the deterministic head of the pipelines (load, RAS, spacing, HU window,
body crop, pad) runs once per case and is stored by MONAI's PersistentDataset under
`cache_dir/<fingerprint of the preprocessing>/{train,val}/`. DDP safety: the cache is filled in
`prepare_data`, which Lightning runs on local rank 0 only while the other ranks wait at a barrier;
`setup` on every rank then only reads. (MONAI writes each entry to a temp file and moves it into
place, so even an unexpected second writer cannot leave a half-written entry.) The cache is keyed
by file path: delete it when the files behind an unchanged path change.

Phantom data: `phantom=PhantomCohort(...)` makes the module write a synthetic cohort with
`medct.phantom.write_cohort` into `data_dir` when that folder has no dataset.json yet (again in
`prepare_data`), so every YAML recipe runs without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from medct.errors import InputPathError
from medct.paths import VOLUME_SUFFIXES, volume_stem
from medct.transforms import Preprocessing, train_transforms, val_transforms

DATASET_JSON = "dataset.json"
CACHE_VERSION = 1  # bump when the cached part of the pipelines changes meaning

Datalist = list[dict[str, str]]


# ----------------------------------------------------------------------------- datalists


def _strip_suffix(name: str) -> tuple[str, str] | None:
    stem = volume_stem(name)
    return None if stem is None else (stem, name[len(stem) :])


def _resolve(base: Path, rel: str, where: Path) -> str:
    p = (base / rel).resolve()
    if not p.exists():
        raise InputPathError(f"{where} lists {rel}, which does not exist under {base}.")
    return str(p)


def read_msd_datalist(dataset_json: str | os.PathLike[str], key: str = "training") -> Datalist | None:
    """The `key` list of an MSD dataset.json with absolute paths, or None if it has no such list."""
    path = Path(dataset_json)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputPathError(f"{path} is not a readable JSON file ({e}).") from e
    items = meta.get(key)
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "image" in i for i in items):
        raise InputPathError(f'{path}: \'{key}\' must be a list of {{"image": ..., "label": ...}} entries.')
    out = []
    for item in items:
        entry = {"image": _resolve(path.parent, item["image"], path)}
        if "label" in item:
            entry["label"] = _resolve(path.parent, item["label"], path)
        out.append(entry)
    return out


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


def find_datalist(data_dir: str | os.PathLike[str]) -> tuple[Datalist, Datalist | None]:
    """(training, validation or None) of a dataset folder: MSD dataset.json first, else nnU-Net pairing."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputPathError(f"Dataset folder {root} does not exist.")
    ds_json = root / DATASET_JSON
    if ds_json.is_file():
        train = read_msd_datalist(ds_json, "training")
        if train is not None:
            return train, read_msd_datalist(ds_json, "validation")
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
            raise ValueError(f"fold must lie in [0, {num_folds}), got {fold}")
        val = order[fold::num_folds]
        val_ids = {id(x) for x in val}
        return [x for x in order if id(x) not in val_ids], val
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return order[: n - n_val], order[n - n_val :]


# ----------------------------------------------------------------------------- data modules


@dataclass(frozen=True)
class PhantomCohort:
    """A synthetic cohort `medct.phantom.write_cohort` writes when `data_dir` is empty."""

    n: int = 20
    variant: str = "ct"
    seed: int = 0
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)


class SegmentationDataModule(pl.LightningDataModule):
    """Training patches and whole validation volumes for one segmentation dataset.

    Give `data_dir` (MSD dataset.json or nnU-Net imagesTr/labelsTr) or `datalist` (an MSD-style
    JSON whose paths are relative to its own folder). `labels` names the classes by index
    (0 = background); by default they come from dataset.json (or the phantom's label table).
    One training step sees batch_size * num_samples patches; validation yields one whole
    preprocessed volume per batch, (1, 1, X, Y, Z).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datalist: str | None = None,
        labels: list[str] | None = None,
        spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
        hu_min: float = -1000.0,
        hu_max: float = 1000.0,
        patch_size: tuple[int, int, int] = (96, 96, 96),
        batch_size: int = 2,
        num_samples: int = 2,
        pos: float = 1.0,
        neg: float = 1.0,
        augment: bool = True,
        flip_axes: tuple[int, ...] = (),
        num_workers: int = 4,
        cache_dir: str | None = None,
        val_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        seed: int = 0,
        phantom: PhantomCohort | None = None,
    ) -> None:
        super().__init__()
        if (data_dir is None) == (datalist is None):
            raise InputPathError("Give exactly one of data.data_dir (a dataset folder) or data.datalist (a JSON file).")
        if phantom is not None and data_dir is None:
            raise InputPathError("A phantom cohort needs data.data_dir, the folder to write it into.")
        self.data_dir = data_dir
        self.datalist = datalist
        self.pre = Preprocessing(spacing=tuple(float(s) for s in spacing), hu_min=hu_min, hu_max=hu_max)  # type: ignore[arg-type]
        self.spacing = list(self.pre.spacing)
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.pos, self.neg = pos, neg
        self.augment = augment
        self.flip_axes = tuple(flip_axes)
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.val_fraction, self.fold, self.num_folds, self.seed = val_fraction, fold, num_folds, seed
        self.phantom = phantom
        self.labels: list[str] = list(labels) if labels is not None else self._default_labels()
        if len(self.labels) < 2:
            raise InputPathError(f"Segmentation needs background plus at least one class; labels are {self.labels}.")
        self.train_items: Datalist = []
        self.val_items: Datalist = []

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background + classes."""
        return len(self.labels)

    def _json_path(self) -> Path:
        return Path(self.datalist) if self.datalist is not None else Path(str(self.data_dir)) / DATASET_JSON

    def _default_labels(self) -> list[str]:
        if self.phantom is None and not self._json_path().parent.is_dir():
            raise InputPathError(f"Dataset folder {self._json_path().parent} does not exist.")
        names = read_label_names(self._json_path())
        if names is None and self.phantom is not None:
            from medct.phantom import LABELS

            names = _phantom_label_names(LABELS)
        if names is None:
            raise InputPathError(f"{self._json_path()} names no labels; set data.labels (background first).")
        return names

    # -- Lightning hooks

    def prepare_data(self) -> None:
        """Local rank 0 only: write the phantom cohort if asked, and fill the disk cache."""
        if self.phantom is not None and not self._json_path().is_file():
            from medct.phantom import write_cohort

            p = self.phantom
            write_cohort(
                self.data_dir, n=p.n, variant=p.variant, seed=p.seed, shape=tuple(p.shape), spacing=tuple(p.spacing)
            )
        if self.cache_dir is not None:
            train, val = self._split()
            for ds in (self._dataset(train, "train"), self._dataset(val, "val")):
                for i in range(len(ds)):
                    ds[i]  # computes and stores the deterministic part of case i

    def setup(self, stage: str | None = None) -> None:
        self.train_items, self.val_items = self._split()

    # MONAI's DataLoader (a torch DataLoader) seeds the random transforms from torch's generator,
    # so runs are reproducible under seed_everything, and gives every worker its own random state
    # (a plain DataLoader would fork identical augmentation streams into all workers).

    def train_dataloader(self) -> DataLoader:
        from monai.data import DataLoader as MonaiDataLoader
        from monai.data import list_data_collate

        return MonaiDataLoader(
            self._dataset(self.train_items, "train"),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=list_data_collate,  # flattens the num_samples crops of each volume into the batch
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        from monai.data import DataLoader as MonaiDataLoader

        return MonaiDataLoader(
            self._dataset(self.val_items, "val"),
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # -- helpers

    def _split(self) -> tuple[Datalist, Datalist]:
        if self.datalist is not None:
            path = Path(self.datalist)
            if not path.is_file():
                raise InputPathError(f"Datalist {path} does not exist.")
            train = read_msd_datalist(path, "training")
            if train is None:
                raise InputPathError(f"{path} has no 'training' list.")
            val = read_msd_datalist(path, "validation")
        else:
            train, val = find_datalist(str(self.data_dir))
        missing = [x["image"] for x in train + (val or []) if "label" not in x]
        if missing:
            raise InputPathError(f"{len(missing)} training cases have no label, e.g. {missing[0]}.")
        if val:
            return train, val
        return split_datalist(train, self.val_fraction, self.seed, self.fold, self.num_folds)

    def cache_fingerprint(self) -> str:
        """Short hash of everything the cached tensors depend on (a new folder when any changes)."""
        key = {"v": CACHE_VERSION, "pre": self.pre.to_dict(), "patch": self.patch_size}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def _dataset(self, items: Datalist, split: str) -> Any:
        from monai.data import Dataset, PersistentDataset

        if split == "train":
            xform = train_transforms(
                self.pre, self.patch_size, self.num_samples, self.pos, self.neg, self.augment, self.flip_axes
            )
        else:
            xform = val_transforms(self.pre)
        if self.cache_dir is None:
            return Dataset(items, xform)
        folder = Path(self.cache_dir) / self.cache_fingerprint() / split
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, xform, cache_dir=folder)

    def describe(self) -> dict[str, Any]:
        """Plain summary (for logs and tests)."""
        return {
            "train": len(self.train_items),
            "val": len(self.val_items),
            "labels": self.labels,
            "preprocessing": self.pre.to_dict(),
            "patch_size": self.patch_size,
            "steps_per_epoch": math.ceil(len(self.train_items) / self.batch_size),
            "phantom": asdict(self.phantom) if self.phantom else None,
        }


def _phantom_label_names(labels: Any) -> list[str]:
    """medct.phantom.LABELS ({index: name} or a list by index) -> names by index, background first."""
    if isinstance(labels, dict):
        by_index = {int(k): str(v) for k, v in labels.items()}
        by_index.setdefault(0, "background")
        return [by_index.get(i, f"label_{i}") for i in range(max(by_index) + 1)]
    names = [str(n) for n in labels]
    return names if names and names[0] == "background" else ["background", *names]
