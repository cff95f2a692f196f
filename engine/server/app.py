"""The FastAPI application: OpenAI's routes and response shapes over a Scheduler.

Handlers validate and tokenize (so bad requests, prompts longer than the context and a full queue are
answered with a proper status even for streaming requests), queue a Job, then either collect its events into
one JSON response or forward them as `chat.completion.chunk` / `text_completion` SSE events. A client that
goes away cancels its job, which the engine notices before the next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from engine.errors import DllamaError
from engine.grammar import check_grammar, json_grammar
from engine.server.errors import ApiError, error_body
from engine.server.metrics import CONTENT_TYPE, CountRequests, RequestCounter, render
from engine.server.scheduler import (
    SEED_MASK,
    Event,
    Failed,
    Finished,
    Job,
    ModelInfo,
    Piece,
    Scheduler,
    TokenLogprob,
)
from engine.server.schemas import ChatRequest, CompletionRequest, SamplingRequest, parse_body
from engine.server.tools import call_grammar, parse_calls
from engine.tokenizer import Tokenizer

MAX_BODY = 8 << 20  # bytes; a larger request body is answered with 413
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive; a slower one is answered with 408
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"  # the web chat at /, self-contained


@dataclass
class Defaults:
    """Sampling used where a request says nothing (the command line's --temperature, --topp, --seed)."""

    temperature: float
    top_p: float
    seed: int | None


def create_app(scheduler: Scheduler, defaults: Defaults, body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    """The ASGI app; starting it starts the scheduler's thread, stopping it stops the scheduler. A request
    body that takes longer than `body_timeout` seconds to arrive is answered with 408."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="dllama-api", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    requests = RequestCounter()
    app.add_middleware(CountRequests, counter=requests)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:  # logged by uvicorn as well
        message = f"internal error: {type(e).__name__}: {e}"
        return JSONResponse(error_body(500, message, code="internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        running, waiting = scheduler.load_counts()
        load = {"running": running, "waiting": waiting}
        if scheduler.state == "ready" and scheduler.info is not None:
            info = scheduler.info
            return JSONResponse({"status": "ok", "model": info.name, "nodes": info.n_nodes, **load})
        return JSONResponse({"status": scheduler.state, "message": scheduler.detail, **load}, status_code=503)

    @app.get("/")
    async def chat_page() -> FileResponse:
        return FileResponse(CHAT_PAGE, media_type="text/html; charset=utf-8")

    @app.get("/v1/cluster")
    async def cluster() -> JSONResponse:
        _, waiting = scheduler.load_counts()
        used, total = scheduler.slot_usage()
        stats = scheduler.stats()
        body: dict[str, Any] = {
            "status": "ok" if scheduler.state == "ready" else scheduler.state,
            "message": scheduler.detail,
            "slots": {"total": total, "used": used, "waiting": waiting},
            "generated_tokens": stats.generated_tokens,
            "last_tokens_per_second": stats.last_rate,
        }
        info = scheduler.info
        if scheduler.state == "ready" and info is not None:
            nodes = [asdict(n) for n in info.nodes]
            body |= {"model": info.name, "context_length": info.context_length, "nodes": nodes}
            return JSONResponse(body)
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(requests, scheduler), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(_info(scheduler), started)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        info = _info(scheduler)
        if model_id != info.name:
            raise ApiError(
                404, f"model {model_id!r} does not exist: this server serves {info.name!r}", "model"
            )
        return _model_card(info, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatRequest, await _read_body(request, body_timeout))
        messages = [m.as_template_input() for m in req.messages]
        tools = _offered_tools(scheduler, req)
        ids = await run_in_threadpool(_encode_chat, scheduler, messages, tools)
        is_json, schema = req.json_constraint
        grammar = await run_in_threadpool(_json_grammar, scheduler, schema) if is_json else None
        if req.forced_tools:
            grammar = await run_in_threadpool(_call_grammar, scheduler, req)
        return await _run(
            request, scheduler, defaults, req, ids, chat=True, grammar=grammar, tools=tools is not None
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await _read_body(request, body_timeout))
        ids = await run_in_threadpool(_encode_text, scheduler, req.prompt)
        return await _run(request, scheduler, defaults, req, ids, chat=False)

    return app


def _info(scheduler: Scheduler) -> ModelInfo:
    if scheduler.info is None:
        raise ApiError(503, scheduler.detail, code="unavailable")
    return scheduler.info


def _model_card(info: ModelInfo, created: int) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": "dllama",
        "context_length": info.context_length,
        "n_nodes": info.n_nodes,
    }


async def _read_body(request: Request, timeout: float) -> bytes:
    """The request body, refused with 413 past MAX_BODY bytes and with 408 if it takes over `timeout` s."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, f"the request body has {size} bytes, more than the {MAX_BODY} allowed")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_BODY:
                    raise ApiError(413, f"the request body is larger than the {MAX_BODY} bytes allowed")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout:g} s (--request-timeout)", code="timeout"
        ) from None
    return b"".join(chunks)


def _ready_tokenizer(scheduler: Scheduler) -> Tokenizer:
    loaded = scheduler.loaded
    if loaded is None or scheduler.state != "ready":
        raise ApiError(503, scheduler.detail, code="unavailable")
    return loaded.tokenizer


def _offered_tools(scheduler: Scheduler, req: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools to show the template (None with tool_choice "none" or no tools); a 400 when the model's
    template cannot take them."""
    if req.tool_mode == "none":
        return None
    _ready_tokenizer(scheduler)
    assert scheduler.template is not None
    if not scheduler.template.tool_calls:
        message = (
            f"tools: the model's chat template ({scheduler.template.name}) has no tool-call support "
            "(it takes no tools, or not in the <tool_call> format)"
        )
        raise ApiError(400, message, "tools")
    return [t.model_dump(exclude_none=True) for t in req.tools or []]


def _encode_chat(
    scheduler: Scheduler, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[int]:
    tok = _ready_tokenizer(scheduler)
    assert scheduler.template is not None
    try:
        return scheduler.template.encode(tok, messages, tools=tools)
    except DllamaError as e:  # the model's template refused the conversation (e.g. roles out of order)
        raise ApiError(400, str(e), "messages") from None


def _encode_text(scheduler: Scheduler, prompt: str) -> list[int]:
    return _ready_tokenizer(scheduler).encode(prompt)


def _json_grammar(scheduler: Scheduler, schema: dict[str, Any] | None) -> str:
    """The checked grammar of JSON mode (schema None) or of a JSON schema; a 400 if it cannot be used."""
    try:
        grammar = json_grammar(schema)
        check_grammar(grammar, _ready_tokenizer(scheduler))
    except DllamaError as e:
        raise ApiError(400, f"response_format: {e}", "response_format") from None
    return grammar


def _call_grammar(scheduler: Scheduler, req: ChatRequest) -> str:
    """The checked grammar of one call to a forced tool; a 400 if a parameter schema cannot be used."""
    tok = _ready_tokenizer(scheduler)
    grammar = call_grammar(req.forced_tools, tok)
    try:
        check_grammar(grammar, tok)
    except DllamaError as e:
        raise ApiError(400, f"tools: a function's parameters are {e}", "tools") from None
    return grammar


async def _run(
    request: Request,
    scheduler: Scheduler,
    defaults: Defaults,
    req: SamplingRequest,
    ids: list[int],
    chat: bool,
    grammar: str | None = None,
    tools: bool = False,
) -> Response:
    """Queue the generation and answer with its result (JSON) or its events (SSE)."""
    info, tok = _info(scheduler), _ready_tokenizer(scheduler)
    bias = req.bias
    bad = next((t for t in bias if t >= tok.vocab_size), None)
    if bad is not None:
        raise ApiError(
            400,
            f"logit_bias: token id {bad} is not in the vocabulary (0..{tok.vocab_size - 1})",
            "logit_bias",
        )
    if not ids:
        raise ApiError(400, "the prompt is empty", "messages" if chat else "prompt")
    if len(ids) >= info.context_length:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens but the context holds only {info.context_length} tokens "
            "(--max-seq-len); shorten the prompt",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            pass

    seed = req.seed if req.seed is not None else defaults.seed
    shape = _Shape(
        ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        int(time.time()),
        info.name,
        chat,
        tok,
        req.logprob_count is not None,
        tools,
    )
    job = Job(
        id=shape.id,
        prompt=ids,
        max_tokens=req.token_limit,
        temperature=req.temperature if req.temperature is not None else defaults.temperature,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        seed=seed & SEED_MASK if seed is not None else None,
        stops=req.stop or [],
        reply_start=chat,
        emit=emit,
        presence=req.presence_penalty or 0.0,
        frequency=req.frequency_penalty or 0.0,
        repetition=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        bias=bias,
        logprobs=req.logprob_count,
        grammar=grammar,
        n=req.n or 1,
    )
    scheduler.submit(job)
    if req.stream:
        return EventSourceResponse(_stream(events, job, shape, req.include_usage), sep="\n")
    return await _collect(request, events, job, shape)


@dataclass
class _Shape:
    """What every response or chunk of one request carries."""

    id: str
    created: int
    model: str
    chat: bool
    tokenizer: Tokenizer
    with_logprobs: bool
    tools: bool  # tools were offered: replies are read for tool calls (and streamed whole at the end)
    offsets: dict[int, int] = field(default_factory=dict)  # completions: choice -> next token's text offset

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        chunk: bool,
        entries: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        logprobs = self.logprobs(index, list(entries)) if self.with_logprobs and entries else None
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if not chunk:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools:
                message["content"], calls = parse_calls(text or "")
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {
            "index": index,
            "delta": {} if text is None else {"content": text},
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the legacy lists, whose
        top_logprobs hold the chosen token as well, as OpenAI's do."""
        tok = self.tokenizer

        def one(token: int, logprob: float) -> dict[str, Any]:
            return {"token": tok.token_text(token), "logprob": logprob, "bytes": list(tok.token_bytes(token))}

        if self.chat:
            content = [
                {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
            ]
            return {"content": content, "refusal": None}
        texts = [tok.token_text(e.token) for e in entries]
        offsets, at = [], self.offsets.get(index, 0)
        for text in texts:
            offsets.append(at)
            at += len(text)
        self.offsets[index] = at
        tops = [{tok.token_text(t): lp for t, lp in [*e.top, (e.token, e.logprob)]} for e in entries]
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def _usage(done: dict[int, Finished]) -> dict[str, Any]:
    """The prompt counted once (the first choice's cache hit), the completion tokens of all choices."""
    first = done[0]
    completion = sum(f.completion_tokens for f in done.values())
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, events: asyncio.Queue[Event], job: Job, shape: _Shape) -> Response:
    """A non-streaming answer; the job is cancelled if the client disconnects while it waits."""
    gone = asyncio.ensure_future(_wait_disconnect(request))
    pieces: dict[int, list[str]] = {i: [] for i in range(job.n)}
    entries: dict[int, list[TokenLogprob]] = {i: [] for i in range(job.n)}
    done: dict[int, Finished] = {}
    try:
        while True:
            nxt = asyncio.ensure_future(events.get())
            await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                return Response(status_code=499)  # nobody will read it
            ev = nxt.result()
            if isinstance(ev, Piece):
                pieces[ev.index].append(ev.text)
                entries[ev.index] += ev.logprobs
            elif isinstance(ev, Finished):
                done[ev.index] = ev
                entries[ev.index] += ev.logprobs
                if len(done) < job.n:
                    continue
                body = shape.head(chunk=False)
                body["choices"] = [
                    shape.choice(i, "".join(pieces[i]), done[i].reason, False, entries[i])
                    for i in range(job.n)
                ]
                body["usage"] = _usage(done)
                return JSONResponse(body)
            else:
                raise ApiError(ev.status, ev.message, code=ev.code)
    finally:
        gone.cancel()
        job.cancel.set()  # a no-op once finished; stops the engine if this handler was cancelled


async def _stream(
    events: asyncio.Queue[Event], job: Job, shape: _Shape, include_usage: bool
) -> AsyncIterator[str]:
    """SSE data lines: per choice an opening chunk (chat: the assistant role), one chunk per piece and its
    finish chunk; then optionally the usage chunk, then [DONE]; a failure ends the stream with an error
    object instead. With tools offered a choice's reply is held back and sent whole when it ends: its text,
    then its tool calls."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = shape.head(chunk=True)
        body["choices"] = choices
        if include_usage:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    def opening(index: int) -> str:
        first = shape.choice(index, "", None, chunk=True)
        first["delta"] = {"role": "assistant", "content": ""}
        return chunk([first])

    def whole(index: int, ev: Finished) -> Iterator[str]:
        content, calls = parse_calls("".join(held.pop(index, [])))
        entries = [*held_logprobs.pop(index, []), *ev.logprobs]
        if content:
            yield chunk([shape.choice(index, content, None, True, entries)])
            entries = []
        if calls:
            delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
            yield chunk([{**shape.choice(index, None, None, True, entries), "delta": delta}])
            entries = []
        yield chunk([shape.choice(index, None, "tool_calls" if calls else ev.reason, True, entries)])

    done: dict[int, Finished] = {}
    held: dict[int, list[str]] = {}  # with tools: each choice's text until it ends
    held_logprobs: dict[int, list[TokenLogprob]] = {}
    opened = {0}  # choices (run side by side in KV slots) whose opening chunk was sent
    try:
        if shape.chat:
            yield opening(0)
        while True:
            ev = await events.get()
            if shape.chat and isinstance(ev, Piece | Finished) and ev.index not in opened:
                opened.add(ev.index)
                yield opening(ev.index)
            if isinstance(ev, Piece) and shape.tools:
                held.setdefault(ev.index, []).append(ev.text)
                held_logprobs.setdefault(ev.index, []).extend(ev.logprobs)
            elif isinstance(ev, Piece):
                yield chunk([shape.choice(ev.index, ev.text, None, True, ev.logprobs)])
            elif isinstance(ev, Finished):
                if shape.tools:
                    for line in whole(ev.index, ev):
                        yield line
                else:
                    yield chunk([shape.choice(ev.index, None, ev.reason, True, ev.logprobs)])
                done[ev.index] = ev
                if len(done) < job.n:
                    continue
                if include_usage:
                    yield chunk([], _usage(done))
                yield "[DONE]"
                return
            else:
                assert isinstance(ev, Failed)
                error = error_body(ev.status, ev.message, code=ev.code)
                yield json.dumps(error, ensure_ascii=False, separators=(",", ":"))
                return
    finally:
        job.cancel.set()
