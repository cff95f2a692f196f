"""`dllama pull` / `dllama launch` against a local stand-in for the Hugging Face hub (tests/hubserver.py: real
sockets and threads): LFS redirects, resumes with Range after a dropped connection, a SIGINT or a full disk,
sha256 refusals that keep the partial file, multi-part models joined in order, one-line errors (exit 2), a
second pull with no network, the catalogue list and close-name suggestions, and launch running a model."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hubserver import HubServer
from tinymodel import write_tiny_gguf

from engine import catalog, download
from engine.catalog import HubModel, resolve_model, tokenizer_for
from engine.convert import convert_gguf
from engine.download import Progress
from engine.errors import DllamaError
from engine.launch import launch_command, pull_command

ROOT = Path(__file__).resolve().parents[2]
REPO = "acme/Tiny-Distributed-Llama"
PART_NAMES = ("dllama_model_tiny_q40_aa", "dllama_model_tiny_q40_ab", "dllama_model_tiny_q40_ac")
# the command that pulls in a fresh process (`dllama pull` once engine/cli.py registers it)
PULL = [sys.executable, "-m", "engine.cli", "pull"]
TINY = HubModel("tiny_q40", "a test model", "0.1 MB", REPO, PART_NAMES, "dllama_tokenizer_tiny.t")


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@pytest.fixture
def hub(monkeypatch):
    server = HubServer()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DLLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny(monkeypatch):
    """The catalogue with a three-part test model in it."""
    monkeypatch.setattr(catalog, "CATALOG", (*catalog.CATALOG, TINY))
    return TINY


def serve_tiny(hub: HubServer, parts: list[bytes], tokenizer: bytes = b"tokenizer bytes") -> None:
    for name, data in zip(PART_NAMES, parts, strict=True):
        hub.add(f"{REPO}/{name}", data)
    hub.add(f"{REPO}/dllama_tokenizer_tiny.t", tokenizer)


def run_pull(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """PULL ARGS in a fresh interpreter, bounded in time and memory."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run(
        [*PULL, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


# ---- one file ---------------------------------------------------------------------------------------------


def test_a_hub_file_follows_the_lfs_redirect_and_is_verified(hub, cache, monkeypatch, capsys):
    data = random_bytes(300_000, 1)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    pulled = pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    target = cache / "hf" / "acme" / "Tiny-GGUF" / "tiny.gguf"
    assert pulled.model == target and pulled.tokenizer is None
    assert target.read_bytes() == data
    assert sorted(os.listdir(target.parent)) == ["tiny.gguf", "tiny.gguf.lock", "tiny.gguf.verified"]
    record = json.loads((target.parent / "tiny.gguf.verified").read_text())
    assert record["size"] == 300_000 and record["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "downloaded and verified" in capsys.readouterr().out
    hub_side = [s for s in hub.seen if "/resolve/main/" in s.path]
    cdn_side = [s for s in hub.seen if s.path.startswith("/blobs/")]
    assert [s.method for s in hub_side] == ["HEAD", "GET"]
    assert [s.method for s in cdn_side] == ["GET"]  # the size and sha256 come from the hub's redirect
    assert all(s.authorization == "Bearer hf_secret" for s in hub_side)
    assert all(s.host.startswith("localhost:") and s.authorization is None for s in cdn_side)


def test_a_small_git_file_is_checked_by_size_alone(hub, cache):
    hub.add("acme/Tiny-GGUF/config.json", b'{"a": 1}', lfs=False)  # served directly, ETag = a git sha1
    path = pull_command("hf://acme/Tiny-GGUF/config.json").model
    assert path.read_bytes() == b'{"a": 1}'
    assert json.loads(Path(f"{path}.verified").read_text())["files"][0] == {
        "url": f"{hub.endpoint}/acme/Tiny-GGUF/resolve/main/config.json",
        "size": 8,
        "sha256": None,
    }
    assert [s.path for s in hub.seen] == ["/acme/Tiny-GGUF/resolve/main/config.json"] * 2


def test_a_plain_web_url_is_pulled_and_verified_by_its_sha256_etag(hub, cache):
    data = random_bytes(5000, 2)
    hub.add("files/model.gguf", data)
    url = f"{hub.endpoint}/files/model.gguf"
    path = resolve_model(url)
    assert path == cache / "web" / f"127.0.0.1:{hub.port}" / "files" / "model.gguf"
    assert path.read_bytes() == data
    assert (
        json.loads(Path(f"{path}.verified").read_text())["files"][0]["sha256"]
        == hashlib.sha256(data).hexdigest()
    )


def test_a_dropped_connection_is_resumed_with_a_range_request(hub, cache):
    data = random_bytes(400_000, 3)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data, drop_after=150_000)
    path = pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model
    assert path.read_bytes() == data
    assert [s.range for s in hub.gets("/blobs/")] == [None, "bytes=150000-"]


def test_a_busy_server_and_a_dropped_connection_are_retried(hub, cache):
    data = random_bytes(200_000, 20)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data, drop_after=80_000, busy_gets=1)
    assert pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model.read_bytes() == data
    assert [s.range for s in hub.gets("/blobs/")] == [None, None, "bytes=80000-"]  # 503, dropped, resumed


def test_a_server_busy_for_good_ends_in_one_line_after_the_retries(hub, cache, monkeypatch):
    monkeypatch.setattr(download, "RETRY_DELAYS_S", (0.0,) * 5)  # the same five tries, without the waits
    hub.add("acme/Tiny-GGUF/tiny.gguf", b"x" * 1000, busy_gets=99)
    with pytest.raises(DllamaError) as e:
        pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 503" in msg and "try again later" in msg
    assert len(hub.gets("/blobs/")) == 5


def test_a_server_that_ignores_range_restarts_the_file(hub, cache):
    data = random_bytes(300_000, 4)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data, drop_after=100_000, ignore_range=True)
    path = pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model
    assert path.read_bytes() == data
    assert [s.range for s in hub.gets("/blobs/")] == [None, "bytes=100000-"]


def test_a_wrong_sha256_is_refused_and_the_bytes_stay_under_the_partial_name(hub, cache):
    data = random_bytes(200_000, 5)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data, announced_sha256="ab" * 32)
    target = cache / "hf" / "acme" / "Tiny-GGUF" / "tiny.gguf"
    for _ in range(2):  # the second run checks the kept bytes again instead of downloading them again
        with pytest.raises(DllamaError) as e:
            pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
        msg = str(e.value)
        assert "\n" not in msg and "sha256" in msg and f"{target}.part" in msg and "delete" in msg
        assert not target.exists() and not Path(f"{target}.verified").exists()
        assert Path(f"{target}.part").read_bytes() == data
    assert len(hub.gets("/blobs/")) == 1
    with pytest.raises(DllamaError):
        resolve_model("hf://acme/Tiny-GGUF/tiny.gguf")  # --model refuses it the same way


def test_not_enough_disk_space_is_refused_before_any_download(hub, cache):
    hub.add("acme/Huge/huge.gguf", b"x" * 1000, announced_size=10**15)
    with pytest.raises(DllamaError) as e:
        pull_command("hf://acme/Huge/huge.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "1000000.00 GB" in msg and "free" in msg and "--dir" in msg
    assert hub.gets() == []


def test_a_full_disk_is_one_line_and_a_later_run_resumes(hub, cache):
    data = random_bytes(300_000, 6)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data)
    target = cache / "hf" / "acme" / "Tiny-GGUF" / "tiny.gguf"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # writes past 100 kB fail, like a full disk
    try:
        with pytest.raises(DllamaError) as e:
            pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(e.value)
    assert "\n" not in msg and "cannot write" in msg and "disk space" in msg and "resumes" in msg
    kept = Path(f"{target}.part").stat().st_size
    assert 0 < kept <= 100_000 and not target.exists()
    assert pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model.read_bytes() == data
    assert hub.gets("/blobs/")[-1].range == f"bytes={kept}-"


def test_a_changed_file_is_checked_again_and_a_damaged_one_refused(hub, cache, capsys):
    data = random_bytes(100_000, 7)
    hub.add("acme/Tiny-GGUF/tiny.gguf", data)
    path = pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # touched: the record no longer matches
    assert not pull_command("hf://acme/Tiny-GGUF/tiny.gguf").fetched
    assert "matches the server" in capsys.readouterr().err
    assert len(hub.gets("/blobs/")) == 1  # verified in place, not downloaded again
    damaged = bytearray(data)
    damaged[5000] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(DllamaError) as e:
        pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    assert "exists but is not" in str(e.value) and path.read_bytes() == bytes(damaged)


def test_a_second_pull_needs_no_network_and_says_so(hub, cache, tiny, capsys):
    serve_tiny(hub, [random_bytes(1000, 8), random_bytes(1000, 9), b"z"])
    hub.add("acme/Tiny-GGUF/tiny.gguf", random_bytes(2000, 10))
    pull_command("tiny_q40")
    pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    capsys.readouterr()
    hub.stop()
    t0 = time.perf_counter()
    again = pull_command("tiny-q40")
    url_again = pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    assert time.perf_counter() - t0 < 1.0
    out = capsys.readouterr().out
    assert out.count("already downloaded and verified, nothing to do") == 2
    assert not again.fetched and not url_again.fetched
    assert resolve_model("tiny_q40") == again.model  # --model NAME takes the pulled file, offline too


# ---- errors in a real process: one line, exit 2 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("404", ["not found (HTTP 404", "check the repository"]),
        ("401", ["access refused (HTTP 401)", "set HF_TOKEN"]),
        ("401 with token", ["access refused (HTTP 401) although HF_TOKEN is set"]),
        ("offline", ["cannot reach 127.0.0.1:", "check the network"]),
        ("bad address", ["give hf://OWNER/REPO/FILE"]),
    ],
)
def test_errors_are_one_line_and_exit_2(hub, tmp_path, case, expected):
    hub.add("acme/Gated/model.gguf", b"secret", status=401)
    env = {"HF_ENDPOINT": hub.endpoint, "DLLAMA_CACHE": str(tmp_path / "cache")}
    arg = "hf://acme/Gated/model.gguf"
    if case == "404":
        arg = "hf://acme/Missing/model.gguf"
    elif case == "401 with token":
        env["HF_TOKEN"] = "hf_wrong"
    elif case == "offline":
        hub.stop()  # nothing listens on the port any more
    elif case == "bad address":
        arg = "hf://acme/model.gguf"
    result = run_pull([arg], env)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert all(text in lines[0] for text in expected), lines[0]
    assert not list((tmp_path / "cache").rglob("model.gguf"))


@pytest.mark.parametrize("which", ["verified", "part"])
def test_a_fifo_in_place_of_the_record_or_the_partial_file_is_refused_without_hanging(hub, cache, which):
    hub.add("acme/Tiny-GGUF/tiny.gguf", random_bytes(1000, 19))
    target = cache / "hf" / "acme" / "Tiny-GGUF" / "tiny.gguf"
    if which == "verified":
        pull_command("hf://acme/Tiny-GGUF/tiny.gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    fifo = Path(f"{target}.{which}")
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    result = run_pull(
        ["hf://acme/Tiny-GGUF/tiny.gguf"], {"HF_ENDPOINT": hub.endpoint, "DLLAMA_CACHE": str(cache)}
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "FIFO" in lines[0] and str(fifo) in lines[0]


def test_a_pull_stopped_by_sigint_leaves_only_a_partial_file_and_a_rerun_completes(hub, cache):
    data = random_bytes(500_000, 11)
    hosted = hub.add("acme/Tiny-GGUF/tiny.gguf", data, stall_after=200_000)
    target = cache / "hf" / "acme" / "Tiny-GGUF" / "tiny.gguf"
    part = Path(f"{target}.part")
    env = {"HF_ENDPOINT": hub.endpoint, "DLLAMA_CACHE": str(cache)}
    proc = subprocess.Popen(
        [*PULL, "hf://acme/Tiny-GGUF/tiny.gguf"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == 200_000) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert part.stat().st_size == 200_000
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()
    assert not target.exists() and not Path(f"{target}.verified").exists()
    assert part.stat().st_size == 200_000
    hosted.stall_after = None
    hub.release()
    assert pull_command("hf://acme/Tiny-GGUF/tiny.gguf").model.read_bytes() == data
    assert hub.gets("/blobs/")[-1].range == "bytes=200000-"


# ---- multi-part catalogue models ---------------------------------------------------------------------------


def test_a_multipart_model_is_joined_in_order_with_its_tokenizer(hub, tmp_path, tiny):
    parts = [random_bytes(70_000, 12), random_bytes(50_001, 13), b"end"]
    serve_tiny(hub, parts, b"the .t file")
    pulled = pull_command("tiny_q40", str(tmp_path / "models"))
    folder = tmp_path / "models" / "tiny_q40"
    assert pulled.model == folder / "dllama_model_tiny_q40.m"
    assert pulled.tokenizer == folder / "dllama_tokenizer_tiny_q40.t"
    assert pulled.model.read_bytes() == b"".join(parts)
    assert pulled.tokenizer.read_bytes() == b"the .t file"
    assert tokenizer_for(pulled.model) == pulled.tokenizer
    gets = [s.path for s in hub.seen if s.method == "GET" and "/resolve/" in s.path]
    assert gets == [f"/{REPO}/resolve/main/{name}" for name in (*PART_NAMES, "dllama_tokenizer_tiny.t")]


def test_a_partial_multipart_file_resumes_in_the_part_it_stopped_in(hub, tmp_path, tiny):
    parts = [random_bytes(30_000, 14), random_bytes(40_000, 15), random_bytes(500, 16)]
    serve_tiny(hub, parts)
    folder = tmp_path / "models" / "tiny_q40"
    folder.mkdir(parents=True)
    (folder / "dllama_model_tiny_q40.m.part").write_bytes(parts[0] + parts[1][:1000])
    pulled = pull_command("tiny_q40", str(tmp_path / "models"))
    assert pulled.model.read_bytes() == b"".join(parts)
    blob_gets = [(s.path, s.range) for s in hub.gets("/blobs/")]
    sha = [hashlib.sha256(p).hexdigest() for p in parts]
    assert blob_gets[:2] == [(f"/blobs/{sha[1]}", "bytes=1000-"), (f"/blobs/{sha[2]}", None)]


def test_a_damaged_first_part_is_refused_when_the_second_begins(hub, tmp_path, tiny):
    parts = [random_bytes(30_000, 17), random_bytes(40_000, 18), b"x"]
    serve_tiny(hub, parts)
    folder = tmp_path / "models" / "tiny_q40"
    folder.mkdir(parents=True)
    bad = bytearray(parts[0])
    bad[10] ^= 0xFF
    (folder / "dllama_model_tiny_q40.m.part").write_bytes(bytes(bad))  # stopped right at the end of part 1
    with pytest.raises(DllamaError) as e:
        pull_command("tiny_q40", str(tmp_path / "models"))
    assert "sha256" in str(e.value) and hub.gets("/blobs/") == []


# ---- progress ----------------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_plain_lines_with_speed_and_eta():
    out = io.StringIO()
    bar = Progress("tiny.gguf", 10_000_000, 0, out)
    for _ in range(10):
        time.sleep(0.005)
        bar.update(1_000_000)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "tiny.gguf: 0.0 MB of 10.0 MB (0%)"
    assert lines[-1].startswith("tiny.gguf: 10.0 MB of 10.0 MB (100%), ") and "MB/s" in lines[-1]
    assert len(lines) == 11 and all("ETA" in line for line in lines[1:-1])


def test_progress_on_a_terminal_is_a_tqdm_bar():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=True) as term:
            bar = Progress("tiny.gguf", 1_000_000, 250_000, term)
            bar.update(750_000)
            bar.close()
        chunks = []
        while True:  # everything the bar wrote; EIO once it is all read (the terminal's other end is closed)
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        text = b"".join(chunks).decode()
    finally:
        os.close(master)
    assert "\r" in text and "tiny.gguf" in text and "100%" in text and "B/s" in text


# ---- launch ------------------------------------------------------------------------------------------------


def test_launch_without_a_name_lists_the_catalogue(hub, cache, tiny, capsys):
    serve_tiny(hub, [b"a", b"b", b"c"])
    pull_command("tiny_q40")
    capsys.readouterr()
    asked = len(hub.seen)
    launch_command(None)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    names = [  # distributed-llama's launcher (spec section 8) and the two PyPI models
        "smollm2", "qwen2.5-coder", "llama3_1_8b_instruct_q40", "llama3_1_405b_instruct_q40",
        "llama3_2_1b_instruct_q40", "llama3_2_3b_instruct_q40", "llama3_3_70b_instruct_q40",
        "deepseek_r1_distill_llama_8b_q40", "qwen3_0.6b_q40", "qwen3_1.7b_q40", "qwen3_8b_q40",
        "qwen3_14b_q40", "qwen3_30b_a3b_q40",
    ]  # fmt: skip
    assert all(name in rows for name in names)
    assert (
        rows["llama3_1_405b_instruct_q40"][-3:] == ["GB", "56", "no"]
        and "238" in rows["llama3_1_405b_instruct_q40"]
    )
    assert rows["tiny_q40"][-2:] == ["3", "yes"]
    assert str(cache) in out
    assert len(hub.seen) == asked  # listing asks the server nothing


def test_an_unknown_name_gives_close_matches(hub, cache):
    cases = [
        (lambda: launch_command("qwen3-8b"), "qwen3-8b: no such model file", "did you mean qwen3_8b_q40"),
        (
            lambda: pull_command("llama3_2_1b"),
            "llama3_2_1b: no such",
            "did you mean llama3_2_1b_instruct_q40",
        ),
        (lambda: resolve_model("Smol"), "Smol: no such", "did you mean smollm2"),
    ]
    for call, start, hint in cases:
        with pytest.raises(DllamaError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(start) and hint in msg and "dllama launch" in msg
    assert hub.seen == []


def test_launch_refuses_a_model_flag_and_an_unknown_mode(cache):
    with pytest.raises(DllamaError, match="launch sets --model itself"):
        launch_command("qwen3_8b_q40", "chat", ["--model", "x.m"])
    with pytest.raises(DllamaError, match="launch runs chat, inference, api, worker"):
        launch_command("qwen3_8b_q40", "perplexity")


def test_launch_worker_downloads_nothing(hub, cache, capfd):
    with pytest.raises(SystemExit) as e:
        launch_command("qwen3_8b_q40", None, ["worker", "--port", "99999"])  # refused by the worker's parser
    assert e.value.code == 2
    err = capfd.readouterr().err
    assert "dllama worker --port 99999" in err and "--port" in err.splitlines()[-1]
    assert hub.seen == []


def test_launch_pulls_a_multipart_model_and_runs_inference(hub, tmp_path, tiny, capfd):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", wtype="q40")
    convert_gguf(src, tmp_path / "tiny.m", "q40", tmp_path / "tiny.t", log=lambda s: None)
    whole = (tmp_path / "tiny.m").read_bytes()
    cut = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    serve_tiny(
        hub, [whole[a:b] for a, b in zip(cut, cut[1:], strict=False)], (tmp_path / "tiny.t").read_bytes()
    )
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        launch_command(
            "tiny_q40",
            None,
            ["inference", "--prompt", "hi", "--steps", "2", "--nthreads", "1"],
            str(tmp_path / "m"),
        )
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capfd.readouterr()
    model = tmp_path / "m" / "tiny_q40" / "dllama_model_tiny_q40.m"
    assert model.read_bytes() == whole
    command = next(line for line in err.splitlines() if "dllama inference" in line)
    assert f"--model {model} --tokenizer {model.with_name('dllama_tokenizer_tiny_q40.t')}" in command
    assert "--buffer-float-type q80 --max-seq-len 4096 --prompt hi --steps 2" in command
    assert "buffers q80" in out and "nTokens: 2" in out


def test_launch_through_the_cli_lists_and_names_close_matches(cache):
    """`dllama launch` alone lists the catalogue (exit 0); an unknown name is one line, exit 2."""
    env = {**os.environ, "DLLAMA_CACHE": str(cache)}
    listed = subprocess.run(
        [sys.executable, "-m", "engine.cli", "launch"], capture_output=True, text=True, timeout=60, env=env
    )
    assert listed.returncode == 0 and "qwen3_30b_a3b_q40" in listed.stdout and "17.0 GB" in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "engine.cli", "launch", "qwen3_8b_q4", "inference", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "did you mean qwen3_8b_q40" in bad.stderr
