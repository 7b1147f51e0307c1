"""The triage web app (FastAPI): one page (static/triage.html, plain HTML and JS, no build step)
and a small JSON API over the queue and the label store.

Safety: requests name photos by their queue position, never by a file path, so nothing outside the
queue can be read; nothing can be uploaded (a request with a body other than a small JSON object
is refused); on any bind other than loopback every request needs the token (cookie, header or
`?token=`), and on loopback the Host header must be loopback too (no DNS rebinding)."""

from __future__ import annotations

import functools
import hmac
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

from railway_defect.data.label_store import Item, LabelStore, changed_on_disk, queue_rule
from railway_defect.inference.model import CheckpointPredictor, EnsemblePredictor, Predictor

PAGE = Path(__file__).with_name("static") / "triage.html"
TOKEN_COOKIE = "triage_token"
TOKEN_HEADER = "x-triage-token"
MAX_BODY_BYTES = 4096
MAX_PAGE = 200
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# decoded frames and Grad-CAM overlays kept for moving back and forth
CACHED_IMAGES = 64
# video frames shown on each side of a frame
NEIGHBOURS_EACH_SIDE = 3


class LabelRequest(BaseModel):
    position: int = Field(ge=0)
    label: str = Field(min_length=1, max_length=200)
    reviewer: str = Field(min_length=1, max_length=64)


class UndoRequest(BaseModel):
    reviewer: str = Field(min_length=1, max_length=64)


class Triage:
    """What the endpoints share: the store, the queue's description and rule, the model (for Grad-CAM)."""

    def __init__(self, store: LabelStore, predictor: Predictor | None):
        self.store = store
        self.meta = store.meta()
        self.classes: list[str] = self.meta["classes"]
        self.rule = queue_rule(self.meta)
        self.size = store.size()
        self.explainer = _explainer(predictor)
        self.model_lock = threading.Lock()

    def item(self, position: int) -> Item:
        item = self.store.item(position)
        if item is None:
            raise HTTPException(404, f"no item {position}: the queue has {self.size}")
        return item

    def predicted(self, item: Item) -> str | None:
        """The label the queue's rule gives the item (None: not scored)."""
        if item.probs is None:
            return None
        return self.classes[int(self.rule.labels(np.asarray([item.probs]))[0])]

    def describe(self, item: Item, decision: Any) -> dict[str, Any]:
        near = [] if item.frame is None else self.store.frames_near(item, NEIGHBOURS_EACH_SIDE)
        return {
            "position": item.position,
            "name": Path(item.path).name,
            "frame": item.frame,
            "time_s": item.time_s,
            "probs": None if item.probs is None else dict(zip(self.classes, item.probs, strict=True)),
            "predicted": self.predicted(item),
            "given": item.given,
            "score": item.score,
            "label": None if decision is None else decision.label,
            "reviewer": None if decision is None else decision.reviewer,
            "changed": decision is not None and changed_on_disk(decision),
            "neighbours": [{"position": f.position, "frame": f.frame, "time_s": f.time_s} for f in near],
        }


def _explainer(predictor: Predictor | None) -> CheckpointPredictor | None:
    if isinstance(predictor, EnsemblePredictor):
        return predictor.members[0]
    return predictor if isinstance(predictor, CheckpointPredictor) else None


def read_frame(path: str, frame: int) -> np.ndarray:
    """One video frame as RGB (the queue stores frame indices, the video stays where it is)."""
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
        ok, bgr = capture.read()
    finally:
        capture.release()
    if not ok:
        raise HTTPException(404, f"frame {frame} of {Path(path).name} cannot be read")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def gradcam_overlay(explainer: CheckpointPredictor, item: Item, class_index: int) -> bytes:
    """Where the model looked for the predicted class, blended over the photo as the model saw it."""
    import cv2
    import torch

    from railway_defect.data.images import prepare
    from railway_defect.models.gradcam import gradcam_heatmaps, overlay

    contract = explainer.contract
    if item.frame is None:
        image = explainer.decode(Path(item.path).read_bytes())
    else:
        image = prepare(
            Image.fromarray(read_frame(item.path, item.frame)), contract.decode_size, contract.harmonize
        )
    batch = torch.from_numpy(explainer.preprocess([image])).to(explainer.device)
    heatmap = gradcam_heatmaps(explainer.network(), batch, [class_index])[0]
    heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return jpeg(overlay(image, heatmap))


def _security(app: FastAPI, token: str | None, loopback_only: bool) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if request.method not in ("GET", "POST", "HEAD"):
            return JSONResponse({"error": f"{request.method} is not served"}, status_code=405)
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not content_type.startswith("application/json"):
            return JSONResponse({"error": "uploads are refused; send a JSON object"}, status_code=415)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return JSONResponse({"error": "request body too large"}, status_code=413)
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if loopback_only and host not in LOOPBACK_HOSTS:
            return JSONResponse({"error": "this server answers on 127.0.0.1 only"}, status_code=403)
        given = request.query_params.get("token") or request.headers.get(TOKEN_HEADER)
        given = given or request.cookies.get(TOKEN_COOKIE)
        if token is not None and not hmac.compare_digest((given or "").encode(), token.encode()):
            return JSONResponse({"error": "give the token the server printed: ?token=..."}, status_code=401)
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def build_app(
    store: LabelStore, predictor: Predictor | None, token: str | None, loopback_only: bool
) -> FastAPI:
    """The app over `store`'s queue; `token`: required of every request (None: none required)."""
    triage = Triage(store, predictor)
    app = FastAPI(title="railway_defect triage", docs_url=None, redoc_url=None, openapi_url=None)
    _security(app, token, loopback_only)
    _page_and_meta(app, triage)
    _images(app, triage)
    _decisions(app, triage)
    return app


def _page_and_meta(app: FastAPI, triage: Triage) -> None:
    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/meta")
    def meta() -> dict[str, Any]:
        return {
            **triage.meta,
            "size": triage.size,
            "resume_at": triage.store.first_unlabelled(),
            "labelled": len(triage.store.current()),
            "gradcam": triage.explainer is not None,
        }

    @app.get("/api/items")
    def items(
        offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_PAGE)
    ) -> list[dict[str, Any]]:
        """One page of the queue: the page never holds the whole queue."""
        page = triage.store.items(offset, limit)
        decisions = triage.store.current([i.position for i in page])
        return [triage.describe(item, decisions.get(item.position)) for item in page]


def _images(app: FastAPI, triage: Triage) -> None:
    @functools.lru_cache(maxsize=CACHED_IMAGES)
    def frame_jpeg(path: str, frame: int) -> bytes:
        return jpeg(read_frame(path, frame))

    @functools.lru_cache(maxsize=CACHED_IMAGES)
    def overlay_jpeg(position: int) -> bytes:
        item = triage.item(position)
        predicted = triage.predicted(item) or triage.classes[triage.explainer.contract.positive_index]
        with triage.model_lock:
            return gradcam_overlay(triage.explainer, item, triage.classes.index(predicted))

    @app.get("/api/image/{position}")
    def image(position: int) -> Response:
        item = triage.item(position)
        if item.frame is not None:
            return Response(frame_jpeg(item.path, item.frame), media_type="image/jpeg")
        if not Path(item.path).is_file():
            raise HTTPException(404, f"{Path(item.path).name} is no longer on disk")
        return FileResponse(item.path, headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/gradcam/{position}")
    def gradcam(position: int) -> Response:
        if triage.explainer is None:
            raise HTTPException(404, "Grad-CAM needs the training checkpoint (ckpt_path=...)")
        return Response(overlay_jpeg(position), media_type="image/jpeg")


def _decisions(app: FastAPI, triage: Triage) -> None:
    @app.post("/api/label")
    def label(request: LabelRequest) -> dict[str, Any]:
        if request.label not in triage.classes:
            raise HTTPException(422, f"label {request.label!r}: use one of {triage.classes}")
        item = triage.item(request.position)
        shown = {"probs": item.probs, "predicted": triage.predicted(item)}
        model = triage.meta.get("model")
        decision = triage.store.record(item, request.label, request.reviewer, model, shown)
        return {"id": decision.id, "position": decision.position, "label": decision.label}

    @app.post("/api/undo")
    def undo(request: UndoRequest) -> dict[str, Any]:
        decision = triage.store.undo(request.reviewer)
        if decision is None:
            return {"position": None}
        standing = triage.store.current([decision.position]).get(decision.position)
        return {"position": decision.position, "label": None if standing is None else standing.label}
