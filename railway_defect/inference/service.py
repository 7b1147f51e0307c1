"""The HTTP scoring service (FastAPI): the model is loaded once; `POST /predict` scores the images of
one multipart request in one batch and answers rows like predict's CSV; `GET /health` names the
model; `GET /metrics` counts requests, status codes, latency and images (Prometheus). Bad uploads
get a 4xx JSON error: {"error": ..., "files": [{"file", "error"}]}."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from railway_defect import __version__
from railway_defect.data.images import DecodeError
from railway_defect.inference.inputs import InputItem
from railway_defect.inference.model import Predictor, load_predictor
from railway_defect.inference.monitoring import ServiceMetrics
from railway_defect.inference.predicting import Decision, flip_axes, prediction_row, score
from railway_defect.utils.resources import limit_malloc_arenas

MB = 1024 * 1024
# the start of the messages of starlette.formparsers.MultiPartParser for its max_files/max_fields
TOO_MANY_PARTS = ("Too many files", "Too many fields")


class UploadProblem(Exception):
    def __init__(self, status: int, file: str, error: str):
        super().__init__(error)
        self.status, self.file, self.error = status, file, error


def _error(status: int, message: str, files: list[dict[str, str]] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "files": files or []})


class UploadScorer:
    """Scores the uploads of one request in one batch, under the service's limits; one forward pass
    at a time, since the threads of the pool would only compete for the same cores."""

    def __init__(
        self,
        predictor: Predictor,
        decision: Decision,
        flips: tuple[int, ...],
        max_upload_mb: float,
        max_files: int,
    ):
        self.predictor, self.decision, self.flips = predictor, decision, flips
        self.max_upload_mb, self.max_files = max_upload_mb, max_files
        self.max_bytes = int(max_upload_mb * MB)
        self.model_lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            **self.predictor.describe(),
            "review_band": list(self.decision.review_band),
            "top_k": self.decision.top_k,
            "tta": bool(self.flips),
            "max_upload_mb": self.max_upload_mb,
            "max_files": self.max_files,
            "worker_pid": os.getpid(),  # which worker process answered (serve workers=N)
        }

    def decode(self, name: str, data: bytes) -> InputItem:
        if not data:
            raise UploadProblem(400, name, "empty file")
        if len(data) > self.max_bytes:
            raise UploadProblem(413, name, f"larger than {self.max_upload_mb:g} MB")
        try:
            return InputItem(name, image=self.predictor.decode(data))
        except DecodeError as e:
            raise UploadProblem(415, name, str(e)) from e

    def score(self, uploads: list[tuple[str, bytes]]) -> list[dict[str, Any]] | JSONResponse:
        """One row per upload, or the error answer naming every upload that was refused."""
        items, problems = [], []
        for name, data in uploads:
            try:
                items.append(self.decode(name, data))
            except UploadProblem as p:
                problems.append(p)
        if problems:
            return _error(
                problems[0].status,
                f"{len(problems)} of {len(uploads)} uploads refused: {problems[0].error}",
                [{"file": p.file, "error": p.error} for p in problems],
            )
        with self.model_lock:
            probs = score(self.predictor, items, self.flips)
        # JPEG bytes the device could not decode, which the CPU could not either (decode=gpu)
        if undecodable := [item for item in items if item.error]:
            return _error(
                415,
                f"{len(undecodable)} of {len(uploads)} uploads refused: {undecodable[0].error}",
                [{"file": item.path, "error": item.error} for item in undecodable],
            )
        return [
            prediction_row(item, p, self.predictor, self.decision)
            for item, p in zip(items, probs, strict=True)
        ]

    async def read_uploads(self, request: Request) -> list[tuple[str, bytes]] | JSONResponse:
        """The (file name, bytes) of a multipart request, or the 4xx answer for one that breaks a limit."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes * self.max_files + MB:
            return _error(413, f"request larger than {self.max_files} files of {self.max_upload_mb:g} MB")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(415, "send images as multipart/form-data (e.g. curl -F files=@photo.jpg)")
        try:
            form = await request.form(max_files=self.max_files, max_fields=self.max_files)
        except HTTPException as e:
            # Starlette answers 400 for every multipart limit; too many parts is a request too large
            if str(e.detail).startswith(TOO_MANY_PARTS):
                return _error(413, f"more than max_files={self.max_files} files in one request")
            raise
        uploads = []
        try:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append((value.filename or "upload", await value.read(self.max_bytes + 1)))
        finally:
            await form.close()
        if not uploads:
            return _error(400, "no file in the request: send images as multipart files (field 'files')")
        return uploads


def create_app(
    predictor: Predictor,
    decision: Decision,
    flips: tuple[int, ...] = (),
    max_upload_mb: float = 20,
    max_files: int = 32,
    request_timeout_s: float = 60,
) -> FastAPI:
    """The scoring service: GET /health (model, classes, threshold), POST /predict (multipart
    `files`: images scored like `predict` does, one row each), GET /metrics (Prometheus).

    Args:
        predictor: the model (checkpoint, ensemble, ONNX or TorchScript) from `load_predictor`.
        decision: the threshold and review band that label a score.
        flips: test-time flips averaged into each score (image axes: -1 horizontal, -2 vertical).
        max_upload_mb, max_files: per-request limits; beyond them the answer is 413.
        request_timeout_s: a request not scored by then is answered 503 (the next may get through).
    """
    app = FastAPI(title="railway_defect", version=__version__)
    scorer = UploadScorer(predictor, decision, flips, max_upload_mb, max_files)
    monitoring = ServiceMetrics()
    monitoring.install(app)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return scorer.health()

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> dict[str, Any] | JSONResponse:
        uploads = await scorer.read_uploads(request)
        if isinstance(uploads, JSONResponse):
            return uploads
        try:
            result = await asyncio.wait_for(run_in_threadpool(scorer.score, uploads), request_timeout_s)
        except TimeoutError:
            return _error(
                503, f"not scored within request_timeout_s={request_timeout_s:g} s; try again later"
            )
        if isinstance(result, JSONResponse):
            return result
        monitoring.images.inc(len(result))
        return {"model": predictor.model_id, "predictions": result}

    return app


def build_service(
    model_path: str | None,
    device: str = "auto",
    threshold: float | None = None,
    review_margin: float = 1.0,
    review_band: Sequence[float] | None = None,
    tta: bool = False,
    tta_flips: Sequence[str] = ("horizontal",),
    max_upload_mb: float = 20,
    max_files: int = 32,
    request_timeout_s: float = 60,
    top_k: int | None = None,
    decode: str = "auto",
) -> FastAPI:
    """The service for a model file or run/sweep directory, with the decision and test-time flips
    configured as predict's (conf/inference). In every process that serves (each of workers=N),
    before its request threads exist: fewer malloc arenas, so memory settles after a warm-up."""
    limit_malloc_arenas()
    predictor = load_predictor(model_path, device, threshold, decode)
    decision = Decision.for_model(predictor, review_margin, review_band, top_k)
    flips = flip_axes(tta, list(tta_flips))
    return create_app(predictor, decision, flips, max_upload_mb, max_files, request_timeout_s)


# uvicorn's worker processes (serve workers=N) build their app from this JSON of build_service's
# arguments, each loading the model once
SERVICE_ARGUMENTS_ENV = "RAILWAY_SERVICE_ARGUMENTS"


def service_from_environment() -> FastAPI:
    """The app factory of a worker process (uvicorn's `factory=True`)."""
    return build_service(**json.loads(os.environ[SERVICE_ARGUMENTS_ENV]))
