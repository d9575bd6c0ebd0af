"""The web chat's HTTP side: the page, a JSON API and answers streamed as Server-Sent Events.

    POST   /api/conversations               body: the image file's bytes -> 201 {id, width, ...}
    GET    /api/conversations/{id}          image facts and the dialogue so far
    GET    /api/conversations/{id}/image    the decoded image as PNG (browsers cannot show TIFF)
    POST   /api/conversations/{id}/messages {"question", "max_new_tokens", "temperature",
                                             "top_p", "seed", "stream"} -> SSE, or JSON when
                                             "stream": false
    POST   /api/conversations/{id}/reset    forget the dialogue, keep the image
    DELETE /api/conversations/{id}
    GET    /api/info                        model, limits, task prompts, example images
    GET    /api/examples/{name}             an example image's bytes
    GET    /api/stats                       batching counters

The stream is `event: start`, then `event: token` (data `{"text": ...}`) as the answer grows,
then `event: done` (the answer, its boxes in normalised and pixel coordinates, timings) or
`event: error`. Every refusal is a 4xx with `{"error": "..."}` that says what was wrong.
Conversations and limits live in service.py, decoding in engine.py's worker thread; this module
only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from earthgpt_jax.serve.service import ApiError, ChatService

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ------------------------------------------------------------------------------ HTTP


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: ChatService) -> Starlette:
    async def index(_):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    async def info(_):
        return JSONResponse(service.info())

    async def stats(_):
        return JSONResponse(dict(service.engine.stats, pending=service.engine.pending(),
                                 live_rows=service.engine.live_rows(),
                                 conversations=service.count()))

    async def example(request):
        path = service.examples.get(request.path_params["name"])
        if path is None:
            raise ApiError(404, f"no example image named {request.path_params['name']!r}")
        return FileResponse(path)

    async def create(request):
        name = os.path.basename(request.query_params.get("name", "") or "upload")[:200]
        data = await _read_limited(request, service.limits.max_upload_bytes,
                                   "the upload" if name == "upload" else f"upload {name}")
        conv = await run_in_threadpool(service.create, data, name)
        return JSONResponse(conv.facts(), status_code=201)

    async def show(request):
        return JSONResponse(service.get(request.path_params["cid"]).facts())

    async def image(request):
        conv = service.get(request.path_params["cid"])
        png = await run_in_threadpool(service.image_png, conv)
        return Response(png, media_type="image/png")

    async def reset(request):
        conv = service.get(request.path_params["cid"])
        if conv.busy:
            raise ApiError(409, f"conversation {conv.id} is still answering; wait for the answer")
        conv.history.clear()
        return JSONResponse(conv.facts())

    async def delete(request):
        service.delete(request.path_params["cid"])
        return JSONResponse({"deleted": request.path_params["cid"]})

    async def message(request):
        conv = service.get(request.path_params["cid"])
        raw = await _read_limited(request, service.limits.max_json_bytes, "message body")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise ApiError(400, "message body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "message body must be a JSON object")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the server is shutting down

        decode, started = service.start_answer(conv, body, emit)
        question = started["question"]

        async def answer_events():
            finished = False
            try:
                while True:
                    event = await events.get()
                    if event["type"] == "token":
                        yield event
                        continue
                    finished = True
                    if event["type"] == "done":
                        event = service.finish_answer(conv, question, event)
                    conv.busy = False
                    yield event
                    return
            finally:
                if not finished:  # the client went away: stop decoding its row
                    decode.cancelled.set()
                    conv.busy = False

        if body.get("stream", True) is False:
            text, last = "", None
            async for event in answer_events():
                if event["type"] == "token":
                    text += event["text"]
                last = event
            if last.pop("type") == "error":
                return _error(500, last["message"])
            return JSONResponse(dict(last, **started, streamed_text=text))

        async def sse():
            yield _sse("start", dict(started, conversation_id=conv.id))
            async for event in answer_events():
                kind = event.pop("type")
                yield _sse(kind, event)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def on_api_error(_, exc: ApiError):
        return _error(exc.status, exc.message)

    async def on_http_error(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/stats", stats),
        Route("/api/examples/{name:path}", example),
        Route("/api/conversations", create, methods=["POST"]),
        Route("/api/conversations/{cid}", show),
        Route("/api/conversations/{cid}", delete, methods=["DELETE"]),
        Route("/api/conversations/{cid}/image", image),
        Route("/api/conversations/{cid}/reset", reset, methods=["POST"]),
        Route("/api/conversations/{cid}/messages", message, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error,
                                                        HTTPException: on_http_error})
