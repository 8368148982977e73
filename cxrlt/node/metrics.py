"""The DICOM node's counters, served in Prometheus' text format (no client library needed).

``GET /metrics`` on ``--metrics-port`` answers::

    cxrlt_node_received_total     instances received by C-STORE (all of them)
    cxrlt_node_ignored_total      acknowledged, not for classification (SR, PR, KO: no pixel data)
    cxrlt_node_classified_total   images classified by the server
    cxrlt_node_sent_total         SRs the destination accepted
    cxrlt_node_retried_total      attempts that failed for a reason retrying can fix (server or destination down)
    cxrlt_node_rejected_total     instances moved to rejected/ (retrying cannot help)
    cxrlt_node_spooled            instances waiting in the spool now
"""

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

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        counts["spooled"] = self._spooled()
        return counts

    def text(self) -> str:
        counts = self.snapshot()
        lines = []
        for name, help_text in COUNTERS.items():
            lines += [f"# HELP {PREFIX}{name}_total {help_text}", f"# TYPE {PREFIX}{name}_total counter",
                      f"{PREFIX}{name}_total {counts[name]}"]
        lines += [f"# HELP {PREFIX}spooled instances waiting in the spool now", f"# TYPE {PREFIX}spooled gauge",
                  f"{PREFIX}spooled {counts['spooled']}"]
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
