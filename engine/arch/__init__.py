"""Model architectures, one module each, found by name: GGUF `general.architecture` or the `.m` arch_type.

Every module here that defines `ARCH` (an engine.arch.base.Arch) is an architecture; adding one is one new
file (plus its tests). Modules are imported on first lookup, so importing the package costs nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from engine.arch.base import Arch
from engine.errors import DllamaError


@cache
def registry() -> dict[str, Arch]:
    """Every architecture by name."""
    found: dict[str, Arch] = {}
    for info in pkgutil.iter_modules(__path__):
        arch = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ARCH", None)
        if isinstance(arch, Arch):
            found[arch.name] = arch
    return found


def get_arch(name: object, where: str = "") -> Arch:
    """The architecture called `name`; unknown names are refused with the list of supported ones."""
    arch = registry().get(name) if isinstance(name, str) else None
    if arch is None:
        prefix = f"{where}: " if where else ""
        known = ", ".join(sorted(registry()))
        raise DllamaError(f"{prefix}architecture {name!r} is not supported (supported: {known})")
    return arch


def arch_for_m_type(code: int, where: str) -> Arch:
    """The architecture of a `.m` header's arch_type."""
    for arch in registry().values():
        if arch.m_arch_type == code:
            return arch
    known = ", ".join(f"{a.m_arch_type:#x} {a.name}" for a in registry().values() if a.m_arch_type)
    raise DllamaError(f"{where}: unknown architecture {code:#x} in the .m header (known: {known})")
