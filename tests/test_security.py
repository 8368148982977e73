"""TLS end to end, mutual TLS, and the admin APIs behind a key, against `cxrlt serve`.

The tests make their own certificate authorities (trustme): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from cxrlt.cli.commands.serve import ADMIN_KEY_ENV, admin_key
from cxrlt.client import ClientError, CxrltClient
from cxrlt.server import is_loopback

ADMIN_KEY = "test-admin-key-0123456789"
GRPC_ADMIN_HEADER = {"triton-grpc-protocol-admin-key": ADMIN_KEY}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    import trustme

    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("cxrlt-test-client")
    files = {
        "ca": folder / "ca.pem", "other_ca": folder / "other-ca.pem",
        "server_cert": folder / "server.pem", "server_key": folder / "server.key",
        "client_cert": folder / "client.pem", "client_key": folder / "client.key",
    }
    ca.cert_pem.write_to_path(files["ca"])
    other.cert_pem.write_to_path(files["other_ca"])
    files["server_cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(files["server_key"])
    files["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    client.private_key_pem.write_to_path(files["client_key"])
    return {k: str(v) for k, v in files.items()}


def _probabilities(client: CxrltClient, image) -> dict[str, float]:
    return client.classify(image, hint="PA").probabilities


@pytest.mark.timeout(600)
def test_tls_serves_the_same_answers_and_refuses_plaintext_and_strangers(serve, pki, url, real_cxr, cxrlt, tmp_path):
    server = serve("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], env={ADMIN_KEY_ENV: ADMIN_KEY})
    assert "(TLS)" in server.output
    with CxrltClient(url) as plain, CxrltClient(server.url, ssl=True, root_certificates=pki["ca"]) as tls:
        assert _probabilities(tls, real_cxr) == _probabilities(plain, real_cxr)

    with CxrltClient(server.url, retries=1, timeout_s=10) as plaintext:
        with pytest.raises(ClientError, match=server.url):
            plaintext.classify(real_cxr)
    with CxrltClient(server.url, ssl=True, root_certificates=pki["other_ca"], retries=1, timeout_s=10) as stranger:
        with pytest.raises(ClientError, match=server.url):
            stranger.classify(real_cxr)

    # The CLI and the health check connect the same way.
    out = tmp_path / "tls.json"
    from pydicom.data import get_testdata_file

    assert cxrlt("classify", get_testdata_file("RG1_UNCR.dcm"), "--url", server.url, "--root-certificates", pki["ca"],
                 "--format", "json", "--out", str(out)) == 0
    assert len(json.loads(out.read_text())[0]["probabilities"]) == 36
    assert cxrlt("health", "--url", server.url, "--root-certificates", pki["ca"]) == 0

    # Admin APIs want the key; inference, health and metadata do not.
    triton = grpcclient.InferenceServerClient(server.url, ssl=True, root_certificates=pki["ca"])
    for call in (triton.get_model_repository_index, triton.get_inference_statistics, triton.get_system_shared_memory_status):
        with pytest.raises(Exception, match="(?i)admin-key|unauthenticated|restricted|permission"):
            call()
        call(headers=GRPC_ADMIN_HEADER)
    assert triton.is_model_ready("cxr_findings") and triton.get_model_config("cxr_findings")
    http = f"http://127.0.0.1:{server.ports['http']}"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{http}/v2/models/stats", timeout=10)
    request = urllib.request.Request(f"{http}/v2/models/stats", headers={"admin-key": ADMIN_KEY})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    # The key never shows on `cxrlt serve`'s own command line.
    assert ADMIN_KEY not in " ".join(server.process.args)


@pytest.mark.timeout(600)
def test_mutual_tls_refuses_a_client_without_a_certificate(serve, pki, real_cxr):
    server = serve("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"])
    assert "(TLS) mutual" in server.output
    with CxrltClient(server.url, ssl=True, root_certificates=pki["ca"], private_key=pki["client_key"],
                     certificate_chain=pki["client_cert"]) as trusted:
        assert len(_probabilities(trusted, real_cxr)) == 36
    with CxrltClient(server.url, ssl=True, root_certificates=pki["ca"], retries=1, timeout_s=10) as anonymous:
        with pytest.raises(ClientError, match=server.url):
            anonymous.classify(real_cxr)


def _args(tmp_path, host: str, key_file=None) -> argparse.Namespace:
    return argparse.Namespace(host=host, grpc_port=18001, admin_key_file=key_file)


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str, **_kwargs) -> None:
        self.lines.append(text)


def test_admin_apis_are_guarded_off_loopback_with_a_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    console = _Console()
    assert admin_key(_args(tmp_path, "127.0.0.1"), console) is None  # loopback: open unless asked
    generated = admin_key(_args(tmp_path, "0.0.0.0"), console)
    key_file = tmp_path / "cache" / "cxrlt" / "admin-key-18001"
    assert generated and key_file.read_text().strip() == generated
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and str(key_file) in console.lines[-1]
    assert generated not in " ".join(console.lines)  # the key itself is never printed
    given = tmp_path / "key"
    given.write_text("from-a-file\n")
    assert admin_key(_args(tmp_path, "0.0.0.0", given), console) == "from-a-file"
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-the-environment")
    assert admin_key(_args(tmp_path, "127.0.0.1"), console) == "from-the-environment"
    given.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        admin_key(_args(tmp_path, "127.0.0.1", given), console)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert os.environ[ADMIN_KEY_ENV] == "from-the-environment"
