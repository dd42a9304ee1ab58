"""The notebook API: load_model / segment on ndarray, path and Volume inputs; previews."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

import medct
from medct.errors import InvalidVolumeError
from medct.inference import Predictor
from medct.io import Volume, write_volume


def scan() -> Volume:
    rng = np.random.default_rng(0)
    arr = np.full((30, 26, 10), -1000, np.int16)
    arr[5:25, 4:22, 2:8] = rng.normal(40, 200, (20, 18, 6)).astype(np.int16)
    aff = np.array([[-0.9, 0, 0, 20.0], [0, -0.9, 0, 15.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])  # LPS-like
    return Volume(arr, aff)


def test_segment_volume_path_and_array_agree(model_dir, tmp_path) -> None:
    model = medct.load_model(model_dir, device="cpu")
    assert isinstance(model, Predictor)
    vol = scan()
    from_volume = medct.segment(model, vol)
    assert from_volume.shape == vol.shape and np.array_equal(from_volume.affine, vol.affine)
    assert from_volume.array.dtype == np.uint8

    path = write_volume(vol, tmp_path / "scan.nii.gz")
    from_path = medct.segment(str(model_dir), path, device="cpu")  # a folder works as the model too
    np.testing.assert_allclose(from_path.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(from_path.array, from_volume.array)

    from_array = medct.segment(model, vol.array, affine=vol.affine)
    np.testing.assert_array_equal(from_array.array, from_volume.array)
    assert np.array_equal(from_array.affine, vol.affine)


def test_segment_array_without_affine_warns(model_dir) -> None:
    model = medct.load_model(model_dir, device="cpu")
    with pytest.warns(UserWarning, match="identity affine"):
        out = medct.segment(model, scan().array)
    assert np.array_equal(out.affine, np.eye(4)) and out.shape == scan().shape


def test_segment_options_do_not_change_the_model(model_dir) -> None:
    model = medct.load_model(model_dir, device="cpu")
    before = (model.overlap, model.tta)
    out = medct.segment(model, scan(), overlap=0.25, tta=True)
    assert out.shape == scan().shape and (model.overlap, model.tta) == before


def test_segment_rejects_bad_input(model_dir) -> None:
    model = medct.load_model(model_dir, device="cpu")
    bad = scan().array.astype(np.float32)
    bad[0, 0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidVolumeError):
            medct.segment(model, bad, affine=scan().affine)
        with pytest.raises(InvalidVolumeError):
            medct.segment(model, np.zeros((4, 4)), affine=np.eye(4))
    with pytest.raises(medct.MedCTError):
        medct.segment(model, "/nonexistent/scan.nii.gz")


def test_segment_accepts_a_torch_tensor_with_its_affine(model_dir) -> None:
    import torch

    model = medct.load_model(model_dir, device="cpu")
    vol = scan()
    out = medct.segment(model, torch.from_numpy(vol.array), affine=vol.affine)
    np.testing.assert_array_equal(out.array, medct.segment(model, vol).array)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overlap": "0.5"}, "overlap must be a number"),
        ({"overlap": 1.5}, "overlap must be in"),
        ({"overlap": True}, "overlap must be a number"),
        ({"tta": "no"}, "tta must be True or False"),
        ({"device": "cuda:99"}, "device 'cuda:99' was asked for"),
        ({"device": "tpu"}, "device must be cpu, cuda"),
    ],
)
def test_segment_rejects_wrong_option_types_with_one_sentence(model_dir, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(medct.MedCTError, match=message) as info:
        medct.segment(str(model_dir), scan(), **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(medct.MedCTError, match="takes a path, a Volume"):
        medct.segment(str(model_dir), [[1, 2], [3, 4]], device="cpu")  # type: ignore[arg-type]


def test_preview_png(tmp_path) -> None:
    from medct.preview import save_preview

    vol = scan()
    labels = vol.with_array((vol.array > 100).astype(np.uint8))
    out = save_preview(vol, labels, tmp_path / "sub" / "case.png", label_names={1: "bright"})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > height > 100
    assert [p.name for p in out.parent.iterdir()] == ["case.png"]  # no temp file left behind
    assert save_preview(vol, None, tmp_path / "nolabels.png").is_file()
    with pytest.raises(medct.MedCTError):
        save_preview(vol, Volume(labels.array[:-1], labels.affine), tmp_path / "bad.png")
