"""The HTTP scoring service (FastAPI): the model is loaded once; `POST /predict` scores the images of
one multipart request in one batch and answers rows like predict's CSV; `GET /health` names the
model. Bad uploads get a 4xx JSON error: {"error": ..., "files": [{"file", "error"}]}."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from railway_defect import __version__
from railway_defect.data.images import DecodeError
from railway_defect.inference.inputs import InputItem
from railway_defect.inference.model import Predictor
from railway_defect.inference.predicting import Decision, prediction_row, score

MB = 1024 * 1024
# the start of the messages of starlette.formparsers.MultiPartParser for its max_files/max_fields
TOO_MANY_PARTS = ("Too many files", "Too many fields")


class UploadProblem(Exception):
    def __init__(self, status: int, file: str, error: str):
        super().__init__(error)
        self.status, self.file, self.error = status, file, error


def _error(status: int, message: str, files: list[dict[str, str]] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "files": files or []})


def create_app(
    predictor: Predictor,
    decision: Decision,
    flips: tuple[int, ...] = (),
    max_upload_mb: float = 20,
    max_files: int = 32,
) -> FastAPI:
    """The scoring service: GET /health (model, classes, threshold), POST /predict (multipart
    `files`: images scored like `predict` does, one row each).

    Args:
        predictor: the model (checkpoint, ensemble, ONNX or TorchScript) from `load_predictor`.
        decision: the threshold and review band that label a score.
        flips: test-time flips averaged into each score (image axes: -1 horizontal, -2 vertical).
        max_upload_mb, max_files: per-request limits; beyond them the answer is 413.
    """
    app = FastAPI(title="railway_defect", version=__version__)
    max_bytes = int(max_upload_mb * MB)
    # one forward pass at a time: the threads of the pool would only compete for the same cores
    model_lock = threading.Lock()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            **predictor.describe(),
            "review_band": list(decision.review_band),
            "tta": bool(flips),
            "max_upload_mb": max_upload_mb,
            "max_files": max_files,
        }

    def decode(name: str, data: bytes) -> InputItem:
        if not data:
            raise UploadProblem(400, name, "empty file")
        if len(data) > max_bytes:
            raise UploadProblem(413, name, f"larger than {max_upload_mb:g} MB")
        try:
            return InputItem(name, image=predictor.decode(data))
        except DecodeError as e:
            raise UploadProblem(415, name, str(e)) from e

    def score_uploads(uploads: list[tuple[str, bytes]]) -> list[dict[str, Any]] | JSONResponse:
        items, problems = [], []
        for name, data in uploads:
            try:
                items.append(decode(name, data))
            except UploadProblem as p:
                problems.append(p)
        if problems:
            return _error(
                problems[0].status,
                f"{len(problems)} of {len(uploads)} uploads refused: {problems[0].error}",
                [{"file": p.file, "error": p.error} for p in problems],
            )
        with model_lock:
            probs = score(predictor, items, flips)
        return [prediction_row(item, p, predictor, decision) for item, p in zip(items, probs, strict=True)]

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> dict[str, Any] | JSONResponse:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * max_files + MB:
            return _error(413, f"request larger than {max_files} files of {max_upload_mb:g} MB")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(415, "send images as multipart/form-data (e.g. curl -F files=@photo.jpg)")
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except HTTPException as e:
            # Starlette answers 400 for every multipart limit; too many parts is a request too large
            if str(e.detail).startswith(TOO_MANY_PARTS):
                return _error(413, f"more than max_files={max_files} files in one request")
            raise
        uploads = []
        try:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append((value.filename or "upload", await value.read(max_bytes + 1)))
        finally:
            await form.close()
        if not uploads:
            return _error(400, "no file in the request: send images as multipart files (field 'files')")
        result = await run_in_threadpool(score_uploads, uploads)
        if isinstance(result, JSONResponse):
            return result
        return {"model": predictor.model_id, "predictions": result}

    return app
