"""Typed errors. Every message names the file (or object) and the problem.

Catch :class:`VfcoreError` to handle any of them.
"""
from __future__ import annotations

from os import PathLike


class VfcoreError(Exception):
    """Base class: ``VfcoreError(path, problem)`` prints as ``"<path>: <problem>"``."""

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class CorruptFileError(VfcoreError):
    """A file cannot be read: truncated or corrupt gzip/NIfTI, unreadable JSON or table."""


class FormatError(VfcoreError):
    """A file reads but is not in the expected format (e.g. centroid JSON without ``direction``)."""


class GeometryError(VfcoreError):
    """Shapes, affines, orientation codes or coordinates disagree (e.g. centroid outside the volume)."""


class LabelError(VfcoreError):
    """A vertebra label that VerSe does not define."""


class DataValueError(VfcoreError):
    """Voxel or table values that cannot be used (NaN, inf, out of range)."""


class EmptyRootError(VfcoreError):
    """A data root with no VerSe-layout cases in it."""


class GradeTableError(VfcoreError):
    """A fracture grade table that is malformed or names unknown cases."""


class DownloadError(VfcoreError):
    """A download or archive extraction failed (checksum, size, unsafe path, network)."""


class CheckpointError(VfcoreError):
    """A checkpoint that cannot be loaded: wrong architecture or preset, not weights-only, corrupt."""


class StaleArtifactError(VfcoreError):
    """An artifact in the run folder was produced from other inputs (checkpoint, split, q, data)."""


class MissingArtifactError(VfcoreError):
    """An artifact a stage needs is not in the run folder (the message says which notebook makes it)."""


class LayerNotFoundError(VfcoreError):
    """A layer name that the model does not have (the message lists the available ones)."""


class InputError(VfcoreError):
    """A user-supplied input (e.g. an uploaded patch) that cannot be used."""


class StateMismatchError(VfcoreError):
    """A saved or gathered state (a threshold buffer, a pass checkpoint) that belongs to another
    configuration: another layer, q, split, sample count or unit count."""


class DistributedError(VfcoreError):
    """A multi-process job that cannot go on: a collective timed out or failed (a rank died)."""


class RunLockedError(VfcoreError):
    """Another process is writing the run folder (or data root): the message names the holder
    (pid, command, since when) and the lock file."""


class WriteError(VfcoreError, OSError):
    """A file or folder that cannot be written (permission, read-only file system): the message
    names it, the errno and what to do. An :class:`OSError` too."""

    def __str__(self) -> str:  # OSError would print "[Errno N] ..." once errno is set
        return BaseException.__str__(self)


class DiskFullError(WriteError):
    """A write failed for lack of space (ENOSPC, EDQUOT): the message names the file, the errno
    and the space left."""


class UnsafePathError(VfcoreError):
    """A path that must not be used: a FIFO, a device, a symlink leaving its root, an absolute
    or ``../`` path where a path inside a folder is expected."""


class PresetError(VfcoreError, KeyError):
    """A network preset name that vfcore does not define (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class InvalidParameterError(VfcoreError, ValueError):
    """A bad argument (a function's parameter, a command-line flag or an environment variable):
    ``InvalidParameterError(name, allowed, given)`` prints ``"<name> must be <allowed>; got <given>"``
    (scikit-learn style). ``path`` is None: it names no file."""

    def __init__(self, name: str, allowed: str, given: object):
        self.name, self.allowed, self.given = name, allowed, given
        super().__init__(None, f"{name} must be {allowed}; got {given!r}")
