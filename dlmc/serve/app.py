"""The HTTP side: OpenAI-compatible routes on FastAPI, run by uvicorn.

Routes parse and check a request, queue its prompts with the worker (`worker.py`), and wait for the
answers without blocking the event loop. Streams are Server-Sent Events of the settled prefix.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dlmc.errors import DlmcError, one_line
from dlmc.serve import openai_types as oa
from dlmc.serve.chat import message_text, render_chat
from dlmc.serve.model import Output, ServedModel
from dlmc.serve.openai_types import ApiError, ChatRequest, CompletionRequest
from dlmc.serve.stream import TextStream
from dlmc.serve.worker import Closed, Job, QueueFull, Worker


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64
    """Requests (prompts) waiting for the worker; one more is refused with 429."""
    max_batch: int = 8
    """Prompts decoded as one batch (at most the artifact's largest batch)."""
    log_level: str = "info"


def create_app(served: ServedModel, settings: ServeSettings) -> FastAPI:
    worker = Worker(served, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        # uvicorn has drained the open requests by now; finish whatever is still queued, off the loop
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="dlmc", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(ApiError(400, f"{param}: {first['msg']}", param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, one_line(e), type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "draining" if worker.closing else "ok", "model": served.name, "queued": worker.queued,
                "running": worker.running, "batch_sizes": dict(worker.batch_sizes)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "dlmc"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = _completion_prompts(served, body.prompt)
        return await _answer(request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        prompt = render_chat(served.tokenizer, messages)
        served.check_spelled(" ".join(message_text(m) for m in messages), prompt, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _answer(request, body, [prompt], max_tokens, chat=True)

    async def _answer(request: Request, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        if body.model != served.name:
            raise ApiError(404, f"model '{body.model}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")
        oa.check_supported(body)
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens={max_tokens} must be at least 1", param="max_tokens")
        options = oa.decoder_options(body, max_tokens)
        key = served.decode_key(body.decoder, options, body.seed or 0, prompts)
        jobs = [Job(prompt, key) for prompt in prompts]
        reply = _Reply(served, body, oa.new_id("chatcmpl" if chat else "cmpl"), chat)
        events = reply.listen(jobs, asyncio.get_running_loop()) if body.stream else None
        try:
            worker.submit(jobs)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({settings.max_queue} requests); retry later",
                           type="rate_limit_error", code="queue_full") from None
        except Closed:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        if body.stream:
            return StreamingResponse(reply.stream(jobs, events), media_type="text/event-stream")
        outputs = await _results(request, jobs)
        if outputs is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        return reply.response(prompts, outputs)

    return app


def _completion_prompts(served: ServedModel, prompt) -> list[list[int]]:
    """/v1/completions takes a string, a list of strings, a list of token ids or a list of those."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    return [served.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]


async def _results(request: Request, jobs: list[Job]) -> list[Output] | None:
    """Every job's output, or None (and the jobs cancelled) if the client disconnects first."""
    answers = [asyncio.wrap_future(job.future) for job in jobs]
    finished = asyncio.ensure_future(asyncio.wait(answers))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():
        for job in jobs:  # a queued job is dropped; a running one leaves its batch (or is discarded)
            job.cancel()
        finished.cancel()
        return None
    gone.cancel()
    try:
        return [answer.result() for answer in answers]
    except DlmcError as e:
        raise ApiError(400, str(e)) from None


async def _disconnected(request: Request) -> None:
    # the body has been read: the next ASGI message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """The response of one request: JSON, or SSE chunks with each prompt's settled text."""

    def __init__(self, served: ServedModel, body, id: str, chat: bool):
        self.served, self.body, self.id, self.chat = served, body, id, chat

    def listen(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Hook the jobs to a queue of (index, settled ids | None for done), filled from the worker thread."""
        events: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_settled = lambda ids, i=i: _call_soon(loop, events.put_nowait, (i, ids))
            job.future.add_done_callback(lambda f, i=i: _call_soon(loop, events.put_nowait, (i, None)))
        return events

    def response(self, prompts: list[list[int]], outputs: list[Output]) -> dict:
        use = oa.usage(sum(map(len, prompts)), sum(o.completion_tokens for o in outputs))
        if self.chat:
            return oa.chat_response(self.id, self.served.name, outputs[0].text, outputs[0].finish_reason, use)
        choices = [oa.completion_choice(i, o.text, o.finish_reason) for i, o in enumerate(outputs)]
        return oa.completion_response(self.id, self.served.name, choices, use)

    def _chunk(self, index: int, text: str | None, finish_reason: str | None) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            chunk = oa.chat_chunk(self.id, self.served.name, delta, finish_reason)
        else:
            chunk = oa.completion_response(self.id, self.served.name, [oa.completion_choice(index, text or "", finish_reason)])
        return _sse(chunk)

    async def stream(self, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[str]:
        texts = [TextStream(self.served.tokenizer) for _ in jobs]
        prompt_tokens, completion_tokens = sum(len(job.prompt) for job in jobs), 0
        try:
            if self.chat:  # the OpenAI API opens a chat stream with the role
                yield _sse(oa.chat_chunk(self.id, self.served.name, {"role": "assistant", "content": ""}, None))
            pending = len(jobs)
            while pending:
                index, ids = await events.get()
                if ids is not None:
                    if piece := texts[index].update(ids):
                        yield self._chunk(index, piece, None)
                    continue
                pending -= 1
                try:
                    output = jobs[index].future.result()
                except Exception as e:  # the stream has started: the error goes in it, as OpenAI does
                    error = ApiError(400 if isinstance(e, DlmcError) else 500, one_line(e), type="server_error")
                    yield _sse(error.body())
                    continue
                completion_tokens += output.completion_tokens
                if piece := texts[index].finish(output.text):
                    yield self._chunk(index, piece, None)
                yield self._chunk(index, None, output.finish_reason)
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                use = oa.usage(prompt_tokens, completion_tokens)
                chunk = (oa.chat_chunk(self.id, self.served.name, {}, None, use, choices=False) if self.chat
                         else oa.completion_response(self.id, self.served.name, [], use))
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: queued jobs are dropped, running ones leave
            for job in jobs:
                job.on_settled = None
                job.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """From the worker thread; never raises into the decode (the loop may be gone at shutdown)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def serve(served: ServedModel, settings: ServeSettings) -> None:
    """Run the server until SIGINT or SIGTERM; then drain: open requests and queued jobs finish."""
    import uvicorn

    app = create_app(served, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    # uvicorn shuts down gracefully on these signals, then restores the handlers it found and raises the
    # signal again; with these no-op handlers that last step is a no-op and a drained shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
