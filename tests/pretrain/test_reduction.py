"""Data-set reduction: dHash, the greedy rule, reduced datalists and crops centred on kept slices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medct.io import Volume, write_volume
from medct.pretrain.reduction import axial_axis, dhash, greedy_keep, hamming, reduce_datalist
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing


def test_dhash_bits():
    ramp = np.tile(np.arange(90, 0, -1, dtype=np.float64), (80, 1))  # brighter on the left everywhere
    assert dhash(ramp) == 2**64 - 1
    assert dhash(ramp[:, ::-1]) == 0
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64))
    assert dhash(a) == dhash(a * 3 + 5)  # invariant to brightness and contrast
    assert hamming(dhash(a), dhash(rng.normal(size=(64, 64)))) > 16  # unrelated slices are far apart


def test_greedy_keeps_one_of_each_group_of_near_duplicates():
    codes = [0b0000, 0b0001, 0b1111_0000, 0b0011, 0b1111_0001]
    kept = greedy_keep(len(codes), lambda i, j: hamming(codes[i], codes[j]) <= 2)
    assert kept == [0, 2]


def _volume(path, slices: list[np.ndarray], spacing=4.0):
    arr = np.stack(slices, axis=2).astype(np.float32)  # (X, Y, Z): axial slices along the last axis
    affine = np.diag([spacing, spacing, spacing, 1.0])
    write_volume(Volume(arr, affine), path)
    return str(path)


def test_reduction_over_a_data_set(tmp_path):
    rng = np.random.default_rng(0)
    distinct = [rng.normal(0, 300, size=(32, 32)) for _ in range(3)]
    repeated = [distinct[i // 5] for i in range(15)]  # 3 distinct slices, 5 copies each
    a = _volume(tmp_path / "a.nii.gz", repeated)
    b = _volume(tmp_path / "b.nii.gz", repeated[::-1])  # the same anatomy again, another volume
    red = reduce_datalist([{"image": a}, {"image": b}])
    assert red.total_slices == 30 and red.kept_slices == 3
    assert red.items == [{"image": a, "slices": [0, 5, 10]}]  # b adds nothing: left out
    assert red.kept_fraction == pytest.approx(0.1)
    emb = reduce_datalist([{"image": a}], method="embedding", threshold=0.99)
    assert emb.kept_slices == 3


def test_axial_axis_of_a_sagittally_stored_volume():
    affine = np.array([[0, 0, 2.0, 0], [0, 1.0, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])  # voxel axis 0 runs I-S
    assert axial_axis(affine) == 0


def test_training_crops_are_centred_on_kept_slices(tmp_path):
    from medct.data import VolumeDataModule

    # HU encodes the slice index (all inside the body and the window): a crop shows where it came from
    slices = [np.full((24, 24), -600.0 + 20.0 * z) for z in range(40)]
    path = _volume(tmp_path / "v.nii.gz", slices)
    other = _volume(tmp_path / "w.nii.gz", slices)
    (tmp_path / "red.json").write_text(
        json.dumps({"training": [{"image": path, "slices": [30]}, {"image": other, "slices": [30]}]})
    )
    dm = VolumeDataModule(
        keys=["image"],
        datalist=str(tmp_path / "red.json"),
        augment=False,
        num_workers=0,
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)),
        sampling=Sampling(patch_size=(16, 16, 8), num_samples=20),
        split=Split(val_fraction=0.5),
    )
    dm.setup()
    assert dm.kept_slices
    crops = dm._dataset(dm.train_items, "train")[0]
    kept_value = (-600.0 + 20.0 * 30 + 1000.0) / 2000.0  # slice 30 after the [0, 1] window
    for crop in crops:
        column = crop["image"][0, 0, 0, :]  # (Z,) values along S
        assert "kept" not in crop
        assert np.isclose(column.numpy(), kept_value, atol=1e-4).any()


def test_medct_reduce_command(tmp_path, capsys):
    from medct.cli import main

    rng = np.random.default_rng(1)
    folder = tmp_path / "scans"
    folder.mkdir()
    _volume(folder / "a.nii.gz", [rng.normal(0, 300, size=(32, 32))] * 6)
    assert main(["reduce", str(folder), "-o", str(tmp_path / "red.json")]) == 0
    doc = json.loads((tmp_path / "red.json").read_text())
    assert doc["reduction"]["kept_slices"] == 1 and doc["training"][0]["slices"] == [0]
    assert "83.3 % of the pretraining time saved" in capsys.readouterr().out
    assert main(["reduce", str(tmp_path / "missing"), "-o", str(tmp_path / "x.json")]) != 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # the good volume is still reduced
    assert main(["reduce", str(folder), "-o", str(tmp_path / "red2.json")]) == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "Traceback" not in err
    assert len(json.loads((tmp_path / "red2.json").read_text())["training"]) == 1
