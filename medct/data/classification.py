"""`ClassificationDataModule`: whole volumes with a volume-level class from any datalist field."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from torch.utils.data import DataLoader

from medct.data.datalists import Datalist
from medct.data.module import PhantomCohort, VolumeDataModule
from medct.errors import ConfigError, InputPathError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing, classification_transforms


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
