"""`VolumeDataModule`: the one generic LightningDataModule that feeds `medct fit` (see medct.data),
the phantom cohort it can write, and the DataLoader worker options every data module shares."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from medct.data.datalists import DATASET_JSON, KEY_SETS, Datalist, find_datalist, read_msd_datalist, split_datalist
from medct.errors import ConfigError, InputPathError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing, generic_transforms

CACHE_VERSION = 2  # bump when the cached part of the pipelines changes meaning
START_METHODS = ("fork", "spawn", "forkserver")  # multiprocessing start methods a DataLoader takes


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
