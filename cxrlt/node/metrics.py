"""The DICOM node's counters (:data:`COUNTERS`), served on ``GET /metrics`` by prometheus-client:
``cxrlt_node_<counter>_total``, and the gauge ``cxrlt_node_spooled`` (instances waiting in the
spool now, read at scrape time)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["COUNTERS", "Metrics"]

COUNTERS: dict[str, str] = {
    "received": "DICOM instances received by C-STORE",
    "ignored": "instances acknowledged but not classified (no pixel data: SR, PR, KO and the like)",
    "classified": "images classified by the server",
    "sent": "SRs the destination accepted",
    "study_sent": "study SRs the destination accepted (one per study, once it is quiet)",
    "retried": "attempts that failed for a reason retrying can fix (server or destination unavailable)",
    "rejected": "instances moved to rejected/ because retrying cannot help",
}
PREFIX = "cxrlt_node_"


class Metrics:
    """Thread-safe counters plus the spool gauge, in a registry of their own."""

    def __init__(self, spooled: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._counters = {name: Counter(f"{PREFIX}{name}", text, registry=self.registry) for name, text in COUNTERS.items()}
        Gauge(f"{PREFIX}spooled", "instances waiting in the spool now", registry=self.registry).set_function(spooled)
        self._server: Any = None

    def inc(self, name: str, n: int = 1) -> None:
        self._counters[name].inc(n)

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics on host:port in a daemon thread; returns the port (0 picks one)."""
        self._server, _ = start_http_server(port, host, self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
