"""vfcore.verse.download against a local HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import hashlib
import importlib
import http.server
import io
import json
import random
import re
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from vfcore import verse
from vfcore.errors import DownloadError


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes) with HTTP Range support and scripted failures."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: list[int] = []  # per coming GET: send only this many body bytes
        self.fail_with: list[int] = []  # per coming GET: answer with this HTTP status instead
        self.honour_range = True

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server: ArchiveServer = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        if server.fail_with:
            self.send_error(server.fail_with.pop(0))
            return
        if name not in server.files:
            self.send_error(404)
            return
        body = server.files[name]
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if server.cut_after:
            part = part[: server.cut_after.pop(0)]  # then the connection closes early
        self.wfile.write(part)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = ArchiveServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, link_target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, link_target)
    return buf.getvalue()


def verse_like_zip(seed: int = 0) -> bytes:
    """A small VerSe'19-like archive; incompressible payload so the transfer has some size."""
    payload = random.Random(seed).randbytes(1 << 16)  # 64 KiB
    top = "dataset-verse19training"
    return make_zip({f"{top}/rawdata/sub-verse004/sub-verse004_ct.nii.gz": payload,
                     f"{top}/derivatives/sub-verse004/sub-verse004_seg-subreg_ctd.json":
                         b'[{"direction": ["P", "I", "R"]}]'})


def leftovers(target: Path) -> list[str]:
    """Temporary or partial names left in ``target``."""
    return sorted(p.name for p in target.iterdir() if p.name.startswith(".") or p.suffix == ".part")


def test_verse_archives_are_the_public_urls():
    base = "https://s3.bonescreen.de/public/VerSe-complete/"
    assert verse.VERSE_ARCHIVES == {
        f"verse{y}{s}": f"{base}dataset-verse{y}{s}.zip"
        for y in ("19", "20") for s in ("training", "validation", "test")}


def test_download_records_checksum_and_extracts(server, tmp_path):
    body = verse_like_zip()
    server.files["dataset-verse19training.zip"] = body
    urls = {"verse19training": server.url("dataset-verse19training.zip")}
    out = verse.download(urls, tmp_path, progress=True, chunk_size=4096)
    assert out == [tmp_path / "dataset-verse19training"]
    ct = out[0] / "rawdata/sub-verse004/sub-verse004_ct.nii.gz"
    assert ct.read_bytes() == random.Random(0).randbytes(1 << 16)
    assert (tmp_path / "dataset-verse19training.zip").read_bytes() == body
    record = json.loads((tmp_path / verse.RECORD_NAME).read_text())
    entry = record["dataset-verse19training.zip"]
    assert entry["size"] == len(body) and entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["url"] == urls["verse19training"]
    assert leftovers(tmp_path) == []
    # second call: verified against the record, nothing fetched, nothing extracted again
    n = len(server.requests)
    assert verse.download(urls, tmp_path, progress=False) == out
    assert len(server.requests) == n


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    body = verse_like_zip(1)
    server.files["a.zip"] = body
    server.cut_after = [20000]
    urls = {"a": server.url("a.zip")}
    with pytest.raises(DownloadError) as err:
        verse.download(urls, tmp_path, retries=0, progress=False)
    part = tmp_path / "a.zip.part"
    assert str(part) in str(err.value) and "resume" in str(err.value)
    assert part.stat().st_size == 20000
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / verse.RECORD_NAME).exists()
    out = verse.download(urls, tmp_path, progress=False)
    assert server.requests[-1] == ("a.zip", "bytes=20000-")
    assert (tmp_path / "a.zip").read_bytes() == body
    assert out == [tmp_path / "dataset-verse19training"]
    record = json.loads((tmp_path / verse.RECORD_NAME).read_text())
    assert record["a.zip"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert leftovers(tmp_path) == []


def test_retries_resume_within_one_call(server, tmp_path):
    body = verse_like_zip(2)
    server.files["b.zip"] = body
    server.cut_after = [1000, 30000]
    verse.download({"b": server.url("b.zip")}, tmp_path, retries=2, retry_wait=0,
                   extract=False, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=1000-", "bytes=31000-"]
    assert (tmp_path / "b.zip").read_bytes() == body


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = verse_like_zip(3)
    server.files["c.zip"] = body
    server.honour_range = False
    (tmp_path / "c.zip.part").write_bytes(b"stale bytes from somewhere else")
    verse.download({"c": server.url("c.zip")}, tmp_path, extract=False, progress=False)
    assert server.requests[-1][1] is not None  # a Range was asked for, and ignored
    assert (tmp_path / "c.zip").read_bytes() == body


def test_corrupted_redownload_detected_by_sha256(server, tmp_path):
    body = verse_like_zip(4)
    server.files["d.zip"] = body
    urls = {"d": server.url("d.zip")}
    verse.download(urls, tmp_path, extract=False, progress=False)
    (tmp_path / "d.zip").unlink()
    corrupted = bytearray(body)
    corrupted[len(body) // 2] ^= 0xFF  # same size, one flipped byte
    server.files["d.zip"] = bytes(corrupted)
    with pytest.raises(DownloadError) as err:
        verse.download(urls, tmp_path, extract=False, progress=False)
    assert str(tmp_path / "d.zip") in str(err.value) and "sha256" in str(err.value)
    assert not (tmp_path / "d.zip").exists()
    assert leftovers(tmp_path) == []


def test_tampered_archive_on_disk_detected(server, tmp_path):
    server.files["e.zip"] = verse_like_zip(5)
    urls = {"e": server.url("e.zip")}
    verse.download(urls, tmp_path, extract=False, progress=False)
    archive = tmp_path / "e.zip"
    archive.write_bytes(archive.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DownloadError) as err:
        verse.download(urls, tmp_path, progress=False)
    assert str(archive) in str(err.value) and "sha256" in str(err.value)
    assert not (tmp_path / "dataset-verse19training").exists()
    archive.write_bytes(archive.read_bytes()[:-1])
    with pytest.raises(DownloadError) as err:
        verse.download(urls, tmp_path, progress=False)
    assert "size" in str(err.value)


@pytest.mark.parametrize("members, symlinks", [
    ({"dataset/ok.txt": b"ok", "../evil": b"boom"}, None),
    ({"dataset/ok.txt": b"ok", "dataset/../../evil": b"boom"}, None),
    ({"/evil": b"boom"}, None),
    ({"dataset/ok.txt": b"ok"}, {"dataset/link": "/etc/passwd"}),
])
def test_zip_escaping_the_target_is_refused(server, tmp_path, members, symlinks):
    target = tmp_path / "target"
    server.files["evil.zip"] = make_zip(members, symlinks)
    with pytest.raises(DownloadError) as err:
        verse.download({"evil": server.url("evil.zip")}, target, progress=False)
    assert str(target / "evil.zip") in str(err.value) and "refused" in str(err.value)
    assert not (tmp_path / "evil").exists() and not Path("/evil").exists()
    assert not (target / "dataset").exists() and not (target / "evil").exists()
    assert leftovers(target) == []


def test_corrupt_zip_leaves_nothing(server, tmp_path):
    server.files["f.zip"] = b"PK\x03\x04 this is not really a zip" * 10
    with pytest.raises(DownloadError) as err:
        verse.download({"f": server.url("f.zip")}, tmp_path, progress=False)
    assert "corrupt zip" in str(err.value) and str(tmp_path / "f.zip") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not recorded, not kept


def test_zip_failing_crc_is_not_recorded(server, tmp_path):
    body = bytearray(make_zip({"d/x.bin": random.Random(7).randbytes(5000)}))
    body[100] ^= 0xFF  # inside the stored (incompressible) data of d/x.bin
    server.files["h.zip"] = bytes(body)
    with pytest.raises(DownloadError) as err:
        verse.download({"h": server.url("h.zip")}, tmp_path, progress=False)
    assert "CRC" in str(err.value) and str(tmp_path / "h.zip") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_zip_without_single_top_folder_goes_to_archive_stem(tmp_path):
    archive = tmp_path / "loose.zip"
    archive.write_bytes(make_zip({"a.txt": b"a", "sub/b.txt": b"b"}))
    assert verse.extract_zip(archive, tmp_path / "t") == [tmp_path / "t" / "loose"]
    assert (tmp_path / "t/loose/sub/b.txt").read_bytes() == b"b"
    with pytest.raises(DownloadError) as err:  # never overwrites
        verse.extract_zip(archive, tmp_path / "t")
    assert "already exists" in str(err.value)
    assert leftovers(tmp_path / "t") == []


def test_archive_placed_by_hand_is_recorded_then_verified(tmp_path):
    body = verse_like_zip(8)
    (tmp_path / "dataset-verse19training.zip").write_bytes(body)  # e.g. fetched from OSF
    out = verse.download(["verse19training"], tmp_path, progress=False)  # no network needed
    assert out == [tmp_path / "dataset-verse19training"]
    record = json.loads((tmp_path / verse.RECORD_NAME).read_text())
    assert record["dataset-verse19training.zip"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert record["dataset-verse19training.zip"]["extracted"] == "dataset-verse19training"
    broken = tmp_path / "other" / "dataset-verse20test.zip"
    broken.parent.mkdir()
    broken.write_bytes(body[:-100])
    with pytest.raises(DownloadError) as err:
        verse.download(["verse20test"], broken.parent, progress=False)
    assert str(broken) in str(err.value) and broken.exists()  # the user's file is kept


def test_http_errors_and_unknown_names(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        verse.download({"g": server.url("missing.zip")}, tmp_path, progress=False)
    assert "404" in str(err.value) and server.url("missing.zip") in str(err.value)
    assert "not found at URL" in str(err.value) and "resume" not in str(err.value)
    assert leftovers(tmp_path) == []
    with pytest.raises(DownloadError) as err:
        verse.download(["verse21training"], tmp_path, progress=False)
    assert "verse19training" in str(err.value)


def test_release_names_expand_to_their_splits(tmp_path):
    for split in ("training", "validation", "test"):
        folder = f"dataset-verse20{split}"
        (tmp_path / f"{folder}.zip").write_bytes(make_zip({f"{folder}/x.txt": split.encode()}))
    out = verse.download("verse20", tmp_path, progress=False)
    assert [p.name for p in out] == ["dataset-verse20training", "dataset-verse20validation",
                                     "dataset-verse20test"]
    assert (out[2] / "x.txt").read_text() == "test"


def test_command_line(tmp_path, capsys):
    (tmp_path / "dataset-verse19test.zip").write_bytes(verse_like_zip(9))
    assert verse.main(["download", "--target", str(tmp_path), "verse19test"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dataset-verse19training")


def test_server_errors_are_retried_then_succeed(server, tmp_path):
    body = verse_like_zip(11)
    server.files["f.zip"] = body
    server.fail_with = [503, 500]
    (archive,) = verse.download({"f": server.url("f.zip")}, tmp_path, extract=False,
                                progress=False, retries=3, retry_wait=0.01)
    assert archive.read_bytes() == body
    assert len(server.requests) == 3  # two failures, one success


def test_persistent_server_error_is_bounded_and_named(server, tmp_path):
    server.files["g.zip"] = verse_like_zip(12)
    server.fail_with = [502] * 10
    with pytest.raises(DownloadError) as err:
        verse.download({"g": server.url("g.zip")}, tmp_path, progress=False, retries=2,
                       retry_wait=0.01)
    assert len(server.requests) == 3  # retries + 1 tries, then stop
    assert "HTTP 502" in str(err.value) and "3 tries" in str(err.value)
    assert server.url("g.zip") in str(err.value)


def test_client_errors_are_not_retried(server, tmp_path):
    server.files["h.zip"] = verse_like_zip(13)
    server.fail_with = [403]
    with pytest.raises(DownloadError) as err:
        verse.download({"h": server.url("h.zip")}, tmp_path, progress=False, retries=3,
                       retry_wait=0.01)
    assert len(server.requests) == 1
    assert "HTTP 403" in str(err.value) and "resume" not in str(err.value)


def test_retry_wait_doubles_and_is_capped(server, tmp_path, monkeypatch):
    waits = []
    # vfcore.verse.download is the function; its module is reached through importlib
    monkeypatch.setattr(importlib.import_module("vfcore.verse.download").time, "sleep", waits.append)
    server.files["i.zip"] = verse_like_zip(14)
    server.fail_with = [503] * 4
    verse.download({"i": server.url("i.zip")}, tmp_path, extract=False, progress=False,
                   retries=4, retry_wait=25.0)
    assert waits == [25.0, 50.0, 60.0, 60.0]  # doubling from retry_wait, capped at 60 s
