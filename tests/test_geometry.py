"""medct.geometry: resampling continuous volumes, vector fields and label maps between grids."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medct.geometry import Grid, index_map, network_grid, resample_volume
from medct.volume import Volume

OBLIQUE_LPS = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() @ np.diag([-1.0, -1.0, 1.0])


def _affine(rot: np.ndarray, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = -(aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0))  # grid centred on the world origin
    return aff


def _world(aff: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ aff[:3, :3].T + aff[:3, 3]  # (X, Y, Z, 3) RAS mm


COEF = np.array([[0.7, -1.3, 2.1], [-0.4, 0.9, 0.2], [1.1, 0.5, -0.8]])  # three linear functions of RAS mm


def _linear_field(aff: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return (_world(aff, shape) @ COEF.T).astype(np.float32)  # (X, Y, Z, 3)


SRC_SHAPE = (40, 44, 16)
SRC = _affine(np.diag([-1.0, -1.0, 1.0]), (1.5, 1.5, 4.0), SRC_SHAPE)  # LPS, anisotropic


@pytest.mark.parametrize("rot", ["identity", "oblique_lps"])
def test_linear_values_and_vector_fields_are_reproduced(rot: str) -> None:
    """Trilinear interpolation reproduces linear functions exactly: an HU-like volume and a world-mm
    displacement field land on an oblique target grid with the values of the target's own points."""
    r = np.eye(3) if rot == "identity" else OBLIQUE_LPS
    out_shape = (20, 18, 22)
    grid = Grid(out_shape, _affine(r, (1.1, 1.3, 0.9), out_shape))  # inside the source's extent
    field = Volume(_linear_field(SRC, SRC_SHAPE), SRC, {"kind": "displacement_ras_mm"})
    out = resample_volume(field, grid)
    assert out.array.shape == (*out_shape, 3) and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.affine, grid.affine)
    np.testing.assert_allclose(out.array, _linear_field(grid.affine, out_shape), atol=2e-3)
    hu = resample_volume(field.with_array(field.array[..., 0]), grid, dtype=np.float32)
    np.testing.assert_allclose(hu.array, out.array[..., 0], atol=1e-4)
    assert out.meta["kind"] == "displacement_ras_mm"


def test_constant_padding_and_border_padding() -> None:
    vol = Volume(np.full(SRC_SHAPE, 40.0, np.float32), SRC)
    shifted = SRC.copy()
    shifted[:3, 3] += [0.0, 0.0, 200.0]  # far above the source: every point is outside
    outside = Grid((4, 4, 4), shifted)
    assert np.all(resample_volume(vol, outside, padding=-1000.0).array == -1000.0)
    assert np.allclose(resample_volume(vol, outside).array, 40.0)  # border: the edge value repeats


def test_label_maps_use_nearest_and_keep_their_values() -> None:
    labels = np.zeros(SRC_SHAPE, np.uint8)
    labels[10:30, 5:20, 3:9] = 3
    labels[25:35, 25:40, 8:14] = 7
    vol = Volume(labels, SRC)
    same = resample_volume(vol, Grid(SRC_SHAPE, SRC), mode="nearest")
    np.testing.assert_array_equal(same.array, labels)
    assert same.array.dtype == np.uint8
    grid = network_grid(SRC, SRC_SHAPE, (1.0, 1.0, 1.0))  # RAS, finer: nearest picks existing values
    out = resample_volume(vol, grid, mode="nearest")
    assert set(np.unique(out.array)) == {0, 3, 7}
    # the world volume of each label is kept up to the voxel staircase
    for v in (3, 7):
        ml_in = (labels == v).sum() * np.prod(vol.spacing)
        ml_out = (out.array == v).sum() * np.prod(out.spacing)
        assert abs(ml_out - ml_in) / ml_in < 0.15


def test_index_map_composes_affines() -> None:
    grid = network_grid(SRC, SRC_SHAPE, (2.0, 2.0, 2.0))
    m = index_map(SRC, grid.affine)
    ijk_out = np.array([3.0, 5.0, 7.0, 1.0])
    np.testing.assert_allclose(SRC @ (m @ ijk_out), grid.affine @ ijk_out, atol=1e-9)


def test_transcribed_grid_helpers_equal_monai() -> None:
    """medct.geometry's zoom_affine / compute_shape_offset give MONAI's results on LPS, oblique,
    anisotropic and sheared affines."""
    from monai.data.utils import compute_shape_offset as monai_offset
    from monai.data.utils import zoom_affine as monai_zoom
    from scipy.spatial.transform import Rotation

    from medct.geometry import compute_shape_offset, zoom_affine

    rng = np.random.default_rng(0)
    for k in range(30):
        aff = np.eye(4)
        rot = Rotation.from_euler("xyz", rng.uniform(-40, 40, 3), degrees=True).as_matrix() if k % 3 else np.eye(3)
        aff[:3, :3] = rot @ np.diag(rng.uniform(0.4, 5.0, 3) * rng.choice([-1, 1], 3))
        if k % 5 == 4:
            aff[0, 2] += 0.3  # a shear (gantry tilt)
        aff[:3, 3] = rng.uniform(-200, 200, 3)
        spacing = rng.uniform(0.5, 4.0, 3)
        shape = tuple(int(s) for s in rng.integers(5, 300, 3))
        np.testing.assert_array_equal(zoom_affine(aff, spacing), monai_zoom(aff, spacing, diagonal=False))
        new = zoom_affine(aff, spacing)
        ours, theirs = compute_shape_offset(shape, aff, new), monai_offset(shape, aff, new, scale_extent=False)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


def test_float_tensor_equals_numpy_for_every_memory_order_and_byte_order() -> None:
    """Fortran order (nibabel's), C order, negative strides, big-endian, uint16: float32 values equal."""
    import torch

    from medct.geometry import float_tensor

    base = np.random.default_rng(0).integers(-1024, 3000, (7, 6, 5)).astype(np.int16)
    cases = [np.asfortranarray(base), base, base[::-1, :, ::-2], base.astype(">i2"), (base + 1100).astype(np.uint16)]
    for arr in cases:
        t = float_tensor(arr)
        assert t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), arr.astype(np.float32))


def test_separable_resampling_of_a_fortran_ordered_array_equals_c_order() -> None:
    """The axis order `resample_separable` picks by memory layout changes only float rounding."""
    import torch

    from medct.geometry import float_tensor, resample_separable

    arr = np.asfortranarray(np.random.default_rng(1).normal(0, 500, (40, 40, 12)).astype(np.float32))
    imap = np.diag([40 / 15, 40 / 15, 1.0, 1.0])  # 40 -> 16 voxels in-plane (x and y shrink alike), z kept
    fortran = resample_separable(float_tensor(arr)[None], imap, (16, 16, 12))
    c_order = resample_separable(torch.from_numpy(np.ascontiguousarray(arr))[None], imap, (16, 16, 12))
    assert fortran.is_contiguous()
    np.testing.assert_allclose(fortran.numpy(), c_order.numpy(), rtol=0, atol=1e-3)
