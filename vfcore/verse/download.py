"""Download the public VerSe archives: resume, verify against a recorded sha256, unpack safely.

VerSe publishes no checksums: the size and sha256 of each archive are recorded on first
download and every later call verifies against that record.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from vfcore.errors import DiskFullError, DownloadError, FormatError
from vfcore.io import disk_full_error, free_bytes, is_disk_full, sha256_file, write_json
from vfcore.verse.reading import read_small_json

# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------

_S3 = "https://s3.bonescreen.de/public/VerSe-complete"
#: Public VerSe archives (CC BY-SA 4.0); no checksums are published, see :func:`download`.
VERSE_ARCHIVES: dict[str, str] = {
    f"verse{year}{split}": f"{_S3}/dataset-verse{year}{split}.zip"
    for year in ("19", "20") for split in ("training", "validation", "test")
}
#: Release name -> its archives (``download("verse19", ...)`` fetches all three splits).
VERSE_RELEASES: dict[str, list[str]] = {
    f"verse{year}": [f"verse{year}{split}" for split in ("training", "validation", "test")]
    for year in ("19", "20")
}
#: Name of the JSON record (size + sha256 per archive) kept beside the archives.
RECORD_NAME = "archives.sha256.json"


def _fetch(url: str, part: Path, *, timeout: float, chunk_size: int, progress: bool,
           desc: str) -> None:
    """Append the rest of ``url`` to ``part`` (HTTP Range from its current size)."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vfcore"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        # a fresh opener reads the proxy settings of the environment at call time
        response = urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # range not satisfiable: .part is complete or too long
            total = _total_size(err.headers)
            if total is not None and total == offset:
                return
            part.unlink()
            return _fetch(url, part, timeout=timeout, chunk_size=chunk_size,
                          progress=progress, desc=desc)
        raise
    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers)
            if start != offset:
                raise DownloadError(part, f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # server ignored Range: start over
        total = _total_size(response.headers)
        try:
            with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B",
                                             unit_scale=True, unit_divisor=1024, desc=desc,
                                             disable=not progress) as bar:
                while block := response.read(chunk_size):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if not is_disk_full(err):
                raise
            full = disk_full_error(part, err)
            kept = part.stat().st_size if part.exists() else 0
            full.args = (f"{full}; {kept:,} bytes kept in {part.name}: the next call resumes "
                         f"from there",)
            full.problem = full.args[0]
            raise full from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _range_start(headers) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total_size(headers) -> int | None:
    """Full size of the resource from Content-Range (``bytes a-b/N``) or Content-Length."""
    match = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", headers.get("Content-Range", "") or "")
    if match:
        return int(match.group(1))
    length = headers.get("Content-Length")
    return int(length) if length is not None else None


def _load_record(path: Path) -> dict:
    """The checksum record ``{archive: {"size": int, "sha256": hex, ...}}``; {} when absent.

    Every entry is checked here, so a hand-edited or damaged record is a :class:`FormatError`
    naming the record and the entry, never a ``KeyError`` later.
    """
    if not path.exists():
        return {}
    record = read_small_json(path, "checksum record")
    if not isinstance(record, dict):
        raise FormatError(path, "checksum record must be a JSON object {archive: {size, sha256}}")
    for name, entry in record.items():
        if not isinstance(entry, dict):
            raise FormatError(path, f"entry {name!r} is {type(entry).__name__} {entry!r}, not an "
                                    "object {size, sha256}: delete the record to start afresh")
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FormatError(path, f"entry {name!r} has no valid 'size' (got {size!r}): delete "
                                    "the record to start afresh")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise FormatError(path, f"entry {name!r} has no valid 'sha256' (got {digest!r}): "
                                    "delete the record to start afresh")
        done = entry.get("extracted", "")
        if not isinstance(done, str):
            raise FormatError(path, f"entry {name!r}: 'extracted' is not a folder name")
        if done and (done in (".", "..") or "/" in done or "\\" in done or ":" in done):
            raise FormatError(path, f"entry {name!r}: 'extracted' {done!r} is not a folder name "
                                    f"inside {path.parent} (a path elsewhere is refused): delete "
                                    "the record to start afresh")
    return record


def _verify(archive: Path, entry: dict, record_path: Path) -> None:
    size = archive.stat().st_size
    if size != entry["size"]:
        raise DownloadError(archive, f"size {size} differs from {entry['size']} recorded in "
                                     f"{record_path}")
    digest = sha256_file(archive)
    if digest != entry["sha256"]:
        raise DownloadError(archive, f"sha256 {digest} differs from {entry['sha256']} recorded "
                                     f"in {record_path}")


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse absolute paths, ``..``, drive letters and symlinks (zip-slip)."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DownloadError(archive, f"member {name!r} is a symbolic link: refused")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DownloadError(archive, f"member {name!r} would be written outside the target "
                                     "folder: refused")


#: Bounds on extraction, checked from the archive's directory before anything is written:
#: the total uncompressed size, and the ratio of that to the archive's size (VerSe's .nii.gz
#: members do not compress further: about 1; a zip bomb: hundreds to millions).
MAX_EXTRACT_BYTES = 256 << 30
MAX_EXTRACT_RATIO = 50.0


def _check_sizes(archive: Path, members: list, target: Path, max_bytes: int,
                 max_ratio: float) -> None:
    """:class:`DownloadError` for an archive whose members claim more than ``max_bytes`` or
    more than ``max_ratio`` times the archive's size; :class:`DiskFullError` when the target
    has not that much space free."""
    total = sum(max(0, int(i.file_size)) for i in members)
    size = max(1, archive.stat().st_size)
    if total > max_bytes:
        raise DownloadError(archive, f"members claim {total:,} bytes uncompressed, more than the "
                                     f"limit of {max_bytes:,}: refused before extracting")
    if total / size > max_ratio:
        raise DownloadError(archive, f"members claim {total:,} bytes from a {size:,}-byte archive "
                                     f"(ratio {total / size:.0f}, limit {max_ratio:g}): refused "
                                     f"before extracting (a zip bomb?)")
    free = free_bytes(target)
    if free is not None and total > free:
        err = DiskFullError(target, f"disk full (errno 28 ENOSPC): extracting {archive.name} "
                                    f"needs {total / 1e6:.1f} MB, {free / 1e6:.1f} MB free under "
                                    f"{target}; free some space and run again (the archive is kept)")
        err.errno, err.filename = 28, str(target)
        raise err


def extract_zip(archive: str | os.PathLike, target: str | os.PathLike, *,
                max_bytes: int = MAX_EXTRACT_BYTES, max_ratio: float = MAX_EXTRACT_RATIO
                ) -> list[Path]:
    """Extract safely: check every member, unpack into a hidden temp folder, then rename.

    Refused before anything is written: members escaping the target or symlinks, a total
    uncompressed size over ``max_bytes`` or over ``max_ratio`` times the archive's size
    (:class:`DownloadError`), more than the target's free space (:class:`DiskFullError`).

    A zip whose members all sit in one top-level folder (VerSe: ``dataset-verse19training/``)
    becomes ``target/<that folder>``; otherwise ``target/<archive stem>``. Existing folders
    are never overwritten (:class:`DownloadError`); on any failure nothing is left behind.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=f".extract-{archive.stem}-"))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    _check_member(info, archive)
                _check_sizes(archive, members, target, max_bytes, max_ratio)
                root = tmp.resolve()
                for info in members:
                    dest = (tmp / info.filename).resolve()
                    if root != dest and root not in dest.parents:
                        raise DownloadError(archive, f"member {info.filename!r} escapes the "
                                                     "target folder: refused")
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise DownloadError(archive, f"corrupt zip archive: {err}") from err
        except OSError as err:   # the partial extraction is removed below; the archive is kept
            if is_disk_full(err):
                raise disk_full_error(Path(err.filename or tmp), err) from None
            raise
        top = [p for p in tmp.iterdir()]
        if len(top) == 1 and top[0].is_dir():
            source, dest = top[0], target / top[0].name
        else:
            source, dest = tmp, target / archive.stem
        if dest.exists():
            raise DownloadError(dest, "already exists: remove it to extract again")
        os.replace(source, dest)
        return [dest]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a sound zip (CRCs of all members checked), or None."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        return f"not a readable zip ({err})"
    return f"member {bad!r} fails its CRC check" if bad else None


def _check_zip(part: Path, archive: Path) -> None:
    """Delete a fresh download ``part`` and raise :class:`DownloadError` unless it is sound."""
    problem = _zip_problem(part)
    if problem:
        part.unlink()
        raise DownloadError(archive, f"corrupt zip archive: {problem}; the download was deleted")


def _check_zip_kept(archive: Path) -> None:
    """Like :func:`_check_zip` for an archive the user placed: it is kept, not deleted."""
    problem = _zip_problem(archive)
    if problem:
        raise DownloadError(archive, f"corrupt zip archive: {problem}; delete it to download "
                                     "it again")


#: HTTP status codes worth another try (server busy or failing); others are final.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: Longest wait between two tries, seconds (the wait doubles from ``retry_wait``).
MAX_RETRY_WAIT = 60.0


def _fetch_with_retries(url: str, part: Path, *, retries: int, retry_wait: float,
                        **fetch_kwargs) -> None:
    """:func:`_fetch`, resumed up to ``retries`` times after a dropped connection or a 5xx/429.

    The wait doubles from ``retry_wait`` (capped at :data:`MAX_RETRY_WAIT`). A 404 is "not
    found at URL"; other 4xx answers are final and named with their code.
    """
    for attempt in range(retries + 1):
        try:
            return _fetch(url, part, **fetch_kwargs)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise DownloadError(url, "not found at URL (HTTP 404): check the archive name "
                                         "or URL") from None
            if err.code not in RETRY_STATUS:
                raise DownloadError(url, f"the server refused the download (HTTP {err.code} "
                                         f"{err.reason})") from None
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(url, f"server error HTTP {err.code} {err.reason} in "
                                         f"{retries + 1} tries; {kept} bytes kept in {part}, "
                                         "run again later to resume") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as err:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(url, f"download failed ({err}); {kept} bytes kept in "
                                         f"{part}, run again to resume") from err
        time.sleep(min(retry_wait * 2 ** attempt, MAX_RETRY_WAIT))


def _record_entry(url: str, archive: Path) -> dict:
    return {"url": url, "size": archive.stat().st_size, "sha256": sha256_file(archive),
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def download(archives: Iterable[str] | Mapping[str, str], target: str | os.PathLike, *,
             extract: bool = True, retries: int = 3, retry_wait: float = 2.0,
             timeout: float = 60.0, chunk_size: int = 1 << 20,
             progress: bool = True) -> list[Path]:
    """Download and unpack VerSe archives into ``target``; returns the extracted folders.

    ``archives``: names of :data:`VERSE_ARCHIVES` (``"verse19training"``, ...) or of
    :data:`VERSE_RELEASES` (``"verse19"``: its three splits), or a mapping name -> URL. Each archive is fetched to ``target/<file>.zip.part`` (resumed with an HTTP
    Range request after an interruption, up to ``retries`` times per call, and on the next
    call), then renamed to ``target/<file>.zip``. VerSe publishes no checksums, so the size
    and sha256 are recorded in ``target/archives.sha256.json`` on first download (only once
    the zip's CRCs check out) and every later call verifies the archive against that record
    (:class:`DownloadError` on mismatch; a mismatching new download is deleted). Extraction:
    :func:`extract_zip`, once per archive (the record remembers the folder). With
    ``extract=False`` the archive paths are returned.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if isinstance(archives, str):
        archives = [archives]
    if isinstance(archives, Mapping):
        urls = dict(archives)
    else:
        names = [n for name in archives for n in VERSE_RELEASES.get(name, [name])]
        unknown = [name for name in names if name not in VERSE_ARCHIVES]
        if unknown:
            raise DownloadError(None, f"unknown archive(s) {unknown}; choose from "
                                      f"{sorted(VERSE_ARCHIVES)} or {sorted(VERSE_RELEASES)}")
        urls = {name: VERSE_ARCHIVES[name] for name in names}
    record_path = target / RECORD_NAME
    out = []
    for name, url in urls.items():
        filename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or f"{name}.zip"
        if not filename.lower().endswith(".zip") or filename.startswith("."):
            # the checksum record (RECORD_NAME, .json) and the temporaries can never be an archive
            raise DownloadError(url, f"archive file name {filename!r} must end in .zip and not "
                                     "start with '.': refused")
        archive = target / filename
        record = _load_record(record_path)
        if not archive.exists():
            part = archive.with_name(archive.name + ".part")
            _fetch_with_retries(url, part, retries=retries, retry_wait=retry_wait,
                                timeout=timeout, chunk_size=chunk_size, progress=progress,
                                desc=filename)
            if filename in record:
                try:
                    _verify(part, record[filename], record_path)
                except DownloadError as err:
                    part.unlink()
                    raise DownloadError(archive, f"{err.problem}; the new download was deleted "
                                                 "(the server's file changed or the transfer "
                                                 "was corrupted)") from None
            else:
                _check_zip(part, archive)
                record[filename] = _record_entry(url, part)
                write_json(record_path, record)
            os.replace(part, archive)
        elif filename in record:
            _verify(archive, record[filename], record_path)
        else:  # an archive put there by hand: record it now (trust on first use)
            _check_zip_kept(archive)
            record[filename] = _record_entry(url, archive)
            write_json(record_path, record)
        if not extract:
            out.append(archive)
            continue
        done = record[filename].get("extracted")
        if done and (target / done).is_dir():
            out.append(target / done)  # unpacked by an earlier call
            continue
        (folder,) = extract_zip(archive, target)
        record[filename]["extracted"] = folder.name
        write_json(record_path, record)
        out.append(folder)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vfcore.verse download --target data/verse verse19training ...``."""
    parser = argparse.ArgumentParser(prog="python -m vfcore.verse",
                                     description="Download the public VerSe archives.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download, verify and unpack archives")
    dl.add_argument("archives", nargs="*", default=list(VERSE_ARCHIVES),
                    help=f"any of {', '.join([*VERSE_RELEASES, *VERSE_ARCHIVES])} "
                         "(default: all)")
    dl.add_argument("--target", required=True, help="folder for the archives and data")
    dl.add_argument("--no-extract", action="store_true", help="only download and verify")
    args = parser.parse_args(argv)
    for folder in download(args.archives, args.target, extract=not args.no_extract):
        print(folder)
    return 0
