"""The scoring service's /metrics in Prometheus' text format (the official prometheus-client):
requests by endpoint and status code, request latency, and images scored. Each app has its own
registry, so that several services in one process (the tests) count apart."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# seconds: a single photo on a CPU takes tens of milliseconds, a full request of 32 a few seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "railway_requests", "HTTP requests answered", ["endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "railway_request_seconds",
            "Time to answer a request",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("railway_images_scored", "Images scored", registry=self.registry)

    def install(self, app: FastAPI) -> None:
        """Count and time every request, and answer GET /metrics."""

        @app.middleware("http")
        async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            start = time.perf_counter()
            response = await call_next(request)
            endpoint = request.url.path if request.url.path in KNOWN_PATHS else "other"
            self.requests.labels(endpoint, str(response.status_code)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)
            return response

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


# endpoints counted by name; any other path is `other` (a scan of random URLs cannot grow the labels)
KNOWN_PATHS = ("/predict", "/health", "/metrics")
