"""Elastix wrapper: known transforms recovered, directions of points vs images, labels, files.

Volumes are small (about 40^3) smooth blob images on oblique, anisotropic grids; a known transform
T (fixed world -> moving world) is built into the moving image by construction:
moving(y) = fixed_function(T^-1(y)), so the registration must find T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medct.volume import Volume

elastix = pytest.importorskip("medct.registration.elastix")


def _rotation(deg: float, axis: int) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _oblique_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Oblique (10 degrees about z), LPS-like (first two axes flipped), anisotropic, centred grid."""
    lin = _rotation(10.0, 2) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ (np.asarray(shape) - 1) / 2.0 + np.array([5.0, -3.0, 2.0])
    return aff


CENTRES = np.array([[-14.0, -8.0, -6.0], [10.0, 12.0, 4.0], [4.0, -14.0, 10.0], [-6.0, 10.0, -10.0], [0.0, 0.0, 0.0]])
RADII = np.array([7.0, 9.0, 6.0, 8.0, 5.0])


def _scene(world: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric CT-like scene at (..., 3) RAS world points: HU values."""
    out = np.full(world.shape[:-1], -900.0)
    for c, r, hu in zip(CENTRES, RADII, (300.0, 900.0, 100.0, 600.0, 1200.0), strict=True):
        d2 = ((world - c) ** 2).sum(-1) / r**2
        out += (hu + 900.0) * np.exp(-(d2**2))
    # soft-tissue-like texture, so that mutual information has structure everywhere (as in real CT)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    out += 120.0 * np.sin(0.35 * x + 0.5) * np.sin(0.29 * y - 0.3) * np.sin(0.41 * z + 1.1)
    out += 80.0 * np.sin(0.23 * x - 0.21 * y + 0.17 * z)
    return out.astype(np.float32)


def _world(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]  # (X, Y, Z, 3)


def _pair(t_inverse, shape=(40, 40, 28), spacing=(1.5, 1.5, 2.0)) -> tuple[Volume, Volume]:
    """Fixed = scene; moving = scene(T^-1(y)), both on oblique grids (the moving grid shifted)."""
    aff_f = _oblique_affine(shape, spacing)
    fixed = Volume(_scene(_world(aff_f, shape)), aff_f)
    aff_m = aff_f.copy()
    aff_m[:3, 3] += np.array([2.0, 1.0, -1.5])  # a different (but overlapping) moving grid
    moving = Volume(_scene(t_inverse(_world(aff_m, shape))), aff_m)
    return fixed, moving


def _probe_points() -> np.ndarray:
    return CENTRES[:4] * 0.8


def test_rigid_recovers_a_known_rotation_and_translation(tmp_path: Path) -> None:
    rot, shift = _rotation(6.0, 2), np.array([3.0, -2.0, 1.5])

    def t(x):  # fixed -> moving
        return x @ rot.T + shift

    def t_inv(y):
        return (y - shift) @ rot

    fixed, moving = _pair(t_inv)
    tr = elastix.register(fixed, moving, preset="rigid")
    pts = _probe_points()
    # transformix sends FIXED points to the MOVING image: T(x)
    np.testing.assert_allclose(tr.points_fixed_to_moving(pts), t(pts), atol=0.5)
    # points drawn on the moving image come back to the fixed image through T^-1
    np.testing.assert_allclose(tr.points_moving_to_fixed(t(pts)), pts, atol=0.5)
    # the warped image lies on the fixed grid and matches the fixed image
    warped = tr.warp(moving, default=-900.0)
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    inside = np.abs(fixed.array + 900.0) > 50
    before = np.abs(moving.array - fixed.array)[inside].mean()
    after = np.abs(warped.array - fixed.array)[inside].mean()
    assert after < 0.25 * before, (before, after)


def test_affine_recovers_a_known_scaling_and_shear() -> None:
    lin = np.array([[1.06, 0.04, 0.0], [0.0, 0.95, 0.03], [0.02, 0.0, 1.04]])
    shift = np.array([-2.0, 1.0, 1.0])
    inv = np.linalg.inv(lin)

    def t_inv(y):
        return (y - shift) @ inv.T

    fixed, moving = _pair(t_inv)
    tr = elastix.register(fixed, moving, preset="affine")
    pts = _probe_points()
    np.testing.assert_allclose(tr.points_fixed_to_moving(pts), pts @ lin.T + shift, atol=0.6)


def test_bspline_reduces_a_smooth_deformation_and_labels_move_with_the_image() -> None:
    def u(x):  # a smooth local deformation (mm), largest near the origin
        amp = 3.0 * np.exp(-((x**2).sum(-1, keepdims=True)) / 400.0)
        return amp * np.array([1.0, -0.6, 0.4])

    def t_inv(y):  # y = x + u(x)  ->  x ~ y - u(y - u(y)) (two fixed-point steps suffice here)
        return y - u(y - u(y))

    fixed, moving = _pair(t_inv)
    tr = elastix.register(fixed, moving, preset="rigid,bspline")
    pts = np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0], [-4.0, 3.0, 2.0]])
    got = tr.points_fixed_to_moving(pts)
    want = pts + u(pts)
    err_after = np.linalg.norm(got - want, axis=1)
    err_before = np.linalg.norm(pts - want, axis=1)
    assert err_after.mean() < 0.5 * err_before.mean(), (err_before, err_after)
    # labels: a ball label drawn on the moving image lands where the same structure is on the fixed
    world_m = _world(moving.affine, moving.shape)
    lab_m = (((t_inv(world_m) - CENTRES[1]) ** 2).sum(-1) < RADII[1] ** 2).astype(np.uint8)
    warped = tr.warp(moving.with_array(lab_m), kind="labels")
    assert warped.array.dtype == np.uint8 and set(np.unique(warped.array)) <= {0, 1}
    world_f = _world(fixed.affine, fixed.shape)
    lab_f = ((world_f - CENTRES[1]) ** 2).sum(-1) < RADII[1] ** 2
    dice = 2 * (warped.array.astype(bool) & lab_f).sum() / (warped.array.sum() + lab_f.sum())
    assert dice > 0.9
    # a smooth, moderate deformation does not fold; elastix's Jacobian agrees with the field's
    assert tr.folding_fraction() == 0.0
    det = tr.jacobian().array
    from medct.metrics import jacobian_determinant

    disp = tr.displacement()
    d = np.linalg.inv(fixed.affine[:3, :3] / np.asarray(fixed.spacing)[None, :])  # world -> voxel-axis frame
    u_axes = np.einsum("ab,xyzb->axyz", d, disp.array)
    fd = jacobian_determinant(u_axes, fixed.spacing)
    core = (slice(3, -3),) * 3
    np.testing.assert_allclose(det[core], fd[core], atol=0.02)


def test_displacement_field_is_t_minus_x_in_ras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shift = np.array([2.5, -1.5, 1.0])
    fixed, moving = _pair(lambda y: y - shift)
    tr = elastix.register(fixed, moving, preset="rigid")
    monkeypatch.chdir(tmp_path)
    disp = tr.displacement()
    tr.jacobian()
    assert list(tmp_path.iterdir()) == []  # transformix leaves nothing in the working folder
    assert disp.array.shape == (*fixed.shape, 3)
    np.testing.assert_allclose(disp.array[20, 20, 14], shift, atol=0.5)


def test_save_load_round_trip_and_point_files(tmp_path: Path) -> None:
    shift = np.array([2.0, 1.0, -1.0])
    fixed, moving = _pair(lambda y: y - shift)
    tr = elastix.register(fixed, moving, preset="affine")
    paths = tr.save(tmp_path / "tf")
    assert [p.name for p in paths] == ["TransformParameters.0.txt", "TransformParameters.1.txt"]
    again = elastix.ElastixTransform.load(tmp_path / "tf")
    pts = _probe_points()
    np.testing.assert_allclose(again.points_fixed_to_moving(pts), tr.points_fixed_to_moving(pts), atol=1e-4)
    # the point file is LPS on disk, RAS in memory
    elastix.write_points(tmp_path / "p.txt", pts)
    first = (tmp_path / "p.txt").read_text().splitlines()[2].split()
    np.testing.assert_allclose([float(v) for v in first], pts[0] * [-1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(elastix.read_points(tmp_path / "p.txt"), pts, atol=1e-5)


def test_a_transform_transformix_rejects_says_why(tmp_path: Path) -> None:
    """A saved transform edited by hand (one of its 6 rigid parameters deleted): transformix's own
    reason, read from its log, not "See transformix log"."""
    fixed, moving = _pair(lambda y: y)
    elastix.register(fixed, moving, preset="rigid").save(tmp_path / "tf")
    f = tmp_path / "tf" / "TransformParameters.0.txt"
    text = f.read_text()
    start = text.index("(TransformParameters ")
    end = text.index(")", start)
    f.write_text(text[:start] + " ".join(text[start:end].split()[:-1]) + text[end:])
    with pytest.raises(elastix.RegistrationError, match=r"^Transformix failed: .*TransformParameters"):
        elastix.ElastixTransform.load(tmp_path / "tf").warp(moving)


def test_inverse_composes_to_identity() -> None:
    rot, shift = _rotation(4.0, 2), np.array([2.0, -1.0, 1.0])
    fixed, moving = _pair(lambda y: (y - shift) @ rot)
    tr = elastix.register(fixed, moving, preset="rigid")
    inv = tr.inverse(moving, iterations=200)
    pts = _probe_points()
    there = tr.points_fixed_to_moving(pts)
    back = inv.points_fixed_to_moving(there)
    np.testing.assert_allclose(back, pts, atol=0.5)
    assert inv.fixed_shape == moving.shape


def test_clear_errors_for_2d_empty_masks_and_disjoint_fields_of_view() -> None:
    fixed, moving = _pair(lambda y: y)
    flat = Volume(fixed.array[:, :, :1], fixed.affine)
    with pytest.raises(elastix.RegistrationError, match="3D volume"):
        elastix.register(flat, moving, preset="rigid")
    far = Volume(moving.array, moving.affine.copy())
    far.affine[:3, 3] += 1000.0
    with pytest.raises(elastix.RegistrationError, match="do not overlap"):
        elastix.register(fixed, far, preset="rigid")
    with pytest.raises(elastix.RegistrationError, match="mask is empty"):
        elastix.register(fixed, moving, preset="rigid", fixed_mask=fixed.with_array(np.zeros(fixed.shape, np.uint8)))
    with pytest.raises(Exception, match="'nonrigid' is not a registration preset"):
        elastix.register(fixed, moving, preset="nonrigid")


def test_real_lung_landmarks_read_as_lps_land_on_voxel_centres_inside_the_lung(shared_data: Path) -> None:
    from medct.io import read_volume

    src = shared_data / "elastix_lung_small"
    mask = read_volume(src / "3DCT_lung_baseline_mask.mha")
    pts = elastix.read_points(src / "3DCT_lung_baseline_landmarks.txt")
    assert pts.shape == (100, 3)
    # the file is LPS: its first point (-36.351, -36.974, -1204.5) is RAS (36.351, 36.974, -1204.5)
    np.testing.assert_allclose(pts[0], [36.351, 36.974, -1204.5], atol=1e-6)
    # read as LPS, the landmarks sit exactly on voxel centres of the full-resolution mask grid, and
    # those inside the cropped hemithorax all lie in its lung mask; read as RAS they would not.
    idx = (np.linalg.inv(mask.affine) @ np.hstack([pts, np.ones((100, 1))]).T)[:3].T
    np.testing.assert_allclose(idx, np.rint(idx), atol=0.01)
    inside = ((idx >= 0) & (idx <= np.asarray(mask.shape) - 1)).all(axis=1)
    assert inside.sum() >= 40
    vox = np.rint(idx[inside]).astype(int)
    assert (np.asarray(mask.array)[vox[:, 0], vox[:, 1], vox[:, 2]] > 0).all()


def test_medct_register_writes_every_output_on_the_fixed_grid(tmp_path: Path) -> None:
    from medct.cli import main
    from medct.io import read_volume, write_volume

    shift = np.array([2.0, -1.0, 1.0])
    fixed, moving = _pair(lambda y: y - shift)
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    world_m = _world(moving.affine, moving.shape)
    lab = (((world_m - shift - CENTRES[1]) ** 2).sum(-1) < RADII[1] ** 2).astype(np.uint8)
    write_volume(moving.with_array(lab), tmp_path / "labels.nii.gz")
    elastix.write_points(tmp_path / "points.txt", CENTRES[:2] + shift)  # on the moving image
    out = tmp_path / "out"
    argv = ["register", "-f", str(tmp_path / "fixed.nii.gz"), "-m", str(tmp_path / "moving.nii.gz"), "-o", str(out)]
    argv += ["--preset", "rigid", "--moving-labels", str(tmp_path / "labels.nii.gz")]
    assert main([*argv, "--points", str(tmp_path / "points.txt")]) == 0
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz", "preview.png", "summary.csv"):
        assert (out / name).is_file(), name
    assert (out / "transform" / "TransformParameters.0.txt").is_file()
    ref = read_volume(tmp_path / "fixed.nii.gz")
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz"):
        v = read_volume(out / name)
        assert v.shape == ref.shape
        np.testing.assert_allclose(v.affine, ref.affine, atol=1e-4)
    # moving-image points come back to where the structures are on the fixed image
    np.testing.assert_allclose(elastix.read_points(out / "warped_points.txt"), CENTRES[:2], atol=0.5)
    warped_lab = read_volume(out / "warped_labels.nii.gz").array.astype(bool)
    lab_f = ((_world(fixed.affine, fixed.shape) - CENTRES[1]) ** 2).sum(-1) < RADII[1] ** 2
    assert 2 * (warped_lab & lab_f).sum() / (warped_lab.sum() + lab_f.sum()) > 0.9


def test_medct_register_refuses_a_2d_image_in_one_sentence(tmp_path: Path, capsys) -> None:
    from medct.cli import main
    from medct.io import write_volume

    fixed, moving = _pair(lambda y: y)
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(Volume(moving.array[:, :, :2].copy(), moving.affine), tmp_path / "thin.nii.gz")
    argv = ["register", "-f", str(tmp_path / "fixed.nii.gz"), "-m", str(tmp_path / "thin.nii.gz")]
    assert main([*argv, "-o", str(tmp_path / "out"), "--preset", "rigid"]) == 1
    err = capsys.readouterr().err
    assert "3D volume" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "warped.nii.gz").exists()


def test_api_register_returns_volumes_with_the_fixed_geometry() -> None:
    import medct

    fixed, moving = _pair(lambda y: y - np.array([1.5, 0.0, -1.0]))
    res = medct.register(
        fixed, moving, preset="rigid", moving_labels=moving.with_array((moving.array > 0).astype(np.uint8))
    )
    for key in ("warped", "warped_labels"):
        assert res[key].shape == fixed.shape
        np.testing.assert_allclose(res[key].affine, fixed.affine)
    assert res["warped_labels"].array.dtype == np.uint8
    assert isinstance(res["transform"], elastix.ElastixTransform)


def test_user_parameter_files_run_in_order(tmp_path: Path) -> None:
    import itk

    for i, stage in enumerate(("rigid", "affine")):
        po = itk.ParameterObject.New()
        po.SetParameterMap(elastix.preset_maps(stage)[-1])
        po.WriteParameterFile(str(tmp_path / f"p{i}.txt"))
    shift = np.array([1.5, -2.0, 1.0])
    fixed, moving = _pair(lambda y: y - shift)
    tr = elastix.register(fixed, moving, parameter_files=[tmp_path / "p0.txt", tmp_path / "p1.txt"], seed=1)
    assert [m["Transform"][0] for m in tr.maps] == ["EulerTransform", "AffineTransform"]
    pts = _probe_points()
    np.testing.assert_allclose(tr.points_fixed_to_moving(pts), pts + shift, atol=0.5)
    (tmp_path / "bad.txt").write_text("(Metric AdvancedMattesMutualInformation)\n")
    from medct.errors import ConfigError

    with pytest.raises(ConfigError, match="names no Transform"):
        elastix.register(fixed, moving, parameter_files=[tmp_path / "bad.txt"])


def test_one_preset_grammar_for_the_command_the_api_and_recipes() -> None:
    """A preset name is its chain of stages, a comma list names stages in order; the command's
    option and elastix.register read presets through this one parser."""
    import argparse

    from medct.commands.register import _preset
    from medct.errors import ConfigError

    assert elastix.parse_preset("bspline") == ("rigid", "affine", "bspline")
    assert elastix.parse_preset("ct-cbct") == ("rigid", "ct-cbct")
    assert elastix.parse_preset("bspline,") == ("bspline",)
    assert elastix.parse_preset(" rigid , bspline ") == ("rigid", "bspline")
    for bad in ("", ",", "nonrigid", "rigid,spline"):
        with pytest.raises(ConfigError, match="is not a registration preset or a comma list of rigid, affine"):
            elastix.parse_preset(bad)
        with pytest.raises(argparse.ArgumentTypeError, match="is not a registration preset"):
            _preset(bad)
    assert _preset("impact") == "impact" and _preset("rigid,affine") == "rigid,affine"
