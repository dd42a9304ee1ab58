"""medct.sliding_window against MONAI's sliding_window_inference (same tiles, weights and result)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medct.sliding_window import sliding_window, tile_slices


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1)).eval()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_monai_when_every_tile_runs(overlap: float, channels_last: bool) -> None:
    net = _net()
    x = torch.rand(1, 1, 37, 29, 20)  # sizes no patch step divides
    with torch.inference_mode():
        ref = sliding_window_inference(x, (16, 12, 20), 3, net, overlap=overlap, mode="gaussian")
        got = sliding_window(x, (16, 12, 20), overlap, 3, net, 3, channels_last=channels_last)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_rejected_tiles_count_as_zero_scores_like_monai() -> None:
    net = _net()
    x = torch.rand(1, 1, 40, 32, 24)
    patch = (16, 16, 16)
    rejected = [s for i, s in enumerate(tile_slices(x.shape[2:], patch, 0.5)) if i % 3 == 1]
    assert rejected

    def keep(tile: tuple[slice, ...]) -> bool:
        return tile not in rejected

    def zero_for_rejected(patches: torch.Tensor, coords: list[list[slice]]) -> torch.Tensor:
        out = net(patches)
        for i, c in enumerate(coords):
            if tuple(c[2:]) in rejected:
                out[i] = 0.0
        return out

    runs: list[int] = []

    def counted(patches: torch.Tensor) -> torch.Tensor:
        runs.append(patches.shape[0])
        return net(patches)

    with torch.inference_mode():
        ref = sliding_window_inference(x, patch, 4, zero_for_rejected, overlap=0.5, mode="gaussian", with_coord=True)
        got = sliding_window(x, patch, 0.5, 4, counted, 3, keep=keep)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert sum(runs) == len(tile_slices(x.shape[2:], patch, 0.5)) - len(rejected)  # rejected tiles never ran


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="smaller than the patch"):
        sliding_window(torch.zeros(1, 1, 8, 8, 8), (16, 16, 16), 0.5, 1, _net(), 3)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(torch.zeros(1, 1, 16, 16, 16), (16, 16, 16), 1.0, 1, _net(), 3)


def test_transcribed_weights_and_tiles_equal_monai() -> None:
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from medct.sliding_window import gaussian_weights, scan_interval

    for patch in [(16, 12, 20), (96, 96, 96), (80, 80, 80), (7, 1, 33)]:
        ref = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu")
        torch.testing.assert_close(gaussian_weights(patch), ref, rtol=0, atol=0)
    for size, patch in [((37, 29, 20), (16, 12, 20)), ((184, 184, 134), (80, 80, 80)), ((96, 96, 96), (96, 96, 96))]:
        for overlap in (0.0, 0.25, 0.5, 0.7, 0.9):
            interval = scan_interval(size, patch, overlap)
            assert interval == _get_scan_interval(size, patch, 3, (overlap,) * 3)
            assert tile_slices(size, patch, overlap) == list(dense_patch_slices(size, patch, interval))
