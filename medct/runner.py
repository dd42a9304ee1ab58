"""The one folder runner of every command that maps input cases to outputs.

`medct segment`, `sct`, `register --pairs`, `generate` and `motion` hand it their cases and a `CaseJob` (how
to read one case, run the model on it, write its outputs); it does the rest once for all of them,
as a user of TotalSegmentator/nnU-Net expects:

- discovery of the cases under a file, a folder or a DICOM series folder (`discover_cases`);
- case names that become paths are single, safe file names inside -o (`case_name_problem`): a
  name with a separator, `..`, control characters, an empty or over-long name is refused in one
  sentence, and names that would collide (also when they differ only in case) are renamed;
- while the model runs on one case, the next one is read (`CaseJob.load`, reader thread) and the
  previous one written (`CaseJob.write`, writer thread): a bounded read-ahead/write-behind of one
  case each (`pipeline=False`: one step after the other);
- a bad case (unreadable, NaN, 2D, wrong modality, a write that fails, ...) is reported and
  skipped, and the run finishes the good ones; outputs that exist are skipped unless `overwrite`;
- claim files let two runs share one output folder; temporaries a killed run left are removed;
- a progress bar, and `summary.csv` with the same leading columns for every command (case, status,
  input, output, seconds, network_seconds, error, note) and the job's own after them;
- one exit-code rule: `RunReport.exit_code` is 1 when any case failed, else 0.

Every output file is written atomically by the job (`medct.paths`), so no half-written file is
ever left behind.
"""

from __future__ import annotations

import csv
import errno
import io as _io
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medct.errors import InputPathError, MedCTError, UnreadableVolumeError
from medct.paths import (
    TEMP_PREFIX,
    claim,
    is_dicom_file,
    remove_stale_temps,
    volume_suffix,
    write_text_atomic,
)

# Files a scan folder commonly holds next to the scans; they are not cases and not errors.
IGNORED_SUFFIXES = (".json", ".csv", ".txt", ".md", ".png", ".jpg", ".raw", ".zraw", ".log", ".xlsx")
SUMMARY_COLUMNS = ("case", "status", "input", "output", "seconds", "network_seconds", "error", "note")
MAX_NAME_BYTES = 200  # a case name and its suffixes must fit the 255-byte file names of most file systems


@dataclass
class Case:
    """One input of a folder run: a volume file, a DICOM series folder, or an entry of a datalist
    (`kind` "entry": `data` holds its fields, e.g. a registration pair's paths)."""

    name: str
    path: Path
    kind: str  # "file" | "dicom" | "entry"
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def output_suffix(self) -> str:
        """The suffix of a volume output: the input's own format (MHD -> MHA), DICOM -> .nii.gz."""
        if self.kind != "file":
            return ".nii.gz"
        suffix = volume_suffix(self.path)
        return ".mha" if suffix == ".mhd" else suffix


class CaseJob(Protocol):
    """What a command gives the folder runner: the model's work on one case, in three steps.

    command:  the command's name, for messages ("segment", "sct", ...).
    columns:  the job's summary.csv columns, after SUMMARY_COLUMNS.
    """

    command: str
    columns: Sequence[str]

    def output_path(self, case: Case, out_dir: Path) -> Path:
        """The output whose existence means the case is done (a file or a folder)."""
        ...

    def refuse(self, case: Case) -> str | None:
        """Why this job cannot take the case at all (checked before it is read), or None."""
        ...

    def load(self, case: Case) -> Any:
        """Read and check the case, prepare the model input (reader thread)."""
        ...

    def run(self, loaded: Any, row: dict[str, object]) -> Any:
        """The model on one loaded case (main thread); may fill columns of `row`."""
        ...

    def write(self, case: Case, result: Any, out_path: Path, row: dict[str, object]) -> None:
        """Write the case's outputs atomically and fill its columns of `row` (writer thread)."""
        ...

    def summarise_existing(self, case: Case, out_path: Path, row: dict[str, object]) -> None:
        """Fill `row` for a case whose output exists already (skipped)."""
        ...


@dataclass
class RunReport:
    """What a folder run did: case names by outcome, failures with their one-line reason, and the
    seconds spent in the job's `run` (main thread) and, where the job says, in network forward
    passes, over all cases done."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # folder entries that are not cases
    network_seconds: float = 0.0  # network forward passes (the job's "network_seconds" column)
    run_seconds: float = 0.0  # CaseJob.run: the model's whole step on the main thread

    @property
    def exit_code(self) -> int:
        """The exit status of every folder command: 1 when a case failed, else 0."""
        return 1 if self.failed else 0


def case_name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name inside the output folder, or None when it can.

    One rule for every name that becomes a path (file stems, DICOM folder names, datalist ids):
    a single, non-empty path component that is not `.` or `..`, without separators, NUL or other
    control characters, at most MAX_NAME_BYTES bytes."""
    if not name.strip():
        return "an empty name"
    if name in (".", "..") or "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "not a single file name (it holds a path separator or is '.'/'..')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds control characters"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


class _Entry:
    """One case of a folder run: where its output goes, its summary row, its timings."""

    def __init__(self, case: Case, out_path: Path) -> None:
        self.case, self.out_path = case, out_path
        self.row: dict[str, object] = {"case": case.name, "input": str(case.path), "output": str(out_path), "error": ""}
        self.run_seconds = 0.0
        self.start = 0.0

    def fail(self, e: BaseException, debug: bool) -> None:
        if isinstance(e, MedCTError):
            message = str(e)
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            message = "No space left on the output's disk; free space and run again (finished cases are kept)."
        elif isinstance(e, OSError) and e.strerror:  # the system refused: its reason, no exception name
            message = f"{e.strerror}" + (f" ('{e.filename}')." if e.filename else ".")
        else:
            if debug:
                traceback.print_exception(e)
            message = f"{type(e).__name__}: {e}".splitlines()[0]
        self.row.update(status="failed", error=message)


CLAIM_PREFIX = ".medct-claim-"  # + case name: the run (pid inside) segmenting that case now


def _claim(out_dir: Path, case: str) -> bool:
    """Take the case for this process (`medct.paths.claim`); False when a live process holds it."""
    return claim(out_dir / f"{CLAIM_PREFIX}{case}") == 0


def _release(out_dir: Path, case: str) -> None:
    (out_dir / f"{CLAIM_PREFIX}{case}").unlink(missing_ok=True)


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


def _settle(entry: _Entry, future: Future[None], debug: bool) -> None:
    """Wait for a case's write; its failure (disk full, ...) fails that case only."""
    try:
        future.result()
    except Exception as e:  # noqa: BLE001
        entry.fail(e, debug)
    entry.row["seconds"] = f"{time.perf_counter() - entry.start:.2f}"


def run_folder(
    cases: list[Case],
    output_dir: Path,
    job: CaseJob,
    overwrite: bool = False,
    pipeline: bool = True,
    debug: bool = False,
    ignored: Sequence[tuple[Path, str]] = (),
    summary: bool = True,
) -> RunReport:
    """Run `job` over `cases` into `output_dir` (made by `prepare_output_folder`); see the module
    docstring. `ignored`: folder entries that are not cases, listed in summary.csv. `summary`
    False: no summary.csv (one output the user named as a file, e.g. `generate -o one.nii.gz`)."""
    from tqdm import tqdm

    out_dir = Path(output_dir)
    entries: list[_Entry] = []
    for case in cases:
        problem = case_name_problem(case.name)
        if problem is not None:  # refused: no path is ever made from this name
            entry = _Entry(case, Path(""))
            entry.row.update(output="", status="failed", error=f"Case name {case.name!r} is refused: {problem}.")
        else:
            entry = _Entry(case, job.output_path(case, out_dir))
            reason = job.refuse(case)
            if reason is not None:
                entry.row.update(status="failed", error=reason)
        entries.append(entry)

    def pending_work(e: _Entry) -> bool:
        return "status" not in e.row and (overwrite or not e.out_path.exists())

    def write(e: _Entry, result: Any) -> None:
        job.write(e.case, result, e.out_path, e.row)
        e.row.setdefault("status", "done")

    # A bounded pipeline: while the model runs on case i, the reader prepares case i + 1 and the
    # writer stores case i - 1; never more than one case ahead and one behind (memory stays bounded).
    with _executor(pipeline, "medct-read") as reader, _executor(pipeline, "medct-write") as writer:
        todo = [e for e in entries if pending_work(e)]
        reads = {id(todo[0]): reader.submit(job.load, todo[0].case)} if todo else {}
        pending: tuple[_Entry, Future[None]] | None = None
        claimed: set[str] = set()
        for e in tqdm(entries, desc=job.command, unit="case", file=sys.stderr, disable=len(entries) < 2):
            start = time.perf_counter()
            try:
                if "status" in e.row:  # refused above
                    continue
                if not pending_work(e):
                    job.summarise_existing(e.case, e.out_path, e.row)
                    e.row["status"] = "skipped (exists)"
                    continue
                position = todo.index(e)
                if position + 1 < len(todo):  # read ahead: the next case loads while this one runs
                    ahead = todo[position + 1]
                    reads[id(ahead)] = reader.submit(job.load, ahead.case)
                if not _claim(out_dir, e.case.name):  # two runs on one folder share the work
                    reads.pop(id(e)).cancel()
                    e.row.update(status=f"skipped (another run is {_verb(job.command, True)} it)")
                    continue
                claimed.add(e.case.name)
                loaded = reads.pop(id(e)).result()
                t_run = time.perf_counter()
                result = job.run(loaded, e.row)
                del loaded  # the model input is not needed any more
                e.run_seconds = time.perf_counter() - t_run
                e.row.setdefault("network_seconds", e.run_seconds)  # a job that times its network sets it
                if pending is not None:  # at most one write in flight
                    _settle(*pending, debug)
                    _release(out_dir, pending[0].case.name)
                e.start = start
                pending = (e, writer.submit(write, e, result))
                del result
            except Exception as exc:  # noqa: BLE001 - a folder run keeps going past any bad case
                e.fail(exc, debug)
            finally:
                if pending is None or pending[0] is not e:
                    e.row["seconds"] = f"{time.perf_counter() - start:.2f}"
                    if e.case.name in claimed:
                        _release(out_dir, e.case.name)
        if pending is not None:
            _settle(*pending, debug)
            _release(out_dir, pending[0].case.name)

    report = RunReport()
    rows = [e.row for e in entries]
    for path, reason in ignored:  # what the folder held besides cases, and why it was left alone
        rows.append({"case": path.name, "status": "ignored", "input": str(path), "error": reason})
        report.ignored.append((path.name, reason))
    for e in entries:
        status = str(e.row.get("status", ""))
        if status == "done":
            report.done.append(e.case.name)
            report.run_seconds += e.run_seconds
            report.network_seconds += float(str(e.row.get("network_seconds") or 0.0))
        elif status.startswith("skipped"):
            report.skipped.append(e.case.name)
        else:
            report.failed.append((e.case.name, str(e.row.get("error", ""))))
    if summary:
        write_summary(rows, job.columns, out_dir / "summary.csv")
    print(
        f"medct {job.command}: {len(report.done)} {_verb(job.command, False)}, {len(report.skipped)} skipped (output exists or another run "
        f"has it), {len(report.failed)} failed"
        + (f", {len(report.ignored)} other entries ignored" if report.ignored else "")
        + f"; results in {out_dir}",
        file=sys.stderr,
    )
    for name, message in report.failed:
        print(f"  failed {_printable(name)}: {message}", file=sys.stderr)
    return report


# how the messages say what a command does to a case: (done, doing); other commands "done"/"processing"
_VERBS = {"segment": ("segmented", "segmenting"), "sct": ("synthesised", "synthesising"),
          "register": ("registered", "registering"), "generate": ("generated", "generating"),
          "motion": ("predicted", "predicting")}  # fmt: skip


def _verb(command: str, doing: bool) -> str:
    return _VERBS.get(command, ("done", "processing"))[1 if doing else 0]


def _cell(column: str, value: object) -> object:
    """A summary cell: timings in seconds to 0.01 s, names with their own bytes escaped."""
    if column in ("seconds", "network_seconds") and isinstance(value, float):
        return f"{value:.2f}"
    return _printable(value)


def write_summary(rows: list[dict[str, object]], columns: Sequence[str], path: Path) -> None:
    """summary.csv: SUMMARY_COLUMNS then `columns`, one row per case (atomic)."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*SUMMARY_COLUMNS, *columns], extrasaction="ignore")
    writer.writeheader()
    for row in rows:  # file names that are not valid UTF-8 (surrogate escapes) as \\x.. escapes
        writer.writerow({k: _cell(k, v) for k, v in row.items()})
    try:
        write_text_atomic(path, buf.getvalue())
    except OSError as e:
        raise InputPathError(
            f"Could not write {path} ({e.strerror or e}); the outputs before it are complete."
        ) from None


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


def _case_tag(case: Case, position: int) -> str:
    """What tells same-named cases apart: the file suffix ("mha", "nii_gz"), "dicom", or a datalist
    entry's position."""
    if case.kind == "entry":
        return str(position)
    return "dicom" if case.kind == "dicom" else volume_suffix(case.path).lstrip(".").replace(".", "_")


def unique_case_names(cases: list[Case]) -> list[Case]:
    """Cases whose names (and so output files) would collide -- `x.mha` beside `x.mhd`, a DICOM
    folder `same/` beside `same.nii.gz`, `Case1` beside `case1` (one file on macOS and Windows) --
    are all renamed `<name>_<suffix>` (`x_mha`, `x_mhd`, `same_dicom`, `same_nii_gz`; a datalist
    entry: its position), so that no case's output or summary row is another's; each renaming is
    printed once."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.name.casefold()] = counts.get(case.name.casefold(), 0) + 1
    out, taken = [], {c.name.casefold() for c in cases if counts[c.name.casefold()] == 1}
    for position, case in enumerate(cases):
        if counts[case.name.casefold()] == 1:
            out.append(case)
            continue
        name = f"{case.name}_{_case_tag(case, position)}"
        while name.casefold() in taken:  # x_mha.nii.gz and x.mha.nii.gz ... keep going until free
            name += "_"
        taken.add(name.casefold())
        print(
            f"medct: '{_printable(case.path.name or case.name)}' shares its case name with another input; named '{name}'.",
            file=sys.stderr,
        )
        out.append(Case(name, case.path, case.kind, case.data))
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
        print(f"medct: removed '{stale.name}', left in {out} by a run that was killed.", file=sys.stderr)
    return out


def _printable(value: object) -> object:
    if isinstance(value, str):
        return os.fsencode(value).decode("utf-8", "backslashreplace")  # the name's own bytes, escaped
    return value
