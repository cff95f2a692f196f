"""A stand-in for the Hugging Face hub on 127.0.0.1, for download tests: real sockets, one thread per request.

`/{owner}/{repo}/resolve/main/{file}` answers HEAD and GET as the hub does for an LFS file: a 302 to
`http://localhost:PORT/blobs/{sha256}` (another host name, like the hub's CDN) carrying `X-Linked-Size`,
`X-Linked-Etag` and `ETag` (the sha256); the blob URL serves the bytes with Range support and an ETag of its
own that is not the sha256. A file added with lfs=False is served directly with a 40-hex git ETag, and
`/files/{name}` serves a plain web file (Content-Length, a sha256 ETag). Faults per file: a forced status
(401, 404...), a wrong announced sha256 or size, a connection dropped after N bytes (once), a stall after N
bytes until `release()`, 503s, a server that ignores Range. Requests are logged with Range and Authorization.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hosted:
    """One file the server holds, and the faults it shows."""

    data: bytes
    lfs: bool = True
    status: int | None = None  # answer every request for it with this status
    announced_sha256: str | None = None  # a wrong sha256 to announce instead of the real one
    announced_size: int | None = None  # a size to announce (X-Linked-Size) instead of the real one
    drop_after: int | None = None  # the next GET sends this many body bytes, then drops the connection
    stall_after: int | None = None  # every GET sends this many body bytes, then waits for release()
    ignore_range: bool = False
    busy_gets: int = 0  # answer this many GETs of the bytes with 503 (after a redirect, where the bytes are)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Seen:
    """A request as the server saw it."""

    method: str
    path: str
    host: str
    range: str | None
    authorization: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:  # a dropped client: no noise
        pass


@dataclass
class HubServer:
    """The server, started on a free port when made; `stop()` ends it."""

    files: dict[str, Hosted] = field(default_factory=dict)  # "owner/repo/file" or "files/name" -> file
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.released = threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        """What HF_ENDPOINT is set to."""
        return f"http://127.0.0.1:{self.port}"

    def add(self, key: str, data: bytes, **faults) -> Hosted:
        self.files[key] = hosted = Hosted(data, **faults)
        return hosted

    def gets(self, path_part: str = "") -> list[Seen]:
        """The GET requests whose path contains `path_part`."""
        return [s for s in self.seen if s.method == "GET" and path_part in s.path]

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            h = self.headers
            hub.seen.append(
                Seen(self.command, self.path, h.get("Host", ""), h.get("Range"), h.get("Authorization"))
            )
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", self.path)
            blob = re.fullmatch(r"/blobs/([0-9a-f]{64})", self.path)
            if resolve:
                key = f"{resolve.group(1)}/{resolve.group(2)}"
                f = hub.files.get(key)
                if f is None or f.status:
                    return self._status(f.status if f else 404)
                if f.lfs:
                    sha = f.announced_sha256 or f.sha256
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{hub.port}/blobs/{f.sha256}")
                    self.send_header("X-Linked-Size", str(f.announced_size or len(f.data)))
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("ETag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                return self._serve(f, body, etag=hashlib.sha1(f.data).hexdigest())
            if blob:
                f = next((f for f in hub.files.values() if f.sha256 == blob.group(1)), None)
                if f is None:
                    return self._status(404)
                return self._serve(f, body, etag=hashlib.sha256(b"cdn" + f.data).hexdigest())
            f = hub.files.get(self.path.lstrip("/"))
            if f is None or f.status:
                return self._status(f.status if f else 404)
            return self._serve(f, body, etag=f.announced_sha256 or f.sha256)

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, f: Hosted, body: bool, etag: str) -> None:
            if body and f.busy_gets:
                f.busy_gets -= 1
                return self._status(503)
            size, start = len(f.data), 0
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if asked and not f.ignore_range:
                start = int(asked.group(1))
                if start >= size:
                    return self._status(416)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            rest = f.data[start:]
            if f.drop_after is not None:
                cut, f.drop_after = f.drop_after, None
                self.wfile.write(rest[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if f.stall_after is not None:
                self.wfile.write(rest[: f.stall_after])
                self.wfile.flush()
                hub.released.wait(20)
                self.close_connection = True
                return
            try:
                self.wfile.write(rest)
            except OSError:  # the client went away
                self.close_connection = True

    return Handler
