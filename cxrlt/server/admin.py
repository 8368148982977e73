"""The launcher's own calls to its server: readiness, model configs, reloads, shared memory.

They go over Triton's HTTP endpoint, which the launcher always has on loopback (gRPC may be
behind TLS with client certificates the launcher does not hold), with the admin key header
when the admin APIs are restricted. urllib only: no client library on the server side.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

ADMIN_HEADER = "admin-key"  # Triton checks `<key>: <value>` on HTTP, `triton-grpc-protocol-<key>` on gRPC


class AdminError(RuntimeError):
    """A call to the server's HTTP API failed; the message has Triton's reason."""


class AdminApi:
    def __init__(self, http_address: str, admin_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.base = f"http://{http_address}"
        self.headers = {ADMIN_HEADER: admin_key} if admin_key else {}
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={**self.headers, **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            reason = exc.read().decode(errors="replace")
            try:
                reason = json.loads(reason).get("error", reason)
            except ValueError:
                pass
            raise AdminError(f"{method} {path}: HTTP {exc.code}: {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"{method} {path}: {exc}") from None
        return json.loads(payload) if payload else None

    def ready(self) -> bool:
        try:
            self._call("GET", "/v2/health/ready")
        except AdminError:
            return False
        return True

    def model_config(self, model: str) -> dict:
        return self._call("GET", f"/v2/models/{model}/config")

    def load_model(self, model: str, config: dict | None = None) -> None:
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        self._call("POST", f"/v2/repository/models/{model}/load", body)

    def shared_memory_regions(self) -> list[dict]:
        return self._call("GET", "/v2/systemsharedmemory/status") or []

    def unregister_shared_memory(self, name: str) -> None:
        self._call("POST", f"/v2/systemsharedmemory/region/{name}/unregister")
