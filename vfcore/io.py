"""Small file helpers shared by every stage: atomic writes, checksums, provenance.

Writers never leave a half-written file: they write to a temporary name in the same folder,
flush it to disk, then rename it over the target (``os.replace`` is atomic on one file system).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(tmp: str, path: Path) -> None:
    """Give the finished temporary file normal permissions, then rename it into place."""
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; written files are for everyone to read
    os.replace(tmp, path)


@contextlib.contextmanager
def _temporary(path: Path, suffix: str) -> Iterator[str]:
    """A temporary file name beside ``path``; renamed to ``path`` if the block succeeds (after
    an fsync), deleted if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``, else delete it."""
    with _temporary(Path(path), ".part") as tmp, open(tmp, mode) as f:
        yield f


def atomic_save(path: str | os.PathLike, save, suffix: str | None = None) -> Path:
    """Call ``save(tmp_path)`` (any library writer taking a file name), then rename atomically.

    ``suffix`` keeps the extension libraries look at (``.nii.gz``, ``.npy``, ``.png``); it
    defaults to everything after the first dot of the target's name.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes)
    with _temporary(path, f".part{suffix}") as tmp:
        save(tmp)
    return path


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """Write JSON atomically (NaN is not allowed: pass ``None`` instead)."""
    dumps_kwargs.setdefault("indent", 2)
    text = json.dumps(obj, allow_nan=False, **dumps_kwargs)
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``numpy.save`` with an atomic rename."""
    return atomic_save(path, lambda tmp: np.save(tmp, array, allow_pickle=False), suffix=".npy")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour changes results."""
    out = {"python": platform.python_version()}
    for name in ("vfcore", "numpy", "scipy", "pandas", "torch", "monai", "nibabel"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))  # plain str (TorchVersion is a subclass)
        except ImportError:
            pass
    return out
