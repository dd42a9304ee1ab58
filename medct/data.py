"""Datalists, splits, disk caching and the one generic LightningDataModule that feeds `medct fit`.

Every task reads its data through `VolumeDataModule` with the keys it needs (`KEY_SETS`):

  keys                 task                        what an item holds
  ("image",)           pretraining                 a volume (unlabelled folders of NIfTI/MHA/NRRD
                                                   files and DICOM series folders work as they are)
  ("image", "label")   segmentation                a volume and its label map on the same grid
  ("image", "target")  paired synthesis (sCT)      two volumes on one grid (e.g. CBCT and its CT)
  ("image", "text")    text-to-CT, CLIP            a volume and its report (a string, or a .txt path)
  ("fixed", "moving")  registration                two volumes; their grids may differ
  ("phases",)          4D motion, BM-MAE           ordered phase volumes on one grid (a list of
                                                   paths or one 4D NIfTI), stacked as channels
  ("phases", "label")  multimodal segmentation     the same, with a label map on their grid

Datalists are MONAI-style lists of dicts with those keys, read from
  * an MSD `dataset.json` ("training" list of paths relative to the JSON, optional "validation"
    list, "labels" {"0": "background", ...}, "modality" {"0": "CT"}; Antonelli et al., "The Medical
    Segmentation Decathlon", Nat. Commun. 2022), given as `datalist` or found in `data_dir`;
  * an nnU-Net raw folder: imagesTr/NAME_0000.nii.gz paired with labelsTr/NAME.nii.gz (Isensee et
    al., Nat. Methods 2021); nnU-Net v2's dataset.json ("labels" {"background": 0, ...}) names the
    classes;
  * for ("image",) only: any folder of volumes (`list_volume_folder`), or a reduced datalist
    written by `medct reduce` (entries with "slices": training crops are centred on those).
Without a "validation" list the training list is split by a seeded shuffle: a fraction, or fold
k of n.

A data module takes three typed groups (dataclasses the Lightning CLI reads from YAML as nested
mappings): `preprocessing` (`medct.transforms.Preprocessing`: spacing, HU window, modality),
`sampling` and `split` (`medct.settings`). What the data decides is linked by MedCTCLI into the
task (`medct.lightning_cli.DATA_LINKS`): sampling.patch_size on parse; the resolved preprocessing,
labels and num_classes (into the network's out_channels) on instantiation. A task that lacks one of these arguments simply does
not receive it.

Caching (`cache_dir`): the deterministic head of the pipelines (load, RAS, spacing, intensity
window, body crop) runs once per case and is stored by MONAI's PersistentDataset under
`cache_dir/<fingerprint of keys + preprocessing>/{train,val}/`. DDP safety: the cache is filled in
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from medct.errors import ConfigError, InputPathError
from medct.paths import VOLUME_SUFFIXES, volume_stem
from medct.settings import Sampling, Split
from medct.transforms import (
    Preprocessing,
    classification_transforms,
    generic_transforms,
    train_transforms,
    val_transforms,
)

DATASET_JSON = "dataset.json"
CACHE_VERSION = 2  # bump when the cached part of the pipelines changes meaning

Datalist = list[dict[str, Any]]

# The key sets a task may ask for (see the module docstring), and what each key holds.
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


# ----------------------------------------------------------------------------- datalists


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


# ----------------------------------------------------------------------------- data modules


@dataclass(frozen=True)
class PhantomCohort:
    """A synthetic cohort `medct.phantom.write_cohort` writes when `data_dir` is empty."""

    n: int = 20
    variant: str = "ct"
    seed: int = 0
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    phases: tuple[str, ...] | None = None  # one volume per contrast phase per case (multimodal: keys [phases])
    phase: str = "venous"  # the contrast phase of every case, or "mixed" (a seeded phase per case)
    varied_reports: bool = False  # each case's text in its own seeded wording (text-to-CT corpus)
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # world RAS centre of the grid


class VolumeDataModule(pl.LightningDataModule):
    """Training patches and whole validation volumes for any task, by the keys it needs.

    Args:
        keys: one of KEY_SETS, e.g. ["image"] (pretraining) or ["fixed", "moving"]. Defaults to ["image"].
        data_dir: a dataset folder (dataset.json, nnU-Net imagesTr/labelsTr, or a plain folder of
            volumes for ["image"]); exactly one of data_dir / datalist. Defaults to None.
        datalist: an MSD-style JSON whose paths are relative to its own folder. Defaults to None.
        preprocessing: spacing (mm, R A S), HU window mapped to [0, 1], modality (None: from the
            phantom variant or dataset.json's "modality", else CT). Defaults to 1.5 mm, [-1000, 1000].
        sampling: patch_size, batch_size (volumes per step), num_samples (crops per volume), pos/neg
            (`medct.settings.Sampling`). Defaults to 96^3, 2, 2.
        split: val_fraction, fold/num_folds, seed, num_train when the datalist has no validation
            list (`medct.settings.Split`). Defaults to 20 % held out, seed 0, all training volumes.
        augment: intensity/affine augmentation in training. Defaults to True.
        num_workers: DataLoader workers. Defaults to 4.
        multiprocessing_context: how workers start: "fork", "spawn" (macOS, Windows) or
            "forkserver"; None = the platform's default. Every pipeline pickles, so all three work.
            Defaults to None.
        cache_dir: disk cache of the deterministic preprocessing (None = no cache). Defaults to None.
        phantom: write this synthetic cohort into data_dir when it holds no dataset.json. Defaults to None.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image",),
        data_dir: str | None = None,
        datalist: str | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        sampling: Sampling = Sampling(),
        split: Split = Split(),
        augment: bool = True,
        num_workers: int = 4,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        super().__init__()
        self.keys = tuple(str(k) for k in keys)
        if self.keys not in KEY_SETS:
            known = ", ".join(str(list(k)) for k in KEY_SETS)
            raise ConfigError(f"data.keys {list(self.keys)} is not a known key set; use one of {known}.")
        if (data_dir is None) == (datalist is None):
            raise InputPathError("Give exactly one of data.data_dir (a dataset folder) or data.datalist (a JSON file).")
        if phantom is not None and data_dir is None:
            raise InputPathError("A phantom cohort needs data.data_dir, the folder to write it into.")
        if phantom is not None and phantom.variant not in ("ct", "cbct", "cbct_tst", "mr"):
            raise ConfigError(f"data.phantom.variant must be ct, cbct, cbct_tst or mr, got '{phantom.variant}'.")
        check_workers(num_workers, multiprocessing_context)
        self.data_dir = data_dir
        self.datalist = datalist
        self.phantom = phantom
        self.pre = preprocessing.resolved(self._default_modality())
        self.modality = str(self.pre.modality)
        self.sampling, self.split_settings = sampling, split
        self.spacing = list(self.pre.spacing)
        self.hu_min, self.hu_max = self.pre.hu_min, self.pre.hu_max
        self.patch_size = list(sampling.patch_size)
        self.batch_size = int(sampling.batch_size)
        self.num_samples = int(sampling.num_samples)
        self.augment = augment
        self.num_workers = int(num_workers)
        self.multiprocessing_context = multiprocessing_context
        self.cache_dir = cache_dir
        self.val_fraction, self.fold, self.num_folds, self.seed = (
            split.val_fraction,
            split.fold,
            split.num_folds,
            split.seed,
        )
        self.num_train = None if split.num_train is None else int(split.num_train)
        self.train_items: Datalist = []
        self.val_items: Datalist = []
        self.kept_slices = False  # set by _split from the datalist

    @property
    def resolved_preprocessing(self) -> dict[str, Any]:
        """The preprocessing with its modality resolved, as the task receives it (MedCTCLI links it)."""
        return self.pre.to_dict()

    def _json_path(self) -> Path:
        return Path(self.datalist) if self.datalist is not None else Path(str(self.data_dir)) / DATASET_JSON

    def _default_modality(self) -> str:
        if self.phantom is not None:
            from medct.phantom import MODALITY_OF_VARIANT

            return MODALITY_OF_VARIANT[self.phantom.variant]
        path = self._json_path()
        if path.is_file():
            try:
                found = json.loads(path.read_text()).get("modality")
            except (OSError, ValueError):
                found = None
            if isinstance(found, dict) and found:
                return str(found.get("0", next(iter(found.values())))).upper()
        return "CT"

    # -- Lightning hooks

    def prepare_data(self) -> None:
        """Local rank 0 only: write the phantom cohort if asked, and fill the disk cache."""
        if self.phantom is not None and not self._json_path().is_file():
            from medct.phantom import write_cohort

            p = self.phantom
            write_cohort(
                self.data_dir,
                n=p.n,
                variant=p.variant,
                seed=p.seed,
                shape=tuple(p.shape),
                spacing=tuple(p.spacing),
                phases=tuple(p.phases) if p.phases else None,  # type: ignore[arg-type]
                phase=p.phase,  # type: ignore[arg-type]
                varied_reports=p.varied_reports,
                center_mm=tuple(p.center_mm),  # type: ignore[arg-type]
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
        from monai.data import list_data_collate

        # list_data_collate flattens the num_samples crops of each volume into the batch
        return self.loader(self._dataset(self.train_items, "train"), self.batch_size, True, list_data_collate)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self._dataset(self.val_items, "val"), batch_size=1, shuffle=False)

    def loader(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        collate_fn: Any = None,
        batch_sampler: Any = None,
    ) -> DataLoader:
        """A MONAI DataLoader with this module's workers (`num_workers`, `multiprocessing_context`);
        `collate_fn` None: MONAI's list_data_collate; `batch_sampler` replaces batch_size/shuffle."""
        from monai.data import DataLoader as MonaiDataLoader
        from monai.data import list_data_collate

        workers = worker_options(self.num_workers, self.multiprocessing_context)
        collate = collate_fn if collate_fn is not None else list_data_collate
        if batch_sampler is not None:
            return MonaiDataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, **workers)
        return MonaiDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, **workers)

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
            train, val = find_datalist(str(self.data_dir), self.keys)
        for key in self.keys:
            lacking = [x for x in train + (val or []) if key not in x]
            if lacking:
                first = next((str(v) for v in lacking[0].values()), "an entry")
                raise InputPathError(
                    f"{len(lacking)} cases have no '{key}' (this task needs {list(self.keys)}), e.g. {first}."
                )
        # a reduced datalist (`medct reduce`): training crops are centred on the kept slices
        self.kept_slices = self.keys == ("image",) and any("slices" in x for x in train)
        if not val:
            train, val = split_datalist(train, self.val_fraction, self.seed, self.fold, self.num_folds)
        if self.num_train is not None:
            train = self.subset(train, self.num_train)
        return train, val

    def subset(self, train: Datalist, n: int) -> Datalist:
        """`n` training volumes: the first n of a seeded shuffle (the same for every task on one split)."""
        if n > len(train):
            raise ConfigError(f"data.split.num_train is {n} but the training split has only {len(train)} volumes.")
        order = list(train)
        random.Random(self.seed + 1).shuffle(order)
        return order[:n]

    def cache_fingerprint(self) -> str:
        """Short hash of everything the cached tensors depend on (a new folder when any changes)."""
        key = {"v": CACHE_VERSION, "keys": list(self.keys), "pre": self.pre.to_dict(), "patch": self.patch_size}
        if self.kept_slices:
            key["kept_slices"] = True
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def transforms(self, split: str) -> Any:
        """The MONAI Compose for `split` ("train" or "val"); everything up to the first random
        transform is deterministic (what the disk cache stores)."""
        return generic_transforms(
            self.pre,
            self.keys,
            self.patch_size,
            train=split == "train",
            num_samples=self.num_samples,
            augment=self.augment,
            kept_slices=self.kept_slices,
        )

    def _dataset(self, items: Datalist, split: str) -> Any:
        from monai.data import Dataset, PersistentDataset

        xform = self.transforms(split)
        if self.cache_dir is None:
            return Dataset(items, xform)
        folder = Path(self.cache_dir) / self.cache_fingerprint() / split
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, xform, cache_dir=folder)

    def describe(self) -> dict[str, Any]:
        """Plain summary (for logs and tests)."""
        return {
            "keys": list(self.keys),
            "train": len(self.train_items),
            "val": len(self.val_items),
            "preprocessing": self.pre.to_dict(),
            "patch_size": self.patch_size,
            "steps_per_epoch": math.ceil(len(self.train_items) / self.batch_size),
            "phantom": asdict(self.phantom) if self.phantom else None,
        }


class SegmentationDataModule(VolumeDataModule):
    """`VolumeDataModule` with keys ("image", "label"), class names, and foreground-balanced crops.

    `labels` names the classes by index (0 = background); by default they come from dataset.json
    (or the phantom's label table). One training step sees batch_size * num_samples patches,
    pos:neg of them centred on a labelled voxel (nnU-Net's foreground oversampling);
    validation yields one whole preprocessed volume per batch, (1, 1, X, Y, Z).

    Args (besides VolumeDataModule's):
        labels: class names by index, background first. Defaults to None (from the dataset).
        flip_axes: RAS axes to mirror in augmentation; none by default (laterality). Defaults to ().
        (sampling.pos / sampling.neg: the ratio of label-centred to body-centred crops.)
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datalist: str | None = None,
        labels: list[str] | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        sampling: Sampling = Sampling(),
        split: Split = Split(),
        augment: bool = True,
        flip_axes: tuple[int, ...] = (),
        num_workers: int = 4,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        super().__init__(
            ("image", "label"),
            data_dir,
            datalist,
            preprocessing,
            sampling,
            split,
            augment,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        if any(a not in (0, 1, 2) for a in flip_axes):
            raise ConfigError(f"data.flip_axes holds RAS axes 0, 1 or 2, got {list(flip_axes)}.")
        self.pos, self.neg = sampling.pos, sampling.neg
        self.flip_axes = tuple(flip_axes)
        self.labels: list[str] = list(labels) if labels is not None else self._default_labels()
        if len(self.labels) < 2:
            raise InputPathError(f"Segmentation needs background plus at least one class; labels are {self.labels}.")

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background + classes."""
        return len(self.labels)

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

    def transforms(self, split: str) -> Any:
        if split == "train":
            return train_transforms(
                self.pre, self.patch_size, self.num_samples, self.pos, self.neg, self.augment, self.flip_axes
            )
        return val_transforms(self.pre)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels}


class ClassificationDataModule(VolumeDataModule):
    """Whole volumes with a volume-level class: keys ("image",) plus the entry field `class_key`.

    Each datalist entry names its class in `class_key` (e.g. the phantom cohort's "lesion":
    present/absent, "phase", "variant"; any string or number). `classes` orders the class names
    (index = position); by default the sorted distinct values of the datalist. Items are whole
    body-cropped volumes padded / centre-cropped to `patch_size` (`classification_transforms`)
    with "class" = the class index. `num_train` picks that many training volumes, balanced over the
    classes (round-robin over a seeded shuffle of each class).

    Args (besides VolumeDataModule's): class_key, classes. Of `sampling` only patch_size and
    batch_size apply (one whole volume per item).
    """

    def __init__(
        self,
        class_key: str = "class",
        classes: list[str] | None = None,
        data_dir: str | None = None,
        datalist: str | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        sampling: Sampling = Sampling(),
        split: Split = Split(),
        augment: bool = True,
        num_workers: int = 4,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        whole = replace(sampling, num_samples=1)
        super().__init__(
            ("image",),
            data_dir,
            datalist,
            preprocessing,
            whole,
            split,
            augment,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        self.class_key = str(class_key)
        self._classes = [str(c) for c in classes] if classes is not None else None

    @property
    def labels(self) -> list[str]:
        """Class names by index (linked into the task's `labels`)."""
        if self._classes is None:
            train, val = self._split_all()
            self._classes = sorted({str(x[self.class_key]) for x in train + val})
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _split_all(self) -> tuple[Datalist, Datalist]:
        n, self.num_train = self.num_train, None
        try:
            return self._split()
        finally:
            self.num_train = n

    def _split(self) -> tuple[Datalist, Datalist]:
        if self.phantom is not None and not self._json_path().is_file():
            self.prepare_data()  # the class names are read from the cohort's entries
        train, val = super()._split()
        lacking = [x for x in train + val if self.class_key not in x]
        if lacking:
            raise InputPathError(
                f"{len(lacking)} entries have no '{self.class_key}' field (data.class_key), e.g. {lacking[0].get('image')}."
            )
        names = self._classes
        if names is not None:
            unknown = sorted({str(x[self.class_key]) for x in train + val} - set(names))
            if unknown:
                raise ConfigError(f"data.classes {names} does not name the classes {unknown} found in the datalist.")
        index = {c: i for i, c in enumerate(names or sorted({str(x[self.class_key]) for x in train + val}))}
        return (
            [{**x, "class": index[str(x[self.class_key])]} for x in train],
            [{**x, "class": index[str(x[self.class_key])]} for x in val],
        )

    def subset(self, train: Datalist, n: int) -> Datalist:
        if n > len(train):
            raise ConfigError(f"data.split.num_train is {n} but the training split has only {len(train)} volumes.")
        by_class: dict[str, list[dict[str, Any]]] = {}
        for x in train:
            by_class.setdefault(str(x[self.class_key]), []).append(x)
        rng = random.Random(self.seed + 1)
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_class.items())]
        picked: list[dict[str, Any]] = []
        while len(picked) < n:
            for q in queues:
                if q and len(picked) < n:
                    picked.append(q.pop(0))
        return picked

    def transforms(self, split: str) -> Any:
        return classification_transforms(self.pre, self.patch_size, train=split == "train", augment=self.augment)

    def val_dataloader(self) -> DataLoader:  # fixed-size items: validation batches like training
        return self.loader(self._dataset(self.val_items, "val"), batch_size=self.batch_size, shuffle=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classes": self.labels, "class_key": self.class_key}


START_METHODS = ("fork", "spawn", "forkserver")


def check_workers(num_workers: int, multiprocessing_context: str | None) -> None:
    """Refuse, in one sentence, a negative worker count or an unknown start method."""
    if int(num_workers) < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}.")
    if multiprocessing_context is not None and multiprocessing_context not in START_METHODS:
        raise ConfigError(
            f"data.multiprocessing_context must be one of {', '.join(START_METHODS)} or null, "
            f"got '{multiprocessing_context}'."
        )


def worker_options(num_workers: int, multiprocessing_context: str | None) -> dict[str, Any]:
    """DataLoader options of the workers: persistent across epochs, started by
    `multiprocessing_context` (torch refuses a context without workers, so none then)."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {
        "num_workers": num_workers,
        "persistent_workers": True,
        "multiprocessing_context": multiprocessing_context,
    }


def _phantom_label_names(labels: Any) -> list[str]:
    """medct.phantom.LABELS ({index: name} or a list by index) -> names by index, background first."""
    if isinstance(labels, dict):
        by_index = {int(k): str(v) for k, v in labels.items()}
        by_index.setdefault(0, "background")
        return [by_index.get(i, f"label_{i}") for i in range(max(by_index) + 1)]
    names = [str(n) for n in labels]
    return names if names and names[0] == "background" else ["background", *names]
