"""HTTP downloads of model files: resumable, verified, atomic, with a progress bar.

A file (or several parts joined in order into one file) is written to `NAME.part`, resumed from its length
with an HTTP Range request after a broken connection or in a later run, checked part by part against the size
and sha256 the server announces (the Hugging Face hub's `X-Linked-Size` / `X-Linked-Etag` of an LFS file, else
`Content-Length` / a sha256 `ETag`), and only then renamed to `NAME`; `NAME.verified` records size, mtime and
digests, so a later pull of a complete file needs no network. A mismatch deletes nothing: the `.part` stays,
unused, and the message says what to remove.

Why urllib rather than huggingface_hub (installed here as a dependency of tokenizers): hf_hub_download writes
each download to a process-unique temporary file that it deletes on failure, so an interrupted 40 GB download
starts again from zero; it checks the size but not the sha256 of what it received; a full disk is only a
warning; it keeps files in its own blob/snapshot layout; its tqdm bar writes carriage returns into logs;
and it cannot join the parts of a distributed-llama model or fetch a plain https URL. One small module can.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO, TextIO
from urllib.parse import quote, urljoin, urlsplit

from engine.atomic_file import atomic_write
from engine.errors import DllamaError
from engine.files import open_regular, special_kind

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 30.0  # longest silence of a connection before it counts as broken
BLOCK = 1 << 20  # bytes read (and hashed) at a time
RETRY_DELAYS_S = (0.0, 1.0, 2.0, 4.0, 8.0)  # waits before the retries of a transfer that broke off
MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---- where files are ---------------------------------------------------------------------------------------


def hf_endpoint() -> str:
    """The hub to download from: $HF_ENDPOINT (a mirror, or a local server in tests) as huggingface_hub reads
    it, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_url(repo: str, file: str, revision: str = "main") -> str:
    """The download URL of `file` in the hub repository `repo` (OWNER/NAME) at `revision`."""
    return f"{hf_endpoint()}/{repo}/resolve/{quote(revision, safe='')}/{quote(file)}"


def partial_path(target: Path) -> Path:
    """Where the bytes of `target` collect until they are verified: never mistaken for the finished file."""
    return target.with_name(target.name + ".part")


def record_path(target: Path) -> Path:
    """The small JSON file that remembers that `target` was verified (size, mtime, digests)."""
    return target.with_name(target.name + ".verified")


def verified(target: Path) -> bool:
    """Whether `target` is a file this module downloaded and verified, unchanged since (no network)."""
    try:
        with open_regular(record_path(target)) as f:
            record = json.loads(f.read(1 << 20))
        st = target.stat()
        return st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"]
    except (DllamaError, OSError, ValueError, KeyError, TypeError):
        return False


# ---- HTTP --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """A file on a server: its URL, size and, where the server gives it, sha256."""

    url: str
    size: int
    sha256: str | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand redirects back to _request, which drops the token on another host and reads the hub's headers."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _headers(url: str, start: int) -> dict[str, str]:
    """Request headers: no compression (sizes are file sizes), a Range from `start`, and HF_TOKEN as a Bearer
    token only for the hub's own host (a redirect to a CDN does not get it)."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "dllama/0.1"}
    if start:
        headers["Range"] = f"bytes={start}-"
    token = os.environ.get("HF_TOKEN")
    if token and urlsplit(url).netloc == urlsplit(hf_endpoint()).netloc:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _refused(code: int, reason: str, url: str, label: str) -> DllamaError:
    """The one-line error for an HTTP error status."""
    if code in (401, 403):
        if os.environ.get("HF_TOKEN"):
            return DllamaError(
                f"{label}: access refused (HTTP {code}) although HF_TOKEN is set: the token may not read "
                "this repository; accept the model's terms on its page or use a token that can, then pull "
                "again"
            )
        return DllamaError(
            f"{label}: access refused (HTTP {code}): the repository is gated, private or missing; set "
            "HF_TOKEN to a Hugging Face access token that may read it (and accept the model's terms), then "
            "pull again"
        )
    if code == 404:
        return DllamaError(f"{label}: not found (HTTP 404 at {url}): check the repository and file name")
    error = _Transient if code == 429 or code >= 500 else DllamaError
    return error(f"{label}: the server answered HTTP {code} {reason} for {url}: try again later")


class _Transient(DllamaError):
    """No answer (refused, unresolvable, timed out), or 429 / 5xx: a download in progress tries again."""


def _unreachable(url: str, label: str, reason: object) -> DllamaError:
    host = urlsplit(url).netloc or url
    return _Transient(
        f"{label}: cannot reach {host} ({reason}): check the network connection (or HF_ENDPOINT); a pull "
        "run again resumes where it stopped"
    )


def _request(
    url: str, method: str, label: str, start: int = 0, head: bool = False
) -> tuple[http.client.HTTPResponse | None, list[tuple[str, Message]]]:
    """Send `method` to `url`, following redirects; the final response and every (url, headers) on the way.
    With `head`, a redirect that carries the hub's X-Linked-Size ends the walk (response None): the answer is
    complete, and a signed CDN URL may accept only the GET it was signed for (as huggingface_hub does)."""
    chain: list[tuple[str, Message]] = []
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = _OPENER.open(
                urllib.request.Request(url, method=method, headers=_headers(url, start)), timeout=TIMEOUT_S
            )
        except urllib.error.HTTPError as e:
            with e:
                location = e.headers.get("Location")
                if e.code in _REDIRECTS and location:
                    chain.append((url, e.headers))
                    if head and e.headers.get("X-Linked-Size"):
                        return None, chain
                    url = urljoin(url, location)
                    continue
                raise _refused(e.code, e.reason, url, label) from None
        except urllib.error.URLError as e:
            raise _unreachable(url, label, getattr(e.reason, "strerror", None) or e.reason) from None
        except (OSError, http.client.HTTPException) as e:
            reason = (e.strerror if isinstance(e, OSError) else None) or e.__class__.__name__
            raise _unreachable(url, label, reason) from None
        except ValueError as e:  # not a URL urllib can open
            raise DllamaError(f"{label}: cannot download {url} ({e})") from None
        chain.append((url, response.headers))
        return response, chain
    raise DllamaError(f"{label}: more than {MAX_REDIRECTS} redirects from {url}: the server is misconfigured")


def _etag_sha256(value: str | None) -> str | None:
    """The sha256 an ETag carries (the hub's LFS ETag is the file's sha256), else None (git sha1, md5...)."""
    if not value:
        return None
    tag = value.strip().removeprefix("W/").strip('"').lower()
    return tag if _SHA256.fullmatch(tag) else None


def remote_file(url: str, label: str) -> RemoteFile:
    """Ask the server (HEAD) for the size and sha256 of `url`: the hub's X-Linked-* headers of a redirect
    first, else the final Content-Length and an ETag of the first host (not a CDN's own tag)."""
    response, chain = _request(url, "HEAD", label, head=True)
    if response is not None:
        response.close()
    origin = urlsplit(url).netloc
    size = next((h["X-Linked-Size"] for _, h in chain if h.get("X-Linked-Size")), None)
    size = size or chain[-1][1].get("Content-Length")
    sha = next((_etag_sha256(h.get("X-Linked-Etag")) for _, h in chain if h.get("X-Linked-Etag")), None)
    if sha is None:
        sha = next(
            (s for u, h in chain if urlsplit(u).netloc == origin and (s := _etag_sha256(h.get("ETag")))), None
        )
    try:
        n = int(size)
    except (TypeError, ValueError):
        raise DllamaError(f"{label}: the server gives no file size for {url}: cannot verify it") from None
    if n < 0:
        raise DllamaError(f"{label}: the server gives a negative file size for {url}")
    return RemoteFile(url, n, sha)


# ---- progress ----------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class Progress:
    """A tqdm bar (speed, ETA) on a terminal; elsewhere a plain line every 10 % or 30 s and at the end."""

    def __init__(self, label: str, total: int, done: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.label, self.total, self.done = label, total, done
        self.start_done, self.t0 = done, time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=label, file=self.stream, leave=True
            )
        else:
            self.next_pct, self.next_t = self._pct() // 10 * 10 + 10, self.t0 + 30
            self._line()

    def _pct(self) -> int:
        return 100 * self.done // self.total if self.total else 100

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 and self.done < self.total else ""
        speed = f", {rate / 1e6:.1f} MB/s" if rate > 0 else ""
        print(
            f"{self.label}: {_mb(self.done)} of {_mb(self.total)} ({self._pct()}%){speed}{eta}",
            file=self.stream,
            flush=True,
        )

    def update(self, n: int) -> None:
        """Count `n` more bytes."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self._pct() >= self.next_pct or time.monotonic() >= self.next_t:
            self._line()
            self.next_pct, self.next_t = self._pct() // 10 * 10 + 10, time.monotonic() + 30

    def close(self) -> None:
        """End the bar (a terminal) or write the last line (elsewhere) if it is not written yet."""
        if self.bar is not None:
            self.bar.close()
        elif self.done == self.total and self.next_pct <= 100:
            self._line()


# ---- downloading -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(lock_path: Path, what: str) -> Iterator[None]:
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


def _hash_range(path: Path, start: int, stop: int) -> hashlib._Hash:
    """sha256 of bytes start..stop of `path` (to go on hashing a part that a previous run began)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left:
            block = f.read(min(BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest


def _size_of(path: Path) -> int:
    """Length of an existing partial file (0 if none); anything but a regular file is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise DllamaError(f"{path}: cannot read ({e.strerror})") from None
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise DllamaError(f"{path} is {kind}, not a regular file: move it away, then pull again")
    return st.st_size


def _check_space(folder: Path, need: int, label: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DllamaError(
            f"{label} needs {_mb(need)} more but {folder} has {_mb(free)} free: free some space, or pull "
            "into a folder on another disk with --dir (or DLLAMA_CACHE)"
        )


def _write(f: BinaryIO, block: bytes, part: Path, left: int) -> None:
    try:
        f.write(block)
        f.flush()  # on disk as soon as received: a killed run resumes from here
    except OSError as e:
        raise DllamaError(
            f"cannot write {part} ({e.strerror or e}): free {_mb(left)} of disk space, or pull into a folder "
            "on another disk with --dir (or DLLAMA_CACHE); a pull run again resumes where it stopped"
        ) from None


def _download_part(
    remote: RemoteFile, f: BinaryIO, base: int, have: int, progress: Progress, part: Path, label: str
) -> None:
    """Append `remote` to `f` after the `have` bytes of it already there (from file offset `base`), resuming
    broken transfers and failed reconnections with a Range request, then check its sha256."""
    digest = _hash_range(part, base, base + have) if remote.sha256 else None
    offset, failures = have, 0
    while offset < remote.size:
        start, broken = offset, None
        try:
            response, _ = _request(remote.url, "GET", label, offset)
        except _Transient as e:
            response, broken = None, e
        if response is not None:
            with response:
                if offset and response.status != 206:  # the server ignored the Range: the part starts again
                    os.ftruncate(f.fileno(), base)
                    progress.update(-offset)
                    offset = start = 0
                    digest = hashlib.sha256() if remote.sha256 else None
                _check_answer(response, remote, offset, label)
                while offset < remote.size:
                    try:
                        block = response.read1(min(BLOCK, remote.size - offset))
                    except (OSError, http.client.HTTPException) as e:
                        broken = (e.strerror if isinstance(e, OSError) else None) or e.__class__.__name__
                        break
                    if not block:
                        broken = "the connection closed early"
                        break
                    _write(f, block, part, remote.size - offset)
                    if digest is not None:
                        digest.update(block)
                    offset += len(block)
                    progress.update(len(block))
        if broken is not None:
            failures = 0 if offset > start else failures + 1
            if failures >= len(RETRY_DELAYS_S):
                if isinstance(broken, _Transient):
                    raise broken
                raise DllamaError(
                    f"{label}: the download broke off at {_mb(base + offset)} ({broken}): run the same pull "
                    "again to resume"
                )
            time.sleep(RETRY_DELAYS_S[failures])
    if digest is not None and digest.hexdigest() != remote.sha256:
        raise DllamaError(
            f"{label}: the bytes received from {remote.url} do not match the sha256 the server gives "
            f"({digest.hexdigest()[:12]}... instead of {remote.sha256[:12]}...): they are kept in {part} but "
            "not used; delete that file and pull again (if it persists, the server's copy is damaged)"
        )


def _check_answer(response: http.client.HTTPResponse, remote: RemoteFile, offset: int, label: str) -> None:
    """Refuse a body that is not the bytes asked for: another range, or another length than announced."""
    if response.status == 206:
        first = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if not first or int(first.group(1)) != offset:
            raise DllamaError(f"{label}: the server sent another range than asked for ({remote.url})")
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != remote.size - offset:
        raise DllamaError(
            f"{label}: the server sends {length} bytes but announced {remote.size - offset} ({remote.url}): "
            "try again later"
        )


def _download(remotes: Sequence[RemoteFile], part: Path, have: int, label: str) -> None:
    """Fill `part` with the remotes in order, from its current length `have`; the parts wholly before the
    one `have` falls in were verified by the run that wrote them, so only that one is hashed again."""
    progress = Progress(label, sum(r.size for r in remotes), have)
    try:
        with open(part, "ab") as f:
            base = 0
            for remote in remotes:
                if base + remote.size >= have:
                    done = min(max(have - base, 0), remote.size)
                    _download_part(remote, f, base, done, progress, part, label)
                base += remote.size
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise DllamaError(f"cannot write {part} ({e.strerror or e})") from None
    finally:
        progress.close()


def _record(target: Path, st: os.stat_result, remotes: Sequence[RemoteFile]) -> None:
    """Remember that `target` (as `st` describes it) is verified, so a later pull needs no network."""
    record = {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "files": [{"url": r.url, "size": r.size, "sha256": r.sha256} for r in remotes],
    }
    with atomic_write(record_path(target)) as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())


def _adopt(target: Path, remotes: Sequence[RemoteFile], label: str) -> None:
    """A `target` without a valid record (copied in, or touched since): verify it against the server and
    record it, or refuse it without deleting it."""
    size = _size_of(target)
    base, same = 0, size == sum(r.size for r in remotes)
    for remote in remotes:
        if same and remote.sha256:
            same = _hash_range(target, base, base + remote.size).hexdigest() == remote.sha256
        base += remote.size
    if not same:
        raise DllamaError(
            f"{target} exists but is not {label} (its size or sha256 differs from the server's): move it "
            "away or delete it, then pull again"
        )
    _record(target, target.stat(), remotes)
    print(f"{label}: {target} matches the server: recorded as verified", file=sys.stderr)


def fetch(urls: Sequence[str], target: Path, label: str) -> bool:
    """Download `urls` (one file, or parts joined in order) into `target` unless it is there and verified;
    True when something was downloaded. One process at a time works on a target (a lock file beside it)."""
    if verified(target):
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DllamaError(
            f"cannot create the folder {target.parent} ({e.strerror}): pass --dir or set DLLAMA_CACHE to a "
            "writable folder"
        ) from None
    with locked(target.with_name(target.name + ".lock"), label):
        if verified(target):  # another process finished it while we waited
            return False
        remotes = [remote_file(url, label) for url in urls]
        if os.path.lexists(target):
            _adopt(target, remotes, label)
            return False
        part = partial_path(target)
        have, total = _size_of(part), sum(r.size for r in remotes)
        if have > total:
            raise DllamaError(
                f"{part} is longer ({have} bytes) than {label} ({total} bytes): delete it, then pull again"
            )
        _check_space(target.parent, total - have, label)
        if have:
            print(f"{label}: resuming {part} at {_mb(have)} of {_mb(total)}", file=sys.stderr, flush=True)
        _download(remotes, part, have, label)
        _record(target, part.stat(), remotes)
        os.replace(part, target)
    return True
