"""The generation worker: one thread owns the model and runs queued requests one at a time.

It also owns the model's life cycle: loading at start-up (the HTTP server already answers /health with 503
meanwhile) and, on a cluster, rebuilding it after a node failed, retrying until every worker is back.
Between requests it keeps the token list whose keys and values sit in the KV cache, exactly as `dllama chat`
does, so a request that extends the previous conversation pre-fills only its new tokens; the cache never
changes what a request generates, only how much of its prompt has to be computed.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.chat import common_prefix
from engine.chat_template import ChatTemplate
from engine.errors import DllamaError
from engine.generate import Metrics, generate
from engine.grammar import GrammarMask
from engine.loader import Loaded
from engine.logits import LogitsProcessor, log_softmax_at
from engine.runner import Runner
from engine.sampler import Sampler
from engine.server.errors import ApiError
from engine.server.stops import StopFilter

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
        self._current: Job | None = None
        self._cached: list[int] = []  # tokens in the KV cache, positions 0..len-1
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
            return int(self._current is not None), len(self._jobs)

    def stats(self) -> EngineStats:
        """A copy of the token totals, for /metrics."""
        with self._cv:
            return EngineStats(**vars(self._stats))

    def submit(self, job: Job) -> None:
        """Queue a job, or raise ApiError: 503 while not ready, 429 when `queue_size` jobs already wait
        behind the running one."""
        with self._cv:
            if self._stop.is_set():
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.state != "ready":
                raise ApiError(503, self.detail, code="unavailable")
            if len(self._jobs) + (self._current is not None) > self.queue_size:
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
        """Shutdown, step 2: cancel the running job, wait for the thread, release cluster workers."""
        self.drain()
        with self._cv:
            if self._current is not None:
                self._current.cancel.set()
        self._thread.join(timeout)

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.loaded is None:
                    self._bring_up()
                    continue
                job = self._next_job()
                if job is not None:
                    self._serve(job)
        except Exception as e:  # a dead engine thread must stop the server, not hang it
            traceback.print_exc()
            self._fatal(f"the engine failed: {type(e).__name__}: {e}")
        finally:
            if self.loaded is not None:
                self.loaded.runner.close()

    def _next_job(self) -> Job | None:
        """The next job to run; None when stopping or when the idle check found the cluster broken."""
        fault = None
        with self._cv:
            while not self._jobs and not self._stop.is_set() and fault is None:
                self._cv.wait(IDLE_CHECK_S)
                fault = None if self._jobs else self._cluster_fault()
            if not self._stop.is_set() and fault is None:
                self._current = self._jobs.popleft()
                return self._current
        if fault is not None and not self._stop.is_set():
            self._broken(fault)
        return None

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
            self.loaded, self._cached = loaded, []
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
            loaded, self.loaded, self._cached = self.loaded, None, []
        self._log(f"⚠️ {self.detail}")
        for job in waiting:
            job.emit(Failed(503, self.detail, "unavailable"))
        if loaded is not None:
            loaded.runner.close()

    def _serve(self, job: Job) -> None:
        try:
            for index in range(job.n):
                if job.cancel.is_set() or not self._generate(job, index):
                    break
        finally:
            with self._cv:
                self._current = None

    def _generate(self, job: Job, index: int) -> bool:
        """Generate choice `index`; False when it failed or was cancelled (the later choices do not run)."""
        assert self.loaded is not None
        runner, tok = self.loaded.runner, self.loaded.tokenizer
        ids = job.prompt
        start = min(common_prefix(ids, self._cached), len(ids) - 1)
        self._cached = ids[:start]  # what stays valid whatever happens below
        processor = LogitsProcessor(
            tok.vocab_size, job.presence, job.frequency, job.repetition, job.bias, prompt=ids
        )
        grammar = GrammarMask(job.grammar, tok) if job.grammar is not None else None
        seed = (job.seed + index) & SEED_MASK if job.seed is not None else None
        sampler = Sampler(tok.vocab_size, job.temperature, job.top_p, seed, processor, grammar)
        pending: list[TokenLogprob] = []
        budget = job.max_tokens if job.max_tokens is not None else runner.max_seq_len
        m, fed, stopper, reason = Metrics(), start, StopFilter(job.stops), None
        t0 = time.perf_counter()
        events = generate(
            runner, tok, ids[start:], budget, sampler, start_pos=start, metrics=m, reply_start=job.reply_start
        )
        try:
            for ev in events:
                if ev.kind == "prefill":
                    fed += ev.n_tokens
                else:
                    if job.logprobs is not None:
                        assert ev.logits is not None and ev.token is not None
                        lp, top = log_softmax_at(ev.logits, tok.vocab_size, ev.token, job.logprobs)
                        pending.append(TokenLogprob(ev.token, lp, top))
                    text, hit = stopper.push(ev.text)
                    if text:
                        job.emit(Piece(text, pending, index))
                        pending = []
                    if hit:
                        reason = "stop"
                        break
                if job.cancel.is_set():
                    break
            else:
                reason = "stop" if m.stop_reason == "eos" else "length"
                tail = stopper.flush()
                if tail:
                    job.emit(Piece(tail, pending, index))
                    pending = []
        except DllamaError as e:
            self._failed(job, runner, str(e))
            return False
        except Exception as e:  # a bug must fail this request, not the server
            traceback.print_exc()
            self._failed(job, runner, f"internal error: {type(e).__name__}: {e}")
            return False
        finally:
            events.close()
        # the last sampled token is never fed, so the cache holds the prompt and all but the last one
        self._cached = ids[:fed] + m.generated[:-1]
        with self._cv:
            self._stats.prompt_tokens += len(ids) if index == 0 else 0  # once per request, as in usage
            self._stats.generated_tokens += len(m.generated)
            self._stats.last_rate = m.decode_rate()
        outcome = reason if reason is not None else "cancelled (the client went away)"
        choice = f" choice {index}" if job.n > 1 else ""
        self._log(
            f"📝 {job.id}{choice}: {len(ids)} prompt tokens ({start} cached) + {len(m.generated)} generated, "
            f"{outcome}, {time.perf_counter() - t0:.2f} s"
        )
        if reason is None:
            return False
        job.emit(Finished(reason, len(ids), len(m.generated), start, pending, index))
        return True

    def _failed(self, job: Job, runner: Runner, message: str) -> None:
        self._cached = []
        self._log(f"❌ {job.id}: {message}")
        if runner.n_nodes > 1:
            job.emit(Failed(503, f"the cluster failed during this request: {message}", "unavailable"))
            self._broken(message)
        else:
            job.emit(Failed(500, message, "internal_error"))


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
