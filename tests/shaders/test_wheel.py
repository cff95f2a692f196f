"""A wheel (a non-editable install) carries every package of the source tree, the API server's web chat page
and every shader source: each .comp's #includes resolve inside the wheel's shaders/ folder and every shader
compiles from there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import shaders.compile
from shaders.compile import spirv

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "cpu_fallback", "net", "shaders")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def test_wheel_carries_and_compiles_every_shader(tmp_path, monkeypatch):
    # built from a copy, so that setuptools' build/ and egg-info never land in the working tree
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(ROOT, src, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src)]
    res = subprocess.run([*cmd, "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dllama-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "wheel")
    carried = tmp_path / "wheel" / "shaders"
    packages = {p.parent.relative_to(ROOT) for top in PACKAGES for p in (ROOT / top).rglob("__init__.py")}
    missing = [str(p) for p in sorted(packages) if not (tmp_path / "wheel" / p / "__init__.py").is_file()]
    assert not missing, f"the wheel lacks packages {missing}"  # engine/arch was once left out
    page = Path("engine/server/static/chat.html")  # the API server's web chat at /
    assert (tmp_path / "wheel" / page).read_bytes() == (ROOT / page).read_bytes()

    comps = sorted(carried.glob("*.comp"))
    assert {p.name for p in comps} == {p.name for p in (ROOT / "shaders").glob("*.comp")}
    for comp in comps:
        pending, seen = [comp], set()
        while pending:
            f = pending.pop()
            seen.add(f.name)
            for inc in INCLUDE.findall(f.read_text()):
                assert (carried / inc).is_file(), f"{f.name} includes {inc}, which the wheel lacks"
                if inc not in seen:
                    pending.append(carried / inc)

    monkeypatch.setattr(shaders.compile, "cache_dir", lambda: tmp_path / "spirv")
    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = list(pool.map(lambda p: spirv(p.stem, source_dir=carried), comps))
    assert all(code[:4] == b"\x03\x02\x23\x07" for code in codes)  # the SPIR-V magic number
    assert len(list((tmp_path / "spirv").glob("*.spv"))) == len(comps)  # compiled here, not from the cache
