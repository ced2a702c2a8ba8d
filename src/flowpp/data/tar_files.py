"""Tar archives read in place, never extracted: absolute paths, ``..``, links and device or FIFO
members refuse the whole archive."""

from __future__ import annotations

import os
import re
import tarfile
from typing import Collection

from .errors import DatasetError
from .safety import Closing, PathLike, fail

__all__ = ["SafeTar", "read_tar_stream", "check_tar_member", "tar_member_name"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def tar_member_name(name: str) -> str:
    """Normalise a member name for lookups: '/' separators, no './' parts."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_tar_member(member: tarfile.TarInfo, archive: PathLike) -> None:
    """Refuse a tar member that would be unsafe to extract or read.

    Refused: absolute names (``/x``, ``C:x``, ``\\x``), any ``..`` component,
    symbolic and hard links, and everything that is neither a regular file nor
    a directory (character/block devices, FIFOs).  We never extract, but an
    archive that carries such members is not one of the official archives, so
    the whole archive is refused rather than silently skipping the member.
    """
    name = member.name
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise fail(archive, f"refusing tar member {name!r}: absolute path")
    if ".." in norm.split("/"):
        raise fail(archive, f"refusing tar member {name!r}: '..' path component (path traversal)")
    if member.issym() or member.islnk():
        raise fail(archive, f"refusing tar member {name!r}: it is a link (to {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise fail(
            archive,
            f"refusing tar member {name!r}: not a regular file or directory (device, FIFO or other special file)",
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo that remembers why header reading stopped.

    ``tarfile`` silently treats a truncated, missing or corrupted header after
    the first member as the end of the archive.  Recording the reason lets
    :func:`_check_tar_end` tell a proper end-of-archive block (all zeros) from
    a truncated or damaged archive.
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj):
        try:
            return super().fromtarfile(tarfile_obj)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError) as exc:
            tarfile_obj._flowpp_stop = (tarfile_obj.offset, exc)
            raise


def _check_tar_end(tar: tarfile.TarFile, path: PathLike) -> None:
    stop = getattr(tar, "_flowpp_stop", None)
    if stop is None:
        return
    offset, exc = stop
    if isinstance(exc, tarfile.EmptyHeaderError):
        what = "it ends without the end-of-archive marker (truncated)"
    elif isinstance(exc, tarfile.TruncatedHeaderError):
        what = "it ends inside a member header (truncated)"
    else:
        what = "a member header is corrupted (bad checksum)"
    raise fail(path, f"cannot read the tar archive: {what} at byte {offset}; delete it and fetch it again")


_TAR_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    UnicodeError,
    MemoryError,
    __import__("zlib").error,
)


def read_tar_stream(path: PathLike, wanted: Collection[str], max_member_bytes: int) -> dict:
    """Read the members named in `wanted` from a (possibly compressed) tar in one pass.

    Streams the archive (``tarfile`` mode ``'r|*'``), so a ``.tar.gz`` is
    decompressed exactly once.  Every member is checked with
    :func:`check_tar_member`, including those not wanted.  Names are compared
    after :func:`tar_member_name` normalisation.  Returns ``{name: bytes}`` for
    the wanted members found; a wanted member that appears twice is refused.
    Missing members are simply absent from the result (the caller names them).
    """
    wanted = {tar_member_name(w) for w in wanted}
    found: dict = {}
    try:
        with tarfile.open(os.fspath(path), mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                check_tar_member(member, path)
                key = tar_member_name(member.name)
                if key not in wanted or not member.isreg():
                    continue
                if key in found:
                    raise fail(path, f"tar member {member.name!r} appears twice")
                if member.size > max_member_bytes:
                    raise fail(
                        path,
                        f"tar member {member.name!r} is {member.size} bytes, "
                        f"more than the {max_member_bytes} expected at most",
                    )
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise fail(path, f"tar member {member.name!r} is truncated ({len(data)} of {member.size} bytes)")
                found[key] = data
            _check_tar_end(tar, path)
    except DatasetError:
        raise
    except _TAR_ERRORS as exc:
        raise fail(
            path, "cannot read the tar archive: it is truncated or corrupted; delete it and fetch it again", exc
        ) from exc
    return found


class SafeTar(Closing):
    """An uncompressed or compressed tar opened for random access to its files.

    Opening scans every header (cheap for an uncompressed tar: it only seeks)
    and checks each member with :func:`check_tar_member`.  ``files`` maps the
    normalised name of each regular file to its ``TarInfo``.  Use as a context
    manager; :meth:`read` returns a member's bytes.
    """

    def __init__(self, path: PathLike):
        self.path = path
        self._tar = None
        try:
            self._tar = tarfile.open(os.fspath(path), mode="r:*", tarinfo=_CheckedTarInfo)
            self.files: dict = {}
            for member in self._tar:
                check_tar_member(member, path)
                if member.isreg():
                    key = tar_member_name(member.name)
                    if key in self.files:
                        raise fail(path, f"tar member {member.name!r} appears twice")
                    self.files[key] = member
            _check_tar_end(self._tar, path)
        except DatasetError:
            self.close()
            raise
        except _TAR_ERRORS as exc:
            self.close()
            raise fail(path, "cannot read the tar archive: it is truncated or corrupted", exc) from exc

    def read(self, key: str, max_bytes: int) -> bytes:
        """Return the bytes of regular-file member `key` (at most `max_bytes`)."""
        member = self.files[key]
        if member.size > max_bytes:
            raise fail(
                self.path,
                f"tar member {member.name!r} is {member.size} bytes, more than the {max_bytes} expected at most",
            )
        try:
            fobj = self._tar.extractfile(member)
            data = fobj.read() if fobj is not None else b""
        except _TAR_ERRORS as exc:
            raise fail(self.path, f"cannot read tar member {member.name!r}", exc) from exc
        if len(data) != member.size:
            raise fail(self.path, f"tar member {member.name!r} is truncated ({len(data)} of {member.size} bytes)")
        return data

    def close(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except _TAR_ERRORS:
                pass
            self._tar = None
