"""Run a segmentation model over a file, a folder of scans or a DICOM series folder.

This is the engine of `medct segment`, kept apart from argument parsing so that notebooks and
tests can call it. Behaviour a user of TotalSegmentator/nnU-Net expects:

- while the network runs on one case, the next one is read and prepared (`Predictor.prepare`:
  resampled onto the network grid, body mask) and the previous one finished (`Predictor.finish`:
  labels back on its own grid) and written: a bounded read-ahead/write-behind of one case each;
- every readable case is segmented; a bad case (unreadable, NaN, 2D, wrong modality, ...) is
  reported and skipped, and the run still finishes the good ones (exit 1 if any failed);
- outputs that exist are skipped unless `overwrite`; each output is written atomically, so no
  half-written file is ever left behind;
- output label maps carry the input's exact geometry; NIfTI/MHA/NRRD inputs keep their format,
  DICOM series are written as NIfTI, or with `output_format` "dicom-seg" / "rtstruct" as a
  DICOM-SEG or RTSTRUCT file referencing the source series (`medct.dicom_out`; DICOM inputs only);
- `summary.csv` lists every case with its status and the volume of each label in mL.
"""

from __future__ import annotations

import csv
import io as _io
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medct.errors import ConfigError, InputPathError, InvalidVolumeError, MedCTError, UnreadableVolumeError
from medct.io import is_dicom_file
from medct.paths import TEMP_PREFIX, pid_alive, remove_stale_temps, volume_suffix, write_text_atomic
from medct.volume import Volume

# Files a scan folder commonly holds next to the scans; they are not cases and not errors.
IGNORED_SUFFIXES = (".json", ".csv", ".txt", ".md", ".png", ".jpg", ".raw", ".zraw", ".log", ".xlsx")


@dataclass
class Case:
    """One scan to segment: a volume file or a DICOM series folder."""

    name: str
    path: Path
    kind: str  # "file" | "dicom"

    @property
    def output_suffix(self) -> str:
        if self.kind == "dicom":
            return ".nii.gz"
        suffix = volume_suffix(self.path)
        return ".mha" if suffix == ".mhd" else suffix


@dataclass
class RunReport:
    """What a folder run did: case names by outcome, failures with their one-line reason, and the
    seconds spent in network forward passes and in Predictor.run (forward + blending) over all segmented cases."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # folder entries that are not cases
    network_seconds: float = 0.0  # network forward passes
    run_seconds: float = 0.0  # Predictor.run: forward passes + blending the tiles (main thread)


class _Job:
    """One case of a folder run: where its output goes and its summary row."""

    def __init__(self, case: Case, out_dir: Path, output_format: str) -> None:
        self.case = case
        self.output_format = output_format
        suffix = case.output_suffix if output_format == "nifti" else DICOM_OUTPUT_SUFFIX[output_format]
        self.out_path = out_dir / f"{case.name}{suffix}"
        self.row: dict[str, object] = {
            "case": case.name,
            "input": str(case.path),
            "output": str(self.out_path),
            "error": "",
        }
        self.network_seconds = 0.0
        self.run_seconds = 0.0
        self.start = 0.0

    def check_format(self) -> None:
        if self.output_format != "nifti" and self.case.kind != "dicom":
            raise InvalidVolumeError(
                f"'{self.case.path}' is not a DICOM series; --output-format {self.output_format} needs DICOM input."
            )

    def needs_run(self, overwrite: bool) -> bool:
        """Whether the network must run (a wrong output format fails when the case comes up)."""
        ok_format = self.output_format == "nifti" or self.case.kind == "dicom"
        return ok_format and (overwrite or not self.out_path.exists())

    def fail(self, e: BaseException, debug: bool) -> None:
        if isinstance(e, MedCTError):
            message = str(e)
        else:
            if debug:
                traceback.print_exception(e)
            message = f"{type(e).__name__}: {e}".splitlines()[0]
        self.row.update(status="failed", error=message)


class _Inline:
    """An executor that runs each task at once in the calling thread (`pipeline=False`)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future, as a thread pool does
            future.set_exception(e)
        return future


def _executor(pipeline: bool, name: str) -> ThreadPoolExecutor | _Inline:
    return ThreadPoolExecutor(1, thread_name_prefix=name) if pipeline else _Inline()


def _settle(job: _Job, future: Future[None], debug: bool) -> None:
    """Wait for a case's write; its failure (disk full, ...) fails that case only."""
    try:
        future.result()
    except Exception as e:  # noqa: BLE001
        job.fail(e, debug)
    job.row["seconds"] = f"{time.perf_counter() - job.start:.2f}"


CLAIM_PREFIX = ".medct-claim-"  # + case name: the run (pid inside) segmenting that case now


def _claim(out_dir: Path, case: str) -> bool:
    """Take the case for this process (an O_EXCL claim file holding our pid); False when a live
    process holds it. A claim left by a dead process (kill -9) is taken over."""
    path = out_dir / f"{CLAIM_PREFIX}{case}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                return False
            path.unlink(missing_ok=True)  # its run died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _release(out_dir: Path, case: str) -> None:
    (out_dir / f"{CLAIM_PREFIX}{case}").unlink(missing_ok=True)


def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and is_dicom_file(p) for p in folder.rglob("*"))


def discover_cases(input_path: str | os.PathLike[str], ignored: list[tuple[Path, str]] | None = None) -> list[Case]:
    """The cases under `input_path`: a volume file, a DICOM file/folder, or a folder of them.

    ignored: if given, gets (path, reason) for each entry of the folder that is not a case and not
    an expected companion file (IGNORED_SUFFIXES, hidden files), e.g. a stray 'scan.xyz'."""
    path = Path(input_path)
    if not path.exists():
        raise InputPathError(f"Input '{path}' does not exist.")
    if path.is_file():
        if volume_suffix(path):
            return [Case(path.name[: -len(volume_suffix(path))], path, "file")]
        if is_dicom_file(path):
            return [Case(path.parent.name, path.parent, "dicom")]
        raise UnreadableVolumeError(
            f"'{path}' is not a supported volume (NIfTI .nii/.nii.gz, MHA/MHD, NRRD, or a DICOM series)."
        )
    cases: list[Case] = []
    direct_dicom = False
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if volume_suffix(entry) and (entry.is_file() or entry.is_symlink()):  # a broken link fails as its case
            cases.append(Case(entry.name[: -len(volume_suffix(entry))], entry, "file"))
        elif entry.is_file():
            if is_dicom_file(entry):
                direct_dicom = True
            elif ignored is not None and not entry.name.lower().endswith(IGNORED_SUFFIXES):
                ignored.append((entry, "not a volume (NIfTI, MHA/MHD, NRRD) or DICOM file"))
        elif entry.is_dir():
            if _holds_dicom(entry):
                cases.append(Case(entry.name, entry, "dicom"))
            elif ignored is not None:
                ignored.append((entry, "a folder without DICOM images"))
        elif ignored is not None:
            ignored.append((entry, "a broken link" if entry.is_symlink() else "not a regular file"))
    if direct_dicom:
        # The folder itself is a DICOM series folder (`-i DICOM_DIR`).
        cases.insert(0, Case(path.name, path, "dicom"))
    if not cases:
        raise InputPathError(f"Folder '{path}' holds no NIfTI, MHA/MHD, NRRD or DICOM scans.")
    return unique_case_names(cases)


def _case_tag(case: Case) -> str:
    """What tells same-named cases apart: the file suffix ("mha", "nii_gz") or "dicom"."""
    return "dicom" if case.kind == "dicom" else volume_suffix(case.path).lstrip(".").replace(".", "_")


def unique_case_names(cases: list[Case]) -> list[Case]:
    """Cases whose names (and so output files) would collide -- `x.mha` beside `x.mhd`, a DICOM
    folder `same/` beside `same.nii.gz` -- are all renamed `<name>_<suffix>` (`x_mha`, `x_mhd`,
    `same_dicom`, `same_nii_gz`), so that no case's output or summary row is another's; each
    renaming is printed once."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.name] = counts.get(case.name, 0) + 1
    out, taken = [], {c.name for c in cases if counts[c.name] == 1}
    for case in cases:
        if counts[case.name] == 1:
            out.append(case)
            continue
        name = f"{case.name}_{_case_tag(case)}"
        while name in taken:  # x_mha.nii.gz and x.mha.nii.gz ... keep going until free
            name += "_"
        taken.add(name)
        print(
            f"medct segment: '{case.path.name}' shares its case name with another input; named '{name}'.",
            file=sys.stderr,
        )
        out.append(Case(name, case.path, case.kind))
    return out


def prepare_output_folder(output_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder, check that it can be written (before any work) and remove the
    temporaries that killed runs left in it."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputPathError(f"Output '{out}' is a file; -o needs a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f"{TEMP_PREFIX}{os.getpid()}-probe.", dir=out):
            pass
    except OSError as e:
        raise InputPathError(f"Output folder '{out}' cannot be written ({e.strerror or e}).") from None
    for stale in remove_stale_temps(out):
        print(f"medct segment: removed '{stale.name}', left in {out} by a run that was killed.", file=sys.stderr)
    return out


def label_volumes_ml(
    labels: np.ndarray, spacing: tuple[float, float, float], names: dict[int, str]
) -> dict[str, float]:
    """Volume in mL of each named foreground label (0 is background)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    import torch  # loaded already by the inference that made `labels`; kept out of `import medct.cli`

    # torch's bincount counts uint8 directly; numpy's first copies the volume to int64 (~35x slower)
    counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(labels)).reshape(-1), minlength=max(names) + 1)
    return {name: float(counts[i]) * voxel_ml for i, name in sorted(names.items()) if i != 0}


def _printable(value: object) -> object:
    if isinstance(value, str):
        return os.fsencode(value).decode("utf-8", "backslashreplace")  # the name's own bytes, escaped
    return value


def _write_summary(rows: list[dict[str, object]], label_names: list[str], path: Path) -> None:
    columns = ["case", "status", "input", "output", "seconds", "network_seconds", "error", "note"] + [
        f"{n}_ml" for n in label_names
    ]
    if any("adapt" in row for row in rows):  # test-time adaptation: steps, time, memory, guard per case
        from medct.adaptation import ADAPT_COLUMNS

        columns += list(ADAPT_COLUMNS)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:  # file names that are not valid UTF-8 (surrogate escapes) as \\x.. escapes
        writer.writerow({k: _printable(v) for k, v in row.items()})
    try:
        write_text_atomic(path, buf.getvalue())
    except OSError as e:
        raise InputPathError(
            f"Could not write {path} ({e.strerror or e}); the label maps before it are complete."
        ) from None


def segment_paths(
    model_dir: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    device: str | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    tta: bool = False,
    overwrite: bool = False,
    preview: bool = False,
    series_uid: str | None = None,
    debug: bool = False,
    output_format: str = "nifti",
    pipeline: bool = True,
    adapt: str | None = None,
    adapt_steps: int = 10,
    adapt_reset: str = "case",
    adapt_seed: int = 0,
) -> RunReport:
    """Segment every case under `input_path` into `output_dir`; see the module docstring.

    pipeline: read the next case and write the previous one on two threads while the network runs
    (False: one step after the other, as bench/segment_folder.py compares).
    adapt: a test-time adaptation method of `medct.adaptation`'s table (tent, cotta, psmt once
    `medct.finetune.tta` is imported) run on a copy of the model before each case, `adapt_steps` steps, reset to the source weights per case or
    never (continual along the folder, in the order the cases are listed); `adapt_seed` seeds the
    draw of adaptation patches."""
    from tqdm import tqdm

    from medct.dicom_out import OUTPUT_FORMATS
    from medct.inference import Predictor, Prepared, Scores
    from medct.io import read_volume, validate_for_inference

    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got '{output_format}'.")
    ignored: list[tuple[Path, str]] = []
    cases = discover_cases(input_path, ignored)  # path errors surface before the model loads
    predictor = Predictor.from_folder(model_dir, device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta)
    card = predictor.card
    adapter = None
    if adapt is not None:  # a method from medct.adaptation's table (the command imports the methods)
        from medct.adaptation import AdaptOptions, make_adapter
        from medct.checkpoint import load_model_folder

        options = AdaptOptions(
            adapt, tuple(card.patch_size), steps=adapt_steps, batch=predictor.sw_batch_size,  # type: ignore[arg-type]
            reset=adapt_reset, device=str(predictor.device), seed=adapt_seed,  # type: ignore[arg-type]
        )  # fmt: skip
        source, _ = load_model_folder(model_dir, device="cpu")  # unfolded batch norm: what adaptation trains
        adapter = make_adapter(source, options)
    names = {i: n for i, n in card.labels.items() if i != 0}
    out_dir = prepare_output_folder(output_dir)

    report = RunReport()
    rows: list[dict[str, object]] = []
    jobs = [_Job(case, out_dir, output_format) for case in cases]

    def load(job: _Job) -> Prepared:
        """Read and check one input, make the network's input (runs on the reader thread)."""
        case = job.case
        image = read_volume(case.path, series_uid=series_uid) if case.kind == "dicom" else read_volume(case.path)
        _check_modality(image.meta.get("modality"), card.preprocessing.modality, case.path)
        validate_for_inference(image)
        return predictor.prepare(image)

    def finish(job: _Job, scores: Scores) -> None:
        """Scores -> labels on the input grid; write them and the preview, fill the summary row
        (runs on the writer thread)."""
        image = scores.volume
        labels = predictor.finish(scores)
        if scores.notes:
            job.row["note"] = "; ".join(scores.notes)
        _write_output(labels, image, card.labels, job.out_path, output_format)
        if preview:
            from medct.preview import save_preview

            save_preview(image, labels, out_dir / f"{job.case.name}.png")
        volumes = label_volumes_ml(np.asarray(labels.array), labels.spacing, names)
        job.row.update({f"{n}_ml": f"{v:.2f}" for n, v in volumes.items()}, status="done")

    # A bounded pipeline: while the network runs on case i, the reader prepares case i + 1 and the
    # writer stores case i - 1; never more than one case ahead and one behind (memory stays bounded).
    with (
        _executor(pipeline, "medct-read") as reader,
        _executor(pipeline, "medct-write") as writer,
    ):
        todo = [j for j in jobs if j.needs_run(overwrite)]
        reads = {id(todo[0]): reader.submit(load, todo[0])} if todo else {}
        pending: tuple[_Job, Future[None]] | None = None
        claimed: set[str] = set()
        for job in tqdm(jobs, desc="segment", unit="case", file=sys.stderr, disable=len(jobs) < 2):
            start = time.perf_counter()
            try:
                job.check_format()
                if not job.needs_run(overwrite):
                    labels = _read_output(job.out_path, output_format, job.case, series_uid)
                    volumes = label_volumes_ml(np.asarray(labels.array), labels.spacing, names)
                    job.row.update({f"{n}_ml": f"{v:.2f}" for n, v in volumes.items()}, status="skipped (exists)")
                    continue
                position = todo.index(job)
                if position + 1 < len(todo):  # read ahead: the next case loads while this one runs
                    ahead = todo[position + 1]
                    reads[id(ahead)] = reader.submit(load, ahead)
                if not _claim(out_dir, job.case.name):  # two runs on one folder share the work
                    reads.pop(id(job)).cancel()
                    job.row.update(status="skipped (another run is segmenting it)")
                    continue
                claimed.add(job.case.name)
                prepared = reads.pop(id(job)).result()
                case_predictor = predictor
                if adapter is not None and not (prepared.body is not None and prepared.body.empty):
                    adapted, info = adapter.adapt(prepared.x, prepared.body)
                    job.row.update(info.row())
                    case_predictor = predictor.with_net(adapted)
                t_predict, t_forward = time.perf_counter(), case_predictor.forward_seconds
                scores = case_predictor.run(prepared)
                del prepared  # the network input is not needed any more
                job.run_seconds = time.perf_counter() - t_predict
                job.network_seconds = case_predictor.forward_seconds - t_forward
                job.row["network_seconds"] = f"{job.network_seconds:.2f}"
                if pending is not None:  # at most one write in flight
                    _settle(*pending, debug)
                    _release(out_dir, pending[0].case.name)
                job.start = start
                pending = (job, writer.submit(finish, job, scores))
                del scores
            except Exception as e:  # noqa: BLE001 - a folder run keeps going past any bad case
                job.fail(e, debug)
            finally:
                if pending is None or pending[0] is not job:
                    job.row["seconds"] = f"{time.perf_counter() - start:.2f}"
                    if job.case.name in claimed:
                        _release(out_dir, job.case.name)
        if pending is not None:
            _settle(*pending, debug)
            _release(out_dir, pending[0].case.name)
    for job in jobs:
        rows.append(job.row)
    for path, reason in ignored:  # what the folder held besides cases, and why it was left alone
        rows.append({"case": path.name, "status": "ignored", "input": str(path), "error": reason})
        report.ignored.append((path.name, reason))
    for job in jobs:
        status = str(job.row.get("status", ""))
        if status == "done":
            report.done.append(job.case.name)
            report.network_seconds += job.network_seconds
            report.run_seconds += job.run_seconds
        elif status.startswith("skipped"):
            report.skipped.append(job.case.name)
        else:
            report.failed.append((job.case.name, str(job.row.get("error", ""))))

    _write_summary(rows, list(names.values()), out_dir / "summary.csv")
    print(
        f"medct segment: {len(report.done)} segmented, {len(report.skipped)} skipped (output exists or another run has it), "
        f"{len(report.failed)} failed"
        + (f", {len(report.ignored)} other entries ignored" if report.ignored else "")
        + f"; results in {out_dir}",
        file=sys.stderr,
    )
    for name, message in report.failed:
        print(f"  failed {name}: {message}", file=sys.stderr)
    return report


DICOM_OUTPUT_SUFFIX = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def _write_output(labels: Volume, image: Volume, names: dict[int, str], path: Path, output_format: str) -> None:
    from medct.io import write_volume

    if output_format == "nifti":
        write_volume(labels, path)
        return
    from medct.dicom_out import write_dicom_seg, write_rtstruct

    writer = write_dicom_seg if output_format == "dicom-seg" else write_rtstruct
    writer(labels, image, names, path)


def _read_output(path: Path, output_format: str, case: Case, series_uid: str | None) -> Volume:
    """An existing output read back as a label map (for the summary of a skipped case)."""
    from medct.io import read_volume

    if output_format == "nifti":
        return read_volume(path)
    from medct.dicom import read_rtstruct
    from medct.dicom_out import read_dicom_seg

    reference = read_volume(case.path, series_uid=series_uid)
    if output_format == "dicom-seg":
        return read_dicom_seg(path, reference)[0]
    labels, by_label = read_rtstruct(path, reference)
    # read_rtstruct numbers ROIs by their order; the summary wants the card's numbers, which the
    # RTSTRUCT keeps as ROINumber: re-read the mapping from the file's ROI numbers.
    import pydicom

    number_of = {str(r.ROIName): int(r.ROINumber) for r in pydicom.dcmread(path).StructureSetROISequence}
    lut = np.zeros(256, np.uint8)
    for label, name in by_label.items():
        lut[label] = number_of[name]
    return labels.with_array(lut[np.asarray(labels.array)])


def _check_modality(found: object, expected: str, path: Path) -> None:
    """A DICOM header that names another modality than the model's is a user mistake."""
    if not found or not isinstance(found, str):
        return
    ok = {"CT": {"CT"}, "CBCT": {"CT", "RTIMAGE"}, "MR": {"MR"}}.get(expected, {expected})
    if found.upper() not in ok:
        raise InvalidVolumeError(f"'{path}' is a {found} scan but this model expects {expected}.")
