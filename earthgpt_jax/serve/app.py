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

Whole scenes (the page at /scene; scenes.py runs the CLI's `python -m earthgpt_jax.scene`):

    POST   /api/scenes?name=N               body: the raster's bytes, streamed to disk (limit
                                            --max_scene_mb) -> 201 {id, name, width, height,
                                            bands, crs, georeferenced, overview_url,
                                            overview_size, overview_scale, job, [note]}
    GET    /api/scenes/{id}                 the same facts; `job`: {task, question, status,
                                            done, total, tiles_per_s, eta_s}
    GET    /api/scenes/{id}/overview        PNG, at most 1024 px a side (never the raw raster)
    POST   /api/scenes/{id}/job             {"task": "detect"|"ground"|"ask", "question",
                                            "tile", "overlap" (the CLI's; default the model's
                                            input size and a quarter of it)} -> 202 job facts;
                                            409 while any scene job runs
    DELETE /api/scenes/{id}/job             cancel after the running batch (202); starting the
                                            same task again resumes from the tiles done
    GET    /api/scenes/{id}/events          the job's events as SSE, replayed from the start (or
                                            after `Last-Event-ID` / `?after=N`), ending after
                                            `done`, `error` or `cancelled`
    GET    /api/scenes/{id}/result/{kind}   the finished job's files as downloads: `geojson`
                                            (WGS84; scene pixels without a CRS),
                                            `scene_crs.geojson`, `png` (overview with boxes)
    DELETE /api/scenes/{id}

Scene events (each with `seq`): `start` {task, question, scene}; `log` {message} (tile count,
"no georeference"); `progress` {done, total, tiles_per_s, eta_s, windows: the tiles of this
batch as [col, row, width, height], boxes: [{label, corners: x1,y1..x4,y4 scene pixels,
tile}] found in them, before merging}; then `done` {the CLI's summary, boxes: the merged
boxes the GeoJSON holds, downloads: {kind: url}}, `error` {message} or `cancelled`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from earthgpt_jax.serve.scenes import FINAL
from earthgpt_jax.serve.service import ApiError, ChatService

SCENE_EVENT_POLL_S = 0.2  # how often an open event stream looks for a job's new events
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ------------------------------------------------------------------------------ HTTP


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _limited_chunks(request: Request, limit: int, what: str, scope: str = "",
                          hint: str = ""):
    """The request body's chunks; ApiError 413 naming `what` before reading when its declared
    length passes `limit`, else as soon as what arrived does."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} is {int(declared)} bytes; the limit{scope} is {limit} "
                            f"bytes{hint}")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit{scope} of {limit} bytes{hint}")
        yield chunk


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """The whole request body, at most `limit` bytes (`_limited_chunks`)."""
    return b"".join([chunk async for chunk in _limited_chunks(request, limit, what)])


async def _json_object(request: Request, limit: int, what: str) -> dict:
    """The request body as a JSON object (an empty body is {}); ApiError 400/413 naming `what`."""
    raw = await _read_limited(request, limit, what)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, f"{what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    return body


def _scene_routes(service: ChatService) -> list:
    def jobs():
        if service.scenes is None:
            raise ApiError(404, "this server takes no scenes (started without scene jobs)")
        return service.scenes

    def scene_of(request):
        return jobs().get(request.path_params["sid"])

    async def scene_page(_):
        return FileResponse(os.path.join(STATIC_DIR, "scene.html"))

    async def upload(request):
        scenes = jobs()
        name = os.path.basename(request.query_params.get("name", "") or "scene")[:200]
        scene_id, folder = scenes.new_folder()
        path = scenes.upload_path(folder, name)
        try:
            # A scene may be gigabytes: written as it arrives, never held whole.
            with open(path, "wb") as f:
                async for chunk in _limited_chunks(request, scenes.limits.max_scene_bytes, name,
                                                   scope=" for scenes", hint=" (--max_scene_mb)"):
                    f.write(chunk)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        scene = await run_in_threadpool(scenes.register, scene_id, folder, name, path)
        return JSONResponse(scene.facts(), status_code=201)

    async def show(request):
        return JSONResponse(scene_of(request).facts())

    async def delete(request):
        jobs().delete(request.path_params["sid"])
        return JSONResponse({"deleted": request.path_params["sid"]})

    async def overview(request):
        return FileResponse(os.path.join(scene_of(request).folder, "overview.png"),
                            media_type="image/png")

    async def start(request):
        scene = scene_of(request)
        body = await _json_object(request, service.limits.max_json_bytes, "job body")
        return JSONResponse(jobs().start(scene, body).facts(), status_code=202)

    async def cancel(request):
        return JSONResponse(jobs().cancel(scene_of(request)).facts(), status_code=202)

    async def events(request):
        scene = scene_of(request)
        job = scene.job
        if job is None:
            raise ApiError(404, f"scene {scene.name} has no job; start one first")
        after = request.headers.get("last-event-id") or request.query_params.get("after", "")
        first = int(after) + 1 if after.lstrip("-").isdigit() else 0

        async def stream():
            index = first
            while True:
                while index < len(job.events):
                    event = dict(job.events[index])
                    kind = event.pop("type")
                    yield f"id: {event['seq']}\n" + _sse(kind, event)
                    index += 1
                    if kind in FINAL:
                        return
                await asyncio.sleep(SCENE_EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def result(request):
        scene, kind = scene_of(request), request.path_params["kind"]
        path = jobs().result_path(scene, kind)
        stem = os.path.splitext(scene.name)[0] or "scene"
        return FileResponse(path, filename=f"{stem}.{scene.job.task}.{kind}",
                            media_type="image/png" if kind == "png" else "application/geo+json")

    return [
        Route("/scene", scene_page),
        Route("/api/scenes", upload, methods=["POST"]),
        Route("/api/scenes/{sid}", show),
        Route("/api/scenes/{sid}", delete, methods=["DELETE"]),
        Route("/api/scenes/{sid}/overview", overview),
        Route("/api/scenes/{sid}/job", start, methods=["POST"]),
        Route("/api/scenes/{sid}/job", cancel, methods=["DELETE"]),
        Route("/api/scenes/{sid}/events", events),
        Route("/api/scenes/{sid}/result/{kind}", result),
    ]


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
        try:
            data = await _read_limited(request, service.limits.max_upload_bytes,
                                       "the upload" if name == "upload" else f"upload {name}")
        except ApiError as e:
            if e.status == 413 and service.scenes is not None:  # a whole scene, sent here
                e.message += "; for a whole scene (a large GeoTIFF) use the scene page, /scene"
            raise
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
        body = await _json_object(request, service.limits.max_json_bytes, "message body")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the server is shutting down

        decode, started = service.start_answer(conv, body, emit)

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
                        event = service.finish_answer(conv, started["question"], event)
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

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

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
        *_scene_routes(service),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error,
                                                        HTTPException: on_http_error})
