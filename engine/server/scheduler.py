"""The generation worker: one thread owns the model and runs queued requests in its KV slots.

It also owns the model's life cycle: loading at start-up (the HTTP server already answers /health with 503
meanwhile) and, on a cluster, rebuilding it after a node failed, retrying until every worker is back.
Continuous batching: each choice of a request takes a free KV slot (`--parallel` of them); every turn feeds
one prompt chunk of a sequence still pre-filling, then decodes one token of every other sequence in one
forward pass, and a finished or cancelled choice frees its slot at once. Each slot keeps the token list whose
keys and values it holds, so a request that extends a slot's conversation pre-fills only its new tokens; the
cache never changes what a request generates, only how much of its prompt has to be computed.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.chat import common_prefix
from engine.chat_template import ChatTemplate
from engine.errors import DllamaError
from engine.grammar import GrammarMask
from engine.loader import Loaded
from engine.logits import LogitsProcessor, log_softmax_at
from engine.runner import Runner
from engine.sampler import Sampler
from engine.server.errors import ApiError
from engine.server.stops import StopFilter
from engine.tokenizer import StreamDecoder

SEED_MASK = (1 << 64) - 1
RETRY_S = 3.0  # seconds between attempts to (re)build a cluster, as the original's API server
IDLE_CHECK_S = 1.0  # how often an idle engine looks for a cluster node that went away


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw logits, with the most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Piece:
    """Generated text, safe to send (stop strings already removed), and the log-probabilities (if asked
    for) of the tokens generated since the previous piece."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0  # the choice it belongs to


@dataclass
class Finished:
    """The end of one choice: OpenAI's finish_reason, the usage counts, and the log-probabilities of the
    tokens no piece carried (a stop string's, EOS)."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0


@dataclass
class Failed:
    """A generation that could not be completed; `status` is the HTTP status it maps to."""

    status: int
    message: str
    code: str | None = None


Event = Piece | Finished | Failed


@dataclass
class Job:
    """One request's generation: prompt tokens, sampling, limits, and where its events go (thread-safe).
    Its `n` choices run one after the other; choice i draws with seed + i."""

    id: str
    prompt: list[int]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    reply_start: bool  # chat: the text starts the reply (a SentencePiece dummy space is dropped)
    emit: Callable[[Event], None]
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: dict[int, float] = field(default_factory=dict)  # token ids already checked against the vocabulary
    logprobs: int | None = None  # alternatives per token's log-probability; None: no log-probabilities
    grammar: str | None = None  # an llguidance grammar (already checked) the output must follow
    n: int = 1
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class EngineStats:
    """Totals since start-up, for /metrics."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_rate: float = 0.0  # decode tokens/s (wall clock after the first token) of the last generation
    reused_tokens: int = 0  # prompt tokens a slot's cache already held (not pre-filled again)


@dataclass
class NodeInfo:
    """One node of the running model, for /v1/cluster."""

    node: int
    role: str  # "root" | "worker"
    backend: str  # e.g. "cpu", "vulkan"
    device: str  # the backend's description, e.g. "CPU (numba, 2 threads)"


@dataclass
class ModelInfo:
    """What /v1/models, /health and /v1/cluster report about the loaded model."""

    name: str
    context_length: int
    n_nodes: int
    nodes: list[NodeInfo] = field(default_factory=list)


class Scheduler:
    """Queue + worker thread + model life cycle. States: loading, ready, unavailable (a cluster is being
    rebuilt), failed (the model could not be loaded at all), stopping."""

    def __init__(
        self,
        load: Callable[[], Loaded],
        queue_size: int,
        clustered: bool,
        on_fatal: Callable[[str], None],
        template_name: str | None = None,
        log: Callable[[str], None] = print,
        retry_s: float = RETRY_S,
    ):
        self._load, self.queue_size, self.clustered = load, queue_size, clustered
        self._template_name = template_name
        self._on_fatal, self._log, self._retry_s = on_fatal, log, retry_s
        self.state = "loading"
        self.detail = "the model is loading"
        self.info: ModelInfo | None = None
        self.loaded: Loaded | None = None
        self.template: ChatTemplate | None = None
        self._jobs: deque[Job] = deque()
        self._next_choice: dict[str, int] = {}  # a waiting job whose first choices already run: the next one
        self._slots: list[_Sequence | None] = []  # per KV slot: the choice generating there, None when free
        self._cached: list[list[int]] = []  # per KV slot: the tokens in its cache, positions 0..len-1
        self._used: list[int] = []  # per KV slot: when it was last taken (the least recently used goes first)
        self._clock = 0
        self._stats = EngineStats()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dllama-engine", daemon=True)

    # ---- the HTTP side ----
    def start(self) -> None:
        self._thread.start()

    def load_counts(self) -> tuple[int, int]:
        """(running, waiting) jobs, for /health."""
        with self._cv:
            return self._running(), len(self._jobs)

    def slot_usage(self) -> tuple[int, int]:
        """(KV slots generating now, KV slots), for /metrics."""
        with self._cv:
            return sum(q is not None for q in self._slots), len(self._slots)

    def _running(self) -> int:
        """Requests with a choice in a slot (the caller holds the lock)."""
        return len({q.job.id for q in self._slots if q is not None})

    def stats(self) -> EngineStats:
        """A copy of the token totals, for /metrics."""
        with self._cv:
            return EngineStats(**vars(self._stats))

    def submit(self, job: Job) -> None:
        """Queue a job, or raise ApiError: 503 while not ready, 429 when every slot is busy and `queue_size`
        jobs already wait."""
        with self._cv:
            if self._stop.is_set():
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.state != "ready":
                raise ApiError(503, self.detail, code="unavailable")
            if len(self._jobs) + self._running() >= self.queue_size + len(self._slots):
                raise ApiError(
                    429,
                    f"the server is busy: {len(self._jobs)} requests are already waiting (--queue-size "
                    f"{self.queue_size}); retry later",
                    code="queue_full",
                )
            self._jobs.append(job)
            self._cv.notify()

    def drain(self) -> None:
        """Shutdown, step 1: refuse new jobs, fail the waiting ones; the running one may finish."""
        with self._cv:
            self._stop.set()
            waiting, self._jobs = list(self._jobs), deque()
            self._cv.notify_all()
        for job in waiting:
            job.emit(Failed(503, "the server is shutting down", "shutting_down"))

    def stop(self, timeout: float = 10.0) -> None:
        """Shutdown, step 2: cancel the running jobs, wait for the thread, release cluster workers."""
        self.drain()
        with self._cv:
            for seq in self._slots:
                if seq is not None:
                    seq.job.cancel.set()
        self._thread.join(timeout)

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set() or any(q is not None for q in self._slots):
                if self.loaded is None:
                    if not self._stop.is_set():
                        self._bring_up()
                    continue
                if self._wait_for_work():
                    self._step()
        except Exception as e:  # a dead engine thread must stop the server, not hang it
            traceback.print_exc()
            self._fatal(f"the engine failed: {type(e).__name__}: {e}")
        finally:
            if self.loaded is not None:
                self.loaded.runner.close()

    def _wait_for_work(self) -> bool:
        """Wait until a choice runs or a job waits; False when stopping (and nothing runs) or when the idle
        check found the cluster broken."""
        fault = None
        with self._cv:
            while not self._busy() and not self._stop.is_set() and fault is None:
                self._cv.wait(IDLE_CHECK_S)
                fault = None if self._jobs else self._cluster_fault()
            if fault is None:
                return self._busy()
        if not self._stop.is_set():
            self._broken(fault)
        return False

    def _busy(self) -> bool:
        return bool(self._jobs) or any(q is not None for q in self._slots)

    def _bring_up(self) -> None:
        """Load the model (connecting the cluster); a single node gives up on the first error, a cluster
        retries every RETRY_S seconds until it stands."""
        try:
            loaded = self._load()
        except DllamaError as e:
            if not self.clustered:
                self._fatal(str(e))
                return
            detail = f"the cluster is not available: {e} (retrying every {self._retry_s:g} s)"
            if detail != self.detail:  # one line per new reason, not one per attempt
                self._log(f"⚠️ {detail}")
            with self._cv:
                self.state, self.detail = "unavailable", detail
            self._stop.wait(self._retry_s)
            return
        except Exception as e:  # a bug in loading: say it on /health and stop the server
            traceback.print_exc()
            self._fatal(f"{type(e).__name__}: {e}")
            return
        if self.template is None:
            try:
                self.template = ChatTemplate.for_tokenizer(loaded.tokenizer, self._template_name)
            except DllamaError as e:
                loaded.runner.close()
                self._fatal(str(e))
                return
        runner = loaded.runner
        with self._cv:
            self.loaded = loaded
            n = runner.n_slots
            self._slots, self._cached, self._used = [None] * n, [[] for _ in range(n)], [0] * n
            self.info = ModelInfo(_model_name(loaded), runner.max_seq_len, runner.n_nodes, _nodes(runner))
            self.state, self.detail = "ready", "ready"
        self._log(f"✅ Ready: {self.info.name}, context {runner.max_seq_len}, {runner.n_nodes} node(s)")

    def _fatal(self, message: str) -> None:
        """The server cannot go on: say why on /health, fail the waiting jobs, and have the server exit."""
        with self._cv:
            self.state, self.detail = "failed", message
            self._stop.set()
            waiting, self._jobs = list(self._jobs), deque()
        for job in waiting:
            job.emit(Failed(503, message, "unavailable"))
        self._on_fatal(message)

    def _cluster_fault(self) -> str | None:
        """Why the cluster cannot serve (a link found broken by the heartbeat), or None."""
        cluster = getattr(self.loaded.runner, "cluster", None) if self.loaded is not None else None
        if cluster is None:
            return None
        if cluster.failed:
            return cluster.failed
        broken = next((link for link in cluster.links.values() if link.broken), None)
        return f"{broken.name} {broken.broken}" if broken is not None else None

    def _broken(self, reason: str) -> None:
        """A cluster node failed: fail the waiting jobs, drop the runner, and let _run rebuild it."""
        with self._cv:
            self.state = "unavailable"
            self.detail = f"the cluster is not available: {reason} (rebuilding)"
            waiting, self._jobs = list(self._jobs), deque()
            loaded, self.loaded = self.loaded, None
            self._cached = [[] for _ in self._cached]
        self._log(f"⚠️ {self.detail}")
        for job in waiting:
            job.emit(Failed(503, self.detail, "unavailable"))
        if loaded is not None:
            loaded.runner.close()

    def _step(self) -> None:
        """One turn of the engine: admit waiting choices into free slots, feed one prompt chunk of one
        sequence still pre-filling, then one batched decode pass for every sequence that is generating."""
        assert self.loaded is not None
        self._admit()
        for seq in [q for q in self._slots if q is not None and q.job.cancel.is_set()]:
            self._release(seq, None)
        filling = next((q for q in self._slots if q is not None and q.todo), None)
        decoding = [q for q in self._slots if q is not None and not q.todo and q.token is not None]
        runner = self.loaded.runner
        try:
            if filling is not None:
                chunk, filling.todo = filling.todo[: runner.max_batch], filling.todo[runner.max_batch :]
                mode = "none" if filling.todo else "last"
                logits = runner.forward(chunk, filling.pos, mode, slot=filling.slot)
                filling.pos += len(chunk)
                filling.cached += chunk
                if logits is not None:
                    self._take(filling, logits)
            if decoding:
                rows = runner.forward_rows(
                    [q.token for q in decoding], [q.pos for q in decoding], [q.slot for q in decoding]
                )
                for seq, logits in zip(decoding, rows, strict=True):
                    seq.pos += 1
                    seq.cached.append(seq.token)
                    self._take(seq, logits)
        except DllamaError as e:
            self._failed(runner, str(e))
        except Exception as e:  # a bug must fail the requests in flight, not the server
            traceback.print_exc()
            self._failed(runner, f"internal error: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        """Each free slot takes the next waiting choice: the free slot whose cached tokens share the longest
        prefix with its prompt, so that only the rest is pre-filled."""
        assert self.loaded is not None
        while True:
            with self._cv:
                free = [i for i, q in enumerate(self._slots) if q is None]
                if not free or not self._jobs:
                    return
                job = self._jobs[0]
                if job.cancel.is_set():  # its client went away while it waited
                    self._jobs.popleft()
                    self._next_choice.pop(job.id, None)
                    continue
                index = self._next_choice.pop(job.id, 0)
                if index + 1 < job.n:
                    self._next_choice[job.id] = index + 1
                else:
                    self._jobs.popleft()
                slot = max(free, key=lambda i: (common_prefix(job.prompt, self._cached[i]), -self._used[i]))
                self._clock += 1
                self._used[slot] = self._clock
                self._slots[slot] = self._open(job, index, slot)

    def _open(self, job: Job, index: int, slot: int) -> _Sequence:
        """A choice's sequence in `slot`: its sampler, and the prompt tokens its cache does not hold yet."""
        assert self.loaded is not None
        runner, tok = self.loaded.runner, self.loaded.tokenizer
        ids = job.prompt
        start = min(common_prefix(ids, self._cached[slot]), len(ids) - 1)
        processor = LogitsProcessor(
            tok.vocab_size, job.presence, job.frequency, job.repetition, job.bias, prompt=ids
        )
        grammar = GrammarMask(job.grammar, tok) if job.grammar is not None else None
        seed = (job.seed + index) & SEED_MASK if job.seed is not None else None
        sampler = Sampler(tok.vocab_size, job.temperature, job.top_p, seed, processor, grammar)
        budget = job.max_tokens if job.max_tokens is not None else runner.max_seq_len
        stream = tok.stream(at_start=job.reply_start)
        seq = _Sequence(job, index, slot, sampler, stream, StopFilter(job.stops), ids[:start], ids[start:])
        seq.pos, seq.start, seq.budget = start, start, budget
        self._cached[slot] = seq.cached  # what stays valid whatever happens: grows as tokens are fed
        with self._cv:
            self._stats.reused_tokens += start
        return seq

    def _take(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token from its last position's logits, stream its text, and end the
        choice on EOS, a stop string, its token budget or a full context."""
        assert self.loaded is not None
        tok, job = self.loaded.tokenizer, seq.job
        if seq.first_s == 0.0:
            with self._cv:
                self._stats.prompt_tokens += len(job.prompt) if seq.index == 0 else 0  # once per request
        token = seq.sampler.sample(logits)
        seq.generated.append(token)
        now = time.perf_counter()
        seq.first_s, seq.last_s = seq.first_s or now, now
        if job.logprobs is not None:
            lp, top = log_softmax_at(logits, tok.vocab_size, token, job.logprobs)
            seq.pending.append(TokenLogprob(token, lp, top))
        if token in tok.eos_ids:
            text, hit = seq.stopper.push(seq.stream.flush())
            self._piece(seq, text if hit else text + seq.stopper.flush())
            self._release(seq, "stop")
            return
        full = seq.pos >= self.loaded.runner.max_seq_len
        final = full or len(seq.generated) >= seq.budget
        text, hit = seq.stopper.push(seq.stream.push(token) + (seq.stream.flush() if final else ""))
        if hit:
            self._piece(seq, text)
            self._release(seq, "stop")
        elif final:
            self._piece(seq, text + seq.stopper.flush())
            self._release(seq, "length")
        else:
            self._piece(seq, text)
            seq.token = token

    def _piece(self, seq: _Sequence, text: str) -> None:
        if text:
            seq.job.emit(Piece(text, seq.pending, seq.index))
            seq.pending = []

    def _release(self, seq: _Sequence, reason: str | None) -> None:
        """End a choice (reason None: cancelled) and free its slot at once; its cache keeps what was fed."""
        self._slots[seq.slot] = None
        self._cached[seq.slot] = seq.cached
        job, n_gen = seq.job, len(seq.generated)
        rate = (n_gen - 1) / (seq.last_s - seq.first_s) if n_gen > 1 and seq.last_s > seq.first_s else 0.0
        with self._cv:
            self._stats.generated_tokens += n_gen
            self._stats.last_rate = rate
            self._cv.notify_all()
        outcome = reason if reason is not None else "cancelled (the client went away)"
        choice = f" choice {seq.index}" if job.n > 1 else ""
        self._log(
            f"📝 {job.id}{choice}: {len(job.prompt)} prompt tokens ({seq.start} cached) + {n_gen} generated, "
            f"{outcome}, {time.perf_counter() - seq.t0:.2f} s (slot {seq.slot})"
        )
        if reason is None:
            job.cancel.set()  # the later choices do not run
            return
        job.emit(Finished(reason, len(job.prompt), n_gen, seq.start, seq.pending, seq.index))

    def _failed(self, runner: Runner, message: str) -> None:
        """A forward pass failed: every sequence in it fails and every cache is dropped."""
        failed = [q for q in self._slots if q is not None]
        self._slots = [None] * len(self._slots)
        self._cached = [[] for _ in self._slots]
        for seq in failed:
            seq.job.cancel.set()
            self._log(f"❌ {seq.job.id}: {message}")
            if runner.n_nodes > 1:
                seq.job.emit(Failed(503, f"the cluster failed during this request: {message}", "unavailable"))
            else:
                seq.job.emit(Failed(500, message, "internal_error"))
        if runner.n_nodes > 1:
            self._broken(message)


@dataclass
class _Sequence:
    """One choice being generated in a KV slot."""

    job: Job
    index: int
    slot: int
    sampler: Sampler
    stream: StreamDecoder
    stopper: StopFilter
    cached: list[int] = field(default_factory=list)  # tokens whose keys and values the slot holds
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet pre-filled
    pos: int = 0  # the next position to write
    start: int = 0  # prompt tokens the slot already held (prefix reuse)
    budget: int = 0
    token: int | None = None  # the last sampled token, fed by the next decode pass
    generated: list[int] = field(default_factory=list)
    pending: list[TokenLogprob] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    first_s: float = 0.0
    last_s: float = 0.0


def _model_name(loaded: Loaded) -> str:
    return Path(loaded.model.path).name


def _nodes(runner: Runner) -> list[NodeInfo]:
    """The root, then each worker as it described itself when the cluster was built."""
    root = NodeInfo(0, "root", runner.backend.name, runner.backend.description)
    caps = runner.cluster.worker_caps if runner.cluster is not None else []
    workers = [
        NodeInfo(k, "worker", str(c.get("backend", "?")), str(c.get("device", "?")))
        for k, c in enumerate(caps, 1)
    ]
    return [root, *workers]
