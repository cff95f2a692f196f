"""The cluster's wire format: a versioned greeting, then length-bounded frames; raw rows inside a forward.

Every connection opens with a greeting each way: 12 bytes (magic `DLMA`, protocol version, role, payload
length) and a JSON payload of the node's capabilities. After it come frames with an 8-byte header
`<type u8, a u8, b u16, c u32>`: `c` is the payload length for the types that carry one (bounded per type),
while FORWARD packs mode, token count and start position into the header itself, so the per-forward control
message is 8 bytes like the original's (spec 5.5). Inside a forward pass nodes exchange raw activation rows
whose sizes every node derives from the session config, so sync traffic carries no framing bytes at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from enum import IntEnum
from typing import Any, NamedTuple

from engine.arch import registry
from engine.backend import Backend
from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.graph import ACT_TYPES
from engine.slicing import NodeSlice

MAGIC = b"DLMA"
PROTOCOL_VERSION = 2  # 2: the session config carries the worker's NodeSlice, tensor headers a shape
GREETING = struct.Struct("<4sHBBI")  # magic, version, role, reserved, payload length
HEADER = struct.Struct("<BBHI")  # type, a, b, c
GREETING_BOUND = 4096  # bytes of a greeting's JSON payload
NET_TIMEOUT = 3.0  # seconds of silence from a peer in a forward pass before it is reported
MODES = ("none", "last", "all")  # FORWARD `a`: which logits the root wants back


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
    FORWARD = 7  # root -> worker: a = mode, b = tokens, c = start position; no payload
    PING = 8  # keep-alive while a link is otherwise idle
    STOP = 9  # root -> worker: the session is over; OK once the worker has freed the model


BOUNDS = {Msg.ERROR: 4096, Msg.CONFIG: 1 << 16, Msg.TENSOR: 4096}  # payload bytes; other types carry none


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


def parse_json(payload: bytes, what: str, peer: str) -> dict[str, Any]:
    """A JSON object from a greeting or message payload."""
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
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
    return pack_frame(Msg.ERROR, text.encode()[: BOUNDS[Msg.ERROR]])


def pack_forward(pos: int, n_tokens: int, mode: str) -> bytes:
    """The 8-byte per-forward control message."""
    return HEADER.pack(Msg.FORWARD, MODES.index(mode), n_tokens, pos)


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


def config_from_json(d: Any, peer: str) -> ModelConfig:
    """The ModelConfig a root sent, type-checked field by field."""
    try:
        d = dict(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            d["rope_scaling"] = RopeScaling(
                float(rs["factor"]),
                float(rs["low_freq_factor"]),
                float(rs["high_freq_factor"]),
                int(rs["orig_max_seq_len"]),
            )
        cfg = ModelConfig(**d)
        ints = (
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
            cfg.context_len,
        )
        sizes = (cfg.hidden_dim, cfg.n_experts, cfg.n_active_experts, cfg.moe_hidden_dim)
        ok = (
            all(isinstance(v, int) and v > 0 for v in ints)
            and cfg.n_heads % cfg.n_kv_heads == 0
            and all(isinstance(v, int) and v >= 0 for v in sizes)
            and cfg.arch in registry()
            and isinstance(cfg.rope_neox, bool)
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ProtocolError(f"{peer} sent a model config this worker cannot use")
    return cfg


def slice_from_json(d: Any, peer: str) -> NodeSlice:
    """The NodeSlice a root sent, its ranges checked to be ordered."""
    try:
        d = dict(d)
        ranges = {k: (int(d[k][0]), int(d[k][1])) for k in ("kv_heads", "q_heads", "ffn", "moe", "vocab")}
        sl = NodeSlice(node=int(d["node"]), n_nodes=int(d["n_nodes"]), **ranges)
        ok = all(0 <= a <= b for a, b in ranges.values())
    except (TypeError, KeyError, ValueError, IndexError):
        ok = False
    if not ok:
        raise ProtocolError(f"{peer} sent a node slice this worker cannot use")
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
    timeout: float  # NET_TIMEOUT of the root
    heartbeat: float  # seconds between the root's keep-alive pings on idle links
    weight_bytes: int  # bytes of tensors this worker will receive
    peers: list[tuple[str, int]]  # addresses of nodes 1..n_nodes-1 as the root reached them
    model: ModelConfig
    slice: NodeSlice  # the part of the model this worker computes

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes, peer: str) -> SessionConfig:
        d = parse_json(payload, "session config", peer)
        try:
            sc = cls(
                session=str(d["session"]),
                node=int(d["node"]),
                n_nodes=int(d["n_nodes"]),
                act=str(d["act"]),
                max_seq_len=int(d["max_seq_len"]),
                max_batch=int(d["max_batch"]),
                timeout=float(d["timeout"]),
                heartbeat=float(d["heartbeat"]),
                weight_bytes=int(d["weight_bytes"]),
                peers=[(str(h), int(p)) for h, p in d["peers"]],
                model=config_from_json(d["model"], peer),
                slice=slice_from_json(d["slice"], peer),
            )
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{peer} sent an incomplete session config") from None
        if not (
            1 <= sc.node < sc.n_nodes
            and len(sc.peers) == sc.n_nodes - 1
            and sc.act in ACT_TYPES
            and 1 <= sc.max_batch <= 65535
            and 1 <= sc.max_seq_len <= sc.model.context_len
            and 0 < sc.timeout
            and 0 < sc.heartbeat
            and 0 <= sc.weight_bytes
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


def capabilities(backend: Backend) -> dict[str, Any]:
    """What a node tells its peers about itself in the greeting."""
    return {
        "backend": backend.name,
        "device": backend.description,
        "threads": getattr(backend, "n_threads", 1),
        "memory": available_memory(),
        "host": socket.gethostname(),
    }


def describe(caps: dict[str, Any]) -> str:
    """One line for a log: device, threads, free memory."""
    mem = caps.get("memory")
    free = f", {mem / 2**30:.1f} GiB free" if isinstance(mem, int) and mem > 0 else ""
    return f"{caps.get('device', '?')} on {caps.get('host', '?')}{free}"
