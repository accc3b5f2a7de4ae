"""The one way impq-tui reads a file a user could have put anything in.

Any file a command reads may be missing, a directory, unreadable, huge, a FIFO (reading
it blocks), or a link to a device (/dev/zero never ends). read_bytes() opens it without
blocking, checks on the open descriptor that it is a regular file no larger than the
limit, and turns every OSError into a UserError that says what is wrong with which file;
callers add what the file is for (`what`).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from core.errors import UserError

MiB = 1 << 20
RUN_FILE_LIMIT = 256 * MiB        # samples.jsonl of 100k samples of 80 layers is ~200 MB
TEXT_FILE_LIMIT = 64 * MiB        # calibration or evaluation text: ~16M tokens, far more
                                  # than a run uses; tokenizing a GiB would take many GiB

WHY = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
       errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
       errno.EPERM: "permission denied", errno.EIO: "input/output error",
       errno.ENAMETOOLONG: "file name too long", errno.ELOOP: "too many levels of links",
       errno.ENOTDIR: "a component of the path is not a folder",
       errno.EEXIST: "a file of that name is in the way"}


def why(exc: OSError) -> str:
    """An OSError in a few words."""
    return WHY.get(exc.errno, exc.strerror or str(exc))


def read_tail(path: str | os.PathLike, what: str, *, limit: int = MiB) -> bytes:
    """The last `limit` bytes of a regular file of any size (a log), or a UserError as
    read_bytes gives: a FIFO or a device is refused, never read."""
    fd, path = _open_regular(path, what, follow_links=True)
    try:
        start = max(0, os.fstat(fd).st_size - limit)
        chunks, got = [], 0
        while got < limit and (chunk := os.pread(fd, min(1 << 20, limit - got), start + got)):
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {why(exc)}.") from None
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike, what: str, *, limit: int = RUN_FILE_LIMIT,
               follow_links: bool = True) -> bytes:
    """The whole content of a regular file of at most `limit` bytes, or a UserError naming
    `what` the file is. With follow_links False a symbolic link is refused too."""
    fd, path = _open_regular(path, what, follow_links)
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise UserError(f"{what} {path} holds {info.st_size:,} bytes, more than the "
                            f"{limit:,} impq-tui reads from such a file: it is not the file it "
                            "should be, or it is damaged.")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:      # grew while being read
                raise UserError(f"{what} {path} grew past {limit:,} bytes while being read.")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {why(exc)}.") from None
    finally:
        os.close(fd)


def _open_regular(path: str | os.PathLike, what: str, follow_links: bool) -> tuple[int, Path]:
    """A descriptor of `path`, opened without blocking (a FIFO), that is a regular file."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise UserError(f"{what} {path} is a symbolic link; impq-tui reads and writes only "
                            "the file itself there. Replace the link by the file.") from None
        raise UserError(f"cannot read {what} {path}: {why(exc)}.") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{what} {path} is a folder, not a file.")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {path} is not a regular file (a pipe or a device?); "
                            "impq-tui reads only regular files.")
    except OSError as exc:
        os.close(fd)
        raise UserError(f"cannot read {what} {path}: {why(exc)}.") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def read_text(path: str | os.PathLike, what: str, *, limit: int = RUN_FILE_LIMIT) -> str:
    data = read_bytes(path, what, limit=limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start}).") from None
