"""medct.data: datalists (MSD JSON, nnU-Net pairing), splits, the data module, its disk cache."""

from __future__ import annotations

import json

import pytest
import torch

from medct.data import (
    PhantomCohort,
    SegmentationDataModule,
    find_datalist,
    pair_nnunet_folder,
    read_label_names,
    read_msd_datalist,
    split_datalist,
)
from medct.errors import InputPathError
from medct.phantom import LABELS, write_cohort
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, n=4, seed=1, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0))
    return root


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_nnunet_pairing_and_unpaired_error(tmp_path):
    for name in ("b", "a"):
        _touch(tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
        _touch(tmp_path / "labelsTr" / f"{name}.nii.gz")
    items = pair_nnunet_folder(tmp_path)
    assert [i["image"].rsplit("/", 1)[1] for i in items] == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert items[0]["label"].endswith("labelsTr/a.nii.gz")

    _touch(tmp_path / "imagesTr" / "c_0000.nii.gz")
    _touch(tmp_path / "labelsTr" / "d.nii.gz")
    with pytest.raises(InputPathError, match=r"unpaired cases \(no label for c; no image for d\)"):
        pair_nnunet_folder(tmp_path)


def test_nnunet_second_channel_and_empty_folder(tmp_path):
    with pytest.raises(InputPathError, match="neither"):
        find_datalist(tmp_path)
    _touch(tmp_path / "imagesTr" / "a_0001.nii.gz")
    _touch(tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(InputPathError, match="second input channel"):
        pair_nnunet_folder(tmp_path)


def test_msd_datalist_relative_paths_and_validation(tmp_path):
    img, lab = _touch(tmp_path / "imagesTr" / "x.nii.gz"), _touch(tmp_path / "labelsTr" / "x.nii.gz")
    ds = {
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
        "validation": [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    train, val = find_datalist(tmp_path)
    assert train == [{"image": str(img.resolve()), "label": str(lab.resolve())}] and val == train
    ds["training"].append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/x.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(InputPathError, match="missing.nii.gz, which does not exist"):
        read_msd_datalist(tmp_path / "dataset.json")


def test_label_names_msd_and_nnunet_v2(tmp_path):
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "3": "spleen"}}))
    assert read_label_names(p) == ["background", "liver", "label_2", "spleen"]
    p.write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumour": 2}}))
    assert read_label_names(p) == ["background", "kidney", "tumour"]


def test_split_is_seeded_disjoint_and_complete():
    items = [{"image": f"{i}"} for i in range(10)]
    tr, va = split_datalist(items, val_fraction=0.3, seed=3)
    assert len(va) == 3 and len(tr) == 7
    assert sorted(x["image"] for x in tr + va) == sorted(x["image"] for x in items)
    assert split_datalist(items, 0.3, seed=3) == (tr, va)
    assert split_datalist(items, 0.3, seed=4) != (tr, va)
    folds = [split_datalist(items, seed=0, fold=k, num_folds=5)[1] for k in range(5)]
    assert sorted(x["image"] for f in folds for x in f) == sorted(x["image"] for x in items)
    with pytest.raises(InputPathError):
        split_datalist(items[:1])


def test_datamodule_batches_and_labels(cohort, tmp_path):
    dm = SegmentationDataModule(
        data_dir=str(cohort),
        num_workers=0,
        augment=False,
        preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=2, num_samples=2),
        split=Split(val_fraction=0.25),
    )
    assert dm.labels == [LABELS[i] for i in range(len(LABELS))] and dm.num_classes == len(LABELS)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_items) == 3 and len(dm.val_items) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16, 16)  # batch_size * num_samples patches
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() <= batch["image"].max() <= 1
    assert batch["label"].max() < dm.num_classes
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and val["image"].shape == val["label"].shape
    assert min(val["image"].shape[2:]) > 16  # a whole (body-cropped) volume, not a patch


def test_disk_cache_filled_in_prepare_data_and_reused(cohort, tmp_path):
    def make():
        return SegmentationDataModule(
            data_dir=str(cohort),
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
            sampling=Sampling(patch_size=(16, 16, 16)),
        )

    dm = make()
    dm.prepare_data()
    folder = tmp_path / "cache" / dm.cache_fingerprint()
    files = sorted(folder.rglob("*.pt"))
    assert len(list((folder / "train").glob("*.pt"))) == 3 and len(list((folder / "val").glob("*.pt"))) == 1
    stamps = [f.stat().st_mtime_ns for f in files]
    dm2 = make()
    dm2.setup("fit")
    next(iter(dm2.train_dataloader()))
    next(iter(dm2.val_dataloader()))
    assert sorted(folder.rglob("*.pt")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    # another preprocessing gets its own cache folder
    other = SegmentationDataModule(
        data_dir=str(cohort),
        preprocessing=Preprocessing(spacing=(5.0, 5.0, 5.0)),
        sampling=Sampling(patch_size=(16, 16, 16)),
    )
    assert other.cache_fingerprint() != dm.cache_fingerprint()


def test_phantom_cohort_written_on_first_use(tmp_path):
    dm = SegmentationDataModule(
        data_dir=str(tmp_path / "ph"),
        phantom=PhantomCohort(n=3, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0)),
        num_workers=0,
        preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
        sampling=Sampling(patch_size=(16, 16, 16)),
    )
    assert dm.labels[0] == "background" and len(dm.labels) == len(LABELS)  # before the cohort exists
    dm.prepare_data()
    assert (tmp_path / "ph" / "dataset.json").is_file()
    dm.setup("fit")
    assert len(dm.train_items) + len(dm.val_items) == 3


def test_datamodule_argument_errors(tmp_path):
    with pytest.raises(InputPathError, match="exactly one of"):
        SegmentationDataModule()
    with pytest.raises(InputPathError, match="names no labels"):
        SegmentationDataModule(data_dir=str(tmp_path))
    dm = SegmentationDataModule(data_dir=str(tmp_path / "nope"), labels=["background", "x"])
    with pytest.raises(InputPathError, match="does not exist"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- generic key sets


def _vol(tmp_path, name, shape=(24, 20, 16), spacing=(6.0, 6.0, 6.0), value=None, seed=0, lps=False):
    import numpy as np

    from medct.io import write_volume
    from medct.volume import Volume

    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, np.int16)
    arr[3:-3, 3:-3, 2:-2] = rng.normal(40, 100, [s - d for s, d in zip(shape, (6, 6, 4), strict=True)])
    if value is not None:
        arr[:] = value
    aff = np.diag([*spacing, 1.0])
    if lps:
        aff[:2] *= -1
    return str(write_volume(Volume(arr, aff), tmp_path / name))


def _json(tmp_path, training):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": training}))
    return str(path)


def _module(**kw):
    from medct.data import VolumeDataModule

    args = dict(
        preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=2, num_samples=1),
        num_workers=0,
    )
    return VolumeDataModule(**{**args, **kw})


def test_image_only_from_a_plain_folder_with_dicom(tmp_path, shared_data):
    import shutil

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        _vol(folder, f"s{i}.nii.gz", seed=i)
    shutil.copytree(shared_data / "popi_phase00_10slices_dicom", folder / "dicom_series")
    (folder / "notes.txt").write_text("not a scan")
    dm = _module(keys=["image"], data_dir=str(folder), split=Split(val_fraction=0.34))
    dm.setup("fit")
    assert len(dm.train_items) + len(dm.val_items) == 3  # two NIfTI files and one DICOM series folder
    assert all(set(x) == {"image"} for x in dm.train_items)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image"} and batch["image"].shape == (2, 1, 16, 16, 16)
    assert dm.modality == "CT"


def test_image_target_and_text_keys(tmp_path):
    items = [
        {"image": _vol(tmp_path, f"cbct{i}.nii.gz", seed=i), "target": _vol(tmp_path, f"ct{i}.nii.gz", seed=10 + i)}
        for i in range(3)
    ]
    dm = _module(keys=["image", "target"], datalist=_json(tmp_path, items))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["target"].shape == (2, 1, 16, 16, 16)
    (tmp_path / "r0.txt").write_text("Liver 1500 mL.\n")
    items = [{"image": x["image"], "text": "r0.txt" if i == 0 else f"report {i}"} for i, x in enumerate(items)]
    dm = _module(keys=["image", "text"], datalist=_json(tmp_path, items), augment=False)
    dm.setup("fit")
    texts = [x["text"] for x in dm.train_items + dm.val_items]
    assert "Liver 1500 mL." in texts  # a .txt path is read
    batch = next(iter(dm.train_dataloader()))
    assert (
        isinstance(batch["text"], list) and len(batch["text"]) == 2 and all(isinstance(t, str) for t in batch["text"])
    )
    with pytest.raises(InputPathError, match="have no 'target'"):
        _module(keys=["image", "target"], datalist=_json(tmp_path, [{"image": items[0]["image"]}] * 2)).setup("fit")


def test_fixed_moving_may_lie_on_different_grids(tmp_path):
    items = [
        {
            "fixed": _vol(tmp_path, f"f{i}.nii.gz", seed=i),
            "moving": _vol(tmp_path, f"m{i}.mha", shape=(30, 28, 10), spacing=(4.0, 4.0, 9.0), seed=i, lps=True),
        }
        for i in range(2)
    ]
    dm = _module(
        keys=["fixed", "moving"],
        datalist=_json(tmp_path, items),
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=1, num_samples=1),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == batch["moving"].shape == (1, 1, 16, 16, 16)
    val = next(iter(dm.val_dataloader()))  # whole volumes, each on its own RAS grid at 6 mm
    assert val["fixed"].shape[2:] != val["moving"].shape[2:]


def test_phases_from_files_and_from_one_4d_nifti(tmp_path):
    import nibabel as nib
    import numpy as np

    phases = [_vol(tmp_path, f"p{t}.nii.gz", seed=t) for t in range(3)]
    four_d = np.stack([nib.load(p).get_fdata() for p in phases], axis=-1).astype(np.int16)
    nib.save(nib.Nifti1Image(four_d, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "fourd.nii.gz")
    items = [{"phases": phases}, {"phases": str(tmp_path / "fourd.nii.gz")}]
    dm = _module(
        keys=["phases"],
        datalist=_json(tmp_path, items),
        augment=False,
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=1, num_samples=1),
    )
    dm.setup("fit")
    a = next(iter(dm.val_dataloader()))["phases"]
    assert a.shape[:2] == (1, 3)  # three phases as channels
    from medct.transforms import generic_transforms

    xf = generic_transforms(dm.pre, ["phases"], dm.patch_size, train=False)
    from_files, from_4d = xf(items[0])["phases"], xf(items[1])["phases"]
    assert torch.allclose(from_files, from_4d)
    other = _vol(tmp_path, "other.nii.gz", shape=(20, 20, 16))
    from medct.errors import GeometryMismatchError, InvalidVolumeError
    from medct.io import read_phases

    with pytest.raises(GeometryMismatchError, match="different shapes"):
        read_phases([phases[0], other])
    with pytest.raises(InvalidVolumeError, match="at least 2 phases"):
        read_phases([phases[0]])


def test_unknown_keys_and_bad_values_are_config_errors(tmp_path):
    from medct.errors import ConfigError

    with pytest.raises(ConfigError, match="not a known key set"):
        _module(keys=["image", "mask"], data_dir=str(tmp_path))
    # each typed group checks itself when made, in one sentence naming its key
    for make, match in [
        (lambda: Preprocessing(spacing=(0.0, 1.0, 1.0)), r"preprocessing\.spacing must be three positive"),
        (lambda: Sampling(patch_size=(16, 16)), r"sampling\.patch_size must be three positive"),
        (
            lambda: Preprocessing(hu_min=100.0, hu_max=100.0),
            r"preprocessing\.hu_min must be below hu_max, got 100.0 and 100.0",
        ),
        (lambda: Split(val_fraction=1.0), r"split\.val_fraction must lie strictly between"),
        (lambda: Split(fold=5, num_folds=5), r"split\.fold must lie in 0\.\.4"),
        (lambda: Sampling(batch_size=0), r"sampling\.batch_size must be at least 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make()
