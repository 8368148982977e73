"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) for tests, configured the way
deploy/orthanc/ tells a hospital to, on free loopback ports with a temporary storage folder.

Privacy: Orthanc 1.10 cannot bind to one address. Its HTTP server refuses every client but
localhost (`RemoteAccessAllowed: false`); its DICOM port listens on all interfaces but only
accepts associations from the AE titles declared here, coming from 127.0.0.1
(`DicomAlwaysAllowEcho/Store: false`, `DicomCheckModalityHost: true`; C-FIND/GET/MOVE are off
for unknown AEs by default). It is not put in a network namespace because the node, the test
and tritonserver all have to reach it. Always stopped by PID.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cxrlt.server.launcher import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MODALITY_AET = "MODALITY"  # the AE title the tests C-STORE as (an X-ray modality)
USER = "cxrlt"


def orthanc_binary() -> str | None:
    """Debian's Orthanc (in /usr/sbin, often not on a user's PATH), with its DICOMweb plugin."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    return binary if binary and DICOMWEB_PLUGIN.is_file() else None


class Orthanc:
    """Orthanc routing chest radiographs to a node at 127.0.0.1:``node_port`` with the shipped Lua script."""

    def __init__(self, folder: Path, node_port: int, node_aet: str = "CXRLT", aet: str = "ORTHANC") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.password = secrets.token_hex(8)
        # HTTP basic auth, as a hospital's PACS has it: cxrlt's DICOMweb clients read USER:PASSWORD from a file
        self.credentials_file = self.folder / "dicomweb-credentials"
        self.credentials_file.write_text(f"{USER}:{self.password}\n")
        self.http_port = free_port()
        self.dicom_port = free_port()
        config = json.loads((DEPLOY / "cxrlt.json").read_text())  # what the hospital copies
        node = config["DicomModalities"]["CXRLT"]
        node.update(AET=node_aet, Host="127.0.0.1", Port=node_port)
        config["DicomModalities"][MODALITY_AET] = {"AET": MODALITY_AET, "Host": "127.0.0.1", "Port": 1,
                                                   "AllowEcho": True, "AllowStore": True}
        config["LuaScripts"] = [str(DEPLOY / "cxrlt-route.lua")]
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config.update({
            "Name": "cxrlt-test", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: self.password},
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "SaveJobs": False, "DicomScuTimeout": 10, "StableAge": 5, "ConcurrentJobs": 2,
        })
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = self.folder / "orthanc.log"
        self.start()

    def start(self) -> None:
        """Start Orthanc on its configuration (again, after :meth:`stop`: same ports, same storage)."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([orthanc_binary() or "Orthanc", str(self.config_path)],
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/system")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not answer in {timeout} s:\n{self.log()[-3000:]}")

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{self.password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._request(path, json.dumps(body).encode()))

    def file(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def instances(self, study_uid: str, modality: str | None = None) -> list[dict[str, Any]]:
        """The study's instances (Orthanc's expanded records), those of series with ``modality`` if given."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        if not found:
            return []
        instances = []
        for series in self.get(f"/studies/{found[0]}/series"):
            if modality is None or series["MainDicomTags"].get("Modality") == modality:
                instances += self.get(f"/series/{series['ID']}/instances")
        return instances

    def stop(self) -> None:
        terminate(self.process)
        self._log.close()


def terminate(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a process we started (by its PID), SIGKILL it if it has not ended within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
