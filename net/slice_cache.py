"""A worker's on-disk cache of the weight slices roots sent it: a root that reconnects with the same model and
split sends only what the worker lacks (a restarted worker is back in seconds, not a re-stream of its slice).

The root names each worker's slice with a key (`slice_key`): a hash of the model file's identity
(`model_identity`: its size, mtime, inode, first 16 MiB and 64 KiB samples through it, so a different or
rewritten file never matches) and of every tensor the node will hold (name, type, shape). An entry is one
folder per key: NAME.bin holds a tensor's bytes and NAME.json its type, shape and sha256, written after the
data (a cut write leaves no .json and counts as missing). A tensor is loaded only when its bytes hash to the
recorded digest; anything else is re-sent by the root and written again. With a size bound, whole entries are
evicted least recently used first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from engine.atomic_file import atomic_write
from engine.errors import DllamaError
from engine.files import open_regular
from engine.slicing import NodeSlice
from engine.weight_types import WEIGHT_TYPES
from engine.weights import Model, Weight, empty_weight

CACHE_VERSION = 1  # part of every key: a change of the entry layout starts a new cache
HEAD_BYTES = 16 << 20  # bytes at the start of a model file hashed into its identity (header, metadata)
SAMPLES, SAMPLE_BYTES = 64, 64 << 10  # spread samples of the rest
READ_CHUNK = 16 << 20
META_BYTES = 512  # room counted for a tensor's .json beside its bytes


def model_identity(model: Model) -> str:
    """A hash that changes whenever the model file does (another file, a re-download, an edit in place)."""
    st = os.stat(model.path)
    h = hashlib.sha256(f"dllama-model {CACHE_VERSION} {st.st_size} {st.st_mtime_ns} {st.st_ino}".encode())
    with open_regular(model.path, "the model file") as f:
        h.update(f.read(HEAD_BYTES))
        for k in range(SAMPLES):
            f.seek(k * st.st_size // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def slice_key(identity: str, sl: NodeSlice, weights: Mapping[str, Weight]) -> str:
    """The cache key of one node's slice: the model identity, the slice's ranges and its tensors' layout."""
    layout = {
        "v": CACHE_VERSION,
        "model": identity,
        "slice": [sl.n_nodes, sl.kv_heads, sl.q_heads, sl.ffn, sl.moe, sl.vocab],
        "tensors": sorted([n, w.dtype, list(w.shape)] for n, w in weights.items()),
    }
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def parse_size(text: str) -> int:
    """Bytes from `20G`, `512M`, `1.5T` or a plain number (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not (value == value and 0 < value < 1 << 60):
        raise DllamaError(f"--cache-size {text!r}: give a size such as 20G, 512M or 1048576 (bytes)")
    return int(value * units[unit])


def _sha256(data: memoryview) -> str:
    h = hashlib.sha256()
    for i in range(0, len(data), READ_CHUNK):
        h.update(data[i : i + READ_CHUNK])
    return h.hexdigest()


class SliceCache:
    """The cache folder of one worker; `limit` bounds its total size in bytes (None: no bound)."""

    def __init__(self, folder: str | Path, limit: int | None = None, log: Callable[[str], None] = print):
        self.folder, self.limit, self.log = Path(folder), limit, log
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise DllamaError(f"--cache-dir {folder}: cannot write there ({e.strerror or e})") from None

    def load(self, key: str, expected: Mapping[str, tuple[tuple[int, ...], bool]]) -> dict[str, Weight]:
        """The tensors of entry `key` that the node expects and whose bytes match their digest."""
        entry = self.folder / key
        found: dict[str, Weight] = {}
        if not entry.is_dir():
            return found
        bad = 0
        for name, (shape, _) in expected.items():
            w = self._read(entry, name, shape)
            if w is None:
                bad += (entry / f"{name}.bin").exists()
            else:
                found[name] = w
        with contextlib.suppress(OSError):
            os.utime(entry)  # most recently used
        if bad:
            self.log(
                f"⚠️ Slice cache: {bad} cached tensors were incomplete or damaged; the root re-sends them"
            )
        return found

    def _read(self, entry: Path, name: str, shape: tuple[int, ...]) -> Weight | None:
        try:
            meta = json.loads((entry / f"{name}.json").read_text())
            dtype = meta["dtype"]
            if dtype not in WEIGHT_TYPES or tuple(meta["shape"]) != shape:
                return None
            w = empty_weight(name, dtype, shape)
            data = memoryview(w.data).cast("B")
            with open(entry / f"{name}.bin", "rb") as f:
                if os.fstat(f.fileno()).st_size != len(data) or f.readinto(data) != len(data):
                    return None
            return w if _sha256(data) == meta["sha256"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, weights: Mapping[str, Weight], fresh: set[str]) -> None:
        """Write the `fresh` tensors into entry `key` (evicting old entries to stay within the bound); a full
        disk or any other write error only stops caching, with one line in the log."""
        need = sum(weights[n].nbytes + META_BYTES for n in fresh)
        if not fresh:
            return
        entry = self.folder / key
        if self.limit is not None:
            held = _size(entry) if entry.is_dir() else 0
            if held + need > self.limit:
                self.log(f"⚠️ Slice cache: this slice ({(held + need) / 1e6:.1f} MB) exceeds --cache-size")
                return
            self._evict(need, keep=entry)
        t0 = time.monotonic()
        try:
            entry.mkdir(exist_ok=True)
            for name in sorted(fresh):
                self._write(entry, weights[name])
        except (OSError, DllamaError) as e:  # atomic_write names the file and the OS error
            why = getattr(e, "strerror", None) or e
            self.log(f"⚠️ Slice cache: cannot write {entry} ({why}); this slice stays uncached")
            return
        self.log(f"💾 Slice cache: {need / 1e6:.1f} MB written in {time.monotonic() - t0:.1f} s")

    def _write(self, entry: Path, w: Weight) -> None:
        data = memoryview(w.data).cast("B") if w.data.flags.c_contiguous else memoryview(w.data.tobytes())
        meta = {"dtype": w.dtype, "shape": list(w.shape), "sha256": _sha256(data)}
        with contextlib.suppress(FileNotFoundError):  # no digest may describe bytes being replaced
            (entry / f"{w.name}.json").unlink()
        for target, blob in ((f"{w.name}.bin", data), (f"{w.name}.json", json.dumps(meta).encode())):
            with atomic_write(entry / target) as f:
                f.write(blob)

    def _evict(self, need: int, keep: Path) -> None:
        """Delete least recently used entries other than `keep` until `need` more bytes fit the bound."""
        entries = [p for p in self.folder.iterdir() if p.is_dir()]
        total = sum(_size(p) for p in entries)
        for p in sorted((p for p in entries if p != keep), key=lambda p: p.stat().st_mtime):
            if total + need <= self.limit:
                return
            total -= _size(p)
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"💾 Slice cache: evicted {p.name[:12]} (least recently used)")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
