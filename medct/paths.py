"""File names and atomic writes: the one list of volume suffixes and the one way to write a file.

Every file medct writes (volumes, model folders, encoders, CSV/JSON summaries, PNG previews,
datalists) goes through `atomic_file` or `atomic_folder`: the content is written under a hidden
temporary name in the target's own folder and moved into place with `os.replace`, which is atomic
on POSIX and Windows within one file system. A crash, a full disk or Ctrl-C leaves either the old
file or the new one, never a half-written one, and no temporary file behind; what kill -9 leaves
(`.medct-tmp-<pid>-<name>...`) the next write of the same name removes, and folder runs remove
every stale temporary of their output folder at the start (`remove_stale_temps`). `claim` is the one
lock: an O_EXCL file holding the owner's pid, taken over when that process is gone.

Importing this module imports nothing heavy (the CLI dispatcher reads the suffixes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Volume file suffixes medct reads and writes, longest first so that ".nii.gz" wins over ".gz".
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """The volume suffix of `path` in lower case ('.nii.gz', '.mha', ...), or '' if it has none."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def volume_stem(path: str | os.PathLike[str]) -> str | None:
    """The file name without its volume suffix ('case_0001_0000.nii.gz' -> 'case_0001_0000'), None if
    `path` is not a volume file name."""
    suffix = volume_suffix(path)
    return Path(path).name[: -len(suffix)] if suffix else None


# Every temporary name medct writes starts with TEMP_PREFIX and the writing process's id, so that a
# later run can tell its own stale temporaries (left by kill -9 or a power cut) from live ones.
TEMP_PREFIX = ".medct-tmp-"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read once: os.umask can only be read by setting it, which must not race the writer threads
_UMASK = _read_umask()


def _temp_prefix(name: str) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{name}."


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (ours counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary files/folders in `folder` that medct processes no longer running left
    behind (kill -9, power cut, full disk); returns what was removed. Live runs' temporaries stay.
    `name`: only the temporaries of the file or folder of that name."""
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid, _, rest = entry.name[len(TEMP_PREFIX) :].partition("-")
        if name is not None and not rest.startswith(f"{name}."):
            continue
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def claim(path: str | os.PathLike[str]) -> int:
    """Take the lock file `path` for this process (created with O_EXCL, holding our pid): 0 when
    taken, else the pid of the live process that holds it. A lock left by a
    process that is gone (kill -9) is taken over. Release it with `Path(path).unlink()`."""
    lock = Path(path)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):  # ours counts: one claim per holder
                return pid
            lock.unlink(missing_ok=True)  # its run died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return 0
    return -1  # another process took it between our unlink and create


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it replaces `path`, else it is deleted.

    >>> with atomic_file("out/summary.csv") as tmp:
    ...     tmp.write_text(text)

    `suffix` (default: the target's own) lets writers that pick their format from the extension
    (matplotlib, SimpleITK) see the right one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)  # what a killed earlier write of this file left
    ext = suffix if suffix is not None else "".join(target.suffixes)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=ext, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have given the file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder next to `path`; on a clean exit it replaces the folder `path`
    (an existing one is removed first), else it is deleted. Used for model folders, whose files
    must appear together."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp's 0700 -> what mkdir would have given the folder
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def atomic_files_in(folder: str | os.PathLike[str], final_name: str) -> Iterator[Path]:
    """Yield a temporary folder; every file written into it is moved into `folder` on a clean exit,
    the file named `final_name` last. For formats whose header names a data file (.mhd + .raw):
    the writer sees the final names, and a reader never finds a header before its data."""
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest, final_name)
    stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(final_name), dir=dest))
    try:
        yield stage
        for f in sorted(stage.iterdir(), key=lambda f: f.name == final_name):
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# -- what a file is, from its first bytes (io.py reads volumes, dicom.py series: both ask this)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file has the DICOM Part 10 preamble ('DICM' at byte 128), or is a DICOM data
    set written without it (`is_raw_dicom`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _raw_dicom_start(head)


# The first element of a DICOM data set without preamble: group 0x0002 (file meta) or 0x0008
# (identifying), little endian, an element number below 0x0100, explicit VR letters or an implicit length.
def _raw_dicom_start(head: bytes) -> bool:
    if len(head) < 8 or head[1] != 0 or head[0] not in (0x02, 0x08) or head[3] != 0:
        return False
    vr = head[4:6]
    return vr.isalpha() and vr.isupper() or int.from_bytes(head[4:8], "little") < 1024


def is_raw_dicom(path: str | os.PathLike[str]) -> bool:
    """A DICOM data set stored without the 128-byte preamble and 'DICM' (old exports, some PACS)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] != b"DICM" and _raw_dicom_start(head)
