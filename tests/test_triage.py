"""Triage: the queue orders, the label store, the app's safety rules, and the page in a real
browser (Playwright driving the system's Chromium): label by keyboard, undo, reload, two reviewers
at once, a `kill -9` of the server, the exported manifest."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from railway_defect.data.label_store import Item, LabelStore, file_digest, reviewed_labels, write_manifest
from railway_defect.labelling.app import build_app
from railway_defect.labelling.queue import (
    defect_order,
    disagreement_order,
    k_center_order,
    uncertain_order,
)
from railway_defect.labelling.session import access_token, open_store
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.errors import UserError
from tests.helpers import (
    FAST,
    OFFLINE_ENV,
    PROJECT_ROOT,
    make_split_dataset,
    run_cli,
    write_image,
    write_video,
)

CLASSES = ["Defective", "Non defective"]


# the orders: the expected first item is known --------------------------------------------------
def test_defect_order_puts_the_likeliest_defect_first() -> None:
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    order, _ = defect_order(probs, positive_index=0)
    assert order.tolist() == [1, 2, 0]


def test_uncertain_order_puts_the_item_nearest_the_threshold_first() -> None:
    """Nearness is in log-odds around the model's own threshold, not around 0.5."""
    probs = np.array([[0.5, 0.5], [0.12, 0.88], [0.95, 0.05], [0.3, 0.7]])
    order, _ = uncertain_order(probs, DecisionRule(0, 0.12))
    assert order[0] == 1 and order[-1] == 2


def test_uncertain_order_with_costs_puts_the_closest_call_first() -> None:
    """With a cost matrix the nearest call is where the two least expected costs are closest."""
    costs = ((0.0, 1.0, 5.0), (1.0, 0.0, 2.0), (20.0, 5.0, 0.0))
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    order, gaps = uncertain_order(probs, DecisionRule(2, 0.5, costs))
    expected = np.sort(probs @ np.asarray(costs), axis=1)
    assert order[0] == int(np.argmin(expected[:, 1] - expected[:, 0]))
    assert np.all(np.diff(gaps[order]) >= 0)


def test_disagreement_order_puts_the_split_ensemble_first() -> None:
    members = np.array(
        [
            [[0.9, 0.1], [0.88, 0.12], [0.91, 0.09]],  # the members agree
            [[0.95, 0.05], [0.1, 0.9], [0.5, 0.5]],  # they disagree
            [[0.6, 0.4], [0.4, 0.6], [0.5, 0.5]],
        ]
    )
    order, _ = disagreement_order(members)
    assert order.tolist() == [1, 2, 0]


def test_diverse_order_reaches_the_outlier_before_the_near_duplicates() -> None:
    """Twenty near-duplicate frames and one different photo: after the first item the next one
    chosen is the different photo, not another duplicate."""
    rng = np.random.default_rng(0)
    duplicates = rng.normal(0, 0.01, size=(20, 64))
    outlier = np.full((1, 64), 5.0)
    features = np.vstack([duplicates[:10], outlier, duplicates[10:]])
    order, scores = k_center_order(features, first=0)
    assert order[0] == 0 and order[1] == 10
    assert sorted(order.tolist()) == list(range(21))
    assert scores[10] > 10 * np.median(scores[1:10])


# the label store ----------------------------------------------------------------------------------
def _store_with_photos(
    folder: Path, count: int, name: str = "triage.sqlite"
) -> tuple[LabelStore, list[Path]]:
    photos = [write_image(folder / f"photo_{i:05d}.png", size=(16, 12), seed=i) for i in range(count)]
    store = LabelStore(folder / name)
    items = [Item(i, str(p), None, None, file_digest(p), [0.3, 0.7]) for i, p in enumerate(photos)]
    store.set_queue(
        {"classes": CLASSES, "positive_class": "Defective", "model": "m", "order": "defect"}, items
    )
    return store, photos


def test_decisions_undo_and_the_manifest(tmp_path: Path) -> None:
    store, photos = _store_with_photos(tmp_path, 3)
    store.record(store.item(0), "Defective", "ann", "m", {})
    store.record(store.item(1), "Defective", "ann", "m", {})
    store.record(store.item(1), "Non defective", "bob", "m", {})  # a second opinion: the latest stands
    assert store.undo("ann").position == 1  # ann's latest, which bob's later decision already replaced
    assert store.first_unlabelled() == 2
    rows, changed = write_manifest(store, tmp_path / "labels.csv")
    with (tmp_path / "labels.csv").open(newline="") as f:
        manifest = list(csv.DictReader(f))
    assert rows == 2 and changed == []
    assert [(r["path"], r["label"]) for r in manifest] == [
        (str(photos[0]), "Defective"),
        (str(photos[1]), "Non defective"),
    ]
    assert list(manifest[0]) == ["path", "label", "split", "group"]


def test_a_photo_changed_on_disk_is_flagged_not_relabelled(tmp_path: Path) -> None:
    store, photos = _store_with_photos(tmp_path, 2)
    store.record(store.item(0), "Defective", "ann", "m", {})
    store.record(store.item(1), "Defective", "ann", "m", {})
    write_image(photos[0], size=(16, 12), seed=99)  # replaced by another photo under the same name
    labels, changed = reviewed_labels(store)
    assert changed == [str(photos[0])] and list(labels) == [str(photos[1])]
    client = TestClient(build_app(store, None, None, loopback_only=True), base_url="http://127.0.0.1")
    first = client.get("/api/items", params={"offset": 0, "limit": 2}).json()
    assert [item["changed"] for item in first] == [True, False]


def test_the_page_shows_the_queues_own_rule_and_the_frames_around_a_frame(tmp_path: Path) -> None:
    """Without the model loaded, the prediction shown is still the queue's rule (threshold 0.12: p
    0.2 is Defective, which argmax would not say); a frame lists the 3 frames on each side of it."""
    video = write_video(tmp_path / "walk.mp4")
    store = LabelStore(tmp_path / "triage.sqlite")
    items = [Item(i, str(video), 10 * i, float(i), file_digest(video), [0.2, 0.8]) for i in range(10)]
    meta = {"classes": CLASSES, "positive_class": "Defective", "threshold": 0.12, "order": "defect"}
    store.set_queue(meta, items)
    client = TestClient(build_app(store, None, None, loopback_only=True), base_url="http://127.0.0.1")
    fifth = client.get("/api/items", params={"offset": 5, "limit": 1}).json()[0]
    assert fifth["predicted"] == "Defective"
    assert [n["frame"] for n in fifth["neighbours"]] == [20, 30, 40, 50, 60, 70, 80]
    first = client.get("/api/items", params={"offset": 0, "limit": 1}).json()[0]
    assert [n["frame"] for n in first["neighbours"]] == [0, 10, 20, 30]


def test_concurrent_reviewers_lose_no_decision(tmp_path: Path) -> None:
    """Two reviewers (threads, each with its own connections) writing 50 decisions each at once."""
    store, _ = _store_with_photos(tmp_path, 100)

    def review(reviewer: str, positions: range) -> None:
        for position in positions:
            LabelStore(store.path).record(store.item(position), "Defective", reviewer, "m", {})

    threads = [
        threading.Thread(target=review, args=("ann", range(0, 50))),
        threading.Thread(target=review, args=("bob", range(50, 100))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.decision_count() == 100 and len(store.current()) == 100


# the app's rules -----------------------------------------------------------------------------------
def test_requests_name_queue_positions_never_paths(tmp_path: Path) -> None:
    store, _ = _store_with_photos(tmp_path, 2)
    client = TestClient(build_app(store, None, None, loopback_only=True), base_url="http://127.0.0.1")
    assert client.get("/api/image/0").content == (tmp_path / "photo_00000.png").read_bytes()
    for probe in ("/api/image/../../etc/passwd", "/api/image/..%2F..%2Fetc%2Fpasswd", "/etc/passwd"):
        response = client.get(probe)
        assert response.status_code in (404, 422) and b"root:" not in response.content
    assert client.get("/api/image/2").status_code == 404  # past the end of the queue
    upload = client.post("/api/label", files={"file": ("x.jpg", b"\xff\xd8data")})
    assert upload.status_code == 415
    bad_label = {"position": 0, "label": "Rusty", "reviewer": "ann"}
    assert client.post("/api/label", json=bad_label).status_code == 422
    assert client.put("/api/label", json=bad_label).status_code == 405
    assert client.get("/api/items", params={"limit": 10_000}).status_code == 422  # paged, never whole
    assert client.get("/api/meta", headers={"host": "attacker.example"}).status_code == 403


def test_a_bind_other_than_loopback_needs_the_token(tmp_path: Path) -> None:
    assert access_token("127.0.0.1", None) is None
    generated = access_token("0.0.0.0", None)
    assert generated is not None and len(generated) >= 16
    with pytest.raises(UserError, match="at least 16"):
        access_token("0.0.0.0", "short")
    store, _ = _store_with_photos(tmp_path, 1)
    client = TestClient(build_app(store, None, generated, loopback_only=False), base_url="http://10.0.0.5")
    assert client.get("/api/meta").status_code == 401
    assert client.get("/api/meta", headers={"x-triage-token": "wrong" * 5}).status_code == 401
    assert client.get("/", params={"token": generated}).status_code == 200  # sets the cookie
    assert client.get("/api/meta").status_code == 200  # the cookie carries it from now on


def test_a_ten_thousand_photo_queue_is_served_in_pages(tmp_path: Path) -> None:
    store, _ = _store_with_photos(tmp_path, 10_000)
    client = TestClient(build_app(store, None, None, loopback_only=True), base_url="http://127.0.0.1")
    meta = client.get("/api/meta").json()
    assert meta["size"] == 10_000 and meta["resume_at"] == 0
    started = time.perf_counter()
    last_page = client.get("/api/items", params={"offset": 9_950, "limit": 100}).json()
    seconds = time.perf_counter() - started
    assert [item["position"] for item in last_page] == list(range(9_950, 10_000))
    print(f"last page of a 10,000-photo queue: {seconds * 1000:.0f} ms")


# with a model: the queue from real scoring ------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny checkpoint and a folder to triage: 12 photos and a 3.5 s video."""
    root = tmp_path_factory.mktemp("triage")
    data = make_split_dataset(root / "data", {"Train": 6, "Validation": 3})
    run = root / "run"
    result = run_cli("railway_defect.train", *FAST, f"data.root={data}", "logger=csv", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    photos = root / "photos"
    photos.mkdir()
    for i, source in enumerate(sorted((data / "Train").rglob("*.*"))):
        shutil.copy(source, photos / f"{i:02d}{source.suffix}")
    write_video(photos / "walk.mp4")
    return run / "checkpoints" / "best.ckpt", photos


def test_the_defect_queue_opens_with_the_photo_predict_scores_highest(
    model_and_photos: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, photos = model_and_photos
    predictions = tmp_path / "predictions.csv"
    result = run_cli(
        "railway_defect.predict", f"ckpt_path={ckpt}", f"input={photos}", f"output={predictions}",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with predictions.open(newline="") as f:
        rows = list(csv.DictReader(f))
    highest = max(float(r["p_Defective"]) for r in rows)
    from railway_defect.inference.model import load_predictor

    predictor = load_predictor(ckpt, "cpu")
    for source in (photos, predictions):  # scored here, or read from predict's CSV
        store = open_store(tmp_path / f"{source.name}.sqlite", str(source), "defect", predictor)
        assert store.item(0).probs[0] == pytest.approx(highest, abs=1e-6)
        assert store.size() == len(rows)
    with pytest.raises(UserError, match="holds the queue"):
        open_store(tmp_path / "photos.sqlite", str(photos), "uncertain", predictor)
    with pytest.raises(UserError, match="ensemble"):
        open_store(tmp_path / "other.sqlite", str(photos), "disagreement", predictor)


# the page in a real browser ------------------------------------------------------------------------
def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("no system chromium (apt-get install chromium) for the browser tests")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The triage command in its own process, as a user starts it."""

    def __init__(self, ckpt: Path, photos: Path, db: Path, log: Path):
        self.ckpt, self.photos, self.db = ckpt, photos, db
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        args = [f"ckpt_path={ckpt}", f"input={photos}", f"db={db}", f"port={self.port}"]
        args.append(f"hydra.run.dir={db.parent / 'triage_log'}")
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "railway_defect.triage", *args],
                cwd=PROJECT_ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.log = log

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "api/meta", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        pytest.fail(f"the triage server did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def restarted(self) -> Server:
        """The same command started again on the same database."""
        server = Server(self.ckpt, self.photos, self.db, self.log)
        server.wait_ready()
        return server


@pytest.fixture
def server(model_and_photos: tuple[Path, Path], tmp_path: Path) -> Iterator[Server]:
    """The triage command on the model's folder, with a database of its own; killed at the end."""
    ckpt, photos = model_and_photos
    started = Server(ckpt, photos, tmp_path / "triage.sqlite", tmp_path / "server.log")
    started.wait_ready()
    yield started
    if started.process.poll() is None:
        started.kill()


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def _open(browser: object, url: str, reviewer: str, at: int | None = None) -> object:
    page = browser.new_context(viewport={"width": 1100, "height": 700}).new_page()  # type: ignore[attr-defined]
    page.goto(f"{url}?reviewer={reviewer}" + ("" if at is None else f"&at={at}"))
    page.wait_for_selector("body[data-ready=true]")
    return page


def _press(page: object, key: str, then_shown: int | None = None) -> None:
    page.keyboard.press(key)  # type: ignore[attr-defined]
    if then_shown is not None:
        page.wait_for_function(f"document.body.dataset.shown === '{then_shown}'")  # type: ignore[attr-defined]


def _saved(page: object, count: int) -> None:
    page.wait_for_function(f"window.triage.saved === {count}")  # type: ignore[attr-defined]


def test_labelling_by_keyboard_in_the_browser_survives_undo_reload_two_reviewers_and_kill_9(
    server: Server, browser: object, tmp_path: Path
) -> None:
    db = server.db
    ann = _open(browser, server.url, "ann")
    assert "1 / 16" in ann.inner_text("#position")
    _press(ann, "1", then_shown=1)  # Defective
    _press(ann, "2", then_shown=2)  # Non defective
    _press(ann, "Enter", then_shown=3)  # the model's prediction
    _saved(ann, 3)
    _press(ann, "u", then_shown=2)  # undo the last: back to it, unlabelled
    ann.wait_for_function("window.triage.saved === 2")
    assert "not labelled" in ann.inner_text("#label")
    store = LabelStore(db)
    assert {p: d.label for p, d in store.current().items()} == {0: "Defective", 1: "Non defective"}

    ann.reload()  # where the page was: the position is in its address
    ann.wait_for_selector("body[data-ready=true]")
    assert "3 / 16" in ann.inner_text("#position")
    bob = _open(browser, server.url, "bob", at=8)
    _press(bob, "2", then_shown=9)
    _press(ann, "1", then_shown=3)
    _press(bob, "1", then_shown=10)
    _press(ann, "2", then_shown=4)
    _saved(bob, 2)
    _saved(ann, 2)  # since the reload
    assert len(store.current()) == 6

    server.kill()  # mid-queue: what was saved is on disk
    restarted = server.restarted()
    carol = _open(browser, restarted.url, "carol")
    assert "5 / 16" in carol.inner_text("#position")  # the first photo nobody labelled
    _press(carol, "Enter", then_shown=5)
    _saved(carol, 1)
    restarted.kill()
    reviewers = {d.reviewer for d in LabelStore(db).current().values()}
    assert len(LabelStore(db).current()) == 7 and reviewers == {"ann", "bob", "carol"}

    result = run_cli(
        "railway_defect.triage", f"db={db}", "export=manifest", f"output={tmp_path / 'labels.csv'}",
        f"hydra.run.dir={tmp_path / 'export_log'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with (tmp_path / "labels.csv").open(newline="") as f:
        exported = {Path(r["path"]).name: r["label"] for r in csv.DictReader(f)}
    labels, _ = reviewed_labels(LabelStore(db))
    assert exported == {Path(p).name: label for p, label in labels.items()}
    assert len(exported) == sum(1 for d in LabelStore(db).current().values() if d.frame is None)


def test_the_page_shows_grad_cam_on_g_the_frames_around_a_frame_and_help_on_question_mark(
    server: Server, browser: object
) -> None:
    frame = next(i for i in LabelStore(server.db).items(0, 100) if i.frame is not None)
    page = _open(browser, server.url, "ann", at=frame.position)
    loaded = "(img) => img.complete && img.naturalWidth > 0"
    strip = page.locator("#strip img")  # type: ignore[attr-defined]
    strip.first.wait_for()
    assert strip.count() >= 2
    current = page.locator("#strip img.current")  # type: ignore[attr-defined]
    assert current.count() == 1 and current.get_attribute("src") == f"/api/image/{frame.position}"
    assert page.eval_on_selector("#strip img.current", loaded)  # type: ignore[attr-defined]

    page.keyboard.press("g")  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "(() => { const img = document.getElementById('photo'); return img.src.includes('/api/gradcam/') "
        "&& img.complete && img.naturalWidth > 0; })()"
    )
    assert "on" in (page.get_attribute("#mode", "class") or "")  # type: ignore[attr-defined]
    page.keyboard.press("g")  # type: ignore[attr-defined]
    page.wait_for_function("document.getElementById('photo').src.includes('/api/image/')")  # type: ignore[attr-defined]

    page.keyboard.press("?")  # type: ignore[attr-defined]
    assert page.is_visible("#help")  # type: ignore[attr-defined]
    page.keyboard.press("Escape")  # type: ignore[attr-defined]
    assert not page.is_visible("#help")  # type: ignore[attr-defined]
