"""The robustness corpus: every bad input, user mistake and leftover the reliability issue lists,
and the ones the foundation already handled, built small from the real scans in ../shared/data.

Each `Case` writes its inputs into a fresh folder and runs one `medct` command line in-process
(`medct.cli.main`) or one Python API call. `run_case` then checks what a user would: the exit code
(or the exception), one error sentence without a traceback naming the problem, no temporary or
partial file in the output folder, and for accepted inputs the exact geometry of every output.
The group "every command" runs the same scenarios for each command on the folder runner (segment,
segment --adapt, sct, register --pairs, generate, motion): the rerun after a kill -9 (its temporary
and claim left behind), a case claimed by a live run on the same -o, a full disk (-o on an 8 KiB
tmpfs; needs root, skipped otherwise) and -o inside the input folder; and for reduce, export, fit
and turbolift: another run on the same output, a full disk and the output inside the input.
"killed for real" starts each command (the folder commands, reduce, export, fit, turbolift) as a
process of its own, SIGKILLs it the instant an output is complete but not renamed into place
(killed_child.py), then runs it again: every output must be whole and nothing left over.
"tool's reason": ITK's own words for an unreadable file. tests/robustness/test_corpus.py runs
every case (those starting a process of their own are `slow`); bench/robustness.py prints the table.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medct.volume import Volume


@dataclass(frozen=True)
class Case:
    """One corpus entry. `build(work, model)` writes the inputs under `work` and returns the medct
    argv, or a zero-argument callable for an API case. `exit` is the expected exit code (for API
    cases: 0 = returns, 1 = raises a MedCTError); `expect` a phrase the error line (or, on exit 0,
    stderr or summary.csv) must contain; `outputs` the files under work/out that must exist, each
    on the grid of the input named beside it (relative to `work`)."""

    name: str
    group: str
    build: Callable[[Path, Path], list[str] | Callable[[], object]]
    exit: int
    expect: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    disk_kb: int = 0  # > 0: work/out is a tmpfs of this size (a full disk; needs root, skipped otherwise)
    check: Callable[[Path], str] | None = None  # after the run: "" or what is wrong (given `work`)
    slow: bool = False  # starts a medct process of its own (seconds of imports): `slow` in pytest


@dataclass
class Outcome:
    case: str
    group: str
    exit: int
    message: str
    ok: bool
    why: str = ""
    skipped: bool = False  # the case could not be set up here (a tmpfs needs root)


# ----------------------------------------------------------------------------- inputs


def shared_data() -> Path:
    from tests.conftest import SHARED_DATA

    return SHARED_DATA


def real_ct(shape: tuple[int, int, int] = (96, 80, 24)) -> Volume:
    """A crop of the real planning CT (LPS, 1.07 x 1.07 x 3 mm, HU) around the body centre."""
    from medct.io import read_volume

    vol = read_volume(shared_data() / "pancreas_ct_cbct" / "planct.nii.gz")
    c = np.asarray(vol.shape) // 2
    lo = c - np.asarray(shape) // 2
    sl = tuple(slice(int(a), int(a + s)) for a, s in zip(lo, shape, strict=True))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return Volume(np.ascontiguousarray(vol.array[sl]), vol.affine @ shift, {})


def dicom_subset() -> Path:
    return shared_data() / "pancreas_ct_cbct" / "planct_dicom_subset20"


def _copy_series(dst: Path, edit: Callable[[object], None] | None = None, src: Path | None = None) -> Path:
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted((src or dicom_subset()).glob("*.dcm")):
        if edit is None:
            shutil.copy(f, dst / f.name)
            continue
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(dst / f.name)
    return dst


def _write(vol: Volume, path: Path) -> Path:
    from medct.io import write_volume

    return write_volume(vol, path)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray, q: np.ndarray | None, s: np.ndarray | None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(q, code=1 if q is not None else 0)
    img.set_sform(s, code=1 if s is not None else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _segment(work: Path, model: Path, src: str, *extra: str) -> list[str]:
    return ["segment", "-m", str(model), "-i", str(work / src), "-o", str(work / "out"), *extra]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _edited_model(work: Path, model: Path, edit: Callable[[dict], None]) -> Path:
    bad = work / "model"
    shutil.copytree(model, bad)
    card = json.loads((bad / "medct.json").read_text())
    edit(card)
    (bad / "medct.json").write_text(json.dumps(card))
    return bad


# ----------------------------------------------------------------------------- builders


def b_same_name_files(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in" / "x.nii.gz")
    _write(real_ct((80, 64, 20)), work / "in" / "x.mha")
    return _segment(work, model, "in")


def b_same_name_dicom_and_file(work: Path, model: Path) -> list[str]:
    _copy_series(work / "in" / "same")
    _write(real_ct(), work / "in" / "same.nii.gz")
    return _segment(work, model, "in")


def b_ct_stored_values(work: Path, model: Path) -> list[str]:
    vol = real_ct()
    _write(vol.with_array(np.clip(vol.array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)), work / "in.nii.gz")
    return _segment(work, model, "in.nii.gz")


def b_dicom_without_rescale(work: Path, model: Path) -> list[str]:
    def edit(ds: object) -> None:  # what was stored (HU + 1024, unsigned) without the modality LUT
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)  # type: ignore[attr-defined]
        ds.PixelRepresentation = 0  # type: ignore[attr-defined]
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()  # type: ignore[attr-defined]
        del ds.RescaleSlope, ds.RescaleIntercept  # type: ignore[attr-defined]

    _copy_series(work / "series", edit)
    return _segment(work, model, "series")


def b_all_air(work: Path, model: Path) -> list[str]:
    air = np.random.default_rng(0).normal(-1000, 10, (64, 64, 16)).astype(np.int16)
    _write(Volume(air, real_ct().affine, {}), work / "air.nii.gz")
    return _segment(work, model, "air.nii.gz")


def b_mr_values(work: Path, model: Path) -> list[str]:
    vol = real_ct()
    mr = np.clip(vol.array.astype(np.float32) + 1000.0, 0, None) * 0.8  # an MR-like range 0..~2000
    _write(vol.with_array(mr.astype(np.float32)), work / "mr.nii.gz")
    return _segment(work, model, "mr.nii.gz")


def b_mr_dicom(work: Path, model: Path) -> list[str]:
    def edit(ds: object) -> None:
        ds.Modality = "MR"  # type: ignore[attr-defined]

    _copy_series(work / "series", edit, shared_data() / "popi_phase00_10slices_dicom")
    return _segment(work, model, "series")


def b_zero_pixdim(work: Path, model: Path) -> list[str]:
    import struct

    vol = real_ct()
    path = _nifti(work / "z.nii", vol.array, vol.affine, vol.affine, None)
    raw = bytearray(path.read_bytes())
    raw[76 + 12 : 76 + 16] = struct.pack("<f", 0.0)  # pixdim[3] = 0 (nibabel would load it as 1 mm)
    path.write_bytes(bytes(raw))
    return _segment(work, model, "z.nii")


def b_qform_sform_disagree(work: Path, model: Path) -> list[str]:
    vol = real_ct()
    shifted = vol.affine.copy()
    shifted[:3, 3] += (4.0, -3.0, 6.0)
    _nifti(work / "in" / "q.nii.gz", vol.array, vol.affine, vol.affine, shifted)
    return _segment(work, model, "in")


def b_zero_sform_column(work: Path, model: Path) -> list[str]:
    vol = real_ct()
    bad = vol.affine.copy()
    bad[:3, 2] = 0.0
    _nifti(work / "s.nii.gz", vol.array, vol.affine, None, bad)
    return _segment(work, model, "s.nii.gz")


def _card_case(edit: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    def build(work: Path, model: Path) -> list[str]:
        _write(real_ct(), work / "in.nii.gz")
        bad = _edited_model(work, model, edit)
        return ["segment", "-m", str(bad), "-i", str(work / "in.nii.gz"), "-o", str(work / "out")]

    return build


def b_no_series_uid(work: Path, model: Path) -> list[str]:
    def edit(ds: object) -> None:
        del ds.SeriesInstanceUID  # type: ignore[attr-defined]

    _copy_series(work / "series", edit)
    return _segment(work, model, "series")


def b_gantry_tilt(work: Path, model: Path) -> list[str]:
    import pydicom

    files = sorted(dicom_subset().glob("*.dcm"))
    z0 = float(pydicom.dcmread(files[0]).ImagePositionPatient[2])

    def edit(ds: object) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)  # type: ignore[attr-defined]
        ds.ImagePositionPatient = [x, y + (z - z0) * np.tan(np.radians(15.0)), z]  # type: ignore[attr-defined]
        ds.GantryDetectorTilt = 15.0  # type: ignore[attr-defined]

    _copy_series(work / "series", edit)
    return _segment(work, model, "series")


def b_no_preamble(work: Path, model: Path) -> list[str]:
    import pydicom

    dst = work / "series"
    dst.mkdir()
    for f in sorted(dicom_subset().glob("*.dcm")):
        ds = pydicom.dcmread(f)
        with open(dst / f.name, "wb") as out:
            fp = pydicom.filebase.DicomFileLike(out)
            fp.is_implicit_VR, fp.is_little_endian = True, True
            pydicom.filewriter.write_dataset(fp, pydicom.Dataset(ds))
    return _segment(work, model, "series")


def b_two_series_in_subfolders(work: Path, model: Path) -> list[str]:
    _copy_series(work / "study" / "a" / "ct")
    _copy_series(work / "study" / "a" / "popi", src=shared_data() / "popi_phase00_10slices_dicom")
    return _segment(work, model, "study")


def b_output_is_a_file(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in.nii.gz")
    (work / "out").write_text("not a folder")
    return _segment(work, model, "in.nii.gz")


def b_device_cuda(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in.nii.gz")
    return _segment(work, model, "in.nii.gz", "--device", "cuda")


def _option_case(*extra: str) -> Callable[[Path, Path], list[str]]:
    def build(work: Path, model: Path) -> list[str]:
        _write(real_ct(), work / "in.nii.gz")
        return _segment(work, model, "in.nii.gz", *extra)

    return build


def _ckpt_case(content: bytes | None) -> Callable[[Path, Path], list[str]]:
    def build(work: Path, model: Path) -> list[str]:
        recipe = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "seg_phantom.yaml"
        ckpt = work / "last.ckpt"
        if content is not None:
            ckpt.write_bytes(content)
        return ["fit", "--config", str(recipe), "--ckpt_path", str(ckpt)]

    return build


def _api_case(kwargs: dict[str, object], data: str = "volume") -> Callable[[Path, Path], Callable[[], object]]:
    def build(work: Path, model: Path) -> Callable[[], object]:
        import medct

        vol = real_ct()
        if data == "tensor":
            import torch

            return lambda: medct.segment(str(model), torch.from_numpy(vol.array), affine=vol.affine, device="cpu")
        return lambda: medct.segment(str(model), vol, **kwargs)  # type: ignore[arg-type]

    return build


def b_stale_temporaries(work: Path, model: Path) -> list[str]:
    from medct.paths import TEMP_PREFIX

    _write(real_ct(), work / "in.nii.gz")
    (work / "out").mkdir()
    pid = _dead_pid()
    (work / "out" / f"{TEMP_PREFIX}{pid}-in.nii.gz.k9x.nii.gz").write_bytes(b"half")
    (work / "out" / f"{TEMP_PREFIX}{pid}-summary.csv.a1b").write_bytes(b"")
    return _segment(work, model, "in.nii.gz")


def b_broken_link_and_stray(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in" / "good.nii.gz")
    (work / "in" / "gone.nii.gz").symlink_to(work / "nowhere.nii.gz")
    (work / "in" / "stray.xyz").write_text("?")
    (work / "in" / os.fsdecode(b"caf\xe9.nii.gz")).symlink_to(work / "in" / "good.nii.gz")
    return _segment(work, model, "in")


def b_claimed_by_a_live_run(work: Path, model: Path) -> list[str]:
    from medct.runner import CLAIM_PREFIX

    _write(real_ct(), work / "in" / "a.nii.gz")
    _write(real_ct(), work / "in" / "b.nii.gz")
    (work / "out").mkdir()
    (work / "out" / f"{CLAIM_PREFIX}a").write_text(str(os.getpid()))  # "another run" holds case a
    (work / "out" / f"{CLAIM_PREFIX}b").write_text(str(_dead_pid()))  # a killed run's claim
    return _segment(work, model, "in")


def b_truncated_nifti(work: Path, model: Path) -> list[str]:
    path = _write(real_ct(), work / "t.nii.gz")
    path.write_bytes(path.read_bytes()[:2000])
    return _segment(work, model, "t.nii.gz")


def b_nan(work: Path, model: Path) -> list[str]:
    vol = real_ct()
    arr = vol.array.astype(np.float32)
    arr[10, 10, 5] = np.nan
    _write(vol.with_array(arr), work / "nan.nii.gz")
    return _segment(work, model, "nan.nii.gz")


def b_two_d(work: Path, model: Path) -> list[str]:
    import nibabel as nib

    nib.save(nib.Nifti1Image(real_ct().array[:, :, 0], np.eye(4)), work / "flat.nii.gz")
    return _segment(work, model, "flat.nii.gz")


def b_four_d(work: Path, model: Path) -> list[str]:
    import nibabel as nib

    arr = real_ct().array
    nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), np.eye(4)), work / "t4.nii.gz")
    return _segment(work, model, "t4.nii.gz")


def b_missing_slice(work: Path, model: Path) -> list[str]:
    dst = _copy_series(work / "series")
    sorted(dst.iterdir())[10].unlink()
    return _segment(work, model, "series")


def b_corrupt_weights(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in.nii.gz")
    bad = work / "model"
    shutil.copytree(model, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    return ["segment", "-m", str(bad), "-i", str(work / "in.nii.gz"), "-o", str(work / "out")]


def b_missing_input(work: Path, model: Path) -> list[str]:
    return _segment(work, model, "nothing_here")


def b_accepted_real_scans(work: Path, model: Path) -> list[str]:
    """The plain good path on the real data: LPS anisotropic NIfTI, an oblique volume, a DICOM series."""
    from scipy.spatial.transform import Rotation

    vol = real_ct()
    _write(vol, work / "in" / "lps.nii.gz")
    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
    _write(Volume(vol.array, rot @ vol.affine, {}), work / "in" / "oblique.nii.gz")  # oblique, anisotropic
    _copy_series(work / "in" / "series")
    return _segment(work, model, "in")


# -- pretraining (issue 8): medct reduce, pretrained encoders, encoder folders given as models


def _recipe(name: str) -> str:
    return str(Path(__file__).resolve().parents[2] / "configs" / name)


def _encoder_folder(work: Path) -> Path:
    """An encoder folder (card task "encoder") of a small resenc_unet, as `medct export` writes one."""
    import torch

    from medct.checkpoint import ENCODER_TASK, ModelCard, save_model_folder
    from medct.nets import create_net
    from medct.transforms import Preprocessing

    torch.manual_seed(0)
    net = create_net("resenc_unet", filters=[4, 8, 16])
    card = ModelCard(
        "resenc_unet",
        net.net_config["args"],
        {},
        Preprocessing(spacing=(4.0, 4.0, 4.0)),
        (32, 32, 32),
        task=ENCODER_TASK,
        extra={"pretraining": {"method": "spark"}},
    )
    return save_model_folder(net, card, work / "enc")


def b_reduce_corrupt_volume(work: Path, model: Path) -> list[str]:
    _write(real_ct((64, 64, 16)), work / "scans" / "good.nii.gz")
    (work / "scans" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    (work / "out").mkdir()
    return ["reduce", str(work / "scans"), "-o", str(work / "out" / "reduced.json")]


def b_reduce_missing(work: Path, model: Path) -> list[str]:
    return ["reduce", str(work / "nothing"), "-o", str(work / "reduced.json")]


def b_pretrained_encoder_missing(work: Path, model: Path) -> list[str]:
    return [
        "fit",
        "--config",
        _recipe("finetune/seg_phantom.yaml"),
        f"--model.init_args.pretrained_encoder={work / 'no_encoder'}",
    ]


def b_pretrained_encoder_other_backbone(work: Path, model: Path) -> list[str]:
    enc = _encoder_folder(work)  # filters (4, 8, 16); the recipe's network is (16, 32, 64, 128)
    return ["fit", "--config", _recipe("finetune/seg_phantom.yaml"), f"--model.init_args.pretrained_encoder={enc}"]


def b_encoder_folder_as_model(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in" / "ct.nii.gz")
    return ["segment", "-m", str(_encoder_folder(work)), "-i", str(work / "in"), "-o", str(work / "out")]


def b_encoder_folder_to_api(work: Path, model: Path) -> Callable[[], object]:
    import medct

    enc = _encoder_folder(work)
    return lambda: medct.load_model(str(enc))


def b_turbolift_missing(work: Path, model: Path) -> list[str]:
    return ["turbolift", "--config", str(work / "no_chain.yaml")]


def b_turbolift_plain_recipe(work: Path, model: Path) -> list[str]:
    return ["turbolift", "--config", _recipe("finetune/seg_phantom.yaml")]


def b_turbolift_bad_regularizer(work: Path, model: Path) -> list[str]:
    import yaml

    cfg = yaml.safe_load(Path(_recipe("finetune/turbolift_phantom.yaml")).read_text())
    cfg["turbolift"].update(regularizer="l1", output_dir=str(work / "chain"))
    (work / "chain.yaml").write_text(yaml.safe_dump(cfg))
    return ["turbolift", "--config", str(work / "chain.yaml")]


def b_turbolift_stage_name_escapes(work: Path, model: Path) -> list[str]:
    import yaml

    cfg = yaml.safe_load(Path(_recipe("finetune/turbolift_phantom.yaml")).read_text())
    cfg["turbolift"].update(output_dir=str(work / "chain"))
    cfg["turbolift"]["stages"][1]["name"] = "../escaped"
    (work / "chain.yaml").write_text(yaml.safe_dump(cfg))
    return ["turbolift", "--config", str(work / "chain.yaml")]


def b_turbolift_stage_names_differ_in_case(work: Path, model: Path) -> list[str]:
    import yaml

    cfg = yaml.safe_load(Path(_recipe("finetune/turbolift_phantom.yaml")).read_text())
    cfg["turbolift"].update(output_dir=str(work / "chain"))
    cfg["turbolift"]["stages"][0]["name"], cfg["turbolift"]["stages"][1]["name"] = "CBCT", "cbct"
    (work / "chain.yaml").write_text(yaml.safe_dump(cfg))
    return ["turbolift", "--config", str(work / "chain.yaml")]


def _fit_on_datalist(work: Path, items: object, workers: int = 0) -> list[str]:
    """`medct fit` of the phantom recipe on work/list.json (the phantom and data_dir switched off)."""
    (work / "list.json").write_text(items if isinstance(items, str) else json.dumps(items))
    over = ["--data.init_args.data_dir=null", "--data.init_args.phantom=null", f"--data.init_args.datalist={work / 'list.json'}",
            "--data.init_args.labels=[background,body]", f"--data.init_args.num_workers={workers}"]  # fmt: skip
    return [*_fit_args(work, 1), *over]


def _nan_cases(work: Path) -> list[dict[str, str]]:
    vol = real_ct((32, 32, 16))
    arr = vol.array.astype(np.float32)
    arr[::7, ::5, ::3] = np.nan
    _write(vol.with_array((vol.array > -300).astype(np.uint8)), work / "label.nii.gz")
    _write(vol.with_array(arr), work / "nan.nii.gz")
    return [{"image": str(work / "nan.nii.gz"), "label": str(work / "label.nii.gz")}] * 3


def b_fit_datalist_nan(work: Path, model: Path) -> list[str]:
    return _fit_on_datalist(work, {"training": _nan_cases(work)})


def b_fit_datalist_nan_in_a_worker(work: Path, model: Path) -> list[str]:
    """The same, read in a DataLoader worker: its error reaches the main process as traceback text."""
    return _fit_on_datalist(work, {"training": _nan_cases(work)}, workers=1)


def b_fit_datalist_not_json(work: Path, model: Path) -> list[str]:
    return _fit_on_datalist(work, '{"training": [{"image": "a.nii.gz",}]}')


def b_fit_datalist_missing_file(work: Path, model: Path) -> list[str]:
    items = [{"image": str(work / "gone.nii.gz"), "label": str(work / "gone_label.nii.gz")}] * 3
    return _fit_on_datalist(work, {"training": items})


def b_fit_recipe_not_yaml(work: Path, model: Path) -> list[str]:
    (work / "recipe.yaml").write_text("trainer: {max_epochs: 1\nmodel: [\n")
    return ["fit", "--config", str(work / "recipe.yaml")]


def b_adapt_without_norm_affines(work: Path, model: Path) -> list[str]:
    _write(real_ct(), work / "in.nii.gz")  # the corpus model is a MONAI UNet: instance norm without affine
    return _segment(work, model, "in.nii.gz", "--adapt", "tent")


def _register_pair(work: Path) -> tuple[Path, Path]:
    """A fixed and a moving real CT crop (the moving one a few voxels off) for the register cases."""
    vol = real_ct((64, 56, 16))
    shifted = Volume(np.roll(vol.array, (3, -2, 1), axis=(0, 1, 2)), vol.affine.copy(), {})
    return _write(vol, work / "fixed.nii.gz"), _write(shifted, work / "moving.nii.gz")


def _register(work: Path, fixed: Path, moving: Path, *extra: str) -> list[str]:
    return ["register", "-f", str(fixed), "-m", str(moving), "-o", str(work / "out"), "--preset", "rigid", *extra]


def b_register_two_d(work: Path, model: Path) -> list[str]:
    fixed, _ = _register_pair(work)
    vol = real_ct((64, 56, 16))
    flat = _write(Volume(vol.array[:, :, :1].copy(), vol.affine, {}), work / "flat.nii.gz")
    return _register(work, fixed, flat)


def b_register_disjoint(work: Path, model: Path) -> list[str]:
    fixed, _ = _register_pair(work)
    vol = real_ct((64, 56, 16))
    far = vol.affine.copy()
    far[:3, 3] += 2000.0
    return _register(work, fixed, _write(Volume(vol.array, far, {}), work / "far.nii.gz"))


def b_register_empty_mask(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    vol = real_ct((64, 56, 16))
    mask = _write(vol.with_array(np.zeros(vol.shape, np.uint8)), work / "mask.nii.gz")
    return _register(work, fixed, moving, "--fixed-mask", str(mask))


def b_register_labels_other_grid(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    other = real_ct((60, 56, 16))
    labels = _write(other.with_array((other.array > 0).astype(np.uint8)), work / "labels.nii.gz")
    return _register(work, fixed, moving, "--moving-labels", str(labels))


def b_register_pairs_one_bad(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    (work / "broken.nii.gz").write_bytes(b"not a nifti")
    pairs = [{"name": "good", "fixed": "fixed.nii.gz", "moving": "moving.nii.gz"},
             {"name": "bad", "fixed": "fixed.nii.gz", "moving": "broken.nii.gz"}]  # fmt: skip
    (work / "pairs.json").write_text(json.dumps(pairs))
    return ["register", "--pairs", str(work / "pairs.json"), "-o", str(work / "out"), "--preset", "rigid"]


def b_register_nan_point(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    (work / "points.txt").write_text("point\n2\n10.0 -20.0 5.0\nnan 3.0 4.0\n")
    return _register(work, fixed, moving, "--points", str(work / "points.txt"))


def b_register_labels_not_class_indices(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    vol = real_ct((64, 56, 16))
    arr = (vol.array > 0).astype(np.float32)
    arr[0, 0, 0] = np.nan
    labels = _write(vol.with_array(arr), work / "labels.nii.gz")
    return _register(work, fixed, moving, "--moving-labels", str(labels))


def b_register_nan_mask(work: Path, model: Path) -> list[str]:
    fixed, moving = _register_pair(work)
    vol = real_ct((64, 56, 16))
    arr = np.ones(vol.shape, np.float32)
    arr[1, 1, 1] = np.nan
    mask = _write(vol.with_array(arr), work / "mask.nii.gz")
    return _register(work, fixed, moving, "--fixed-mask", str(mask))


def b_register_params_elastix_rejects(work: Path, model: Path) -> list[str]:
    """A parameter file that reads fine but names a component elastix does not have: the message
    must give elastix's reason (from its log, which stays in the output folder), not 'see the log'."""
    fixed, moving = _register_pair(work)
    (work / "bad.txt").write_text(
        '(Transform "NoSuchTransform")\n(Registration "MultiResolutionRegistration")\n'
        '(Metric "AdvancedMattesMutualInformation")\n(Optimizer "AdaptiveStochasticGradientDescent")\n'
    )
    return ["register", "-f", str(fixed), "-m", str(moving), "-o", str(work / "out"), "--params", str(work / "bad.txt")]


def b_register_pairs_bad_names(work: Path, model: Path) -> list[str]:
    """Pair names a datalist from elsewhere may hold: each refused in one sentence, nothing written
    outside -o, the good pair registered."""
    _register_pair(work)
    bad = ["../escaped_pair", str(work / "absolute_pair"), "a/b", "", "nul\x00name", "x" * 260]
    pairs = [{"name": "good", "fixed": "fixed.nii.gz", "moving": "moving.nii.gz"}]
    pairs += [{"name": n, "fixed": "fixed.nii.gz", "moving": "moving.nii.gz"} for n in bad]
    (work / "pairs.json").write_text(json.dumps(pairs))
    return ["register", "--pairs", str(work / "pairs.json"), "-o", str(work / "out"), "--preset", "rigid"]


def b_register_no_inputs(work: Path, model: Path) -> list[str]:
    return ["register", "-o", str(work / "out")]


def _sct_model(work: Path) -> Path:
    """A tiny untrained synthetic-CT model folder (2D U-Net++, 3 slices, CBCT at 4 mm)."""
    import torch

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_tiny_net
    from medct.transforms import Preprocessing

    torch.manual_seed(0)
    net = create_tiny_net("unetpp_2d", in_channels=3)
    card = ModelCard(
        "unetpp_2d", dict(net.net_config["args"]), {}, Preprocessing((4.0, 4.0, 4.0), -1024.0, 3071.0, "CBCT"),
        (32, 32, 3), task="sct", inference={"context": 1, "tta": False},
    )  # fmt: skip
    return save_model_folder(net, card, work / "sct_model")


def _cbct(work: Path, name: str = "cbct.nii.gz") -> Path:
    return _write(real_ct((64, 56, 16)), work / "in" / name)


def b_sct_segmentation_model(work: Path, model: Path) -> list[str]:
    return ["sct", "-m", str(model), "-i", str(_cbct(work)), "-o", str(work / "out")]


def b_sct_folder_nan_and_good(work: Path, model: Path) -> list[str]:
    _cbct(work, "good.nii.gz")
    vol = real_ct((64, 56, 16))
    arr = vol.array.astype(np.float32)
    arr[10, 10, 5] = np.nan
    _write(Volume(arr, vol.affine, {}), work / "in" / "nan.nii.gz")
    return ["sct", "-m", str(_sct_model(work)), "-i", str(work / "in"), "-o", str(work / "out")]


def b_sct_two_d(work: Path, model: Path) -> list[str]:
    vol = real_ct((64, 56, 16))
    flat = _write(Volume(vol.array[:, :, :1].copy(), vol.affine, {}), work / "flat.nii.gz")
    return ["sct", "-m", str(_sct_model(work)), "-i", str(flat), "-o", str(work / "out")]


def _text2ct_model(work: Path) -> Path:
    from tests.conftest import make_text2ct_model

    return make_text2ct_model(work / "t2c")


def b_generate_segmentation_model(work: Path, model: Path) -> list[str]:
    return ["generate", "-m", str(model), "enlarged liver", "-o", str(work / "out" / "g.nii.gz")]


def b_generate_empty_prompt(work: Path, model: Path) -> list[str]:
    return ["generate", "-m", str(_text2ct_model(work)), " ", "-o", str(work / "out" / "g.nii.gz")]


def b_generate_bad_size(work: Path, model: Path) -> list[str]:
    args = ["generate", "-m", str(_text2ct_model(work)), "liver", "--size", "30", "32", "16"]
    return [*args, "-o", str(work / "out" / "g.nii.gz"), "--no-progress"]


def b_generate_missing_part(work: Path, model: Path) -> list[str]:
    folder = _text2ct_model(work)
    (folder / "clip.safetensors").unlink()
    return ["generate", "-m", str(folder), "liver", "-o", str(work / "out" / "g.nii.gz")]


def b_generate_prompts_not_utf8(work: Path, model: Path) -> list[str]:
    (work / "prompts.txt").write_bytes("enlarged liver\nl\u00e9sion h\u00e9patique\n".encode("latin-1"))
    return [
        "generate",
        "-m",
        str(_text2ct_model(work)),
        "--prompts",
        str(work / "prompts.txt"),
        "-o",
        str(work / "out"),
    ]


def b_generate_prompts_binary(work: Path, model: Path) -> list[str]:
    """A volume given as the prompts file by mistake."""
    path = _write(real_ct((16, 16, 4)), work / "ct.nii")
    return ["generate", "-m", str(_text2ct_model(work)), "--prompts", str(path), "-o", str(work / "out")]


def b_truncated_mha(work: Path, model: Path) -> list[str]:
    raw = _write(real_ct((64, 56, 16)), work / "full.mha").read_bytes()
    (work / "in").mkdir()
    (work / "in" / "cut.mha").write_bytes(raw[: len(raw) // 2])
    return _segment(work, model, "in/cut.mha")


def b_mhd_without_raw(work: Path, model: Path) -> list[str]:
    _write(real_ct((64, 56, 16)), work / "in" / "scan.mhd")
    for f in (work / "in").glob("*.raw"):
        f.unlink()
    return _segment(work, model, "in/scan.mhd")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _motion_phases(work: Path, n: int, shift_last: bool = False) -> Path:
    """n small phantom phases in work/phases (phase_00 ...); shift_last puts the last on another grid."""
    from medct.io import write_volume
    from medct.phantom import make_phantom
    from medct.phantom.spec import GridSpec

    img = make_phantom(0, GridSpec(shape=(24, 24, 16), spacing=(8.0, 8.0, 8.0))).image
    folder = work / "phases"
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        v = Volume(np.asarray(img.array), img.affine.copy())
        if shift_last and t == n - 1:
            v.affine[0, 3] += 8.0
        write_volume(v, folder / f"phase_{t:02d}.nii.gz")
    return folder


def b_motion_segmentation_model(work: Path, model: Path) -> list[str]:
    return ["motion", "-m", str(model), "-i", str(_motion_phases(work, 3)), "-o", str(work / "out"), "--predict", "2"]


def b_motion_two_phases(work: Path, model: Path) -> list[str]:
    args = ["motion", "--method", "pca", "-i", str(_motion_phases(work, 2)), "-o", str(work / "out")]
    return [*args, "--predict", "2"]


def b_motion_phase_grids_differ(work: Path, model: Path) -> list[str]:
    args = ["motion", "--method", "pca", "-i", str(_motion_phases(work, 3, shift_last=True)), "-o", str(work / "out")]
    return [*args, "--predict", "2"]


def b_motion_no_such_input(work: Path, model: Path) -> list[str]:
    return ["motion", "--method", "linear", "-i", str(work / "nope.nii.gz"), "-o", str(work / "out"), "--predict", "2"]


# ----------------------------------------------------------------------------- every folder command
# The same leftovers, races, a full disk and an output folder inside the input folder, for each
# command on the folder runner. `_job(name)` writes two cases (one for motion: a 4D scan is one
# case) and returns the argv and the case names; the scenarios below wrap it.


def _job(name: str, work: Path, model: Path) -> tuple[list[str], list[str]]:
    out = str(work / "out")
    if name == "segment":
        for c in ("a", "b"):
            _write(real_ct(), work / "in" / f"{c}.nii.gz")
        return ["segment", "-m", str(model), "-i", str(work / "in"), "-o", out], ["a", "b"]
    if name == "segment --adapt":
        for c in ("a", "b"):
            _write(real_ct(), work / "in" / f"{c}.nii.gz")
        argv = ["segment", "-m", str(model), "-i", str(work / "in"), "-o", out, "--adapt", "cotta"]
        return [*argv, "--adapt-steps", "1"], ["a", "b"]
    if name == "sct":
        for c in ("a", "b"):
            _cbct(work, f"{c}.nii.gz")
        return ["sct", "-m", str(_sct_model(work)), "-i", str(work / "in"), "-o", out, "--no-tta"], ["a", "b"]
    if name == "register --pairs":
        _register_pair(work)
        pairs = [{"name": c, "fixed": "fixed.nii.gz", "moving": "moving.nii.gz"} for c in ("a", "b")]
        (work / "pairs.json").write_text(json.dumps(pairs))
        argv = ["register", "--pairs", str(work / "pairs.json"), "-o", out, "--preset", "rigid", "--no-preview"]
        return argv, ["a", "b"]
    if name == "generate":
        (work / "prompts.txt").write_text("enlarged liver\nnormal abdomen\n")
        argv = ["generate", "-m", str(_text2ct_model(work)), "--prompts", str(work / "prompts.txt"), "-o", out]
        return [*argv, "--steps", "2", "--no-progress"], ["gen_0000_00", "gen_0001_00"]
    if name == "motion":
        argv = ["motion", "--method", "pca", "-i", str(_motion_phases(work, 3)), "-o", out, "--predict", "2"]
        return [*argv, "--no-gif"], ["phases"]
    raise ValueError(name)


FOLDER_COMMANDS = ("segment", "segment --adapt", "sct", "register --pairs", "generate", "motion")
_DOING = {"segment": "segmenting", "segment --adapt": "segmenting", "sct": "synthesising",
          "register --pairs": "registering", "generate": "generating", "motion": "predicting"}  # fmt: skip


# (command, the suffix of its first case's output, what a finished run has): the kill-9 cases
KILLED_JOBS = (
    ("segment", f"{os.sep}a.nii.gz", ("a.nii.gz", "b.nii.gz", "summary.csv")),
    ("segment --adapt", f"{os.sep}a.nii.gz", ("a.nii.gz", "b.nii.gz", "summary.csv")),
    ("sct", f"{os.sep}a.nii.gz", ("a.nii.gz", "b.nii.gz", "summary.csv")),
    ("register --pairs", f"{os.sep}a", ("a/warped.nii.gz", "b/warped.nii.gz", "summary.csv")),
    ("generate", "gen_0000_00.nii.gz", ("gen_0000_00.nii.gz", "gen_0001_00.nii.gz", "summary.csv")),
    ("motion", "predicted_phase_03.nii.gz", ("predicted_phase_03.nii.gz", "predicted_phase_04.nii.gz", "summary.csv")),
)


def _killed_run(name: str) -> Callable[[Path, Path], list[str]]:
    """A run killed with -9 left a temporary and its claim on the first case: the rerun removes
    both and completes every case."""

    def build(work: Path, model: Path) -> list[str]:
        from medct.paths import TEMP_PREFIX
        from medct.runner import CLAIM_PREFIX

        argv, cases = _job(name, work, model)
        (work / "out").mkdir(exist_ok=True)
        pid = _dead_pid()
        (work / "out" / f"{TEMP_PREFIX}{pid}-{cases[0]}.nii.gz.k9x.nii.gz").write_bytes(b"half")
        (work / "out" / f"{CLAIM_PREFIX}{cases[0]}").write_text(str(pid))
        return argv

    return build


def _live_claim(name: str) -> Callable[[Path, Path], list[str]]:
    """Another live run on the same output folder holds the first case: this run leaves it to it."""

    def build(work: Path, model: Path) -> list[str]:
        from medct.runner import CLAIM_PREFIX

        argv, cases = _job(name, work, model)
        (work / "out").mkdir(exist_ok=True)
        (work / "out" / f"{CLAIM_PREFIX}{cases[0]}").write_text(str(os.getpid()))
        return argv

    return build


def _full_disk(name: str) -> Callable[[Path, Path], list[str]]:
    """-o on a disk with no room (a 8 KiB tmpfs): each case fails in one sentence, nothing half-written."""

    def build(work: Path, model: Path) -> list[str]:
        return _job(name, work, model)[0]

    return build


def _output_inside_input(name: str) -> Callable[[Path, Path], list[str]]:
    """-o inside the input folder, already holding an earlier run's outputs: they are not taken for
    input cases (the rerun skips what is done)."""

    def build(work: Path, model: Path) -> list[str]:
        argv, _ = _job(name, work, model)
        first = argv.index("-o") + 1
        argv[first] = str(work / "in" / "out")
        from medct.cli import main

        with contextlib.redirect_stderr(io.StringIO()):
            main(argv)  # the earlier run, whose outputs now sit inside the input folder
        (work / "out").symlink_to(work / "in" / "out")  # the checks look at work/out
        return argv

    return build


def _segmentation_checkpoint(work: Path) -> Path:
    """A Lightning-style checkpoint of a tiny segmentation task (state dict, hyperparameters, card)."""
    import torch

    from medct.finetune.segmentation import SegmentationTask
    from medct.nets import create_tiny_net

    task = SegmentationTask(create_tiny_net("resenc_unet", out_channels=2), labels=["background", "body"])
    ckpt: dict[str, object] = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    path = work / "task.ckpt"
    torch.save(ckpt, path)
    return path


def b_export_full_disk(work: Path, model: Path) -> list[str]:
    return ["export", str(_segmentation_checkpoint(work)), "-o", str(work / "out" / "model")]


def b_fit_full_disk(work: Path, model: Path) -> list[str]:
    """Training whose checkpoint folder is on a full disk: one sentence, and no half-written
    last.ckpt (Lightning's own save moves a temp file across file systems, which copies)."""
    over = [
        "--trainer.max_epochs=1", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={work / 'out'}", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", f"--data.init_args.data_dir={work / 'data'}", "--data.init_args.phantom.n=3",
        "--data.init_args.phantom.shape=[32,32,32]", "--data.init_args.sampling.patch_size=[32,32,32]",
        "--data.init_args.num_workers=0", "--data.init_args.cache_dir=null",
    ]  # fmt: skip
    return ["fit", "--config", _recipe("finetune/seg_phantom.yaml"), *over]


def b_fit_no_logger_but_lr_monitor(work: Path, model: Path) -> list[str]:
    """--trainer.logger=false on a recipe with a LearningRateMonitor: Lightning refuses it at fit start."""
    return [*b_fit_full_disk(work, model), "--trainer.logger=false"]


def b_reduce_full_disk(work: Path, model: Path) -> list[str]:
    for i in range(3):
        _write(real_ct((64, 64, 16)), work / "scans" / f"s{i}.nii.gz")
    (work / "out").mkdir()
    (work / "out" / "earlier_results.bin").write_bytes(bytes(7000))  # the disk (8 KiB) is all but full
    return ["reduce", str(work / "scans"), "-o", str(work / "out" / "reduced.json")]


def b_export_output_inside_a_file(work: Path, model: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "model").write_text("a file where the folder should go")
    return ["export", str(_segmentation_checkpoint(work)), "-o", str(work / "out" / "model")]


# ----------------------------------------------------------------------------- killed for real
# A medct process killed with SIGKILL at the instant one of its outputs is complete but not yet
# renamed into place (tests/robustness/killed_child.py chooses that moment), then the same command
# run again: it must finish every output, and no temporary, claim or half-written file may remain.


class CaseSetupError(RuntimeError):
    """A case could not set up its scenario (the run it was to kill finished, ...): the case fails."""


KILLED_CHILD = Path(__file__).with_name("killed_child.py")
_LIVE: list[subprocess.Popen[bytes]] = []  # stand-ins for other live runs, ended after each case


def _other_live_run() -> int:
    """The pid of a live process that is not this one: another run on the same output folder."""
    proc = subprocess.Popen(["sleep", "600"])
    _LIVE.append(proc)
    return proc.pid


def _end_other_runs() -> None:
    while _LIVE:
        proc = _LIVE.pop()
        proc.kill()
        proc.wait()


def _kill_at(argv: list[str], work: Path, at: int, match: str) -> None:
    """Run `medct argv` in a process of its own, SIGKILLed at its `at`-th rename onto a name ending with `match`."""
    import signal
    import sys

    env = {**os.environ, "MEDCT_KILL_AT": str(at), "MEDCT_KILL_MATCH": match}
    done = subprocess.run(
        [sys.executable, str(KILLED_CHILD), *argv], env=env, cwd=work, capture_output=True, timeout=900
    )
    if done.returncode != -signal.SIGKILL:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise CaseSetupError(f"the run to kill at write {at} of *{match} exited {done.returncode} ({tail[0][:200]})")


def _leftovers(out: Path) -> list[str]:
    """Temporaries and claims anywhere under `out`, except those of other live processes."""
    from medct.paths import TEMP_PREFIX, pid_alive
    from medct.runner import CLAIM_PREFIX

    found = []
    for p in out.rglob("*") if out.is_dir() else []:
        if p.name.startswith(TEMP_PREFIX):
            pid = p.name[len(TEMP_PREFIX) :].split("-", 1)[0]
            if not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))):
                found.append(str(p.relative_to(out)))
        elif p.name.startswith(CLAIM_PREFIX):
            found.append(str(p.relative_to(out)))
    return found


def _complete(*names: str) -> Callable[[Path], str]:
    """A check: each work/out/<name> exists and reads whole (volume, JSON, model folder, checkpoint),
    and nothing is left over under work/out."""

    def check(work: Path) -> str:
        import torch

        from medct.io import read_volume

        out = work / "out"
        for name in names:
            path = out / name
            if not path.exists():
                return f"no {name} after the rerun"
            try:
                if path.is_dir():
                    from medct.api import load_model

                    load_model(path)
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".ckpt":
                    torch.load(path, map_location="cpu", weights_only=True)
                elif path.suffix == ".csv":
                    path.read_text()
                else:
                    read_volume(path)
            except Exception as e:  # noqa: BLE001 - a half-written output is what this looks for
                return f"{name} is not whole ({type(e).__name__}: {str(e)[:120]})"
        left = _leftovers(out)
        return f"left behind: {left}" if left else ""

    return check


def _tiny_chain(work: Path, epochs: int) -> Path:
    """A two-stage Turbolift chain of tiny phantoms writing into work/out."""
    import yaml

    from tests.finetune.test_turbolift import _chain_yaml

    path = _chain_yaml(work)
    cfg = yaml.safe_load(path.read_text())
    cfg["turbolift"]["output_dir"] = str(work / "out")
    cfg["trainer"]["max_epochs"] = epochs
    for stage in cfg["turbolift"]["stages"]:
        stage["data"]["phantom"]["n"] = 3
    path.write_text(yaml.safe_dump(cfg))
    return path


CPU_FIT = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false"]


def _fit_args(work: Path, epochs: int) -> list[str]:
    """`medct fit` of the phantom segmentation recipe, tiny, `epochs` one-batch epochs, into work/out."""
    over = [
        f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={work / 'out'}", f"--data.init_args.data_dir={work / 'data'}",
        "--data.init_args.phantom.n=3", "--data.init_args.phantom.shape=[32,32,32]",
        "--data.init_args.sampling.patch_size=[32,32,32]", "--data.init_args.num_workers=0",
        "--data.init_args.cache_dir=null", *CPU_FIT,
    ]  # fmt: skip
    return ["fit", "--config", _recipe("finetune/seg_phantom.yaml"), *over]


def _killed_job(name: str, at: int, match: str) -> Callable[[Path, Path], list[str]]:
    """A folder command killed at the rename of its first case's output, then run again."""

    def build(work: Path, model: Path) -> list[str]:
        argv, _ = _job(name, work, model)
        _kill_at(argv, work, at, match)
        return argv

    return build


def b_killed_reduce(work: Path, model: Path) -> list[str]:
    for i in range(3):
        _write(real_ct((64, 64, 16)), work / "scans" / f"s{i}.nii.gz")
    argv = ["reduce", str(work / "scans"), "-o", str(work / "out" / "reduced.json")]
    _kill_at(argv, work, 1, "reduced.json")
    return argv


def b_killed_export(work: Path, model: Path) -> list[str]:
    argv = ["export", str(_segmentation_checkpoint(work)), "-o", str(work / "out" / "model")]
    _kill_at(argv, work, 1, f"{os.sep}model")
    return argv


def b_killed_fit(work: Path, model: Path) -> list[str]:
    """Killed while writing the second epoch's last.ckpt; resumed from the first's with --ckpt_path."""
    _kill_at(_fit_args(work, 2), work, 2, "last.ckpt")
    last = work / "out" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CaseSetupError("the killed fit wrote no last.ckpt before its kill")
    return [*_fit_args(work, 3), "--ckpt_path", str(last)]


def b_killed_turbolift(work: Path, model: Path) -> list[str]:
    """Killed while writing the second last.ckpt of the chain (stage 2's first, as Lightning writes
    last.ckpt once per stage here): the rerun skips the finished stage 1 and trains stage 2 again,
    removing the dead run's lock and half-written checkpoint (resuming from a last.ckpt:
    tests/finetune/test_turbolift.py)."""
    argv = ["turbolift", "--config", str(_tiny_chain(work, 2)), "--", *CPU_FIT]
    _kill_at(argv, work, 2, "last.ckpt")
    return argv


def _live_temp_of(target: Path) -> Path:
    """The temporary of another live run writing `target` at this moment."""
    from medct.paths import TEMP_PREFIX

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TEMP_PREFIX}{_other_live_run()}-{target.name}.live"
    tmp.write_bytes(b"being written")
    return tmp


def _keeps_live(then: Callable[[Path], str]) -> Callable[[Path], str]:
    """A check: `then` holds, and the other live run's temporary (`_live_temp_of`) is still there."""

    def check(work: Path) -> str:
        kept = any(p.name.endswith(".live") for p in (work / "out").iterdir())
        return then(work) or ("" if kept else "removed a live run's temporary")

    return check


def b_two_reduce_runs(work: Path, model: Path) -> list[str]:
    for i in range(3):
        _write(real_ct((64, 64, 16)), work / "scans" / f"s{i}.nii.gz")
    argv = ["reduce", str(work / "scans"), "-o", str(work / "out" / "reduced.json")]
    _live_temp_of(work / "out" / "reduced.json")
    return argv


def b_two_export_runs(work: Path, model: Path) -> list[str]:
    _live_temp_of(work / "out" / "model")
    return ["export", str(_segmentation_checkpoint(work)), "-o", str(work / "out" / "model")]


def b_two_fit_runs(work: Path, model: Path) -> list[str]:
    """Another fit in the same default_root_dir was started a moment ago and has not logged yet."""
    from medct.lightning_cli import MedCTCLI

    with contextlib.redirect_stderr(io.StringIO()):
        MedCTCLI(_fit_args(work, 1)[1:], run=False)
    return _fit_args(work, 1)


def _own_version(work: Path) -> str:
    logs = work / "out" / "lightning_logs"
    if any((logs / "version_0").rglob("*.ckpt")):
        return "wrote into the other run's version_0"
    return _complete("lightning_logs/version_1/checkpoints/last.ckpt")(work)


def b_two_turbolift_runs(work: Path, model: Path) -> list[str]:
    from medct.finetune.turbolift import CHAIN_LOCK

    (work / "out").mkdir(parents=True)
    (work / "out" / CHAIN_LOCK).write_text(str(_other_live_run()))
    return ["turbolift", "--config", str(_tiny_chain(work, 1)), "--", *CPU_FIT]


def b_turbolift_full_disk(work: Path, model: Path) -> list[str]:
    return ["turbolift", "--config", str(_tiny_chain(work, 1)), "--", *CPU_FIT]


def _run_once_then(argv: list[str]) -> list[str]:
    from medct.cli import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise CaseSetupError(f"the first run exited {code}")
    return argv


def b_reduce_output_inside_input(work: Path, model: Path) -> list[str]:
    """reduced.json written into the scan folder: the rerun does not take it (or its temporary) for a scan."""
    for i in range(3):
        _write(real_ct((64, 64, 16)), work / "scans" / f"s{i}.nii.gz")
    (work / "out").symlink_to(work / "scans")
    return _run_once_then(["reduce", str(work / "scans"), "-o", str(work / "scans" / "reduced.json")])


def b_motion_output_inside_input(work: Path, model: Path) -> list[str]:
    phases = _motion_phases(work, 3)
    argv = ["motion", "--method", "pca", "-i", str(phases), "-o", str(phases / "out"), "--predict", "2", "--no-gif"]
    (work / "out").symlink_to(phases / "out")
    return _run_once_then(argv)


def b_fit_output_inside_data(work: Path, model: Path) -> list[str]:
    """default_root_dir inside the data folder, run twice: checkpoints are not taken for scans."""
    argv = _fit_args(work, 1)
    argv = [a.replace(f"default_root_dir={work / 'out'}", f"default_root_dir={work / 'data' / 'runs'}") for a in argv]
    (work / "out").symlink_to(work / "data" / "runs", target_is_directory=True)
    return _run_once_then(argv)


def b_turbolift_output_inside_data(work: Path, model: Path) -> list[str]:
    import yaml

    path = _tiny_chain(work, 1)
    cfg = yaml.safe_load(path.read_text())
    cfg["turbolift"]["output_dir"] = str(work / "ct" / "chain")  # inside the first stage's data_dir
    path.write_text(yaml.safe_dump(cfg))
    (work / "out").symlink_to(work / "ct" / "chain", target_is_directory=True)
    return _run_once_then(["turbolift", "--config", str(path), "--", *CPU_FIT])


def _every_command_cases() -> list[Case]:
    cases = []
    for name in FOLDER_COMMANDS:
        cases += [
            Case(f"{name}: rerun after kill -9", G_EVERY, _killed_run(name), 0, "by a run that was killed"),
            Case(f"{name}: a case claimed by a live run", G_EVERY, _live_claim(name), 0,
                 f"another run is {_DOING[name]} it"),
            Case(f"{name}: a full disk", G_EVERY, _full_disk(name), 1, "No space left", disk_kb=8),
        ]  # fmt: skip
    for name in ("segment", "sct"):
        cases.append(Case(f"{name}: -o inside the input folder", G_EVERY, _output_inside_input(name), 0, "2 skipped"))
    for name, match, outputs in KILLED_JOBS:
        cases.append(Case(f"{name}: killed for real, then rerun", G_KILLED, _killed_job(name, 1, match), 0,
                          check=_complete(*outputs), slow=name != "segment"))  # fmt: skip
    cases += [
        Case("reduce: killed for real, then rerun", G_KILLED, b_killed_reduce, 0, check=_complete("reduced.json"),
             slow=True),
        Case("export: killed for real, then rerun", G_KILLED, b_killed_export, 0, check=_complete("model"), slow=True),
        Case("fit: killed for real, resumed with --ckpt_path", G_KILLED, b_killed_fit, 0,
             check=_complete("lightning_logs/version_1/checkpoints/last.ckpt"), slow=True),
        Case("turbolift: killed for real, then rerun", G_KILLED, b_killed_turbolift, 0, "done before, skipped",
             check=_complete("summary.json", "forgetting.csv", "00_ct/done.json", "01_cbct/done.json"), slow=True),
        Case("reduce: another run writing the same file", G_EVERY, b_two_reduce_runs, 0,
             check=_keeps_live(_complete("reduced.json"))),
        Case("export: another run writing the same folder", G_EVERY, b_two_export_runs, 0,
             check=_keeps_live(_complete("model"))),
        Case("fit: another fit started in the same root", G_EVERY, b_two_fit_runs, 0, check=_own_version),
        Case("turbolift: another chain running in the folder", G_EVERY, b_two_turbolift_runs, 1,
             "Another medct turbolift run"),
        Case("turbolift: a full disk", G_EVERY, b_turbolift_full_disk, 1, "No space left", disk_kb=64),
        Case("reduce: -o inside the scan folder", G_EVERY, b_reduce_output_inside_input, 0, "kept 12 of 48",
             check=_complete("reduced.json")),
        Case("motion: -o inside the phase folder", G_EVERY, b_motion_output_inside_input, 0, "1 skipped"),
        Case("fit: default_root_dir inside the data folder", G_EVERY, b_fit_output_inside_data, 0),
        Case("turbolift: output_dir inside a stage's data", G_EVERY, b_turbolift_output_inside_data, 0,
             "done before, skipped", check=_complete("summary.json")),
    ]  # fmt: skip
    cases += [
        Case("export: a full disk", G_EVERY, b_export_full_disk, 1, "No space left", disk_kb=8),
        Case("export: -o is a file", G_EVERY, b_export_output_inside_a_file, 1, "is a file"),
        Case("reduce: a full disk", G_EVERY, b_reduce_full_disk, 1, "No space left", disk_kb=8),
        Case("fit: a full disk", G_EVERY, b_fit_full_disk, 1, "No space left", disk_kb=64),
        Case(
            "fit: no logger but a LearningRateMonitor",
            G_EVERY,
            b_fit_no_logger_but_lr_monitor,
            1,
            "Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger",
        ),
    ]
    return cases


G_EVERY = "every command"
G_KILLED = "killed for real"
G_TOOLS = "tool's reason"
G_WRONG, G_DICOM, G_MISTAKE, G_LEFTOVER, G_BEFORE, G_PRETRAIN, G_FINETUNE, G_REGISTER, G_SCT, G_GENERATE, G_MOTION = (
    "wrong result",
    "hospital DICOM",
    "user mistake",
    "left behind",
    "handled before",
    "pretraining",
    "fine-tuning",
    "registration",
    "synthetic CT",
    "text-to-CT",
    "4D motion",
)

CASES: list[Case] = [
    Case("same name: x.nii.gz + x.mha", G_WRONG, b_same_name_files, 0, "named 'x_mha'",
         {"x_nii_gz.nii.gz": "in/x.nii.gz", "x_mha.mha": "in/x.mha"}),
    Case("same name: DICOM folder + NIfTI", G_WRONG, b_same_name_dicom_and_file, 0, "named 'same_dicom'",
         {"same_dicom.nii.gz": "in/same", "same_nii_gz.nii.gz": "in/same.nii.gz"}),
    Case("CT stored 0..4095 (no rescale)", G_WRONG, b_ct_stored_values, 1, "not CT in HU"),
    Case("DICOM CT without RescaleSlope/Intercept", G_WRONG, b_dicom_without_rescale, 1, "not CT in HU"),
    Case("all-air volume", G_WRONG, b_all_air, 0, "no body found", {"air.nii.gz": "air.nii.gz"}),
    Case("MR intensities to a CT model", G_WRONG, b_mr_values, 1, "not CT in HU"),
    Case("MR DICOM to a CT model", G_WRONG, b_mr_dicom, 1, "expects CT"),
    Case("NIfTI zero pixdim (qform)", G_WRONG, b_zero_pixdim, 1, "voxel size must be positive"),
    Case("NIfTI qform and sform disagree", G_WRONG, b_qform_sform_disagree, 0, "used the sform",
         {"q.nii.gz": "in/q.nii.gz"}),
    Case("NIfTI zero sform column", G_WRONG, b_zero_sform_column, 1, "degenerate sform"),
    Case("card: labels vs output channels", G_WRONG,
         _card_case(lambda c: c["labels"].update({"9": "extra"})), 1, "out_channels"),
    Case("card: zero spacing", G_WRONG,
         _card_case(lambda c: c["preprocessing"].update(spacing=[0, 4, 4])), 1, "preprocessing.spacing"),
    Case("card: hu_min == hu_max", G_WRONG,
         _card_case(lambda c: c["preprocessing"].update(hu_min=0.0, hu_max=0.0)), 1, "hu_min must be below"),
    Case("card: zero patch size", G_WRONG,
         _card_case(lambda c: c.update(patch_size=[0, 32, 32])), 1, "patch_size"),
    Case("card: newer format", G_WRONG,
         _card_case(lambda c: c.update(format_version=99)), 1, "newer than this medct reads"),
    Case("DICOM without SeriesInstanceUID", G_DICOM, b_no_series_uid, 0, "", {"series.nii.gz": "series"}),
    Case("DICOM gantry tilt 15 degrees", G_DICOM, b_gantry_tilt, 0, "gantry tilt 15.0", {"series.nii.gz": "series"}),
    Case("DICOM without preamble", G_DICOM, b_no_preamble, 0, "", {"series.nii.gz": "series"}),
    Case("two series in subfolders", G_DICOM, b_two_series_in_subfolders, 1, "--series-uid"),
    Case("-o is a file", G_MISTAKE, b_output_is_a_file, 1, "is a file; -o needs a folder"),
    Case("--device cuda", G_MISTAKE, b_device_cuda, -1, "no CUDA GPU"),  # -1: 0 with a GPU, 1 without
    Case("--overlap 1.5", G_MISTAKE, _option_case("--overlap", "1.5"), 2, "the overlap must lie in [0, 1)"),
    Case("--sw-batch-size 0", G_MISTAKE, _option_case("--sw-batch-size", "0"), 2, "whole number >= 1"),
    Case("--sw-batch-size -3", G_MISTAKE, _option_case("--sw-batch-size", "-3"), 2, "whole number >= 1"),
    Case("fit --ckpt_path missing", G_MISTAKE, _ckpt_case(None), 1, "does not exist"),
    Case("fit --ckpt_path truncated", G_MISTAKE, _ckpt_case(b"PK\x03\x04" + b"\0" * 64), 1, "not a complete"),
    Case("API overlap='0.5'", G_MISTAKE, _api_case({"overlap": "0.5", "device": "cpu"}), 1, "overlap must be a number"),
    Case("API tta='no'", G_MISTAKE, _api_case({"tta": "no", "device": "cpu"}), 1, "tta must be True or False"),
    Case("API torch tensor + affine", G_MISTAKE, _api_case({}, data="tensor"), 0),
    Case("stale temporaries of a killed run", G_LEFTOVER, b_stale_temporaries, 0, "by a run that was killed",
         {"in.nii.gz": "in.nii.gz"}),
    Case("broken link, stray file, non-UTF-8 name", G_LEFTOVER, b_broken_link_and_stray, 1, "other entries ignored",
         {"good.nii.gz": "in/good.nii.gz"}),
    Case("case claimed by a live run", G_LEFTOVER, b_claimed_by_a_live_run, 0, "another run is segmenting it",
         {"b.nii.gz": "in/b.nii.gz"}),
    Case("truncated NIfTI", G_BEFORE, b_truncated_nifti, 1, "truncated or corrupt"),
    Case("NaN voxels", G_BEFORE, b_nan, 1, "NaN"),
    Case("2D image", G_BEFORE, b_two_d, 1, "2D"),
    Case("4D image", G_BEFORE, b_four_d, 1, "4D"),
    Case("DICOM missing slice", G_BEFORE, b_missing_slice, 1, "misses about 1 slice"),
    Case("corrupt weights", G_BEFORE, b_corrupt_weights, 1, "corrupt or not a safetensors"),
    Case("input path missing", G_BEFORE, b_missing_input, 1, "does not exist"),
    Case("real LPS, oblique and DICOM inputs", G_BEFORE, b_accepted_real_scans, 0, "",
         {"lps.nii.gz": "in/lps.nii.gz", "oblique.nii.gz": "in/oblique.nii.gz", "series.nii.gz": "in/series"}),
    Case("reduce: a corrupt volume in the folder", G_PRETRAIN, b_reduce_corrupt_volume, 1, "could not be read"),
    Case("reduce: folder missing", G_PRETRAIN, b_reduce_missing, 1, "does not exist"),
    Case("fit: pretrained_encoder missing", G_PRETRAIN, b_pretrained_encoder_missing, 1, "does not exist"),
    Case("fit: encoder of another backbone", G_PRETRAIN, b_pretrained_encoder_other_backbone, 1, "does not fit network"),
    Case("segment -m an encoder folder", G_PRETRAIN, b_encoder_folder_as_model, 1, "encoder"),
    Case("API load_model(encoder folder)", G_PRETRAIN, b_encoder_folder_to_api, 1, "encoder"),
    Case("turbolift: chain file missing", G_FINETUNE, b_turbolift_missing, 1, "does not exist"),
    Case("turbolift: a plain recipe", G_FINETUNE, b_turbolift_plain_recipe, 1, "has no 'turbolift:' section"),
    Case("turbolift: unknown regularizer", G_FINETUNE, b_turbolift_bad_regularizer, 1, "must be none, l2 or ewc"),
    Case("turbolift: a stage name that escapes", G_FINETUNE, b_turbolift_stage_name_escapes, 1, "is refused"),
    Case("turbolift: stage names differing in case", G_FINETUNE, b_turbolift_stage_names_differ_in_case, 1,
         "also ignoring case"),
    Case("fit: a NaN volume in the datalist", G_FINETUNE, b_fit_datalist_nan, 1, "NaN or infinite voxels"),
    Case("fit: a NaN volume read by a worker", G_FINETUNE, b_fit_datalist_nan_in_a_worker, 1, "NaN or infinite voxels"),
    Case("fit: a datalist that is not JSON", G_FINETUNE, b_fit_datalist_not_json, 1, "is not a readable JSON file"),
    Case("fit: a datalist naming a missing file", G_FINETUNE, b_fit_datalist_missing_file, 1, "does not exist"),
    Case("fit: a recipe that is not YAML", G_FINETUNE, b_fit_recipe_not_yaml, 1, "Problems parsing config"),
    Case("segment --adapt tent, no norm affines", G_FINETUNE, b_adapt_without_norm_affines, 1, "normalisation layers"),
    Case("--adapt-steps 0", G_FINETUNE, _option_case("--adapt", "tent", "--adapt-steps", "0"), 2, "whole number >= 1"),
    Case("--adapt-reset sometimes", G_FINETUNE, _option_case("--adapt", "cotta", "--adapt-reset", "sometimes"), 2,
         "invalid choice"),
    Case("register: a 2D moving image", G_REGISTER, b_register_two_d, 1, "is a 2D image"),
    Case("register: fields of view do not overlap", G_REGISTER, b_register_disjoint, 1, "do not overlap"),
    Case("register: empty fixed mask", G_REGISTER, b_register_empty_mask, 1, "mask is empty"),
    Case("register: labels on another grid", G_REGISTER, b_register_labels_other_grid, 1, "moving labels and moving image"),
    Case("register: pairs, one unreadable", G_REGISTER, b_register_pairs_one_bad, 1, "bad",
         {"good/warped.nii.gz": "fixed.nii.gz"}),
    Case("register: no -f/-m or --pairs", G_REGISTER, b_register_no_inputs, 1, "Give -f FIXED"),
    Case("register: a NaN point coordinate", G_REGISTER, b_register_nan_point, 1, "not a finite number"),
    Case("register: a fixed mask with NaN", G_REGISTER, b_register_nan_mask, 1, "mask holds NaN or infinite"),
    Case("register: moving labels with NaN", G_REGISTER, b_register_labels_not_class_indices, 1,
         "holds NaN or infinite values"),
    Case("register: a parameter file elastix rejects", G_REGISTER, b_register_params_elastix_rejects, 1,
         "could not be created: NoSuchTransform"),
    Case("register: pair names that escape -o", G_REGISTER, b_register_pairs_bad_names, 1, "is refused",
         {"good/warped.nii.gz": "fixed.nii.gz"}),
    Case("sct: a segmentation model", G_SCT, b_sct_segmentation_model, 1, "not a synthetic-CT model"),
    Case("sct: folder with a NaN CBCT", G_SCT, b_sct_folder_nan_and_good, 1, "NaN",
         {"good.nii.gz": "in/good.nii.gz"}),
    Case("sct: a 2D image", G_SCT, b_sct_two_d, 1, "2D"),
    Case("generate: a segmentation model", G_GENERATE, b_generate_segmentation_model, 1, "not a text-to-CT model"),
    Case("generate: an empty prompt", G_GENERATE, b_generate_empty_prompt, 1, "prompt is empty"),
    Case("generate: a size the VAE cannot code", G_GENERATE, b_generate_bad_size, 1, "multiple of 8"),
    Case("generate: a model without its CLIP part", G_GENERATE, b_generate_missing_part, 1, "lacks its 'clip' part"),
    Case("generate: a prompts file not in UTF-8", G_GENERATE, b_generate_prompts_not_utf8, 1, "is not UTF-8 text (line 2"),
    Case("generate: a volume as the prompts file", G_GENERATE, b_generate_prompts_binary, 1, "is not"),
    Case("truncated MHA: ITK's reason", G_TOOLS, b_truncated_mha, 1, "data not read completely"),
    Case("MHD whose .raw is missing: ITK's reason", G_TOOLS, b_mhd_without_raw, 1, "Cannot open data file"),
    Case("motion: a segmentation model", G_MOTION, b_motion_segmentation_model, 1, "not a motion model"),
    Case("motion: only two phases", G_MOTION, b_motion_two_phases, 1, "at least 3 phases"),
    Case("motion: phases on different grids", G_MOTION, b_motion_phase_grids_differ, 1, "different voxel grids"),
    Case("motion: no such input", G_MOTION, b_motion_no_such_input, 1, "does not exist"),
]  # fmt: skip
CASES += _every_command_cases()


# ----------------------------------------------------------------------------- running


def _stray_files(out: Path) -> list[str]:
    """Temporaries this run should not have left (another live run's, and claims, are not ours)."""
    from medct.paths import TEMP_PREFIX, pid_alive

    def others(name: str) -> bool:
        pid = name[len(TEMP_PREFIX) :].split("-", 1)[0]
        return pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))

    if not out.is_dir():
        return []
    return [
        p.name for p in out.iterdir() if (p.name.startswith(TEMP_PREFIX) or ".tmp" in p.name) and not others(p.name)
    ]


def run_case(case: Case, work: Path, model: Path) -> Outcome:
    """Build and run one case in `work` (an empty folder); check it as the corpus docstring says."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        try:
            target = case.build(work, model)
        except CaseSetupError as e:
            return Outcome(case.name, case.group, 0, "", False, f"set-up failed: {e}")
        if case.disk_kb:
            if not _mount_tmpfs(work / "out", case.disk_kb):
                return Outcome(case.name, case.group, 0, "", True, "a small tmpfs needs root", skipped=True)
            try:
                return _run_built(case, work, target)
            finally:
                subprocess.run(["umount", str(work / "out")], check=False, capture_output=True)
        return _run_built(case, work, target)
    finally:
        _end_other_runs()


def _mount_tmpfs(folder: Path, kb: int) -> bool:
    """Mount a tmpfs of `kb` KiB at `folder` (keeping what the build put there); False when not root."""
    if os.geteuid() != 0:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    kept = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        return False
    for name, data in kept.items():
        (folder / name).write_bytes(data)
    return True


def _run_built(case: Case, work: Path, target: list[str] | Callable[[], object]) -> Outcome:
    from medct.cli import main
    from medct.errors import MedCTError
    from medct.io import read_volume

    err, said = io.StringIO(), io.StringIO()
    message = ""
    expected_exit = case.exit if case.exit >= 0 else (0 if _has_cuda() else 1)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(said):
        if callable(target):  # an API case
            try:
                target()
                code = 0
            except MedCTError as e:
                code, message = 1, str(e)
            except Exception as e:  # noqa: BLE001 - anything else is a finding of the corpus
                code, message = 99, f"{type(e).__name__}: {e}"
        else:
            try:
                code = main(target)
            except SystemExit as e:  # argparse's exit 2 for bad option values
                code = int(e.code or 0)
            except Exception as e:  # noqa: BLE001
                code, message = 99, f"uncaught {type(e).__name__}: {e}"
    text = err.getvalue()
    lines = [line for line in text.splitlines() if ": error:" in line or line.startswith("  failed ")]
    if not message:
        message = lines[0] if lines else ""

    def fail(why: str) -> Outcome:
        return Outcome(case.name, case.group, code, message or text.strip()[-200:], False, why)

    if "Traceback" in text:
        return fail("a traceback reached the user")
    if code != expected_exit:
        return fail(f"exit {code}, expected {expected_exit}")
    summary = work / "out" / "summary.csv"
    haystack = text + said.getvalue() + (summary.read_text() if summary.is_file() else "") + message
    phrase = case.expect if case.exit >= 0 or expected_exit == 1 else ""
    if phrase and phrase not in haystack:
        return fail(f"the message does not say '{phrase}'")
    if code != 0 and not callable(target) and code != 2 and len([x for x in lines if ": error:" in x]) > 1:
        return fail("more than one error line")
    stray = _stray_files(work / "out")
    if stray:
        return fail(f"left behind: {stray}")
    if case.check is not None:
        wrong = case.check(work)
        if wrong:
            return fail(wrong)
    for out_name, src in case.outputs.items():
        out_path = work / "out" / out_name
        if not out_path.is_file():
            return fail(f"no output {out_name}")
        a, b = read_volume(out_path), read_volume(work / src)
        if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-4):
            return fail(f"{out_name} is not on its input's grid")
    if not message:  # what the user read last: medct's own line, else the command's printout
        own = [ln for ln in text.splitlines() if ln.startswith("medct")]
        printed = [ln for ln in said.getvalue().splitlines() if ln.strip()]
        message = (own or printed or text.strip().splitlines() or [""])[-1][:200]
    return Outcome(case.name, case.group, code, message, True)
