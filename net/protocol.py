"""The cluster's wire format: a versioned greeting, then length-bounded frames; raw rows inside a forward.

Every connection opens with a greeting each way: 12 bytes (magic `DLMA`, protocol version, role, payload
length) and a JSON payload of the node's capabilities. After it come frames with an 8-byte header
`<type u8, a u8, b u16, c u32>`: `c` is the payload length for the types that carry one (bounded per type),
while FORWARD packs mode, token count and start position into the header itself, so the per-forward control
message is 8 bytes like the original's (spec 5.5). A batch of rows at their own positions and KV slots (the
API's --parallel) goes as FORWARD_ROWS: the same header plus n int32 positions and n int32 slots. Inside a
forward pass nodes exchange raw activation rows whose sizes every node derives from the session config, so
sync traffic carries no framing bytes at all.
What a peer sends is never trusted: JSON is parsed with a depth and a number-length bound, the model config
is checked by ModelConfig.validate, and every step on the wire has a deadline (`step_time`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

from engine.backend import Backend
from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.graph import ACT_TYPES
from engine.slicing import KV_TYPES, NodeSlice

MAGIC = b"DLMA"
# 2: the session config carries the NodeSlice, tensor headers a shape; 3: slice cache; 4: the KV-cache type;
# 5: KV slots (n_slots in the session config, FORWARD_ROWS)
PROTOCOL_VERSION = 5
GREETING = struct.Struct("<4sHBBI")  # magic, version, role, reserved, payload length
HEADER = struct.Struct("<BBHI")  # type, a, b, c
GREETING_BOUND = 4096  # bytes of a greeting's JSON payload
NET_TIMEOUT = 3.0  # seconds of silence from a peer in a forward pass before it is reported
MAX_NET_TIMEOUT = 3600.0  # the longest silence a node can be told to allow
MIN_RATE = 1 << 20  # bytes/s: a step moving n bytes must end within its silence bound + n / MIN_RATE
WEIGHT_CHUNK = 4 << 20  # bytes of tensor data per step while streaming weights (each a deadline of its own)
HEARTBEAT_MIN = 0.01  # seconds: the shortest keep-alive interval a worker accepts
JSON_DEPTH = 8  # nesting levels a JSON payload may use (a session config uses 3)
NUMBER_CHARS = 32  # characters of one JSON number (20 digits hold any 64-bit integer)
MODES = ("none", "last", "all")  # FORWARD `a`: which logits the root wants back
MAX_ROWS = 65535  # rows of one forward pass (FORWARD `b` is 16 bits)
ROW_BYTES = 8  # FORWARD_ROWS payload bytes per row: its int32 position and its int32 KV slot


def check_timeout(timeout: float, what: str = "--net-timeout") -> float:
    """`timeout` if it is a usable silence bound (finite, > 0, at most MAX_NET_TIMEOUT); else one line."""
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not (number and math.isfinite(timeout) and 0 < timeout <= MAX_NET_TIMEOUT):
        raise DllamaError(f"{what} must be a number of seconds in (0, {MAX_NET_TIMEOUT:g}] (got {timeout!r})")
    return float(timeout)


def step_time(silence: float, nbytes: int) -> float:
    """Seconds one transfer of `nbytes` may take in all: its silence bound plus the bytes at MIN_RATE, so a
    peer that trickles (a byte now and then, never silent for long) is still given up."""
    return silence + nbytes / MIN_RATE


def compile_wait(timeout: float) -> float:
    """Longest a root waits for a worker to compile and warm up its slice, even while it keeps PINGing."""
    return 10 * setup_silence(timeout)


def setup_silence(timeout: float) -> float:
    """Longest silence allowed from a peer in set-up, while it compiles or serves other workers first (live
    peers keep talking with PINGs, but a cold kernel compilation can hold a process for many seconds)."""
    return max(30.0, 10 * timeout)


def idle_silence(timeout: float) -> float:
    """Longest silence a worker allows its root between forward passes (the root PINGs every second)."""
    return max(10.0, 3 * timeout)


class Role(IntEnum):
    ROOT = 1  # the node with the model file; it drives the session
    WORKER = 2  # a `dllama worker` answering a connection
    PEER = 3  # a worker connecting to another worker of the same session (the all-to-all mesh)


class Msg(IntEnum):
    OK = 1  # a: the message type acknowledged
    ERROR = 2  # payload: UTF-8 text; the session ends
    CONFIG = 3  # root -> worker: JSON session config
    TENSOR = 4  # root -> worker: JSON tensor header; exactly the tensor's bytes follow, unframed
    WEIGHTS_DONE = 5  # root -> worker: all tensors sent; OK means compiled and warmed up
    MESH = 6  # root -> worker: connect to the other workers now
    FORWARD = 7  # root -> worker: a = mode, b = tokens, c = start position (KV slot 0); no payload
    PING = 8  # keep-alive while a link is otherwise idle
    STOP = 9  # root -> worker: the session is over; OK once the worker has freed the model
    HAVE = 10  # worker -> root after OK of CONFIG: JSON {"have": [tensor names its slice cache holds]}
    FORWARD_ROWS = 11  # root -> worker: a = mode, b = rows; payload: b int32 positions, then b int32 KV slots


# payload bytes; other types carry none
BOUNDS = {
    Msg.ERROR: 4096,
    Msg.CONFIG: 1 << 16,
    Msg.TENSOR: 4096,
    Msg.HAVE: 1 << 18,
    Msg.FORWARD_ROWS: ROW_BYTES * MAX_ROWS,
}


class ProtocolError(DllamaError):
    """The peer is not a dllama node of this version, or broke the message rules."""


class Frame(NamedTuple):
    msg: Msg
    a: int
    b: int
    c: int
    payload: bytes


def pack_greeting(role: Role, caps: dict[str, Any], version: int = PROTOCOL_VERSION) -> bytes:
    """A greeting: fixed 12-byte head (the version always at offset 4) and the JSON capabilities."""
    body = json.dumps(caps, separators=(",", ":")).encode()
    if len(body) > GREETING_BOUND:
        raise ValueError(f"greeting payload of {len(body)} bytes exceeds {GREETING_BOUND}")
    return GREETING.pack(MAGIC, version, role, 0, len(body)) + body


def parse_greeting_head(raw: bytes, peer: str) -> tuple[int, int, int]:
    """(version, role, payload length) of a greeting head; a foreign or oversize greeting is refused."""
    magic, version, role, _, length = GREETING.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"{peer} is not a dllama node (it sent {raw!r} instead of a dllama greeting)")
    if length > GREETING_BOUND:
        raise ProtocolError(f"{peer} sent a greeting of {length} bytes, over the {GREETING_BOUND}-byte bound")
    return version, role, length


def version_mismatch(peer: str, theirs: int) -> str:
    return (
        f"{peer} speaks dllama protocol {theirs} but this node speaks {PROTOCOL_VERSION}: "
        "run the same dllama version on every node"
    )


def printable(text: Any, limit: int = 200) -> str:
    """`text` as one printable line of at most `limit` characters: what a peer sends may hold anything."""
    s = "".join(c if c.isprintable() else " " for c in str(text)[:limit])
    return s + ("..." if len(str(text)) > limit else "")


def json_depth(payload: bytes) -> int:
    """Deepest nesting of arrays and objects in `payload` (brackets inside strings do not count), counted
    before parsing because the parser recurses once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in payload:
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in b"]}":
            depth -= 1
    return deepest


class _BadNumber(ValueError):
    """A JSON number over NUMBER_CHARS characters, or NaN/Infinity, or one that overflows a float."""


def _json_int(text: str) -> int:
    if len(text) > NUMBER_CHARS:
        raise _BadNumber(f"an integer of {len(text)} digits")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > NUMBER_CHARS or not math.isfinite(value := float(text)):
        raise _BadNumber(f"the number {printable(text, 40)}")
    return value


def _json_constant(text: str) -> float:
    raise _BadNumber(f"the number {text}")


def parse_json(payload: bytes, what: str, peer: str) -> dict[str, Any]:
    """A JSON object from a greeting or message payload, nested at most JSON_DEPTH levels, its numbers
    finite and at most NUMBER_CHARS long."""
    depth = json_depth(payload)
    if depth > JSON_DEPTH:
        raise ProtocolError(
            f"{peer} sent a {what} nested {depth} levels deep, over the bound of {JSON_DEPTH}"
        )
    try:
        obj = json.loads(payload, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except _BadNumber as e:
        raise ProtocolError(f"{peer} sent a {what} with {e}: numbers must be finite and short") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer} sent a {what} that is not a JSON object")
    return obj


def pack_frame(msg: Msg, payload: bytes = b"", a: int = 0, b: int = 0) -> bytes:
    """One frame; the payload must respect its type's bound."""
    if len(payload) > BOUNDS.get(msg, 0):
        raise ValueError(f"{msg.name} payload of {len(payload)} bytes exceeds its bound {BOUNDS.get(msg, 0)}")
    return HEADER.pack(msg, a, b, len(payload)) + payload


def pack_error(text: str) -> bytes:
    """An ERROR frame, the text cut to the bound."""
    return pack_frame(Msg.ERROR, text.encode(errors="replace")[: BOUNDS[Msg.ERROR]])


def error_text(payload: bytes) -> str:
    """The text of a peer's ERROR frame as one printable line."""
    return printable(payload.decode(errors="replace"), 500)


def pack_forward(pos: int, n_tokens: int, mode: str) -> bytes:
    """The 8-byte per-forward control message."""
    return HEADER.pack(Msg.FORWARD, MODES.index(mode), n_tokens, pos)


def pack_forward_rows(positions: Sequence[int], slots: Sequence[int], mode: str) -> bytes:
    """The control message of a forward pass whose rows have their own positions and KV slots:
    8 header bytes + 8 per row."""
    n = len(positions)
    if not 1 <= n <= MAX_ROWS or len(slots) != n:
        raise ValueError(f"FORWARD_ROWS takes 1..{MAX_ROWS} rows of one position and one slot each")
    payload = struct.pack(f"<{2 * n}i", *positions, *slots)
    return pack_frame(Msg.FORWARD_ROWS, payload, a=MODES.index(mode), b=n)


def parse_forward_rows(
    f: Frame, max_batch: int, max_seq_len: int, n_slots: int, peer: str
) -> tuple[str, np.ndarray, np.ndarray]:
    """(mode, positions, slots) of a FORWARD_ROWS frame, each value checked against the session: a
    known mode, 1..max_batch rows, a payload of exactly 8 bytes per row, positions and slots in range."""
    n = f.b
    if f.a >= len(MODES) or not 1 <= n <= max_batch:
        raise ProtocolError(f"{peer} asked for a forward pass out of range (mode {f.a}, {n} rows)")
    if len(f.payload) != ROW_BYTES * n:
        raise ProtocolError(
            f"{peer} sent a FORWARD_ROWS of {len(f.payload)} bytes for {n} rows (needs {ROW_BYTES * n})"
        )
    values = np.frombuffer(f.payload, dtype="<i4")
    for what, row_values, bound in (("position", values[:n], max_seq_len), ("KV slot", values[n:], n_slots)):
        bad = np.flatnonzero((row_values < 0) | (row_values >= bound))
        if bad.size:
            r = int(bad[0])
            raise ProtocolError(
                f"{peer} sent row {r} the {what} {int(row_values[r])}, outside this session's 0..{bound - 1}"
            )
    positions, slots = values[:n], values[n:]
    return MODES[f.a], positions, slots


def parse_header(raw: bytes, peer: str) -> tuple[Msg, int, int, int]:
    """(type, a, b, c) of a frame header; unknown types and payloads over their bound are refused."""
    t, a, b, c = HEADER.unpack(raw)
    try:
        msg = Msg(t)
    except ValueError:
        raise ProtocolError(f"{peer} sent an unknown message type {t}") from None
    if msg != Msg.FORWARD and c > BOUNDS.get(msg, 0):
        raise ProtocolError(
            f"{peer} sent a {msg.name} message of {c} bytes, over its {BOUNDS.get(msg, 0)}-byte bound"
        )
    return msg, a, b, c


def _int(v: Any) -> int:
    """A JSON integer (not a boolean); TypeError otherwise."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(v)
    return v


def _num(v: Any) -> float:
    """A JSON number (not a boolean) as a float; TypeError otherwise."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(v)
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(v)
    return v


def config_from_json(d: Any, peer: str) -> ModelConfig:
    """The ModelConfig a root sent, checked by the same validation as a model file's."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        if not isinstance(d, dict) or not set(d) <= names:
            raise TypeError(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            rs = RopeScaling(
                *(rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "orig_max_seq_len"))
            )
        cfg = ModelConfig(**{**d, "rope_scaling": rs})
    except (TypeError, KeyError):
        raise ProtocolError(f"{peer} sent a model config this worker cannot use") from None
    try:
        cfg.validate(f"{peer} sent a model config this worker cannot use")
    except DllamaError as e:
        raise ProtocolError(printable(e, 300)) from None
    return cfg


def slice_from_json(d: Any, cfg: ModelConfig, peer: str) -> NodeSlice:
    """The NodeSlice a root sent, its ranges checked to be ordered, inside the model, and its KV heads exactly
    those its query heads read."""
    keys = ("kv_heads", "q_heads", "ffn", "moe", "vocab")
    sizes = (cfg.n_kv_heads, cfg.n_heads, cfg.hidden_dim, cfg.moe_hidden_dim, cfg.vocab_size)
    try:
        ranges = {}
        for k in keys:
            a, b = d[k]
            ranges[k] = (_int(a), _int(b))
        sl = NodeSlice(node=_int(d["node"]), n_nodes=_int(d["n_nodes"]), **ranges)
    except (TypeError, KeyError, ValueError):
        raise ProtocolError(f"{peer} sent a node slice this worker cannot use") from None
    group = cfg.n_heads // cfg.n_kv_heads
    q0, q1 = sl.q_heads
    if not (
        all(0 <= a <= b <= size for (a, b), size in zip(ranges.values(), sizes, strict=True))
        and q0 < q1
        and sl.kv_heads == (q0 // group, -(-q1 // group))
    ):
        raise ProtocolError(
            f"{peer} sent a node slice this worker cannot use (outside its model or unordered)"
        )
    return sl


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    """What a worker needs to rebuild its graph and join the mesh: the graph is a function of these."""

    session: str  # random id that lets the workers of one session recognise each other
    node: int
    n_nodes: int
    act: str
    max_seq_len: int
    max_batch: int
    n_slots: int  # sequences the KV cache holds, max_seq_len rows each (the API's --parallel)
    kv_type: str  # the KV cache's number format (engine.slicing.KV_TYPES)
    timeout: float  # NET_TIMEOUT of the root
    heartbeat: float  # seconds between the root's keep-alive pings on idle links
    weight_bytes: int  # bytes of tensors this worker will hold (received or from its slice cache)
    cache_key: str  # names this slice in a worker's slice cache (net/slice_cache.py): 64 hex digits
    peers: list[tuple[str, int]]  # addresses of nodes 1..n_nodes-1 as the root reached them
    model: ModelConfig
    slice: NodeSlice  # the part of the model this worker computes

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes, peer: str) -> SessionConfig:
        d = parse_json(payload, "session config", peer)
        try:
            model = config_from_json(d["model"], peer)
            peers = []
            for host, port in d["peers"]:
                peers.append((_str(host), _int(port)))
            sc = cls(
                session=_str(d["session"]),
                node=_int(d["node"]),
                n_nodes=_int(d["n_nodes"]),
                act=_str(d["act"]),
                max_seq_len=_int(d["max_seq_len"]),
                max_batch=_int(d["max_batch"]),
                n_slots=_int(d["n_slots"]),
                kv_type=_str(d["kv_type"]),
                timeout=_num(d["timeout"]),
                heartbeat=_num(d["heartbeat"]),
                weight_bytes=_int(d["weight_bytes"]),
                cache_key=_str(d["cache_key"]),
                peers=peers,
                model=model,
                slice=slice_from_json(d["slice"], model, peer),
            )
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{peer} sent an incomplete session config") from None
        if not (
            1 <= sc.node < sc.n_nodes <= sc.model.n_heads
            and len(sc.peers) == sc.n_nodes - 1
            and all(0 < len(h) <= 255 and h.isprintable() and 1 <= p <= 65535 for h, p in sc.peers)
            and 0 < len(sc.session) <= 64
            and sc.act in ACT_TYPES
            and sc.kv_type in KV_TYPES
            and 1 <= sc.max_batch <= MAX_ROWS
            and 1 <= sc.n_slots <= sc.max_batch
            and 1 <= sc.max_seq_len <= sc.model.context_len
            and 0 < sc.timeout <= MAX_NET_TIMEOUT
            and HEARTBEAT_MIN <= sc.heartbeat <= max(1.0, sc.timeout)
            and 0 <= sc.weight_bytes < 1 << 50
            and len(sc.cache_key) == 64
            and all(c in "0123456789abcdef" for c in sc.cache_key)
            and sc.slice.node == sc.node
            and sc.slice.n_nodes == sc.n_nodes
        ):
            raise ProtocolError(f"{peer} sent a session config with values out of range")
        return sc


def available_memory() -> int:
    """Bytes of memory this machine can still give a process (MemAvailable on Linux), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def capabilities(backend: Backend, speed: float | None = None) -> dict[str, Any]:
    """What a node tells its peers about itself in the greeting (a worker adds its measured `speed`, GB/s,
    which the root's split follows)."""
    caps = {
        "backend": backend.name,
        "device": backend.description,
        "threads": getattr(backend, "n_threads", 1),
        "memory": available_memory(),
        "host": socket.gethostname(),
    }
    return caps if speed is None else {**caps, "speed": round(speed, 4)}


def reported(caps: dict[str, Any]) -> tuple[int, float | None]:
    """(free memory in bytes, 0 when unknown; measured speed in GB/s or None) from a peer's greeting, where
    they are plausible numbers."""
    mem, speed = caps.get("memory"), caps.get("speed")
    mem = mem if isinstance(mem, int) and not isinstance(mem, bool) and mem > 0 else 0
    return mem, speed if isinstance(speed, float) and 0 < speed < 1e6 else None


def describe(caps: dict[str, Any]) -> str:
    """One line for a log: device, host, free memory (a peer's own words, made printable and short)."""
    mem, speed = reported(caps)
    free = f", {mem / 2**30:.1f} GiB free" if mem else ""
    fast = f", {speed:.2f} GB/s measured" if speed is not None else ""
    return f"{printable(caps.get('device', '?'), 100)} on {printable(caps.get('host', '?'), 100)}{free}{fast}"
