"""`medct` command line: segment over files/folders/DICOM, and every bad input a user can give.

Each bad input must give one clear sentence, a non-zero exit, no traceback and no partial output;
a folder run must still finish its good cases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medct.cli import main
from medct.io import Volume, read_volume, write_volume

LABELS = {0: "background", 1: "blob", 2: "rod"}


def _ct(shape: tuple[int, int, int] = (40, 36, 20), spacing: tuple[float, float, float] = (2.0, 2.5, 4.0)) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.normal(0, 50, shape).astype(np.float32) - 500
    array[10:30, 8:28, 5:15] += 600
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-40.0, -45.0, 10.0)
    return Volume(array=array, affine=affine)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("medct: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_segment_file_keeps_geometry_and_writes_summary(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_volume(_ct(), tmp_path / "in" / "case1.nii.gz")
    code, _ = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(tmp_path / "out"), "--preview")
    assert code == 0
    seg = read_volume(tmp_path / "out" / "case1.nii.gz")
    image = read_volume(src)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-6)
    assert set(np.unique(seg.array)) <= set(LABELS)
    assert (tmp_path / "out" / "case1.png").stat().st_size > 1000
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("case,status") and "blob_ml" in summary[0]
    assert summary[1].startswith("case1,done")


def test_segment_skips_existing_unless_overwrite(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_volume(_ct(), tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    assert _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(out))[0] == 0
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    assert _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(out))[0] == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime
    assert "skipped" in (out / "summary.csv").read_text()
    assert _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(out), "--overwrite")[0] == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns != mtime


def test_same_named_inputs_get_distinct_cases(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """x.nii.gz beside x.mha (and x.mhd): each is its own case with its own output and summary row,
    never "skipped (output exists)" with the other scan's result."""
    folder = tmp_path / "in"
    small, large = _ct(), _ct(shape=(44, 40, 24))
    write_volume(small, folder / "x.nii.gz")
    write_volume(large, folder / "x.mha")
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(folder), "-o", str(tmp_path / "out"))
    assert code == 0 and "named 'x_mha'" in err and "named 'x_nii_gz'" in err
    assert read_volume(tmp_path / "out" / "x_nii_gz.nii.gz").shape == small.shape
    assert read_volume(tmp_path / "out" / "x_mha.mha").shape == large.shape
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[:2] for r in rows) == [["x_mha", "done"], ["x_nii_gz", "done"]]


def _bad_cases(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input into `folder`; returns case name -> expected word."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _ct()
    write_volume(good, folder / "good.nii.gz")
    nan = good.with_array(good.array.copy())
    nan.array[3, 3, 3] = np.nan
    write_volume(nan, folder / "nans.nii.gz")
    inf = good.with_array(good.array.copy())
    inf.array[1, 2, 3] = np.inf
    write_volume(inf, folder / "infs.nii.gz")
    write_volume(good.with_array(np.full(good.shape, -1000, np.float32)), folder / "constant.nii.gz")
    (folder / "notes.nii.gz").write_bytes(b"this is not an image")
    full = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((30, 30), np.float32), np.eye(4)), str(folder / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10, 3), np.float32), np.eye(4)), str(folder / "four_d.nii.gz"))
    return {
        "nans": "NaN",
        "infs": "inf",
        "constant": "constant",
        "notes": "",
        "truncated": "",
        "flat2d": "2D",
        "four_d": "4D",
    }


def test_folder_run_finishes_good_cases_and_lists_bad_ones(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _bad_cases(tmp_path / "in")
    out = tmp_path / "out"
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(tmp_path / "in"), "-o", str(out))
    assert code == 1
    assert (out / "good.nii.gz").is_file()
    for name, word in expected.items():
        line = next(line for line in err.splitlines() if line.startswith(f"  failed {name}:"))
        assert word.lower() in line.lower(), line
        assert not (out / f"{name}.nii.gz").exists(), f"partial output for {name}"
    # no temp files left behind by atomic writes
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "summary.csv"]
    statuses = {r.split(",")[0]: r.split(",")[1] for r in (out / "summary.csv").read_text().splitlines()[1:]}
    assert statuses["good"] == "done" and statuses["nans"] == "failed"


@pytest.mark.parametrize("name", ["nans", "constant", "notes", "truncated", "flat2d", "four_d"])
def test_single_bad_file_one_sentence(
    name: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _bad_cases(tmp_path / "in")
    out = tmp_path / "out"
    code, err = _run(
        capsys, "segment", "-m", str(model_dir), "-i", str(tmp_path / "in" / f"{name}.nii.gz"), "-o", str(out)
    )
    assert code == 1
    assert f"failed {name}:" in err
    assert not (out / f"{name}.nii.gz").exists()


def test_missing_path_and_empty_folder(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in _one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"))
    assert code == 1 and "holds no" in _one_error_line(err)
    (tmp_path / "x.txt").write_text("hello")
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(tmp_path / "x.txt"), "-o", str(tmp_path / "o"))
    assert code == 1 and "not a supported volume" in _one_error_line(err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.nii.gz"))


def test_broken_model_folder(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_volume(_ct(), tmp_path / "a.nii.gz")
    missing = tmp_path / "missing_weights"
    shutil.copytree(model_dir, missing)
    (missing / "model.safetensors").unlink()
    code, err = _run(capsys, "segment", "-m", str(missing), "-i", str(src), "-o", str(tmp_path / "o"))
    assert code == 1 and "model.safetensors" in _one_error_line(err)
    corrupt = tmp_path / "corrupt_weights"
    shutil.copytree(model_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, err = _run(capsys, "segment", "-m", str(corrupt), "-i", str(src), "-o", str(tmp_path / "o"))
    assert code == 1 and "corrupt" in _one_error_line(err)
    bad_card = tmp_path / "bad_card"
    shutil.copytree(model_dir, bad_card)
    (bad_card / "medct.json").write_text(json.dumps({"net": {}}))
    code, err = _run(capsys, "segment", "-m", str(bad_card), "-i", str(src), "-o", str(tmp_path / "o"))
    assert code == 1 and "medct.json" in _one_error_line(err)
    assert not (tmp_path / "o" / "a.nii.gz").exists()


def test_dicom_missing_slice_and_two_series(
    model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = sorted((shared_data / "pancreas_ct_cbct" / "planct_dicom_subset20").glob("*.dcm"))
    gap = tmp_path / "gap"
    gap.mkdir()
    for i, f in enumerate(series):
        if i != 10:
            shutil.copy(f, gap / f.name)
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(gap), "-o", str(tmp_path / "o1"))
    assert code == 1 and "slice" in err.lower()
    assert not list((tmp_path / "o1").glob("*.nii.gz"))
    two = tmp_path / "two"
    two.mkdir()
    for f in series + sorted((shared_data / "popi_phase00_10slices_dicom").glob("*.dcm")):
        shutil.copy(f, two / f.name)
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(two), "-o", str(tmp_path / "o2"))
    assert code == 1 and "series" in err.lower()
    assert not list((tmp_path / "o2").glob("*.nii.gz"))


def test_dicom_series_folder_is_segmented(
    model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = shared_data / "popi_phase00_10slices_dicom"
    code, _ = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(tmp_path / "o"))
    assert code == 0
    seg = read_volume(tmp_path / "o" / f"{src.name}.nii.gz")
    image = read_volume(src)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point: a user error is one line on stderr and exit code 1."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medct.cli",
            "segment",
            "-m",
            str(tmp_path),
            "-i",
            str(tmp_path / "none"),
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("medct: error:")


def test_import_medct_cli_does_not_import_torch() -> None:
    code = "import sys, medct.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


REAL_INPUTS = [
    # the two full 512x512x134 volumes take ~15 s each on 2 cores: slow; their crop is fast
    pytest.param("pancreas_ct_cbct/planct.nii.gz", marks=pytest.mark.slow),
    pytest.param("pancreas_ct_cbct/cbct_CB07_on_planct_grid.nii.gz", marks=pytest.mark.slow),
    "pancreas_ct_cbct/crop_cbct_fov/planct_crop.nii.gz",
    "pancreas_ct_cbct/planct_dicom_subset20",
    "totalseg/example_ct.nii.gz",
    "totalseg/example_ct_sm.nii.gz",
    "elastix_lung_small/3DCT_lung_baseline_small.mha",
    "popi_phase00_10slices_dicom",
]


@pytest.mark.parametrize("relpath", REAL_INPUTS)
def test_segment_real_scans_keep_exact_geometry(
    relpath: str, model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every real CT in ../shared/data (NIfTI LPS/RAS, MHA, DICOM) comes back on its own grid."""
    src = shared_data / relpath
    code, _ = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(tmp_path))
    assert code == 0
    outputs = [p for p in tmp_path.iterdir() if p.name != "summary.csv"]
    assert len(outputs) == 1
    seg, image = read_volume(outputs[0]), read_volume(src)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    assert seg.array.dtype == np.uint8
    if outputs[0].name.endswith(".nii.gz") and src.name.endswith(".nii.gz"):
        import nibabel as nib

        a, b = nib.load(str(outputs[0])).header, nib.load(str(src)).header
        assert (int(a["qform_code"]), int(a["sform_code"])) == (int(b["qform_code"]), int(b["sform_code"]))


def test_segment_mr_dicom_rejected_for_ct_model(
    model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DICOM series whose header says MR is refused by a CT model with one sentence."""
    import pydicom

    series = tmp_path / "mr_series"
    series.mkdir()
    for f in sorted((shared_data / "popi_phase00_10slices_dicom").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(series / f.name)
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(series), "-o", str(tmp_path / "o"))
    assert code == 1 and "expects CT" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "-m", "m", "-i", "i", "-o", "o", "--overlap", "1.0"], "the overlap must lie in [0, 1)"),
        (["segment", "-m", "m", "-i", "i", "-o", "o", "--overlap", "half"], "expected a number in [0, 1)"),
        (["segment", "-m", "m", "-i", "i", "-o", "o", "--sw-batch-size", "0"], "whole number >= 1"),
        (["segment", "-m", "m", "-i", "i", "-o", "o", "--device", "gpu"], "cpu, mps, cuda or cuda:N"),
        (["phantom", "-o", "p", "--size", "1,2"], "one or three positive numbers"),
        (["phantom", "-o", "p", "--spacing", "0"], "one or three positive numbers"),
        (["phantom", "-o", "p", "-n", "0"], "whole number >= 1"),
        (["demo", "--epochs", "-3"], "whole number >= 1"),
    ],
)
def test_bad_option_values_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and message in errors[0], err


def test_bad_recipe_values_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown network, a non-number, a missing config and a bad fold: one line, exit 1."""
    from medct.phantom import write_cohort

    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "seg_phantom.yaml")
    write_cohort(tmp_path / "c", n=3, shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
    cases = [
        (["--model.init_args.net.class_path=medct.nets.NoSuchNet"], "has no attribute 'NoSuchNet'"),
        (["--model.init_args.lr=abc"], "Got value: abc"),
        (
            [f"--data.init_args.data_dir={tmp_path / 'c'}", "--data.init_args.split.fold=7"],
            "split.fold must lie in 0..4",
        ),
        ([f"--data.init_args.data_dir={tmp_path / 'c'}", "--data.init_args.keys=[image]"], "keys"),
    ]
    for extra, message in cases:
        code, err = _run(capsys, "fit", "--config", recipe, "--trainer.fast_dev_run=true", *extra)
        assert code == 1 and message in _one_error_line(err), err
    code, err = _run(capsys, "fit", "--config", str(tmp_path / "nope.yaml"))
    assert code == 1 and "does not exist" in _one_error_line(err)
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip's start, no end: truncated
    for ckpt, message in ((tmp_path / "gone.ckpt", "does not exist"), (tmp_path / "cut.ckpt", "not a complete")):
        code, err = _run(capsys, "fit", "--config", recipe, "--ckpt_path", str(ckpt))
        assert code == 1 and message in _one_error_line(err), err


def test_pipelined_folder_run_equals_sequential_and_isolates_write_failures(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-ahead/write-behind run writes the same outputs and summary statuses as a sequential
    one, with bad inputs between good ones; a failing write fails only its own case."""
    import medct.segment_job as runner

    folder = tmp_path / "in"
    _bad_cases(folder)
    for i, seed in enumerate((1, 2)):
        write_volume(
            _ct().with_array(np.random.default_rng(seed).normal(0, 300, (40, 36, 20)).astype(np.float32)),
            folder / f"more{i}.nii.gz",
        )
    import threading

    reports, threads = {}, {}
    real_out = runner._write_output
    for pipeline in (True, False):
        seen: set[str] = set()

        def spy(*args, seen=seen):  # type: ignore[no-untyped-def]
            seen.add(threading.current_thread().name)
            real_out(*args)

        monkeypatch.setattr(runner, "_write_output", spy)
        out = tmp_path / f"out_{pipeline}"
        reports[pipeline] = runner.segment_paths(model_dir, folder, out, device="cpu", pipeline=pipeline)
        threads[pipeline] = seen
    monkeypatch.setattr(runner, "_write_output", real_out)
    # outputs are written on the writer thread when pipelined, on the calling thread when not
    assert all(n.startswith("medct-write") for n in threads[True]) and threads[True]
    assert threads[False] == {threading.current_thread().name}
    assert reports[True].done == reports[False].done == ["good", "more0", "more1"]
    assert [f for f, _ in reports[True].failed] == [f for f, _ in reports[False].failed]
    for name in reports[True].done:
        a = read_volume(tmp_path / "out_True" / f"{name}.nii.gz").array
        b = read_volume(tmp_path / "out_False" / f"{name}.nii.gz").array
        np.testing.assert_array_equal(a, b)
    assert reports[True].network_seconds > 0 and reports[True].run_seconds >= reports[True].network_seconds

    real_write = runner._write_output

    def flaky(labels, image, names, path, fmt):  # type: ignore[no-untyped-def]
        if path.name.startswith("more0"):
            raise OSError(28, "No space left on device")
        real_write(labels, image, names, path, fmt)

    monkeypatch.setattr(runner, "_write_output", flaky)
    report = runner.segment_paths(model_dir, folder, tmp_path / "out_flaky", device="cpu")
    assert (
        report.done == ["good", "more1"]
        and ("more0", "No space left on the output's disk; free space and run again (finished cases are kept).")
        in report.failed
    )
    summary = (tmp_path / "out_flaky" / "summary.csv").read_text()
    assert "more0,failed" in summary and "more1,done" in summary


def test_output_problems_are_found_before_any_work(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """-o naming a file fails at once; temporaries of a killed run are removed by the next run; a
    full disk while writing summary.csv is one sentence, not a traceback."""
    import subprocess

    import medct.runner
    from medct.paths import TEMP_PREFIX

    src = write_volume(_ct(), tmp_path / "in" / "a.nii.gz")
    (tmp_path / "afile").write_text("x")
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(tmp_path / "afile"))
    assert code == 1 and "is a file; -o needs a folder" in _one_error_line(err)

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f"{TEMP_PREFIX}{dead.pid}-a.nii.gz.zz9.nii.gz").write_bytes(b"half a file")
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(out))
    assert code == 0 and "left in" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "summary.csv"]

    def full(path, text):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(medct.runner, "write_text_atomic", full)
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src), "-o", str(out), "--overwrite")
    assert code == 1 and "No space left on device" in _one_error_line(err)


def test_ct_not_in_hu_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CT stored without its rescale (0..4095, air near 0) or an MR-like image given to a CT
    model is refused with one sentence, not segmented as if it were HU."""
    raw = _ct().array + 1024.0  # what the scanner stored; RescaleIntercept -1024 lost
    src = write_volume(_ct().with_array(np.clip(raw, 0, 4095).astype(np.uint16)), tmp_path / "in" / "raw.nii.gz")
    good = write_volume(_ct(), tmp_path / "in" / "hu.nii.gz")
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(src.parent), "-o", str(tmp_path / "out"))
    assert code == 1 and "not CT in HU" in next(line for line in err.splitlines() if "failed raw" in line)
    assert (tmp_path / "out" / "hu.nii.gz").is_file() and not (tmp_path / "out" / "raw.nii.gz").exists()
    assert good.is_file()


def test_folder_entries_that_are_not_cases_get_a_summary_row(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken link named like a scan fails as its case; a stray file gets an 'ignored' row; a
    file name that is not valid UTF-8 is segmented and escaped in summary.csv; notes are silent."""
    import os

    folder = tmp_path / "in"
    write_volume(_ct(), folder / "good.nii.gz")
    (folder / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (folder / "stray.xyz").write_text("?")
    (folder / "notes.txt").write_text("a companion file")
    odd = os.fsdecode(b"caf\xe9.nii.gz")  # Latin-1 bytes in a file name
    write_volume(_ct(), folder / odd)
    code, err = _run(capsys, "segment", "-m", str(model_dir), "-i", str(folder), "-o", str(tmp_path / "out"))
    assert code == 1 and "1 other entries ignored" in err
    rows = {r.split(",")[0]: r.split(",")[1] for r in (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:]}
    assert rows["good"] == "done" and rows["gone"] == "failed" and rows["stray.xyz"] == "ignored"
    assert rows["caf\\xe9"] == "done" and "notes.txt" not in rows


def test_two_runs_on_one_output_folder_do_not_both_segment_a_case(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A case another live run has claimed is skipped (that run writes it); a claim left by a
    killed run is taken over; no claim file is left behind."""
    import subprocess

    from medct.runner import CLAIM_PREFIX

    folder, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b"):
        write_volume(_ct(), folder / f"{name}.nii.gz")
    out.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # stands for a second medct run working on case a
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (out / f"{CLAIM_PREFIX}a").write_text(str(other.pid))
        (out / f"{CLAIM_PREFIX}b").write_text(str(dead.pid))
        code, _ = _run(capsys, "segment", "-m", str(model_dir), "-i", str(folder), "-o", str(out))
    finally:
        other.kill()
        other.wait()
    assert code == 0
    rows = {r.split(",")[0]: r.split(",")[1] for r in (out / "summary.csv").read_text().splitlines()[1:]}
    assert rows == {"a": "skipped (another run is segmenting it)", "b": "done"}
    assert not (out / "a.nii.gz").exists() and (out / "b.nii.gz").is_file()
    assert sorted(p.name for p in out.iterdir()) == [f"{CLAIM_PREFIX}a", "b.nii.gz", "summary.csv"]


def test_demo_says_its_model_is_for_trying_medct(tmp_path: Path, capsys) -> None:
    """The demo's model card and closing line state that it was trained on phantoms, not for real
    scans; `medct segment` with it prints that intended use."""
    from medct.card import read_model_card
    from medct.demo import DEMO_INTENDED_USE

    assert main(["demo", "--quick", "-o", str(tmp_path / "demo")]) == 0
    assert f"note: {DEMO_INTENDED_USE}" in capsys.readouterr().out
    card = read_model_card(tmp_path / "demo" / "model")
    assert card.intended_use == DEMO_INTENDED_USE and "not for real scans" in card.intended_use
    scans = tmp_path / "demo" / "cohort_heldout" / "imagesTr"
    one = sorted(scans.glob("*.nii.gz"))[0]
    assert main(["segment", "-m", str(tmp_path / "demo" / "model"), "-i", str(one), "-o", str(tmp_path / "seg")]) == 0
    assert "the model's intended use: This model was trained" in capsys.readouterr().err
