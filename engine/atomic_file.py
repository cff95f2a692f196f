"""Atomic file output, only to regular files: write `.NAME.dllama-tmp-PID` beside the target, rename it at the
end, remove it on every failure (signals included); a killed run's leftover is removed by the next write."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from engine.errors import DllamaError
from engine.files import special_kind

TMP_TAG = ".dllama-tmp-"
_group: list[tuple[Path, Path]] | None = None  # (temp, target) renames deferred by all_or_none()


def check_output(path: str | Path) -> Path:
    """The real path (symlinks resolved) an output goes to; refuses an empty name, a directory, a device, a
    FIFO, a socket or a missing directory, so a run fails before its work rather than after it."""
    text = os.fspath(path)
    if not text:
        raise DllamaError("the output file name is empty: give a file path")
    if text.endswith(os.sep):
        raise DllamaError(f"{text} names a directory: give a file path")
    target = Path(os.path.realpath(text))
    try:
        kind = special_kind(target.stat().st_mode)
    except FileNotFoundError:
        kind = None
    except OSError as e:
        raise DllamaError(f"{text}: cannot write there ({e.strerror})") from None
    if kind is not None:
        raise DllamaError(f"{text} is {kind}, not a regular file: outputs are only written to regular files")
    if not target.parent.is_dir():
        raise DllamaError(f"{text}: directory {target.parent} does not exist")
    return target


def _remove_stale(target: Path) -> None:
    """Delete temp files of `target` whose writer is gone (or was an earlier process with this PID)."""
    for leftover in target.parent.glob(f".{target.name}{TMP_TAG}*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isascii() and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only if the block completes; otherwise it is deleted."""
    target = check_output(path)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}{TMP_TAG}{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise DllamaError(f"{path}: cannot create the output file ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if _group is None:
            os.replace(tmp, target)
        else:
            _group.append((tmp, target))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DllamaError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Every atomic_write inside the block lands only when the whole block succeeds (e.g. a .m and its .t)."""
    global _group
    if _group is not None:
        raise RuntimeError("all_or_none() blocks do not nest")
    _group = pending = []
    try:
        yield
        for tmp, target in pending:
            os.replace(tmp, target)
    except BaseException as e:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise DllamaError(f"cannot write the outputs ({e.strerror or e})") from None
        raise
    finally:
        _group = None
