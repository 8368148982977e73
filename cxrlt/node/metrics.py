"""The DICOM node's counters (:data:`COUNTERS`), served on ``GET /metrics`` in Prometheus' text format
(no client library needed): ``cxrlt_node_<counter>_total``, and the gauge ``cxrlt_node_spooled``
(instances waiting in the spool now)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

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
    """Thread-safe counters plus the spool gauge, read at scrape time."""

    def __init__(self, spooled: Callable[[], int]) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._spooled = spooled
        self._server: ThreadingHTTPServer | None = None

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def text(self) -> str:
        with self._lock:
            counts = dict(self._counts)
        lines = []
        for name, help_text in COUNTERS.items():
            lines += [f"# HELP {PREFIX}{name}_total {help_text}", f"# TYPE {PREFIX}{name}_total counter",
                      f"{PREFIX}{name}_total {counts[name]}"]
        lines += [f"# HELP {PREFIX}spooled instances waiting in the spool now", f"# TYPE {PREFIX}spooled gauge",
                  f"{PREFIX}spooled {self._spooled()}"]
        return "\n".join(lines) + "\n"

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port in a daemon thread; returns the port (0 picks one)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not worth a line each
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
