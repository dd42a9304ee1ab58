"""Synthetic CT (medct.synthesis.sct): intensity scales, masks, slice inference, geometry on a real
oblique scan, pair alignment, the IMPACT loss, and train -> export -> `medct sct` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medct.checkpoint import ModelCard
from medct.errors import ConfigError
from medct.io import read_volume, write_volume
from medct.settings import Sampling, Split
from medct.synthesis import sct
from medct.transforms import Preprocessing
from medct.volume import Volume


class CentreSlice(nn.Module):
    """A 'network' that returns input channel `c` (the centre slice when c = k): sCT = input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2k+1, X, Y) -> (B, 1, X, Y)
        return x[:, self.c : self.c + 1]


def _card(spacing: tuple[float, float, float], modality: str, k: int, tta: bool) -> ModelCard:
    return ModelCard(
        "unetpp_2d", {}, {}, Preprocessing(spacing=spacing, hu_min=-1024, hu_max=3071, modality=modality),
        (32, 32, 2 * k + 1), task="sct", inference={"context": k, "tta": tta, "batch_size": 7},
    )  # fmt: skip


def test_intensity_scales() -> None:
    hu = np.array([-2000.0, -1024.0, 0.0, 3071.0, 5000.0])
    unit = sct.ct_to_unit(hu)
    np.testing.assert_allclose(unit, [-1.0, -1.0, 2 * 1024 / 4095 - 1, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(sct.unit_to_ct(unit[1:4]), hu[1:4], atol=1e-3)
    rng = np.random.default_rng(0)
    cbct = rng.uniform(-1000, 1500, (20, 20, 8)).astype(np.float32)
    x = sct.normalise_source(cbct, "CBCT")
    assert x.min() == pytest.approx(-1.0) and x.max() == pytest.approx(1.0)
    assert np.mean(x >= 1.0 - 1e-6) == pytest.approx(0.005, abs=0.002)  # the top 0.5 % saturate
    mr = np.zeros((30, 30, 6), np.float32)
    mr[5:25, 5:25] = rng.normal(400, 50, (20, 20, 6))
    z = sct.normalise_source(mr, "MR")
    body = sct.source_support(mr, "MR")
    assert body[5:25, 5:25].all() and not body[:5].any()
    assert z[body].mean() == pytest.approx(0.0, abs=1e-4) and z[body].std() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ConfigError, match="CBCT or MR"):
        sct.normalise_source(mr, "PET")


def test_pair_mask_is_the_ct_body_inside_the_cbct_field_of_view() -> None:
    ct = np.full((40, 40, 4), -1000.0, np.float32)
    square = np.zeros((40, 40), bool)
    square[4:36, 4:36] = True
    ct[square] = 40.0  # the body
    ct[15:20, 15:20] = -900.0  # gas inside the body still counts
    yy, xx = np.mgrid[:40, :40]
    fov = (xx - 20) ** 2 + (yy - 20) ** 2 < 18**2  # wider than the body along the axes, not at the corners
    cbct = np.full(ct.shape, -1000.0, np.float32)  # -1000 outside the field of view
    cbct[fov] = -950.0  # air inside it
    cbct[fov & square] = 300.0
    cbct[15:20, 15:20] = -990.0
    mask = sct.pair_mask(cbct, ct, "CBCT")
    np.testing.assert_array_equal(mask, np.broadcast_to((fov & square)[..., None], ct.shape))


@pytest.mark.parametrize("k", [1, 2])
def test_predict_slices_uses_the_neighbours_in_order(k: int) -> None:
    vol = torch.arange(20 * 18 * 6, dtype=torch.float32).reshape(20, 18, 6) / 3000.0 - 0.5
    same = sct.predict_slices(CentreSlice(k), vol, k, batch_size=4, tta=True)
    torch.testing.assert_close(same, vol)  # flips undone before averaging: still the input
    below = sct.predict_slices(CentreSlice(k - 1), vol, k, batch_size=4)  # channel k-1 is slice z-1
    torch.testing.assert_close(below[:, :, 1:], vol[:, :, :-1])
    torch.testing.assert_close(below[:, :, 0], vol[:, :, 0])  # the edge slice repeats beyond the end


def test_sct_output_keeps_the_input_geometry_on_a_real_oblique_scan(shared_data: Path) -> None:
    """An identity network on a real CT given an LPS, oblique, anisotropic geometry: the sCT has
    the input's exact affine and shape, and reproduces the input (resampled there and back)."""
    from scipy.spatial.transform import Rotation

    ct = read_volume(shared_data / "pancreas_ct_cbct" / "crop_cbct_fov" / "planct_crop.nii.gz")
    arr = np.asarray(ct.array)[40:200:2, 40:200:2, 10:40]  # (80, 80, 30)
    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", [15, -10, 25], degrees=True).as_matrix() @ np.diag([-1.0, -1.0, 1.0])
    aff[:3, :3] = rot @ np.diag([2.1, 2.1, 3.0])
    aff[:3, 3] = [40.0, -120.0, 300.0]
    vol = Volume(arr, aff, {"path": "oblique"})
    pred = sct.SCTPredictor(CentreSlice(1), _card((2.1, 2.1, 3.0), "CT", 1, tta=False))
    out = pred.predict(vol)
    assert np.array_equal(out.affine, vol.affine) and out.shape == vol.shape and out.array.dtype == np.int16
    inner = (slice(8, -8), slice(8, -8), slice(3, -3))
    err = np.abs(out.array[inner].astype(float) - np.clip(arr[inner], -1024, 3071))
    assert np.median(err) < 25.0 and err.mean() < 80.0  # a flip or axis swap would be hundreds of HU


def test_align_pair_brings_the_moved_ct_back(tmp_path: Path) -> None:
    """The CT of a phantom pair, moved by 8 / -4 / 4 mm: Elastix (rigid) puts it back onto the CBCT."""
    from medct.phantom.pairs import write_pair_cohort

    ds = write_pair_cohort(tmp_path / "pairs", n=1, shape=(48, 48, 32), spacing=(4.0, 4.0, 4.0), misalign_mm=0.0)
    item = json.loads(ds.read_text())["training"][0]
    base = ds.parent
    truth = read_volume(base / item["truth"])
    shifted = truth.affine.copy()
    shifted[:3, 3] += [8.0, -4.0, 4.0]
    moved = write_volume(Volume(truth.array, shifted, {}), tmp_path / "moved.nii.gz")
    out = sct.align_pair(str(base / item["image"]), str(moved), tmp_path / "a.nii.gz", "elastix", "rigid")
    t = truth.array.astype(float)
    mask = sct.ct_body(t)
    before = np.abs(truth.array - np.roll(t, (2, -1, 1), axis=(0, 1, 2)))[mask].mean()  # the move, as voxels
    after = np.abs(read_volume(out).array - t)[mask].mean()
    assert np.array_equal(read_volume(out).affine, read_volume(base / item["image"]).affine)
    assert after < 0.3 * before, (before, after)
    with pytest.raises(ConfigError, match="align_encoder"):
        sct.align_pair(str(base / item["image"]), str(moved), tmp_path / "b.nii.gz", "impact")


def test_task_losses_and_checks(tmp_path: Path) -> None:
    from medct.nets import create_tiny_net
    from tests.conftest import make_model_folder

    net = create_tiny_net("unetpp_2d", in_channels=3)
    with pytest.raises(ConfigError, match="input slices"):
        sct.SCTTask(net, patch_size=(32, 32, 5))
    with pytest.raises(ConfigError, match="impact_model"):
        sct.SCTTask(net, patch_size=(32, 32, 3), impact_weight=0.5)
    enc = make_model_folder(tmp_path / "enc", channels=(4, 8, 16))
    task = sct.SCTTask(net, patch_size=(32, 32, 3), impact_weight=0.5, impact_model=str(enc), impact_depth=8)
    assert not any(k.startswith("_features") for k in task.state_dict())  # frozen encoder not saved
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    mask = torch.ones_like(target)
    total, l1, impact = task._loss(target.clone(), target, mask)
    assert float(l1) == 0.0 and float(impact) == pytest.approx(0.0, abs=1e-7)
    pred = (target + 0.2 * torch.randn_like(target)).requires_grad_(True)
    total, l1, impact = task._loss(pred, target, mask)
    assert float(impact) > 0 and float(total) == pytest.approx(float(l1) + 0.5 * float(impact), rel=1e-5)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    card = task.model_card()
    assert card.task == "sct" and card.inference["context"] == 1 and card.preprocessing.hu_min == -1024


def test_train_export_and_medct_sct_on_a_folder(tmp_path: Path) -> None:
    """Train a few steps on phantom pairs, export, then `medct sct` on a folder with a good CBCT, a
    corrupt file and a 2D image: the good one is written on its own grid, the bad ones listed."""
    import lightning.pytorch as pl

    import medct
    from medct.checkpoint import save_model_folder
    from medct.cli import main
    from medct.data import PhantomCohort
    from medct.nets import create_tiny_net

    dm = sct.SCTDataModule(
        data_dir=str(tmp_path / "pairs"),
        phantom=PhantomCohort(n=3, variant="cbct", shape=(48, 48, 24), spacing=(4.0, 4.0, 4.0)),
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0), hu_min=sct.CT_MIN, hu_max=sct.CT_MAX),
        sampling=Sampling(patch_size=(32, 32, 3), batch_size=1, num_samples=2),
        split=Split(val_fraction=0.34),
        num_workers=0,
    )
    assert dm.modality == "CBCT"
    task = sct.SCTTask(
        create_tiny_net("unetpp_2d", in_channels=3),
        patch_size=(32, 32, 3),
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0), modality="CBCT"),
    )
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(task, dm)
    assert "val/mae_hu" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["val/mae_hu"])
    model = save_model_folder(task.net, task.model_card(), tmp_path / "model")

    src = tmp_path / "pairs" / "imagesTr" / "case_0000_0000.nii.gz"
    inp = tmp_path / "in"
    inp.mkdir()
    cbct = read_volume(src)
    lps = Volume(cbct.array[::-1, ::-1].copy(), cbct.affine @ np.diag([-1.0, -1.0, 1.0, 1.0]), {})
    lps.affine[:3, 3] = cbct.affine[:3, :3] @ (np.array(cbct.shape) - 1) * [1, 1, 0] + cbct.affine[:3, 3]
    write_volume(lps, inp / "good.nii.gz")
    (inp / "broken.nii.gz").write_bytes(b"not a nifti")
    write_volume(Volume(np.zeros((16, 16, 1), np.int16) - 1000, np.eye(4), {}), inp / "flat.nii.gz")
    rc = main(["sct", "-m", str(model), "-i", str(inp), "-o", str(tmp_path / "out"), "--no-tta"])
    assert rc == 1
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert rows["good"]["status"] == "done"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert rows["flat"]["status"] == "failed"
    out = read_volume(tmp_path / "out" / "good.nii.gz")
    assert np.allclose(out.affine, lps.affine, atol=1e-5) and out.shape == lps.shape
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    again = medct.synthesize_ct(medct.load_model(model), lps, tta=False)
    np.testing.assert_array_equal(again.array, out.array)
