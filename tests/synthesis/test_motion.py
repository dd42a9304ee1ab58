"""4D motion prediction: phase ordering and grid checks, the breathing phantom, baselines that
reproduce known motion exactly, roll-out shapes and causality, fine-tuning, registration of phases,
`medct motion` end to end on an oblique LPS sequence."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medct.errors import GeometryMismatchError, InputPathError, InvalidVolumeError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing
from medct.volume import Volume


def _small_sequence(n_phases: int = 6, axcodes: str = "RAS", oblique: float = 0.0, seed: int = 3):
    from medct.phantom import make_phantom
    from medct.phantom.breathing4d import BreathingPattern, breathing_sequence
    from medct.phantom.spec import Appearance, GridSpec

    grid = GridSpec(shape=(32, 32, 24), spacing=(12.0, 12.0, 12.0), axcodes=axcodes, oblique_deg=oblique)
    case = make_phantom(seed, grid, Appearance(dtype="int16"))
    pattern = BreathingPattern(amplitude_mm=18.0, period_s=4.0, hysteresis=0.5, regional_lag=0.1, seed=seed)
    return breathing_sequence(case.image, pattern, n_phases, 4, case.label, (7, 8))


def _write_phases(seq, folder: Path, names=None, n: int | None = None) -> list[Path]:
    from medct.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, v in enumerate(seq.phases[:n]):
        p = folder / (names[t] if names else f"phase_{t:02d}.nii.gz")
        write_volume(v, p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- reading


def test_phase_files_are_ordered_by_their_number(tmp_path):
    from medct.synthesis.motion import order_phase_files, read_sequence

    seq = _small_sequence(3)
    _write_phases(seq, tmp_path / "p", ["ct_phase10.nii.gz", "ct_phase2.nii.gz", "ct_phase1.nii.gz"])
    assert [p.name for p in order_phase_files(tmp_path / "p")] == [
        "ct_phase1.nii.gz",
        "ct_phase2.nii.gz",
        "ct_phase10.nii.gz",
    ]
    vols = read_sequence(tmp_path / "p")
    # written in the order phase10, phase2, phase1: read back as phase1, phase2, phase10
    assert np.array_equal(vols[0].array, seq.phases[2].array) and np.array_equal(vols[2].array, seq.phases[0].array)

    _write_phases(seq, tmp_path / "bad", ["a.nii.gz", "b1.nii.gz", "c2.nii.gz"])
    with pytest.raises(InvalidVolumeError, match="no phase number"):
        order_phase_files(tmp_path / "bad")
    _write_phases(seq, tmp_path / "dup", ["x_1.nii.gz", "y_01.nii.gz", "z_2.nii.gz"])
    with pytest.raises(InvalidVolumeError, match="same phase number"):
        order_phase_files(tmp_path / "dup")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputPathError, match="no phase volumes"):
        order_phase_files(tmp_path / "empty")


def test_sequences_need_three_phases_on_one_grid(tmp_path):
    import nibabel as nib

    from medct.synthesis.motion import read_sequence

    seq = _small_sequence(3)
    paths = _write_phases(seq, tmp_path / "p")
    with pytest.raises(InvalidVolumeError, match="at least 3 phases"):
        read_sequence(paths[:2])
    other = seq.phases[1]
    moved = Volume(np.asarray(other.array), other.affine.copy())
    moved.affine[0, 3] += 5.0  # the same image 5 mm to the side
    from medct.io import write_volume

    write_volume(moved, tmp_path / "moved.nii.gz")
    with pytest.raises(GeometryMismatchError):
        read_sequence([paths[0], tmp_path / "moved.nii.gz", paths[2]])
    stack = np.stack([np.asarray(v.array) for v in seq.phases], axis=-1)
    nib.save(nib.Nifti1Image(stack, seq.phases[0].affine), tmp_path / "4d.nii.gz")
    vols = read_sequence(tmp_path / "4d.nii.gz")
    assert len(vols) == 3 and np.array_equal(vols[2].array, seq.phases[2].array)


# --------------------------------------------------------------------------- the breathing phantom


def test_breathing_sequence_truth_is_consistent():
    from medct.metrics import jacobian_determinant
    from medct.phantom.breathing4d import BreathingPattern, breathing_signal, warp

    seq = _small_sequence(6)
    assert not np.any(seq.displacements[0])  # phase 0 is the reference
    peak = int(np.argmax(seq.signal[:, 0]))
    u = seq.displacements[peak]
    assert u[..., 2].max() > 8.0  # the diaphragm region moves (pull-back: +S at inspiration)
    ref = seq.phases[0]
    air = np.asarray(ref.array) < -900
    assert np.abs(u[air & (np.abs(u).sum(-1) > 0)]).max(initial=0) < 18.0
    det = jacobian_determinant(np.moveaxis(u, -1, 0).astype(np.float64), (12.0, 12.0, 12.0))
    assert det.min() > 0.3  # invertible
    # the phase is the reference warped by its field (+ 5 HU noise)
    warped = warp(ref, u, 1, float(np.asarray(ref.array).min()))
    body = np.asarray(ref.array) > -500
    assert np.abs(warped - np.asarray(seq.phases[peak].array, np.float32))[body].mean() < 10.0
    # hysteresis: at equal SI positions on inhale and exhale the AP positions differ
    p = BreathingPattern(amplitude_mm=10.0, period_s=4.0, hysteresis=0.5, irregularity=0.0, shape_n=1)
    s = breathing_signal(p, np.array([1.0, 3.0]))  # phi 0.25 and 0.75
    assert abs(s[0, 0] - s[1, 0]) < 1e-5 and s[0, 1] - s[1, 1] > 1.0


# --------------------------------------------------------------------------- baselines


def test_baselines_reproduce_known_motion_exactly():
    from medct.synthesis.motion import PCAMotionModel, copy_last, estimate_period, linear_extrapolation

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((3, 5, 4, 3)).astype(np.float32) for _ in range(3))
    t = np.arange(24, dtype=np.float32)[:, None, None, None, None]
    still = np.repeat(a[None], 24, axis=0)
    assert np.array_equal(copy_last(still[:16], 8), still[16:])
    linear = a[None] + t * b[None]
    assert np.allclose(linear_extrapolation(linear[:16], 8), linear[16:], atol=1e-4)
    theta = 2 * np.pi * t / 8.0  # period 8 phases; two components in quadrature: a hysteresis loop
    loop = c[None] + np.sin(theta) * a[None] + (1 - np.cos(theta)) * b[None]
    model = PCAMotionModel(n_components=3).fit(loop[:16])
    assert model.period == 8 == estimate_period(np.sin(theta[:16, 0, 0, 0, 0]))
    assert np.allclose(model.predict(8), loop[16:], atol=1e-4)
    assert not np.allclose(copy_last(loop[:16], 8), loop[16:], atol=0.1)  # the check can fail


# --------------------------------------------------------------------------- the AR model


def _tiny_net():
    from medct.nets import create_net

    torch.manual_seed(0)
    return create_net("motion_transformer", dim=16, depth=1, heads=2, patch=2, max_phases=8)


def test_rollout_shapes_copy_last_start_and_causality():
    from medct.synthesis.motion import copy_last, rollout

    net = _tiny_net().eval()
    obs = torch.randn(5, 3, 9, 8, 6)
    img = torch.rand(1, 9, 8, 6)
    out = rollout(net, obs, img, k=7, context=4)
    assert out.shape == (7, 3, 9, 8, 6)
    assert torch.equal(out, torch.from_numpy(copy_last(obs.numpy(), 7)))  # zero-initialised head
    torch.nn.init.normal_(net.head.weight, std=0.1)
    with torch.no_grad():
        full = net(obs[None], img[None])
        changed = obs.clone()
        changed[3:] += 5.0
        part = net(changed[None], img[None])
    assert torch.allclose(full[0, :3], part[0, :3], atol=1e-5)  # later phases do not leak back
    assert not torch.allclose(full[0, 3:], part[0, 3:])
    with pytest.raises(ValueError, match="at most 8"):
        net(torch.zeros(1, 9, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_finetune_fits_the_patient_and_leaves_the_population_model():
    from medct.synthesis.motion import finetune, next_phase_loss

    net = _tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t = torch.arange(8, dtype=torch.float32)[:, None, None, None, None]
    field = torch.zeros(8, 3, 6, 6, 4)
    field[:, 2] = 1.0
    obs = field * (6.0 * torch.sin(np.pi * t / 4.0) ** 2)
    img = torch.rand(1, 6, 6, 4)
    loss0 = float(next_phase_loss(net, obs[None], img[None]))
    tuned = finetune(net, obs, img, steps=40, lr=3e-3, context=7)
    assert float(next_phase_loss(tuned, obs[None], img[None])) < 0.7 * loss0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert finetune(net, obs, img, steps=0, lr=1e-3, context=7) is net


def test_register_phases_recovers_the_breathing_field():
    from medct.synthesis.motion import register_phases

    seq = _small_sequence(3)
    fields = register_phases(seq.phases, spacing_mm=12.0)
    assert fields.shape == (3, *seq.phases[0].shape, 3) and not np.any(fields[0])
    body = np.asarray(seq.phases[0].array) > -500
    err = np.linalg.norm(fields[2] - seq.displacements[2], axis=-1)[body].mean()
    motion = np.linalg.norm(seq.displacements[2], axis=-1)[body].mean()
    assert err < 0.6 * motion


# --------------------------------------------------------------------------- export + CLI + API


@pytest.fixture(scope="module")
def motion_model(tmp_path_factory) -> Path:
    from medct.checkpoint import save_model_folder
    from medct.synthesis.motion import MotionTask

    task = MotionTask(
        _tiny_net(),
        context=4,
        registration_spacing_mm=12.0,
        finetune_steps=2,
        preprocessing=Preprocessing(spacing=(12.0, 12.0, 12.0)),
    )
    torch.nn.init.normal_(task.net.head.weight, std=0.01)
    folder = tmp_path_factory.mktemp("motion") / "model"
    save_model_folder(task.net, task.model_card(), folder)
    return folder


def test_medct_motion_end_to_end_keeps_the_input_geometry(motion_model, tmp_path, capsys):
    import nibabel as nib

    from medct.cli import main

    seq = _small_sequence(5, axcodes="LPS", oblique=12.0)
    _write_phases(seq, tmp_path / "in")
    out = tmp_path / "out"
    assert main(["motion", "-m", str(motion_model), "-i", str(tmp_path / "in"), "-o", str(out), "--predict", "3"]) == 0
    ref = nib.load(tmp_path / "in" / "phase_00.nii.gz")
    for t in (5, 6, 7):
        img = nib.load(out / f"predicted_phase_{t:02d}.nii.gz")
        disp = nib.load(out / f"displacement_{t:02d}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-5)
        assert disp.shape[:3] == ref.shape and disp.shape[-1] == 3 and np.allclose(disp.affine, ref.affine, atol=1e-5)
        assert np.asarray(img.dataobj).dtype == np.int16
    assert (out / "sequence.png").stat().st_size > 0 and (out / "sequence.gif").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observed_phases"] == 5 and len(summary["predicted"]) == 3 and summary["method"] == "ar"
    row = next(csv.DictReader(open(out / "summary.csv")))  # the folder runner's row of the one 4D case
    assert row["case"] == "in" and row["status"] == "done" and row["predicted_phases"] == "3"
    argv = ["motion", "-m", str(motion_model), "-i", str(tmp_path / "in"), "-o", str(out), "--predict", "3"]
    assert main(argv) == 0 and next(csv.DictReader(open(out / "summary.csv")))["status"] == "skipped (exists)"

    capsys.readouterr()
    assert (
        main(["motion", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--predict", "0", "--method", "pca"])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--predict" in err[0]
    two = tmp_path / "two"
    _write_phases(seq, two, ["p0.nii.gz", "p1.nii.gz"], n=2)
    assert main(["motion", "-m", str(motion_model), "-i", str(two), "-o", str(tmp_path / "o3"), "--predict", "2"]) == 1
    assert "at least 3 phases" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_api_predict_motion_with_a_baseline():
    import medct

    seq = _small_sequence(4)
    res = medct.predict_motion(None, seq.phases, 2, method="linear")
    assert len(res.phases) == 2 and res.phases[0].shape == seq.phases[0].shape
    assert res.displacements[0].array.shape == (*seq.phases[0].shape, 3)
    assert np.allclose(res.phases[1].affine, seq.phases[0].affine)


def test_datalist_sequences_with_and_without_their_fields(tmp_path):
    from medct.io import write_volume
    from medct.synthesis.motion import MotionDataModule

    seq = _small_sequence(6)
    a = _write_phases(seq, tmp_path / "a")
    disp = []
    for t, u in enumerate(seq.displacements):
        disp.append(f"a_disp/u_{t:02d}.nii.gz")
        write_volume(Volume(u, seq.phases[0].affine.copy()), tmp_path / disp[-1])
    b = _write_phases(_small_sequence(6, seed=4), tmp_path / "b")
    entries = [
        {"phases": [str(p.relative_to(tmp_path)) for p in a], "displacements": disp},
        {"phases": [str(p.relative_to(tmp_path)) for p in b]},  # registered at set-up
    ]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}))
    dm = MotionDataModule(
        datalist=str(tmp_path / "list.json"),
        context=4,
        sampling=Sampling(patch_size=(16, 16, 16), batch_size=4),
        split=Split(val_fraction=0.2),  # round(2 x 0.2) = 0: both sequences train
    )
    dm.setup()
    assert len(dm.train_seqs) == 2
    (img_a, f_a), (img_b, f_b) = dm.train_seqs
    assert f_a.shape[:2] == (6, 3) and img_a.shape == (1, *f_a.shape[2:]) and not np.any(f_b[0])
    assert np.abs(f_a).max() > 5.0 and np.abs(f_b).max() > 2.0  # given and registered fields both hold the motion
    batch = next(iter(dm.train_dataloader()))
    assert batch["fields"].shape == (4, 5, 3, 16, 16, 16) and batch["image"].shape == (4, 1, 16, 16, 16)
    with pytest.raises(Exception, match="more than data.context"):
        MotionDataModule(datalist=str(tmp_path / "list.json"), context=8).setup()
