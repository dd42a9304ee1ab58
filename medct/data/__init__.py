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

Datalists (MSD dataset.json, nnU-Net raw folders, plain folders, seeded splits) are read by
`medct.data.datalists`; the generic module is `medct.data.module`, its segmentation and
classification uses `medct.data.segmentation` and `medct.data.classification`; every name is
importable from `medct.data` (recipes name `medct.data.SegmentationDataModule`).

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

from medct.data.classification import ClassificationDataModule
from medct.data.datalists import (
    DATASET_JSON,
    KEY_SETS,
    PATH_KEYS,
    Datalist,
    find_datalist,
    list_volume_folder,
    pair_nnunet_folder,
    read_label_names,
    read_msd_datalist,
    split_datalist,
)
from medct.data.module import CACHE_VERSION, PhantomCohort, VolumeDataModule, check_workers, worker_options
from medct.data.segmentation import SegmentationDataModule

__all__ = [
    "CACHE_VERSION",
    "DATASET_JSON",
    "KEY_SETS",
    "PATH_KEYS",
    "ClassificationDataModule",
    "Datalist",
    "PhantomCohort",
    "SegmentationDataModule",
    "VolumeDataModule",
    "check_workers",
    "find_datalist",
    "list_volume_folder",
    "pair_nnunet_folder",
    "read_label_names",
    "read_msd_datalist",
    "split_datalist",
    "worker_options",
]
