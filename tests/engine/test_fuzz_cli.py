"""Hostile command lines through the real `dllama` CLI in subprocesses (time-bounded, address-space capped):
every bad flag, prompt or output ends with exit 2, at most 3 lines on stderr, no traceback and nothing left
in the output folder; SIGINT exits 130 and SIGTERM 143 with one line, temp files gone."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinymodel import write_tiny_gguf

from engine.config import RopeScaling

ROOT = Path(__file__).resolve().parents[2]
MEMORY_CAP = 3 << 30  # bytes of address space per CLI process
TIMEOUT_S = 60


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def dllama(args: list, stdin: bytes | int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """The CLI with `args` (str or bytes) and stdin (bytes or a descriptor), bounded in time and memory."""
    kw = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=TIMEOUT_S,
        env=_env(),
        preexec_fn=_cap_memory,
        **kw,
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def assert_refused(r: subprocess.CompletedProcess, needle: str) -> None:
    err = r.stderr.decode(errors="replace")
    lines = err.strip().splitlines()
    assert r.returncode == 2, err
    assert "Traceback" not in err and 1 <= len(lines) <= 3, err
    assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", wtype="q40", dim=64, hidden_dim=96)


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    """An output folder holding a FIFO, a folder, a link to /dev/null and a 17 MiB sparse text file."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "null").symlink_to("/dev/null")  # a device target, without ever naming /dev/null itself
    with open(tmp_path / "big.txt", "wb") as f:
        f.truncate(17 << 20)
    return tmp_path


INFER = ["inference", "--prompt", "hi", "--steps", "2", "--model", "{tiny}"]
CONVERT = ["convert", "--model", "{tiny}"]
PPL = ["perplexity", "--model", "{tiny}"]
CHAT = ["chat", "--model", "{tiny}", "--system", "x"]

# (case id, arguments, what the error line names); {tiny} is the tiny model, {dir} the output folder
CASES = [
    ("temperature-nan", [*INFER, "--temperature", "nan"], "--temperature"),
    ("temperature-negative", [*INFER, "--temperature", "-1"], "--temperature"),
    ("temperature-inf", [*INFER, "--temperature", "inf"], "--temperature"),
    ("temperature-word", [*INFER, "--temperature", "warm"], "--temperature"),
    ("topp-over-1", [*INFER, "--topp", "2"], "--topp"),
    ("topp-negative", [*INFER, "--topp", "-1"], "--topp"),
    ("topp-nan", [*INFER, "--topp", "nan"], "--topp"),
    ("seed-negative", [*INFER, "--seed", "-1"], "--seed"),
    ("seed-2^64", [*INFER, "--seed", str(2**64)], "--seed"),
    ("seed-float", [*INFER, "--seed", "1.5"], "--seed"),
    ("steps-0", [*INFER, "--steps", "0"], "--steps"),
    ("steps-negative", [*INFER, "--steps", "-5"], "--steps"),
    ("max-tokens-0", [*CHAT, "--max-tokens", "0"], "--max-tokens"),
    ("net-timeout-0", [*INFER, "--net-timeout", "0"], "--net-timeout"),
    ("net-timeout-nan", [*INFER, "--net-timeout", "nan"], "--net-timeout"),
    ("net-timeout-inf", [*INFER, "--net-timeout", "inf"], "--net-timeout"),
    ("net-timeout-negative", [*INFER, "--net-timeout", "-1"], "--net-timeout"),
    ("net-timeout-huge", [*INFER, "--net-timeout", "1e9"], "--net-timeout"),
    ("nthreads-0", [*INFER, "--nthreads", "0"], "--nthreads"),
    ("nthreads-huge", [*INFER, "--nthreads", "100000"], "--nthreads"),
    ("max-seq-len-0", [*INFER, "--max-seq-len", "0"], "--max-seq-len"),
    ("max-seq-len-negative", [*INFER, "--max-seq-len", "-1"], "--max-seq-len"),
    ("gpu-index-negative", [*INFER, "--gpu-index", "-1"], "--gpu-index"),
    ("gpu-index-negative-global", ["--gpu-index", "-2", *INFER], "--gpu-index"),
    ("worker-port-high", ["worker", "--port", "70000"], "--port"),
    ("worker-port-negative", ["worker", "--port", "-1"], "--port"),
    ("worker-host-empty", ["worker", "--host", ""], "--host"),
    ("api-port-high", ["api", "--port", "65536"], "--port"),
    ("api-queue-negative", ["api", "--queue-size", "-1"], "--queue-size"),
    ("api-temperature-nan", ["api", "--temperature", "nan"], "--temperature"),
    ("model-empty", ["inference", "--prompt", "hi", "--model", ""], "--model"),
    ("tokenizer-empty", [*INFER, "--tokenizer", ""], "--tokenizer"),
    ("workers-empty", [*INFER, "--workers", ""], "--workers"),
    ("workers-port-range", [*INFER, "--workers", "127.0.0.1:99999"], "99999"),
    ("workers-no-port", [*INFER, "--workers", "nohost"], "nohost"),
    ("workers-twice", [*INFER, "--workers", "127.0.0.1:9,127.0.0.1:9"], "twice"),
    ("workers-unicode-digit", [*INFER, "--workers", "127.0.0.1:\u00b2"], "--workers"),
    ("buffer-type-empty", [*INFER, "--buffer-float-type", ""], "buffer-float-type"),
    ("backend-empty", ["--backend", "", *INFER], "backend"),
    ("json-empty", [*INFER, "--json", ""], "--json"),
    ("json-device", [*INFER, "--json", "{dir}/null"], "character device"),
    ("json-fifo", [*INFER, "--json", "{dir}/fifo"], "FIFO"),
    ("json-folder", [*INFER, "--json", "{dir}/folder"], "directory"),
    ("json-trailing-slash", [*INFER, "--json", "{dir}/new/"], "directory"),
    ("json-missing-folder", [*INFER, "--json", "{dir}/missing/r.json"], "does not exist"),
    ("convert-output-empty", [*CONVERT, "--output", ""], "--output"),
    ("convert-output-fifo", [*CONVERT, "--output", "{dir}/fifo"], "FIFO"),
    ("convert-output-folder", [*CONVERT, "--output", "{dir}/folder"], "directory"),
    ("convert-output-device", [*CONVERT, "--output", "{dir}/null"], "character device"),
    ("convert-t-fifo", [*CONVERT, "--output", "{dir}/t.m", "--tokenizer-output", "{dir}/fifo"], "FIFO"),
    ("convert-t-missing", [*CONVERT, "--output", "{dir}/t.m", "--tokenizer-output", "{dir}/no/t.t"], "exist"),
    ("convert-t-same", [*CONVERT, "--output", "{dir}/t.m", "--tokenizer-output", "{dir}/t.m"], "same file"),
    ("convert-weight-type", [*CONVERT, "--output", "{dir}/t.m", "--weights-float-type", "q7"], "q7"),
    ("convert-model-empty", ["convert", "--model", "", "--output", "{dir}/t.m"], "--model"),
    ("ppl-file-zero", [*PPL, "--file", "/dev/zero"], "character device"),
    ("ppl-file-fifo", [*PPL, "--file", "{dir}/fifo"], "FIFO"),
    ("ppl-file-folder", [*PPL, "--file", "{dir}/folder"], "directory"),
    ("ppl-file-big", [*PPL, "--file", "{dir}/big.txt"], "16 MiB"),
    ("ppl-file-empty-name", [*PPL, "--file", ""], "--file"),
    ("ppl-file-and-prompt", [*PPL, "--file", "{dir}/big.txt", "--prompt", "x"], "exactly one"),
    ("chat-template-empty", [*CHAT, "--chat-template", ""], "--chat-template"),
    ("chat-template-unknown", [*CHAT, "--chat-template", "nope"], "nope"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_flag_is_refused(tiny: Path, case_dir: Path, args: list[str], needle: str) -> None:
    before = snapshot(case_dir)
    t0 = time.monotonic()
    r = dllama([a.format(tiny=tiny, dir=case_dir) for a in args])
    assert_refused(r, needle)
    assert time.monotonic() - t0 < 30
    assert snapshot(case_dir) == before  # nothing written, nothing replaced, no temp file left
    assert os.readlink(case_dir / "null") == "/dev/null"


def test_convert_to_its_own_source_is_refused(tiny: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    src.write_bytes(tiny.read_bytes())
    before = snapshot(tmp_path)
    assert_refused(dllama(["convert", "--model", str(src), "--output", str(src)]), "source")
    assert snapshot(tmp_path) == before and src.read_bytes() == tiny.read_bytes()


@pytest.mark.parametrize(
    "kw, needle",
    [(dict(rope_theta=1e12), "rope_theta"), (dict(rope_scaling=RopeScaling(3e9, 1.0, 4.0, 8192)), "factor")],
    ids=["rope-theta", "rope-scaling-factor"],
)
def test_convert_of_a_float_no_m_header_holds_is_one_line(tmp_path: Path, kw: dict, needle: str) -> None:
    src = write_tiny_gguf(tmp_path / "bad.gguf", **kw)  # valid for the engine, but over int32
    before = snapshot(tmp_path)
    r = dllama(["convert", "--model", str(src), "--output", str(tmp_path / "b.m")])
    assert_refused(r, needle)
    assert snapshot(tmp_path) == before


def test_chat_turn_over_the_bound_is_refused(tiny: Path) -> None:
    with open("/dev/zero", "rb") as zero:  # one endless line: read only up to the 1 MiB bound
        r = dllama(["chat", "--model", str(tiny), "--system", "x", "--max-tokens", "2"], stdin=zero.fileno())
    assert_refused(r, "1 MiB")


# ---- text that is not UTF-8: each invalid byte becomes U+FFFD, as llama.cpp's tokenizer reads it ----
def test_prompt_with_invalid_utf8_is_read_with_replacement(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["inference", "--model", str(tiny), "--steps", "1", "--temperature", "0", "--json", str(out)]
    r = dllama([*args, b"--prompt", b"a\xff\xfeb"])
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert json.loads(out.read_text())["prompt"] == "a\ufffd\ufffdb"


def test_perplexity_of_invalid_utf8_prompt_and_file(tiny: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_bytes(b"ab\xff cd \xc3( ef")
    for source in (["--file", str(text)], [b"--prompt", b"ab\xff cd \xc3( ef"]):
        out = tmp_path / "p.json"
        r = dllama(["perplexity", "--model", str(tiny), *source, "--json", str(out)])
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
        # "ab" + U+FFFD + " cd " + U+FFFD + "( ef": the tiny tokenizer has one token per UTF-8 byte (+ BOS)
        assert json.loads(out.read_text())["n_tokens"] in (2 + 3 + 4 + 3 + 4, 2 + 3 + 4 + 3 + 4 + 1)


def test_chat_with_binary_stdin_does_not_crash(tiny: Path) -> None:
    rng = random.Random(10)
    turns = [rng.randbytes(20).replace(b"\n", b"\0") for _ in range(3)]  # three turns of random bytes
    r = dllama(["chat", "--model", str(tiny), "--system", "x", "--max-tokens", "2"], stdin=b"\n".join(turns))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("🤖 Assistant".encode()) == 3


# ---- temp files: recognisable, removed on failure, stale ones cleaned by the next write ----
def test_stale_temp_of_a_dead_run_is_removed_and_a_live_one_kept(tiny: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".t.m.dllama-tmp-{dead.pid}"
    live = tmp_path / f".t.m.dllama-tmp-{os.getpid()}"  # this pytest process is alive: not its leftover
    stale.write_bytes(b"half a model")
    live.write_bytes(b"being written")
    r = dllama(
        ["convert", "--model", str(tiny), "--output", str(tmp_path / "t.m"), "--weights-float-type", "f32"]
    )
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and live.exists() and (tmp_path / "t.m").stat().st_size > 0


# ---- signals: Ctrl-C exits 130, SIGTERM 143, one line, no temp file left ----
def _interrupt(
    args: list[str], ready: str, sig: int, stdin=subprocess.DEVNULL, meanwhile=lambda pid: None
) -> tuple[int, str, str]:
    """Start the CLI, wait for `ready` on stdout, call `meanwhile(pid)`, send `sig`; (exit code, stdout,
    stderr)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=_cap_memory,
    )
    try:
        seen, deadline = "", time.monotonic() + TIMEOUT_S
        while ready not in seen and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            seen += line
        assert ready in seen, (seen, p.stderr.read() if p.poll() is not None else "")
        meanwhile(p.pid)
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
        return p.returncode, seen + out, err
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


EXPECTED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "interrupted (SIGTERM)")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_inference(smollm2_path: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "r.json"
    args = [
        "inference",
        "--prompt",
        "Tell a long story.",
        "--steps",
        "4000",
        "--ignore-eos",
        "--json",
        str(out),
    ]
    code, _, err = _interrupt([*args, "--nthreads", "1", "--max-seq-len", "4096"], "🔶 Pred", sig)
    assert (code, err.strip().splitlines()) == (EXPECTED[sig][0], [EXPECTED[sig][1]])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_convert_leaves_neither_file(smollm2_path: Path, tmp_path: Path, sig: int) -> None:
    args = ["convert", "--model", str(smollm2_path), "--output", str(tmp_path / "s.m")]

    def half_written(pid: int) -> None:
        assert [p.name for p in tmp_path.iterdir()] == [f".s.m.dllama-tmp-{pid}"]

    code, _, err = _interrupt(
        [*args, "--tokenizer-output", str(tmp_path / "s.t")], "wrote layer 1/", sig, meanwhile=half_written
    )
    assert (code, err.strip().splitlines()) == (EXPECTED[sig][0], [EXPECTED[sig][1]])
    assert list(tmp_path.iterdir()) == []  # no .m, no .t, no .s.m.dllama-tmp-PID


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_chat(tiny: Path, sig: int) -> None:
    r, w = os.pipe()  # stdin stays open and empty: chat waits for the first turn
    try:
        code, _, err = _interrupt(["chat", "--model", str(tiny), "--system", "x"], "Backend", sig, stdin=r)
    finally:
        os.close(r)
        os.close(w)
    assert (code, err.strip().splitlines()) == (EXPECTED[sig][0], [EXPECTED[sig][1]])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_worker(sig: int) -> None:
    code, _, err = _interrupt(["worker", "--port", "0", "--host", "127.0.0.1"], "Listening", sig)
    assert (code, err.strip().splitlines()) == (EXPECTED[sig][0], [EXPECTED[sig][1]])
