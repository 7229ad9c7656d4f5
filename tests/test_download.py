"""Resumable download, checksum verification and safe extraction against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from real_fixtures import VOC_EXPECTED, make_voc
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets import voc2012
from pipeline.download import Archive, fetch, safe_extract
from pipeline.errors import SpmlError
from pipeline.tables import read_label_table

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})


class Handler(BaseHTTPRequestHandler):
    """Serves ``files``; honours ``Range: bytes=N-`` unless ``ignore_range``; the first ``cuts`` responses
    stop after ``cut_at`` bytes and close the connection (a dropped download)."""

    files: ClassVar[dict[str, bytes]] = {}
    cuts = 0
    cut_at = 0
    ignore_range = False
    log: ClassVar[list[tuple[str, str | None, int]]] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        range_header = self.headers.get("Range")
        start = 0
        if range_header and not self.ignore_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cuts > 0:
            type(self).cuts -= 1
            body = body[: self.cut_at]
            self.close_connection = True
        self.wfile.write(body)
        self.log.append((self.path, range_header, len(body)))


@pytest.fixture
def server():
    handler = type("H", (Handler,), {"files": {}, "cuts": 0, "cut_at": 0, "ignore_range": False, "log": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()


def archive_for(handler, name: str, data: bytes, md5: str | None = None) -> Archive:
    handler.files[f"/{name}"] = data
    return Archive(name, (f"{handler.base}/{name}",), len(data), md5 or hashlib.md5(data).hexdigest())


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    archive = archive_for(server, "blob.bin", PAYLOAD)
    server.cuts, server.cut_at = 1, 100_000
    with pytest.raises(SpmlError, match=r"incomplete .*100,000 of 300,000 bytes are kept in .*blob.bin.part"):
        fetch(archive, tmp_path)
    assert not (tmp_path / "blob.bin").exists()  # a partial file is never taken for the archive
    assert (tmp_path / "blob.bin.part").read_bytes() == PAYLOAD[:100_000]
    path = fetch(archive, tmp_path)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "blob.bin.part").exists()
    assert server.log[-1] == ("/blob.bin", "bytes=100000-", 200_000)  # only the rest was sent
    requests = len(server.log)
    assert fetch(archive, tmp_path) == path and len(server.log) == requests  # verified: no new request


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    archive = archive_for(server, "blob.bin", PAYLOAD)
    server.cuts, server.cut_at, server.ignore_range = 1, 50_000, True
    with pytest.raises(SpmlError, match="rerun to resume"):
        fetch(archive, tmp_path)
    assert fetch(archive, tmp_path).read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused(server, tmp_path):
    archive = archive_for(server, "blob.bin", PAYLOAD, md5="0" * 32)
    with pytest.raises(SpmlError, match=r"checksum mismatch for blob.bin: md5 [0-9a-f]{32}, expected 0{32}"):
        fetch(archive, tmp_path)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()
    assert (tmp_path / "blob.bin.bad").exists()


def test_unreachable_server_keeps_nothing_and_says_so(tmp_path):
    archive = Archive("x.bin", ("http://127.0.0.1:9/x.bin",), 10, "0" * 32)
    with pytest.raises(SpmlError, match="download of x.bin incomplete .*nothing kept"):
        fetch(archive, tmp_path)


# ---------------------------------------------------------------------------------------------- extraction


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, message", [
    (("../evil.txt", b"x"), "outside the target folder"),
    (("/tmp/abs-evil.txt", b"x"), "outside the target folder"),
    (("ok/../../evil.txt", b"x"), "outside the target folder"),
    (_link("ok/link", "../../../etc/passwd"), "symlink 'ok/link'"),
    (_link("link", "/etc/passwd"), "symlink 'link'"),
    (_link("hard", "../outside.txt", tarfile.LNKTYPE), "hard link 'hard'"),
])
def test_tar_members_escaping_the_target_are_refused(tmp_path, member, message):
    archive = _tar(tmp_path / "bad.tar", [("ok/fine.txt", b"fine"), member])
    target = tmp_path / "deep" / "target"
    with pytest.raises(SpmlError, match=message):
        safe_extract(archive, target)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_links_inside_the_target_are_allowed(tmp_path):
    archive = _tar(tmp_path / "ok.tar.gz", [("a/file.txt", b"data"), _link("a/alias.txt", "file.txt")], "w:gz")
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/a/alias.txt").read_bytes() == b"data"


def test_zip_traversal_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr("../evil.txt", "x")
    with pytest.raises(SpmlError, match="'../evil.txt' that would be written outside"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_truncated_archives_name_the_file(tmp_path):
    archive = _tar(tmp_path / "full.tar.gz", [(f"f{k}.bin", PAYLOAD[: 50_000 + k]) for k in range(3)], "w:gz")
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:60_000])
    with pytest.raises(SpmlError, match=r"archive .*cut.tar.gz is corrupt or truncated"):
        safe_extract(tmp_path / "cut.tar.gz", tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "full.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", PAYLOAD)
    data = bytearray((tmp_path / "full.zip").read_bytes())
    data[100:200] = bytes(100)  # corrupt the compressed stream
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with pytest.raises(SpmlError, match=r"bad.zip is corrupt or truncated"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out2")
    (tmp_path / "junk.tar").write_bytes(b"not an archive at all")
    with pytest.raises(SpmlError, match="neither a tar nor a zip"):
        safe_extract(tmp_path / "junk.tar", tmp_path / "out3")


# ------------------------------------------------------------------------------ through `spml download voc2012`


@pytest.fixture
def voc_archive(tmp_path, server, monkeypatch):
    make_voc(tmp_path / "tree")
    tar_path = tmp_path / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "tree" / "VOCdevkit", arcname="VOCdevkit")
    data = tar_path.read_bytes()
    archive = archive_for(server, tar_path.name, data)
    monkeypatch.setattr(voc2012, "ARCHIVES", [archive])
    from conftest import tiny_params, write_params

    work = tmp_path / "work"
    work.mkdir()
    write_params(work, tiny_params())
    monkeypatch.chdir(work)
    return tar_path


def test_spml_download_resumes_then_prepares(voc_archive, server):
    server.cuts, server.cut_at = 1, 20_000
    result = runner.invoke(app, ["download", "voc2012"])
    assert result.exit_code == 2 and "rerun to resume" in " ".join(result.output.split())
    assert not Path("data/raw/voc2012").exists()  # nothing half-written
    assert Path("data/downloads/voc2012/VOCtrainval_11-May-2012.tar.part").stat().st_size == 20_000
    assert runner.invoke(app, ["download", "voc2012"]).exit_code == 0
    assert server.log[-1][1] == "bytes=20000-"
    assert runner.invoke(app, ["prepare", "voc2012"]).exit_code == 0
    table = read_label_table("data/prepared/voc2012.parquet")
    assert list(table.image_id[table.official_rows("train")]) == VOC_EXPECTED["train"][0]


def test_spml_download_from_archive_is_verified(voc_archive, tmp_path):
    assert runner.invoke(app, ["download", "voc2012", "--source", str(voc_archive)]).exit_code == 0
    assert Path("data/raw/voc2012/VOCdevkit/VOC2012/ImageSets/Main/cat_train.txt").exists()
    forged = tmp_path / "forged" / voc_archive.name
    forged.parent.mkdir()
    data = bytearray(voc_archive.read_bytes())
    data[-1] ^= 1
    forged.write_bytes(bytes(data))
    result = runner.invoke(app, ["download", "voc2012", "--source", str(forged)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
    assert Path("data/raw/voc2012/VOCdevkit").exists()  # the previous good copy is untouched
    short = tmp_path / "short" / voc_archive.name
    short.parent.mkdir()
    short.write_bytes(bytes(data[:-10]))
    result = runner.invoke(app, ["download", "voc2012", "--source", str(short)])
    assert result.exit_code == 2 and "truncated" in result.output


def test_the_old_from_option_names_its_new_spelling(tmp_path, monkeypatch):
    from helpers import assert_one_line_error

    monkeypatch.chdir(tmp_path)
    assert_one_line_error(runner.invoke(app, ["download", "voc2012", "--from", str(tmp_path)]),
                          "--from is now --source PATH (params data.<dataset>.source)")
    assert not Path("data/raw/voc2012").exists()


def test_missing_source_is_named_by_where_it_came_from(voc_archive, tmp_path):
    from conftest import tiny_params, write_params
    from helpers import assert_one_line_error

    missing = tmp_path / "nowhere.tar"
    assert_one_line_error(runner.invoke(app, ["download", "voc2012", "--source", str(missing)]),
                          f"--source {missing} does not exist")
    params = tiny_params()
    params["data"]["voc2012"]["source"] = str(missing)
    write_params(Path.cwd(), params)
    assert_one_line_error(runner.invoke(app, ["download", "voc2012"]),
                          f"data.voc2012.source {missing} does not exist")
    assert not Path("data/raw/voc2012").exists()
