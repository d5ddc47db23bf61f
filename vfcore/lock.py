"""One writer per run folder: an OS file lock that every writing stage takes.

Two processes writing one run folder at once mix their results silently (a manifest from one
extraction and patches from the other; the best checkpoint from one training and the last from the
other). So every stage that writes a run folder (``extract_patches``, ``fit``, ``train_seed``,
``dissect_run``, ``export_units``, ``prepare``; ``write_phantom_root`` locks its data root)
first takes :func:`writer_lock` on it:

* an exclusive ``fcntl.flock`` on ``<folder>/.vfcore-writer.lock``, which the OS releases when
  the process ends in any way (exit, exception, ``kill -9``): a crash never leaves a stale lock;
* **a second writer stops at once** with :class:`~vfcore.errors.RunLockedError` naming the
  holder (pid, command, since when) and the lock file; ``VFCORE_LOCK_WAIT=<seconds>`` makes it
  wait up to that long for the holder to finish first;
* **reentrant within one process** (a command that calls ``fit`` that calls ``train_seed``
  takes the lock once; other threads of the process share it);
* under ``torchrun`` only rank 0 takes it (the ranks of one job are one writer).

The lock file records the holder as JSON while held and is removed on release (after checking
that the path still names the locked file, so a waiting process never locks a removed inode).
Readers take no lock: writers replace files atomically (``vfcore.io``).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import InvalidParameterError, RunLockedError
from .run import ARTIFACTS, RunFolder

#: The lock file's name inside the locked folder (hidden: data-root walkers skip it).
LOCK_NAME = ".vfcore-writer.lock"
#: Seconds a second writer waits for the first before stopping (default 0: stop at once).
WAIT_ENV = "VFCORE_LOCK_WAIT"
_POLL_S = 0.1

_mutex = threading.RLock()
_held: dict[str, list] = {}   # folder -> [fd, depth, holder info, created folder?]


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a folder."""
    return Path(folder) / LOCK_NAME


def wait_seconds() -> float:
    """:data:`WAIT_ENV` as seconds (0 when unset); a bad value -> InvalidParameterError."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value < 10 ** 7):
        raise InvalidParameterError(WAIT_ENV, "a number of seconds >= 0", text)
    return value


def holder(folder: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``folder`` (``pid``, ``command``, ``argv``, ``since``), or None
    when nobody does (a lock file that no process holds is left over and means nothing)."""
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace") or "{}")
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process (it has not recorded itself yet)"
    what = info.get("command", "?")
    argv = info.get("argv")
    return (f"process {info['pid']} ({what}{f': {argv}' if argv else ''}) since "
            f"{info.get('since', '?')}")


def _is_main_rank() -> bool:
    """False on the ranks other than 0 of a torchrun job (they write nothing)."""
    rank = os.environ.get("RANK", "0").strip() or "0"
    return rank == "0" or not rank.lstrip("-").isdigit()


def _acquire(folder: Path, command: str, wait: float) -> list:
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                waited = f" (waited {wait:g} s)" if wait else ""
                raise RunLockedError(path, f"{folder} is being written by {_describe(info)}"
                                     f"{waited}: wait for it to finish, or stop it (the lock goes "
                                     f"when that process ends); set {WAIT_ENV}=<seconds> to wait "
                                     f"for it") from None
            time.sleep(_POLL_S)
            continue
        try:   # the path must still name the file we locked (a releaser removes it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "command": command,
                "argv": " ".join(Path(sys.argv[0]).name if i == 0 else a
                                 for i, a in enumerate(sys.argv))[:300],
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return [fd, 1, info, created]


def _release(folder: Path, entry: list) -> None:
    fd, created = entry[0], entry[3]
    try:
        with contextlib.suppress(OSError):
            lock_path(folder).unlink()
        if created:   # a folder made only to hold the lock (the stage refused its input)
            with contextlib.suppress(OSError):
                folder.rmdir()
    finally:
        os.close(fd)   # closing releases the flock


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, command: str, *, wait: float | None = None
                ) -> Iterator[dict]:
    """Hold the one-writer lock of ``folder`` for the block; yields the holder record.

    ``wait``: seconds to wait for another holder (default: :data:`WAIT_ENV`, else 0: a second
    writer raises :class:`~vfcore.errors.RunLockedError` at once). Reentrant in one process.
    """
    folder = Path(os.path.abspath(folder))
    key = str(folder)
    wait = wait_seconds() if wait is None else float(wait)
    with _mutex:
        entry = _held.get(key)
        if entry is not None and entry[0] is not None:
            entry[1] += 1
        else:
            entry = _held[key] = _acquire(folder, command, wait)
    try:
        yield entry[2]
    finally:
        with _mutex:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(folder, entry)


def writes(command: str, arg: str = "run_dir", run: bool = True, data_root: bool = False) -> Callable:
    """Decorator: the function holds :func:`writer_lock` on the folder given as its argument
    ``arg`` (a run folder, resolved as ``vfcore.run.RunFolder`` does, when ``run``) while it
    runs. ``data_root``: the folder is a data root, and when it is a run folder's ``data/``
    (``RunFolder.data``) that run folder is locked too (first), so that no stage of the run
    reads the root while it is written. Ranks other than 0 of a torchrun job take no lock."""
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = signature.bind_partial(*args, **kwargs).arguments.get(arg)
            if folder is None or not _is_main_rank():
                return fn(*args, **kwargs)
            if run:
                folder = RunFolder(folder).root
            if Path(folder).exists() and not Path(folder).is_dir():
                return fn(*args, **kwargs)   # not a folder: the function's own error says so
            with contextlib.ExitStack() as held:
                if data_root:
                    here = Path(os.path.abspath(folder))
                    if here.name == ARTIFACTS["data"].rel and here.parent.is_dir():
                        held.enter_context(writer_lock(here.parent, command))
                held.enter_context(writer_lock(folder, command))
                return fn(*args, **kwargs)
        return wrapper
    return decorate
