"""Errors a user can cause.

Every mistake a user can make (bad path, unreadable file, wrong dimensionality, NaNs, missing
DICOM slices, mismatched geometry, a broken model folder) raises a subclass of `MedCTError`
whose message is one clear sentence. The CLI prints that sentence without a traceback and exits
non-zero; programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class MedCTError(Exception):
    """Base class of every error a user can cause; its message is one sentence."""


class InputPathError(MedCTError):
    """A path does not exist, or a folder holds nothing medct can read."""


class UnreadableVolumeError(MedCTError):
    """A file exists but is not a readable image (wrong type, truncated, corrupt)."""


class InvalidVolumeError(MedCTError):
    """A volume was read but cannot be used: wrong dimensionality, NaN/inf, constant."""


class DicomSeriesError(MedCTError):
    """A DICOM folder is ambiguous (several series) or incomplete (missing/uneven slices)."""


class GeometryMismatchError(MedCTError):
    """Two volumes that must share a voxel grid (image and label) do not."""


class ModelFolderError(MedCTError):
    """An exported model folder is missing files or holds corrupt weights/metadata."""


class ConfigError(MedCTError):
    """A recipe or command-line option has a value medct cannot use (bad fold, unknown net, ...)."""


class PrecisionUnavailableError(ConfigError):
    """`--precision bf16` on a device without bf16 arithmetic: an option value this machine cannot
    honour, so the CLI exits 2 as for any bad option value (not silently fp32)."""

    exit_code = 2
