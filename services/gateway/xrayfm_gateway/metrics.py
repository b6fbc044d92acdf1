"""The gateway's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("xrayfm_gateway_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram(
    "xrayfm_gateway_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("xrayfm_gateway_requests_in_flight", "HTTP requests being handled")
REJECTED = Counter("xrayfm_gateway_rejected_uploads_total", "Uploads refused at the gateway", ["reason"])
UPLOAD_BYTES = Histogram(
    "xrayfm_gateway_upload_bytes", "Size of accepted uploads", buckets=(1e4, 1e5, 1e6, 4e6, 1.6e7, 6.4e7)
)
QUEUE_ERRORS = Counter(
    "xrayfm_gateway_queue_errors_total", "Redis/queue failures seen by the gateway", ["kind"]
)
PREDICTIONS = Counter("xrayfm_gateway_predictions_total", "Answers by outcome", ["outcome"])


class MetricsMiddleware:
    """Count and time every HTTP request by its route template (never by raw path: ids stay out)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(route, scope["method"], str(status["code"])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - start)
