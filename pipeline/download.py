"""Getting raw dataset files: resumable HTTP download, verification, safe extraction, local import.

* :func:`fetch` downloads one archive into ``data/downloads/<dataset>/``. Bytes go to ``<name>.part``
  first; an interrupted transfer leaves the ``.part`` file and the next call continues it with an HTTP
  ``Range`` request. Only a file of the expected size and MD5 is renamed to ``<name>``, so a partial
  file is never mistaken for a complete one.
* :func:`verify_file` checks size and MD5 before anything is extracted (``--source`` archives too).
* :func:`safe_extract` unpacks tar (any compression) and zip archives, refusing members that would land
  outside the target folder: absolute paths, ``..`` components, symlinks or hard links pointing outside,
  device files. A truncated or corrupt archive is reported as one :class:`SpmlError` naming the file.
* :func:`link_tree` imports an already-extracted folder by hard-linking every file (copying only where
  the source is on another filesystem). Symlinks are followed only while they stay inside the folder,
  as for archive members. Hard links take no space and no time per byte, keep working if
  the user later moves or deletes the original folder, and DVC hashes them like ordinary files; a
  symlink would tie ``data/raw`` to wherever the user's copy happens to live.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import SpmlError
from pipeline.io import ensure_dir
from pipeline.progress import progress_bar

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """One official file: where it lives and what it must hash to (facts from specs/datasets.md)."""

    filename: str
    urls: tuple[str, ...]
    size: int
    md5: str


def downloads_dir(dataset: str) -> Path:
    """Persistent home of downloaded archives and ``.part`` files (outside the atomic raw dir)."""
    return Path("data") / "downloads" / dataset


def md5_file(path: Path, what: str | None = None) -> str:
    digest = hashlib.md5()
    total = path.stat().st_size
    with progress_bar(transient=True) as bar, open(path, "rb") as handle:
        task = bar.add_task(f"md5 {what or path.name}", total=total)
        while block := handle.read(CHUNK):
            digest.update(block)
            bar.advance(task, len(block))
    return digest.hexdigest()


def verify_file(path: Path, size: int | None, md5: str | None) -> None:
    """Raise SpmlError unless ``path`` has the expected size and MD5 (None skips a check)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise SpmlError(f"{path} has {actual_size:,} bytes, expected {size:,}: the file is truncated or not the "
                        "official archive; download it again")
    if md5 is not None:
        actual = md5_file(path)
        if actual != md5.lower():
            raise SpmlError(f"checksum mismatch for {path}: md5 {actual}, expected {md5}; the file is corrupt or "
                            "not the official archive, delete it and download again")


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _is_verified(dest: Path, archive: Archive) -> bool:
    marker = _marker(dest)
    if not (dest.exists() and marker.exists()):
        return False
    st = dest.stat()
    return marker.read_text().strip() == f"{archive.md5} {st.st_size} {st.st_mtime_ns}"


def _mark_verified(dest: Path, archive: Archive) -> None:
    st = dest.stat()
    _marker(dest).write_text(f"{archive.md5} {st.st_size} {st.st_mtime_ns}\n")


def _transfer(url: str, part: Path, size: int, label: str) -> None:
    """Append the missing bytes of ``url`` to ``part`` (Range request); restart if the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > size:  # not a prefix of this file: start over
        part.unlink()
        offset = 0
    if offset == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-", "User-Agent": "spml-bench"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the server has fewer bytes than the part: not this file, start over
            part.unlink()
            _transfer(url, part, size, label)
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if status == 206:
            content_range = response.headers.get("Content-Range", "")
            start = content_range.split(" ")[-1].split("-")[0] if content_range else ""
            if start != str(offset):
                raise urllib.error.URLError(f"server answered range {content_range!r} for bytes={offset}-")
            mode = "ab"
        else:  # 200: the whole file again
            offset, mode = 0, "wb"
        with open(part, mode) as out, progress_bar() as bar:
            task = bar.add_task(f"download {label}", total=size, completed=offset)
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.advance(task, len(block))
            except http.client.IncompleteRead as exc:  # keep what did arrive, for the next resume
                out.write(exc.partial)
                raise
            finally:
                out.flush()
                os.fsync(out.fileno())


def fetch(archive: Archive, directory: Path, urls: tuple[str, ...] | None = None) -> Path:
    """Download ``archive`` into ``directory`` (resuming a ``.part``), verify it and return its path."""
    ensure_dir(directory)
    dest = directory / archive.filename
    if _is_verified(dest, archive):
        return dest
    if dest.exists():  # complete but not yet verified (e.g. placed there by hand)
        verify_file(dest, archive.size, archive.md5)
        _mark_verified(dest, archive)
        return dest
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls or archive.urls:
        try:
            _transfer(url, part, archive.size, archive.filename)
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
    have = part.stat().st_size if part.exists() else 0
    if have != archive.size:
        kept = f"{have:,} of {archive.size:,} bytes are kept in {part}; rerun to resume" if have else "nothing kept"
        detail = "; ".join(errors) or "the server closed the connection early"
        raise SpmlError(f"download of {archive.filename} incomplete ({detail}); {kept}, or pass --source a local copy")
    actual = md5_file(part, archive.filename)
    if actual != archive.md5:
        bad = dest.with_name(dest.name + ".bad")
        os.replace(part, bad)
        raise SpmlError(f"checksum mismatch for {archive.filename}: md5 {actual}, expected {archive.md5}; moved "
                        f"to {bad} (delete it), rerun to download again or pass --source a verified copy")
    os.replace(part, dest)
    _mark_verified(dest, archive)
    return dest


# ---------------------------------------------------------------------------------------------- extraction


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    posix = name.replace("\\", "/")
    pure = PurePosixPath(posix)
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in pure.parts:
        raise SpmlError(f"archive {archive} has a member {name!r} that would be written outside the target "
                        "folder; refusing to extract it")
    return pure


def _inside(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
        if depth < 0:
            return False
    return True


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = _safe_name(member.name, archive)
    if member.issym():
        target = member.linkname.replace("\\", "/")
        if target.startswith("/") or not _inside(name.parent / target):
            raise SpmlError(f"archive {archive} has a symlink {member.name!r} -> {member.linkname!r} pointing "
                            "outside the target folder; refusing to extract it")
    elif member.islnk():
        target = member.linkname.replace("\\", "/")
        if target.startswith("/") or not _inside(PurePosixPath(target)):
            raise SpmlError(f"archive {archive} has a hard link {member.name!r} -> {member.linkname!r} pointing "
                            "outside the target folder; refusing to extract it")
    elif not (member.isfile() or member.isdir()):
        raise SpmlError(f"archive {archive} has a special file {member.name!r} (device or fifo); refusing to "
                        "extract it")


def _extract_tar(archive: Path, target: Path) -> None:
    with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar, progress_bar() as bar:
        task = bar.add_task(f"extract {archive.name}", total=archive.stat().st_size)
        for member in tar:  # one streaming pass: compressed tars are not read twice
            _check_tar_member(member, archive)
            tar.extract(member, target, filter="data")
            bar.update(task, completed=raw.tell())


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf, progress_bar() as bar:
        members = zf.infolist()
        for info in members:
            _safe_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise SpmlError(f"archive {archive} has a symlink {info.filename!r}; refusing to extract it")
        task = bar.add_task(f"extract {archive.name}", total=sum(i.file_size for i in members))
        for info in members:
            zf.extract(info, target)
            bar.advance(task, info.file_size)


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into ``target`` (which must be disposable:
    the caller writes into a temporary folder that is deleted on error)."""
    archive = Path(archive)
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target)
        else:
            raise SpmlError(f"{archive} is neither a tar nor a zip archive (or it is truncated); download it again")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise SpmlError(f"archive {archive} has a member that would be written outside the target folder "
                            f"({exc}); refusing to extract it") from None
        raise SpmlError(f"archive {archive} is corrupt or truncated ({exc}); delete it and download again") from None


# ---------------------------------------------------------------------------------------------- local folders


def _real(path: Path, source: Path) -> Path:
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:  # ELOOP (a cycle) or ENOENT (dangling)
        what = "is part of a link cycle" if exc.errno == errno.ELOOP else "points to nothing"
        raise SpmlError(f"--source {source}: the link {path} -> {os.readlink(path)} {what}; remove or fix "
                        "it") from None


def _tree_files(source: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(relative path, real file) of every file under ``source`` and every relative folder, following
    symlinks only while they stay inside ``source`` (the rules of :func:`safe_extract`: a link that
    leaves the folder, a link cycle, a dangling link or a special file is one SpmlError naming it)."""
    root = Path(os.path.realpath(source))
    files: list[tuple[Path, Path]] = []
    folders: list[Path] = []

    def visit(folder: Path, rel: Path, open_folders: tuple[Path, ...]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            shown = source / rel / entry.name
            real = Path(entry.path)
            if entry.is_symlink():
                real = _real(real, source)
                if real != root and root not in real.parents:
                    raise SpmlError(f"--source {source}: the link {shown} -> {os.readlink(entry.path)} points "
                                    "outside the folder; refusing to import it (copy the target in instead)")
                if real in open_folders:
                    raise SpmlError(f"--source {source}: the link {shown} -> {os.readlink(entry.path)} is a "
                                    "link cycle (it points to a folder that holds it); remove it")
            if real.is_dir():
                folders.append(rel / entry.name)
                visit(real, rel / entry.name, (*open_folders, real))
            elif real.is_file():
                files.append((rel / entry.name, real))
            else:
                raise SpmlError(f"--source {source}: {shown} is a special file (device, fifo or socket); "
                                "refusing to import it")

    visit(root, Path(), (root,))
    return files, folders


def link_tree(source: Path, target: Path, what: str = "files") -> int:
    """Mirror ``source`` into ``target`` with hard links (copy across filesystems); returns the file count."""
    source = Path(source)
    files, folders = _tree_files(source)  # every link is checked before anything is written
    with progress_bar() as bar:
        task = bar.add_task(f"linking {what}", total=len(files))
        for rel, real in files:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(real, dest)
            except OSError:
                shutil.copy2(real, dest)
            bar.advance(task)
    for rel in folders:  # keep empty folders too
        (target / rel).mkdir(parents=True, exist_ok=True)
    return len(files)


def link_file(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(Path(source).resolve(), dest)
    except OSError:
        shutil.copy2(source, dest)


def obtain(archives: list[Archive], dataset: str, raw_dir: Path, source: Path | None,
           url_override: dict[str, str] | None = None) -> None:
    """Common ``download`` body for archive datasets.

    ``source`` None: fetch each archive (resumable) and extract it. ``source`` a file: it must be one of
    ``archives`` by name; it is verified and extracted. ``source`` a folder holding some of the archive
    files: those are verified and extracted. Any other folder is taken as already extracted and linked.
    """
    by_name = {a.filename: a for a in archives}
    if source is None:
        for archive in archives:
            urls = (url_override[archive.filename],) if url_override and archive.filename in url_override else None
            safe_extract(fetch(archive, downloads_dir(dataset), urls), raw_dir)
        return
    source = Path(source)
    if source.is_file():
        archive = by_name.get(source.name)
        if archive is None:
            raise SpmlError(f"--source {source}: expected one of the official archives {sorted(by_name)} "
                            "(or an extracted folder)")
        verify_file(source, archive.size, archive.md5)
        safe_extract(source, raw_dir)
        return
    held = [source / name for name in by_name if (source / name).is_file()]
    if held:
        for path in held:
            archive = by_name[path.name]
            verify_file(path, archive.size, archive.md5)
            safe_extract(path, raw_dir)
        return
    if not any(path.is_file() for path in source.rglob("*")):
        raise SpmlError(f"--source {source} is an empty folder (no files); pass the folder the dataset was extracted "
                        f"to, or one of the official archives {sorted(by_name)}")
    link_tree(source, raw_dir, f"{dataset} files")
