"""`dllama pull` and `dllama launch`: fetch a model by catalogue name or URL; list the catalogue; pull a
model if it is missing and run chat, inference or the API server on it (distributed-llama's launch.py)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from engine import catalog
from engine.catalog import (
    HubModel,
    PackagedModel,
    Pulled,
    cache_dir,
    find_model,
    is_url,
    pull,
    unknown_name,
)
from engine.errors import DllamaError

LAUNCH_MODES = ("chat", "inference", "api", "worker")
M_DEFAULTS = (("--buffer-float-type", "q80"), ("--max-seq-len", "4096"))  # the launcher's flags for .m models


def _root(directory: str | None) -> Path | None:
    """The folder models go to: --dir when given, else None (the cache: $DLLAMA_CACHE or ~/.cache/dllama)."""
    if directory is None:
        return None
    if not directory:
        raise DllamaError("--dir is empty: give a folder")
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise DllamaError(f"--dir {directory} is not a folder")
    return root


def _entry(arg: str) -> catalog.Entry | None:
    """The catalogue entry `arg` names (None for a URL or an unknown name)."""
    return None if is_url(arg) else find_model(arg)


def pull_command(name_or_url: str, directory: str | None = None) -> Pulled:
    """`dllama pull NAME|hf://OWNER/REPO/FILE|https://...`: download what is missing (resuming a partial
    download, verifying size and sha256) and say where the files are; a complete model costs no network."""
    if not name_or_url:
        raise DllamaError("the model name is empty: give a name from `dllama launch`, hf://... or a URL")
    pulled = pull(name_or_url, _root(directory))
    files = str(pulled.model) + (f" + {pulled.tokenizer}" if pulled.tokenizer else "")
    if pulled.fetched:
        state = "downloaded and verified"
    elif isinstance(_entry(name_or_url), PackagedModel):
        state = "embedded in an installed package, nothing to download"
    else:
        state = "already downloaded and verified, nothing to do"
    print(f"✅ {name_or_url}: {state}: {files}", flush=True)
    return pulled


def list_models(directory: str | None = None) -> None:
    """Print the catalogue: name, what it is, size, parts, and whether it is downloaded (no network)."""
    root = _root(directory)
    rows = [("NAME", "WHAT", "SIZE", "PARTS", "DOWNLOADED")]
    for entry in catalog.CATALOG:
        here = "yes" if entry.present(root) else "no"
        rows.append((entry.name, entry.description, entry.size_label, str(entry.parts()), here))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.rjust(w) if i in (2, 3) else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    print(
        f"\nModels are kept in {root or cache_dir()} (--dir, or $DLLAMA_CACHE). `dllama launch NAME "
        "[chat|inference|api|worker] [options]` pulls a model if it is missing and runs it; `dllama pull "
        "hf://OWNER/REPO/FILE.gguf` fetches any GGUF from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN)."
    )


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def launch_command(
    name: str | None,
    mode: str | None = None,
    extra_args: Sequence[str] = (),
    directory: str | None = None,
    before: Sequence[str] = (),
) -> None:
    """`dllama launch [NAME [chat|inference|api|worker] [options]]`: without a name list the catalogue; else
    pull the model if it is missing and run the command (mode None: the first extra word if it is a mode,
    else chat) with --model (and --tokenizer for a .m) set; `before` are global options (--backend ...)."""
    if not name:
        list_models(directory)
        return
    args = list(extra_args)
    if mode is None:
        mode = args.pop(0) if args and args[0] in LAUNCH_MODES else "chat"
    if mode not in LAUNCH_MODES:
        raise DllamaError(f"launch runs {', '.join(LAUNCH_MODES)}, not {mode!r}")
    for flag in ("--model", "--tokenizer"):
        if _given(args, flag):
            raise DllamaError(
                f"launch sets {flag} itself: drop it, or run `dllama {mode} {flag} ...` instead"
            )
    if not is_url(name) and _entry(name) is None:
        raise unknown_name(name)
    argv = [*before, mode]
    if mode == "worker":
        print("a worker receives its slice of the model from the root: nothing to download", file=sys.stderr)
    else:
        pulled = pull_command(name, directory)
        argv += ["--model", str(pulled.model)]
        if pulled.tokenizer is not None:
            argv += ["--tokenizer", str(pulled.tokenizer)]
        if isinstance(_entry(name), HubModel):
            argv += [item for flag, value in M_DEFAULTS if not _given(args, flag) for item in (flag, value)]
    argv += args
    print(f"▶️  dllama {shlex.join(argv)}", file=sys.stderr, flush=True)
    from engine.cli import main

    main(argv)
