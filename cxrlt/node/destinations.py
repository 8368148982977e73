"""Where the node sends its SRs: a DICOM AE by C-STORE, or a DICOMweb server by STOW-RS.

``send(sr)`` returns when the destination has accepted the SR and raises
:class:`DestinationError` otherwise; every failure is worth retrying later (the destination
is down, busy or refused for now), so the spooled image is kept until a send succeeds.
Both are blocking: the node calls them in worker threads.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from pydicom.dataset import Dataset

__all__ = ["DestinationError", "AeAddress", "parse_ae_address", "CStoreDestination", "StowDestination"]

# C-STORE statuses that mean "stored": success, and the warnings (coercion, elements discarded).
STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)


class DestinationError(RuntimeError):
    """The destination did not accept the SR (unreachable, refused the association, or a failure status)."""


@dataclasses.dataclass(frozen=True)
class AeAddress:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_ae_address(text: str) -> AeAddress:
    """``AE@HOST:PORT`` (``AE@[::1]:PORT`` for IPv6) -> AeAddress; ValueError naming the problem."""
    match = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:@\[\]]+):(\d{1,5})", text.strip())
    if not match or not match.group(1).strip() or not 0 < int(match.group(3)) < 65536:
        raise ValueError(f"{text!r} is not AE@HOST:PORT (an AE title of at most 16 characters, e.g. PACS@10.0.0.5:104)")
    return AeAddress(match.group(1).strip(), match.group(2).strip("[]"), int(match.group(3)))


class CStoreDestination:
    """A DICOM Storage SCP (the PACS) reached by C-STORE with our AE title as the calling AE."""

    def __init__(self, address: AeAddress, calling_ae_title: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"C-STORE {self.address}"

    def send(self, sr: Dataset) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        syntax = sr.file_meta.TransferSyntaxUID
        ae.add_requested_context(sr.SOPClassUID, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        association = ae.associate(self.address.host, self.address.port, ae_title=self.address.ae_title)
        if not association.is_established:
            why = "rejected the association" if association.is_rejected else "could not be reached"
            raise DestinationError(f"{self.address} {why}")
        try:
            status = association.send_c_store(sr)
        finally:
            if association.is_established:
                association.release()
        if "Status" not in status:
            raise DestinationError(f"{self.address} sent no C-STORE response (association aborted or timed out)")
        if int(status.Status) not in STORED_STATUSES:
            comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
            raise DestinationError(f"{self.address} refused the SR: C-STORE status 0x{int(status.Status):04X}{comment}")


class StowDestination:
    """A DICOMweb server's STOW-RS endpoint (the service root, e.g. http://pacs:8042/dicom-web)."""

    def __init__(self, url: str, credentials_file: Path | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.credentials_file = credentials_file
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"

    def client(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.request = functools.partial(session.request, timeout=self.timeout_s)  # type: ignore[method-assign]
        if self.credentials_file is not None:  # "user:password" in a file: never on the command line
            user, _, password = self.credentials_file.read_text().strip().partition(":")
            session.auth = (user, password)
        return DICOMwebClient(url=self.url, session=session)

    def send(self, sr: Dataset) -> None:
        import requests

        try:
            response = self.client().store_instances([sr])
        except requests.RequestException as exc:
            raise DestinationError(f"{self.url} did not accept the SR: {exc}") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "unknown")
            raise DestinationError(f"{self.url} refused the SR (FailureReason {reason})")
