"""Fetching files over HTTP(S) with checksum verification and atomic writes.

A download streams into a temporary file in the destination's directory,
computes the MD5 while writing, and is renamed onto the destination only when
the checksum matches.  Any failure (network, HTTP status, short read, wrong
checksum, interruption) removes the temporary file, so a file at the
destination path is always a complete, verified one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import DatasetError

__all__ = ["file_md5", "fetch", "DEFAULT_TIMEOUT", "MAX_DOWNLOAD_BYTES"]

#: Socket timeout of one download (seconds, per blocking operation).
DEFAULT_TIMEOUT = 60.0

#: Refuse responses larger than this (bytes); the largest file fetched
#: (cifar-10-python.tar.gz) is about 170 MB.
MAX_DOWNLOAD_BYTES = 1 << 30

_CHUNK = 1 << 20


def _md5():
    try:
        return hashlib.md5(usedforsecurity=False)
    except TypeError:  # Python < 3.9 keyword not supported
        return hashlib.md5()


def file_md5(path: os.PathLike) -> str:
    """Hex MD5 digest of the file at `path`."""
    h = _md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_one(url: str, dest: Path, md5: str, timeout: float) -> int:
    """Download `url` to `dest` atomically; return the size. Raises on failure."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = _md5()
        size = 0
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "flowpp-data"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                if status != 200:
                    raise DatasetError(f"HTTP status {status}")
                length = resp.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                if expected is not None and expected > MAX_DOWNLOAD_BYTES:
                    raise DatasetError(f"server announces {expected} bytes, more than expected")
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    size += len(block)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise DatasetError(f"response exceeds {MAX_DOWNLOAD_BYTES} bytes")
                    h.update(block)
                    out.write(block)
            if expected is not None and size != expected:
                raise DatasetError(f"connection closed after {size} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != md5.lower():
            raise DatasetError(f"checksum mismatch: MD5 of the downloaded data is {digest}, expected {md5.lower()}")
        os.replace(tmp, dest)
        return size
    finally:
        # After os.replace the temp name is gone; otherwise never leave a
        # partial file behind (also on KeyboardInterrupt).
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def fetch(
    urls: Sequence[str],
    dest: os.PathLike,
    md5: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    log: Optional[Callable[[str], object]] = print,
) -> Path:
    """Download `dest` from the first of `urls` that yields the right file.

    `urls` are complete file URLs tried in order (mirrors); each attempt must
    deliver data whose MD5 equals `md5`.  On success `dest` exists and holds
    the verified file.  If every URL fails, raises DatasetError listing each
    URL's failure and saying where to place the file by hand.  The destination
    directory is created if needed.
    """
    dest = Path(dest)
    if not urls:
        raise DatasetError(f"{dest}: no download URL is configured; place the file there by hand")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{dest.parent}: cannot create the data directory ({exc})") from exc
    failures = []
    for url in urls:
        if log is not None:
            log(f"downloading {url} -> {dest}")
        try:
            size = _fetch_one(url, dest, md5, timeout)
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            failures.append(f"{url}: cannot connect ({exc.reason})")
        except DatasetError as exc:
            failures.append(f"{url}: {exc}")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # timeouts, resets, short reads, malformed URLs, disk full
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
        else:
            if log is not None:
                log(f"downloaded {dest.name} ({size / 1e6:.1f} MB, MD5 verified)")
            return dest
    raise DatasetError(
        f"{dest}: download failed; nothing was saved.\n  "
        + "\n  ".join(failures)
        + f"\nDownload {dest.name} (MD5 {md5}) yourself and place it at {dest}."
    )
