# SPDX-License-Identifier: Apache-2.0
"""One node's life, outside a cluster: a copied data directory uses its own files, a node whose
token lacks the deployment's CA key refuses to start, and SIGTERM stops a node at once while a
request in flight finishes. (Several nodes: test_cluster.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi.testclient import TestClient
from hsm_fixtures import HsmToken
from live_server import (
    ca_context,
    cardbridge,
    enroll_user,
    free_port,
    init_data_dir,
    start_server,
)

from server import ca
from server.app import create_app
from server.config import Settings
from server.errors import Conflict
from server.hsm import Hsm, KeyAlg

pytestmark = [pytest.mark.hsm]

PASSWORD = "one node, many lives"


@pytest.mark.slow
def test_a_copied_data_directory_uses_its_own_files(tmp_path: Path) -> None:
    original = tmp_path / "original"
    init_data_dir(original)
    raw = json.loads((original / "server.json").read_text())
    assert raw["db_url"] == "sqlite:///cardbridge.db"
    assert (raw["tls_cert"], raw["ca_cert"], raw["softhsm_conf"]) == (
        "tls/server.pem", "ca.pem", "softhsm2.conf"
    )  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # anything that still points there fails

    server = start_server(copy)
    try:
        enroll_user(server, "copied", PASSWORD, alg="p256")  # the copy's database, token, CA
        assert "OK" in server.admin("audit", "verify").stdout
        served = ssl.get_server_certificate(("127.0.0.1", server.port))
    finally:
        assert server.stop() == 0
    own = x509.load_pem_x509_certificates((copy / "tls" / "server.pem").read_bytes())[0]
    assert x509.load_pem_x509_certificate(served.encode()) == own
    assert f"directories.tokendir = {copy / 'tokens'}" in (copy / "softhsm2.conf").read_text()


def test_server_run_refuses_a_token_without_the_ca_key_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_data_dir(data)
    raw = json.loads((data / "server.json").read_text())
    raw["ca_key_id"] = "00" * 16  # no such key on the data directory's token
    (data / "server.json").write_text(json.dumps(raw))
    res = cardbridge("server", "run", "--data", data, "--bind", f"127.0.0.1:{free_port()}",
                     check=False, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "does not hold the deployment's CA key" in res.stderr


def test_the_app_refuses_to_start_when_the_ca_key_is_another_key(
    hsm: Hsm, hsm_token: HsmToken, tmp_path: Path
) -> None:
    """The lifespan's check (each worker of ``server run``): the key named as the CA's must be
    the key of the CA certificate."""
    ca_ref, ca_cert = ca.create_ca(hsm, f"refusing CA {tmp_path.name}")
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    (tmp_path / "hsm-pin").write_text(hsm_token.pin)
    other = hsm.generate_key(KeyAlg.P256, f"not-the-ca-{tmp_path.name}")
    settings = Settings.for_data_dir(
        tmp_path, hsm_module=hsm_token.module, token_label=hsm_token.label,
        ca_key_id=other.key_id, ca_key_alg=str(other.alg),
    )  # fmt: skip
    with pytest.raises(Conflict, match="does not hold the deployment's CA key"):
        with TestClient(create_app(settings)):
            pass
    settings.ca_key_id = ca_ref.key_id
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200


@pytest.fixture
def idle_and_slow(tmp_path: Path) -> Iterator[tuple[Path, httpx.Client, httpx.Client]]:
    data = tmp_path / "data"
    init_data_dir(data)
    clients = [httpx.Client(verify=ca_context(data), timeout=30) for _ in range(2)]
    yield data, clients[0], clients[1]
    for client in clients:
        client.close()


@pytest.mark.slow
def test_sigterm_stops_at_once_and_lets_a_request_in_flight_finish(
    idle_and_slow: tuple[Path, httpx.Client, httpx.Client],
) -> None:
    data, idle, slow = idle_and_slow
    server = start_server(data)
    assert idle.get(f"{server.url}/healthz").status_code == 200  # now an idle keep-alive
    first_part = threading.Event()

    def body() -> Iterator[bytes]:
        yield b'{"lang": '
        first_part.set()
        time.sleep(1.0)  # the SIGTERM arrives meanwhile
        yield b'"en-US"}'

    answers: list[httpx.Response] = []
    in_flight = threading.Thread(target=lambda: answers.append(slow.post(
        f"{server.url}/csc/v2/info", content=body(), headers={"Content-Type": "application/json"}
    )))  # fmt: skip
    in_flight.start()
    assert first_part.wait(10)
    time.sleep(0.2)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    status = server.proc.wait(30)
    stopped_after = time.monotonic() - signalled
    in_flight.join(30)
    server.stop()

    assert status == 0, server.log()
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].headers["connection"] == "close"
    # It waited for the request in flight (about 0.8 s more), not for the idle connection.
    assert 0.5 < stopped_after < 3, (stopped_after, server.log())
