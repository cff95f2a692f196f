"""KV slots in a cluster (the API's --parallel): rows of three sequences, each at its own position and in its
own slot, through 2 and 3 nodes (CPU, Vulkan or both) against one CPU node and against each sequence alone;
the bytes of FORWARD_ROWS; bad FORWARD_ROWS payloads refused by a live worker in one line."""

from __future__ import annotations

import re
import socket
import struct
import threading

import numpy as np
import pytest
from netutil import TINY8, assert_serves

from engine.errors import DllamaError
from engine.runner import ForwardStats, Runner
from engine.slicing import kv_cache_bytes, plan_slices, slice_bytes
from net.protocol import GREETING, HEADER, Msg, Role, error_text, pack_frame, pack_greeting

SEQS = [[5, 17, 200, 3, 99], [42, 7], [150, 11, 8, 60, 1, 2, 9]]  # three prompts (the last: chunks of 4 + 3)
SLOTS = [2, 0, 1]  # the slot of each
NEXT = [[31, 64], [12, 250], [77, 4]]  # each sequence's tokens of two batched decode steps


def slotted(model, backend, workers=(), n_slots: int = 3) -> Runner:
    """f32 sync, 64 positions, batches of 4, `n_slots` KV slots, on these workers (none: one node)."""
    addresses = [w.address for w in workers]
    return Runner(model, backend, "f32", 64, 4, workers=addresses, log=lambda line: None, n_slots=n_slots)


def run_slots(r: Runner) -> list[np.ndarray]:
    """Prefill every sequence in its slot, then two forward_rows steps of all three; the logits of each
    sequence's last prompt token, then of each step (3 rows each)."""
    last = [r.forward(seq, 0, "last", slot=slot) for seq, slot in zip(SEQS, SLOTS, strict=True)]
    steps = [np.stack(last)]
    for step in range(2):
        tokens = [nxt[step] for nxt in NEXT]
        positions = [len(seq) + step for seq in SEQS]  # 5, 2, 7, then 6, 3, 8
        steps.append(r.forward_rows(tokens, positions, SLOTS))
    return steps


def close_to(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1.0))


@pytest.fixture(scope="module")
def one_node(model, backend) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """run_slots on one CPU node, and each sequence's last three rows of logits run alone in one slot."""
    want = run_slots(slotted(model, backend))
    alone_runner = slotted(model, backend, n_slots=1)
    alone = [alone_runner.forward(seq + nxt, 0, "all")[-3:] for seq, nxt in zip(SEQS, NEXT, strict=True)]
    return want, alone


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_forward_rows_match_one_node_and_each_sequence_alone(pool, model, backend, one_node, n_nodes):
    want, alone = one_node
    workers = pool.get(n_nodes - 1)
    marks = [w.mark() for w in workers]
    r = slotted(model, backend, workers)
    try:
        got = run_slots(r)
    finally:
        r.close()
    for w, m in zip(workers, marks, strict=True):
        w.wait_for(r"🛑 Stop: 7 forward passes", m)  # prefills of 2 + 1 + 2 passes, then 2 batched steps
    for step in range(3):  # the prefills' last rows ("last" mode), then the two batched steps
        assert got[step].shape == (3, TINY8["vocab"])
        assert close_to(got[step], want[step])
        for i in range(3):
            assert close_to(got[step][i], alone[i][step]), (step, i)


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_forward_rows_bytes_by_hand(pool, model, backend, n_nodes):
    """A 1-row prefill in slot 0 goes as the 8-byte FORWARD; a 3-row forward_rows as FORWARD_ROWS: 8 header
    bytes + 8 per row (int32 position, int32 slot), then 3 rows of x and partial sums, all 3 logits rows."""
    d, n_layers, vocab = TINY8["dim"], TINY8["n_layers"], TINY8["vocab"]
    s = 4 * d  # f32 partial sums
    workers = pool.get(n_nodes - 1)
    marks = [w.mark() for w in workers]
    r = slotted(model, backend, workers)
    prefill, batch = ForwardStats(), ForwardStats()
    try:
        r.forward([9], 0, "last", prefill)
        r.forward_rows([3, 4, 5], [1, 0, 30], [0, 2, 1], batch)
    finally:
        r.close()
    row_out, row_back = 4 * d + 2 * n_layers * s, 2 * n_layers * s  # per worker: x + sums out, sums back
    logits_row = 4 * vocab * (n_nodes - 1) // n_nodes  # the workers' vocabulary rows, f32
    assert prefill.sent == (n_nodes - 1) * (8 + row_out)
    assert prefill.recv == (n_nodes - 1) * row_back + logits_row
    assert batch.sent == (n_nodes - 1) * (8 + 8 * 3 + 3 * row_out)
    assert batch.recv == (n_nodes - 1) * 3 * row_back + 3 * logits_row
    # each worker: the mesh's partial sums of the other N-1 nodes both ways, its vocabulary rows to the root
    mesh, worker_logits = (n_nodes - 1) * 2 * n_layers * s, 4 * vocab // n_nodes
    for w, m in zip(workers, marks, strict=True):
        got = w.wait_for(r"🛑 Stop: (\d+) forward passes; sent (\d+) B, received (\d+) B", m).groups()
        want_sent = mesh + worker_logits + 3 * (mesh + worker_logits)
        want_recv = (mesh + 4 * d) + 8 + 3 * (mesh + 4 * d) + 8 + 24
        assert tuple(map(int, got)) == (2, want_sent, want_recv)


def rows_frame(payload: bytes, rows: int, mode: int = 2, length: int | None = None) -> bytes:
    """A FORWARD_ROWS frame built by hand: <type u8, mode u8, rows u16, payload length u32> + payload."""
    return (
        struct.pack("<BBHI", Msg.FORWARD_ROWS, mode, rows, len(payload) if length is None else length)
        + payload
    )


# (case, frame, what the worker's one-line refusal says); the session has 4 rows, 64 positions, 3 slots
BAD_ROWS = [
    (
        "slot-3",
        rows_frame(struct.pack("<4i", 1, 2, 0, 3), 2),
        "sent row 1 the KV slot 3, outside this session's 0..2",
    ),
    ("slot-neg", rows_frame(struct.pack("<2i", 0, -1), 1), "sent row 0 the KV slot -1, outside"),
    (
        "pos-64",
        rows_frame(struct.pack("<2i", 64, 0), 1),
        "sent row 0 the position 64, outside this session's 0..63",
    ),
    (
        "count-short",
        rows_frame(struct.pack("<4i", 1, 2, 0, 0), 3),
        "sent a FORWARD_ROWS of 16 bytes for 3 rows (needs 24)",
    ),
    ("rows-5", rows_frame(bytes(40), 5), "asked for a forward pass out of range (mode 2, 5 rows)"),
    ("mode-7", rows_frame(bytes(8), 1, mode=7), "asked for a forward pass out of range (mode 7, 1 rows)"),
    (
        "huge",
        rows_frame(b"", 1, length=2**32 - 1),
        "FORWARD_ROWS message of 4294967295 bytes, over its 524280",
    ),
]


@pytest.mark.parametrize("case, raw, want", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_worker_refuses_a_bad_forward_rows(pool, model, backend, case, raw, want):
    (w,) = pool.get(1)
    m = w.mark()
    r = slotted(model, backend, [w])
    link = r.cluster.links[1]
    try:
        with link.lock:  # the heartbeat stays off this link
            link.send(raw[:8] if case == "huge" else raw, 1.0)
            f = link.read_frame(5.0, total=5.0)
    finally:
        r.close()
    assert f.msg == Msg.ERROR
    text = error_text(f.payload)
    assert want in text and "\n" not in text, text
    w.wait_for("Session ended: .*" + re.escape(want), m)


def test_a_refusing_worker_serves_the_next_root(pool, model, backend):
    (w,) = pool.get(1)
    r = slotted(model, backend, [w])
    link = r.cluster.links[1]
    m = w.mark()
    try:
        with link.lock:
            link.send(rows_frame(struct.pack("<2i", 0, 9), 1), 1.0)
            assert link.read_frame(5.0, total=5.0).msg == Msg.ERROR
    finally:
        r.close()
    w.wait_for("Waiting for a root", m)  # the refused session has ended (else a new root finds it busy)
    assert_serves(model, backend, [w])


def same_rows(got: np.ndarray, want: np.ndarray) -> bool:
    """The same greedy token in every row, and logits within the CPU clusters' f32 bound."""
    return bool((got.argmax(-1) == want.argmax(-1)).all()) and close_to(got, want)


# root's backend, then each worker's: a Vulkan worker, a Vulkan root, both, and a Vulkan node among CPU ones
LAYOUTS = [("cpu", "vulkan"), ("vulkan", "cpu"), ("vulkan", "vulkan"), ("cpu", "vulkan", "cpu")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["-".join(n) for n in LAYOUTS])
def test_vulkan_nodes_run_the_slots_as_one_cpu_node(pool, model, backend, one_node, vulkan, layout):
    """Every node builds the graph with the KV slots and writes each FORWARD_ROWS row's slot into its slot
    pipe: the interleaved rows of three slots give one CPU node's tokens and logits, and each sequence's."""
    want, alone = one_node
    workers = [w for kind in layout[1:] for w in pool.get(1, backend=kind)]
    marks = [w.mark() for w in workers]
    r = slotted(model, vulkan if layout[0] == "vulkan" else backend, workers)
    try:
        got = run_slots(r)
    finally:
        r.close()
    for w, kind, m in zip(workers, layout[1:], marks, strict=True):
        assert ("Vulkan" in w.wait_for("Listening on", 0).string) == (kind == "vulkan")
        w.wait_for(r"🛑 Stop: 7 forward passes", m)
    for step in range(3):
        assert same_rows(got[step], want[step]), step
        for i in range(3):
            assert same_rows(got[step][i], alone[i][step]), (step, i)


def split_with_fake_worker(model, backend, caps: dict) -> list[str]:
    """The root's log up to its failure on a worker that greets with `caps`, then hangs up at the config."""
    srv = socket.create_server(("127.0.0.1", 0))

    def fake_worker() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            head = conn.recv(GREETING.size, socket.MSG_WAITALL)
            conn.recv(int.from_bytes(head[8:12], "little"), socket.MSG_WAITALL)
            conn.sendall(pack_greeting(Role.WORKER, caps) + pack_frame(Msg.OK, a=Msg.OK))
            conn.recv(HEADER.size, socket.MSG_WAITALL)  # the session config: the split is made

    t = threading.Thread(target=fake_worker, daemon=True)
    t.start()
    lines: list[str] = []
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    with pytest.raises(DllamaError):
        Runner(model, backend, "f32", 64, 4, workers=[address], log=lines.append, n_slots=3)
    t.join(10)
    srv.close()
    return lines


def test_the_split_counts_a_vulkan_workers_slots_against_the_device_not_its_host(model, backend):
    """A worker with room for its even share of the weights but not for 3 slots of KV cache: as a CPU node
    the root gives it less, as a Vulkan node (the cache on the device) the even split."""
    even = plan_slices(model, 2)[1]
    kv = kv_cache_bytes(model.config, even, 3 * 64)
    memory = slice_bytes(model, even, 0) + kv // 2
    ffn = {}
    for kind in ("cpu", "vulkan"):
        lines = split_with_fake_worker(model, backend, {"backend": kind, "device": "fake", "memory": memory})
        row = next(ln for ln in lines if ln.split()[:1] == ["1"])  # the split table's row of node 1
        ffn[kind] = tuple(map(int, row.split()[-2].split("-")))
    assert ffn["vulkan"] == even.ffn
    assert ffn["cpu"][1] - ffn["cpu"][0] < even.ffn[1] - even.ffn[0]
