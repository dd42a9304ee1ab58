"""IMPACT feature registration: the distance, its optimisation, and the TorchScript export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medct.registration import impact
from medct.volume import Volume
from tests.conftest import make_model_folder


def _features(spacing=(2.0, 2.0, 2.0), seed: int = 0) -> impact.FeatureSource:
    from medct.nets import create_net

    torch.manual_seed(seed)
    net = create_net("unet", in_channels=1, out_channels=2, channels=[8, 16, 32], num_res_units=1)
    return impact.FeatureSource(impact.FeatureModel(net, -1000.0, 1000.0, layers=(0, 1)), spacing)


def _scene(shape=(32, 32, 24), shift_mm=(0.0, 0.0, 0.0), spacing=(2.0, 2.0, 2.0)) -> Volume:
    """Smooth blobs and texture in HU on a RAS grid; `shift_mm` moves the content by +shift."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    w = idx @ aff[:3, :3].T + aff[:3, 3] - np.asarray(shift_mm)
    out = np.full(shape, -800.0)
    for c, r, hu in (((-8, -6, -4), 8.0, 400.0), ((9, 8, 3), 7.0, 900.0), ((2, -10, 6), 6.0, 150.0)):
        out += (hu + 800.0) * np.exp(-((((w - np.asarray(c)) ** 2).sum(-1) / r**2) ** 2))
    out += 100.0 * np.sin(0.4 * w[..., 0]) * np.sin(0.33 * w[..., 1] + 0.4) * np.sin(0.45 * w[..., 2] + 1.0)
    return Volume(out.astype(np.float32), aff)


def test_distance_is_zero_for_identical_inputs_and_positive_otherwise() -> None:
    src = _features()
    a, b = _scene(), _scene(shift_mm=(3.0, 0.0, 0.0))
    fa = src.model(torch.from_numpy(a.array)[None, None])
    fb = src.model(torch.from_numpy(b.array)[None, None])
    for metric in ("l1", "l2", "cosine"):
        assert float(impact.impact_distance(fa, fa, metric=metric)) == pytest.approx(0.0, abs=1e-6)
        assert float(impact.impact_distance(fa, fb, metric=metric)) > 1e-4
    # the weights weigh the layers: one layer alone equals its weighted term
    d0 = float(impact.impact_distance(fa[:1], fb[:1]))
    assert float(impact.impact_distance(fa, fb, weights=[1.0, 0.0])) == pytest.approx(d0, rel=1e-5)
    # a mask restricts the average: a mask of ones equals no mask
    ones = torch.ones(1, 1, *a.shape)
    assert float(impact.impact_distance(fa, fb, mask=ones)) == pytest.approx(
        float(impact.impact_distance(fa, fb)), rel=1e-4
    )


@pytest.mark.parametrize("mode", ["jacobian", "static"])
def test_registration_lowers_the_distance_and_recovers_a_shift(mode: str) -> None:
    fixed, moving = _scene(), _scene(shift_mm=(4.0, -3.0, 2.0))
    settings = impact.ImpactSettings(control_spacing_mm=(32.0, 16.0), iterations=(40, 30), lr_mm=0.5, mode=mode)
    tr = impact.register_impact(fixed, moving, _features(), settings)
    assert tr.history[-1] < 0.7 * tr.history[0]
    assert tr.displacement.shape == fixed.shape
    np.testing.assert_allclose(tr.displacement.affine, fixed.affine)
    # moving(y) = scene(y - s): the fixed point x is found at x + s in the moving image
    got = tr.points_fixed_to_moving(np.array([[0.0, 0.0, 0.0], [-4.0, -2.0, 0.0]]))
    assert np.abs(got - [[4.0, -3.0, 2.0], [0.0, -5.0, 2.0]]).max() < 1.5
    warped = tr.warp(moving, default=-800.0)
    assert np.abs(warped.array - fixed.array).mean() < 0.6 * np.abs(moving.array - fixed.array).mean()
    assert tr.folding_fraction() == 0.0


def test_feature_model_from_a_model_folder_and_layer_check(tmp_path: Path) -> None:
    from medct.errors import ConfigError

    folder = make_model_folder(tmp_path / "m", spacing=(3.0, 3.0, 3.0))
    src = impact.load_feature_model(folder, layers=(0, 2))
    assert src.spacing == (3.0, 3.0, 3.0)
    feats = src.model(torch.zeros(1, 1, 16, 16, 16))
    assert [f.shape[1] for f in feats] == [4, 16]
    assert not any(p.requires_grad for p in src.model.parameters())
    with pytest.raises(ConfigError, match="do not exist"):
        impact.load_feature_model(folder, layers=(5,))


def test_torchscript_export_gives_the_eager_features_in_itk_axis_order(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "m")
    path = impact.export_torchscript(folder, tmp_path / "enc.pt", example_size=(32, 32, 32))
    scripted = torch.jit.load(str(path), map_location="cpu")
    eager = impact.load_feature_model(folder, layers=(0, 1, 2)).model
    hu = torch.randn(1, 1, 24, 32, 40) * 400.0  # (B, 1, X, Y, Z), another size than traced
    want = eager(hu)
    got = scripted(hu.permute(0, 1, 4, 3, 2), torch.tensor([3]))  # ITK gives (B, C, Z, Y, X)
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.permute(0, 1, 4, 3, 2), w, rtol=1e-4, atol=1e-5)
    # nb_layers selects the first layers (ImpactLoss calls the model with it)
    assert len(scripted(hu.permute(0, 1, 4, 3, 2), torch.tensor([1]))) == 1


def test_medct_register_impact_writes_outputs_on_the_fixed_grid(tmp_path: Path) -> None:
    from medct.cli import main
    from medct.io import read_volume, write_volume

    write_volume(_scene(), tmp_path / "fixed.nii.gz")
    write_volume(_scene(shift_mm=(3.0, 0.0, -2.0)), tmp_path / "moving.nii.gz")
    folder = make_model_folder(tmp_path / "m", spacing=(2.0, 2.0, 2.0))
    out = tmp_path / "out"
    argv = ["register", "-f", str(tmp_path / "fixed.nii.gz"), "-m", str(tmp_path / "moving.nii.gz"), "-o", str(out)]
    assert main([*argv, "--preset", "impact", "--encoder", str(folder), "--impact-init", "none"]) == 0
    ref = read_volume(tmp_path / "fixed.nii.gz")
    for name in ("warped.nii.gz", "jacobian.nii.gz"):
        v = read_volume(out / name)
        assert v.shape == ref.shape and np.allclose(v.affine, ref.affine, atol=1e-4), name
    import nibabel as nib

    disp = nib.load(out / "transform" / "displacement.nii.gz")  # a vector field: (X, Y, Z, ..., 3)
    assert disp.shape[:3] == ref.shape and disp.shape[-1] == 3
    np.testing.assert_allclose(disp.affine, ref.affine, atol=1e-4)
    assert main([*argv, "--preset", "impact"]) == 1  # no --encoder: one sentence, exit 1


def test_api_register_runs_impact_on_a_model_folder(tmp_path: Path) -> None:
    """medct.api.register(method="impact") runs what `medct register --preset impact` runs and
    returns volumes on the fixed grid; without an encoder it is one sentence."""
    import medct
    from medct.errors import ConfigError

    fixed, moving = _scene(), _scene(shift_mm=(3.0, 0.0, -2.0))
    folder = make_model_folder(tmp_path / "m", spacing=(2.0, 2.0, 2.0))
    res = medct.register(fixed, moving, method="impact", encoder=str(folder), impact_init="none")
    assert isinstance(res["transform"], impact.ImpactTransform)
    assert res["warped"].shape == fixed.shape and np.allclose(res["warped"].affine, fixed.affine)
    before = float(np.abs(moving.array - fixed.array).mean())
    assert float(np.abs(res["warped"].array - fixed.array).mean()) < before  # it moved towards the fixed image
    with pytest.raises(ConfigError, match='method="impact" needs encoder='):
        medct.register(fixed, moving, method="impact")
