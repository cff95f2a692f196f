"""What a path is, and opening inputs safely: every reader and writer asks here whether a path is a regular
file, so a FIFO, device, socket or directory is refused by name and never blocks a read. Also: letting go of a
mapped file's pages once they are no longer needed."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.errors import DllamaError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """What a file of this st_mode is unless it is a regular file ("a FIFO (named pipe)", ...); None for a
    regular one."""
    return next((name for test, name in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a file")


def _refuse_irregular(path: str | Path, mode: int, hint: str) -> None:
    kind = special_kind(mode)
    if kind is not None:
        raise DllamaError(f"{path}: is {kind}, not a regular file{hint}")


def open_regular(path: str | Path, expected: str = "") -> BinaryIO:
    """Open `path` for reading only if it is a regular file: a directory, FIFO, device or socket is refused
    by what it is, without blocking (a FIFO is never opened for reading). `expected` is added to errors."""
    hint = f" ({expected})" if expected else ""
    try:
        _refuse_irregular(path, os.stat(path).st_mode, hint)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # swapped for a FIFO since: no block
    except FileNotFoundError:
        raise DllamaError(f"{path}: no such file{hint}") from None
    except OSError as e:
        raise DllamaError(f"{path}: cannot read ({e.strerror}){hint}") from None
    except ValueError as e:  # a NUL byte in the path
        raise DllamaError(f"{path!r}: cannot read ({e}){hint}") from None
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode, hint)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def release_file_pages(a: np.ndarray) -> None:
    """Drop this process's resident pages of the read-only file mapping `a` views (once uploaded, or once a
    converter is done with a tensor); the mapping stays valid and the page cache serves any later touch.
    Arrays that view no file mapping are left alone."""
    base: Any = a
    while base is not None and getattr(base, "_mmap", None) is None:
        base = base.base if isinstance(base, np.ndarray) else None
    if base is None or a.nbytes == 0 or not a.flags.c_contiguous:
        return
    mm = base._mmap
    start = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
    lo = a.__array_interface__["data"][0] - start
    hi = lo + a.nbytes
    lo -= lo % mmap.PAGESIZE
    if 0 <= lo and hi <= len(mm):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
