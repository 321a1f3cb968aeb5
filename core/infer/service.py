"""HTTP scoring service behind `python infer.py --serve`: the models are loaded once, then

- `POST /predict`: a multipart form with the image or video in the field `file`; answers JSON
  `{"name", "kind", "probability" (the blend), "members" (each member's), "seconds" (time in
  the service, upload read included), "batch_size" (inputs scored in the same call)}`;
- `GET /health`: `{"status": "ok", "columns", counters of what was scored and how it was batched}`;
- `GET /`: a plain HTML page to upload a file and read its probability.

Errors are JSON `{"error": reason}`: 413 for an upload over the size limit (counted while the
body arrives, so an oversized upload is never held whole), 400 for a file that is not a
readable image or video or a form without the file, 422 for a face-cropped input with no face,
500 with the exception when scoring fails (a batch that fails is scored again one input at a
time, so only the input at fault fails). A bad request fails alone; the service goes on serving.

Micro-batching: a still image is decoded in memory on a thread of its own, then waits up to
`batch_window_s` for other requests, and all that arrived are scored in one call (at most
`max_batch`). Scoring runs on one worker thread, off the event loop: ONNX Runtime's `Run` is
thread-safe, but each call already spreads over every core, the PyTorch runtime and the face
detector promise no thread safety, and batching is what amortises the work. A video is written
to a temporary folder (OpenCV reads files only), its frames' faces scored in one call on the
same thread, and the folder removed.

Starlette (the ASGI toolkit FastAPI is built on) and uvicorn: one file field and hand-written
error reasons need none of FastAPI's validation layer, and its interactive docs page loads its
scripts from a CDN, which an offline machine cannot reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.imaging import VIDEO_SUFFIXES, ImageDecodeError, decode_image_bytes, is_video

FIELD = "file"
MAX_BATCH = 32
PAGE = Path(__file__).with_name("service_page.html")
# Where uvicorn waits for open requests when told to stop, before it closes them.
GRACEFUL_SHUTDOWN_S = 30


@dataclass
class ServedModel:
    """What the service scores with: `columns` are the blend then each member; `score_arrays`
    maps RGB uint8 images to one row of `columns` each; `score_faces(name, frames)` pools the
    faces of the frames into one row, or None when there is none; `score_video(path)` is a video
    file's row as infer.py gives it (image members on its frames' faces, clip members on its
    clips), or None when no member could score it."""

    columns: list[str]
    score_arrays: Callable[[list[np.ndarray]], np.ndarray]
    score_faces: Callable[[str, list[np.ndarray]], np.ndarray | None]
    score_video: Callable[[Path], np.ndarray | None]
    crop_faces: bool


class UploadTooLarge(Exception):
    """The request body passed the size limit while it was being received."""


class NoFace(Exception):
    """A face-cropped input had no face to score."""


@dataclass
class Stats:
    scored: int = 0
    batches: int = 0
    largest_batch: int = 0

    def record(self, size: int) -> None:
        self.scored += size
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)


@dataclass
class _Pending:
    image: np.ndarray
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Collects images submitted within `window_s` of the first (up to `max_batch`) and scores
    them in one call of `score` on `executor`; each submitter gets its row and the batch size."""

    def __init__(self, score: Callable[[list[np.ndarray]], np.ndarray], executor, window_s: float, max_batch: int):
        self.score = score
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.stats = Stats()
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()

    async def submit(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        pending = _Pending(image)
        await self.queue.put(pending)
        return await pending.done

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._score(batch)
            except Exception:  # noqa: BLE001 (scored again one by one: only the input that fails gets the error)
                for one in batch:
                    try:
                        await self._score([one])
                    except Exception as err:  # noqa: BLE001 (its request answers 500 with the reason)
                        if not one.done.done():
                            one.done.set_exception(err)

    async def _score(self, batch: list[_Pending]) -> None:
        images = [p.image for p in batch]
        rows = await asyncio.get_running_loop().run_in_executor(self.executor, self.score, images)
        self.stats.record(len(batch))
        for p, row in zip(batch, np.asarray(rows, dtype=float), strict=True):
            if not p.done.done():  # its request may have been cancelled meanwhile
                p.done.set_result((row, len(batch)))

    async def _collect(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window_s
        while len(batch) < self.max_batch:
            wait = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return batch


class BodyLimit:
    """ASGI middleware: a request whose body is, or grows, over `max_bytes` is refused with 413.
    A declared Content-Length over the limit is refused before any of the body is read; a body
    sent in chunks raises UploadTooLarge (answered 413 by the app) as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge
            return message

        await self.app(scope, counted, send)


def too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"error": f"upload larger than the limit of {max_bytes / 2**20:g} MB"}, status_code=413)


def error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def read_upload(request: Request) -> tuple[str, bytes, str]:
    """The name, bytes and content type of the form's file field; HTTPException 400 when there is none."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, f"send the file as multipart/form-data in the field '{FIELD}'")
    async with request.form(max_files=1, max_fields=10) as form:
        upload = form.get(FIELD)
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, f"no file in the form field '{FIELD}'")
        return upload.filename or "upload", await upload.read(), upload.content_type or ""


class Service:
    """The app's state: the model, its scoring thread and the batcher on that thread."""

    def __init__(self, model: ServedModel, batch_window_s: float, max_batch: int):
        self.model = model
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.batcher = MicroBatcher(model.score_arrays, self.executor, batch_window_s, max_batch)

    async def on_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def faces(self, name: str, frames: list[np.ndarray]) -> np.ndarray:
        row = self.model.score_faces(name, frames)
        if row is None:
            raise NoFace(f"{name}: no face found in {len(frames)} frame(s)")
        return row

    def video(self, name: str, data: bytes) -> np.ndarray:
        suffix = Path(name).suffix.lower()
        with tempfile.TemporaryDirectory(prefix="infer-serve-") as folder:
            path = Path(folder) / f"upload{suffix if suffix in VIDEO_SUFFIXES else '.mp4'}"
            path.write_bytes(data)
            try:
                row = self.model.score_video(path)
            except ImageDecodeError as err:  # name the upload, not the temporary file
                raise ImageDecodeError(str(err).replace(str(path), name, 1)) from None
            if row is None:
                raise NoFace(f"{name}: no face found and no member scores it otherwise")
            return row

    async def score(self, name: str, data: bytes, content_type: str) -> tuple[str, np.ndarray, int]:
        """(kind, row, batch size) of one upload: a video by its name or its declared type."""
        if is_video(name) or content_type.startswith("video/"):
            return "video", await self.on_thread(self.video, name, data), 1
        image = await asyncio.to_thread(decode_image_bytes, data, name)
        if self.model.crop_faces:
            return "image", await self.on_thread(self.faces, name, [image]), 1
        row, size = await self.batcher.submit(image)
        return "image", row, size


def result(name: str, kind: str, row: np.ndarray, columns: list[str], seconds: float, batch: int) -> dict:
    members = {m: None if np.isnan(x) else float(x) for m, x in zip(columns[1:], row[1:], strict=True)}
    return {
        "name": name,
        "kind": kind,
        "probability": float(row[0]),
        "members": members,
        "seconds": round(seconds, 6),
        "batch_size": batch,
    }


def build_app(
    model: ServedModel,
    max_upload_bytes: int,
    batch_window_s: float,
    max_batch: int = MAX_BATCH,
) -> ASGIApp:
    service = Service(model, batch_window_s, max_batch)
    page = PAGE.read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One untimed call first, so the first request does not pay for the runtime's warm-up.
        await service.on_thread(model.score_arrays, [np.full((64, 64, 3), 128, np.uint8)])
        worker = asyncio.create_task(service.batcher.run())
        yield
        worker.cancel()
        service.executor.shutdown(wait=True)

    async def home(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def health(request: Request) -> JSONResponse:
        stats = service.batcher.stats
        return JSONResponse(
            {
                "status": "ok",
                "columns": model.columns,
                "scored": stats.scored,
                "batches": stats.batches,
                "largest_batch": stats.largest_batch,
                "max_upload_mb": max_upload_bytes / 2**20,
            }
        )

    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        name, data, content_type = await read_upload(request)
        kind, row, batch = await service.score(name, data, content_type)
        if np.isnan(row[0]):
            return error(422, f"{name}: no member could score it")
        return JSONResponse(result(name, kind, row, model.columns, time.perf_counter() - started, batch))

    handlers = {
        UploadTooLarge: lambda request, err: too_large(max_upload_bytes),
        ImageDecodeError: lambda request, err: error(400, str(err)),
        NoFace: lambda request, err: error(422, str(err)),
        HTTPException: lambda request, err: error(err.status_code, err.detail),
        Exception: lambda request, err: error(500, f"scoring failed: {err!r}"),
    }
    routes = [Route("/", home), Route("/health", health), Route("/predict", predict, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    return BodyLimit(app, max_upload_bytes)


def run_server(
    model: ServedModel,
    host: str,
    port: int,
    max_upload_mb: float,
    batch_window_ms: float,
) -> int:
    """Serve until SIGINT or SIGTERM, then finish the open requests and return 0; 1 when the
    service could not start (the port taken, the models failing their first call)."""
    app = build_app(model, int(max_upload_mb * 2**20), batch_window_ms / 1000)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn shuts down gracefully on these signals, then raises the signal again under the
    # handlers it found; these handlers make that a normal exit instead of a kill or a traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
