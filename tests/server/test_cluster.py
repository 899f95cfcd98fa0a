# SPDX-License-Identifier: Apache-2.0
"""Acceptance of issue 12: one deployment on several server nodes, with real components only.

A private PostgreSQL cluster; a network HSM (``p11-kit server`` exporting a SoftHSM2 token on a
socket, which both nodes load through ``p11-kit-client.so``); node A set up with ``server
init`` (two workers), node B added with ``server join``; HAProxy with the project's example
configuration in front of both. Clients open a connection per request, so HAProxy spreads their
requests over both nodes.

The tests run in file order and share the deployment; the last one kills node B.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import P11KIT_CLIENT, LoadBalancer, NetworkHsm
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from live_server import (
    LiveServer,
    ca_context,
    cardbridge,
    credential_for,
    enroll_user,
    free_port,
    set_policy,
    start_server,
    wait_until,
)
from pgcluster import PgCluster
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from test_pyhanko_csc import PASSWORD as PDF_PASSWORD
from test_pyhanko_csc import sign_and_validate

from server.db import make_engine
from server.models import Credential, Sad

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

PASSWORD = "several nodes, one deployment"
SHA256 = "2.16.840.1.101.3.4.2.1"
ECDSA_SHA256 = "1.2.840.10045.4.3.2"
NODES = ("node-a", "node-b")


@dataclass
class Cluster:
    base: Path
    pg: PgCluster
    db_url: str
    hsm: NetworkHsm
    nodes: dict[str, LiveServer]
    lb: LoadBalancer

    def hsm_args(self, hsm: NetworkHsm | None = None) -> list[str]:
        """``--hsm-module`` and ``--hsm-pin-file`` for a node that reaches ``hsm``."""
        return ["--hsm-module", P11KIT_CLIENT, "--hsm-pin-file", str((hsm or self.hsm).pin_file)]

    def admin(self, *args: str, server: str | None = None, input: str | None = None) -> Any:
        """``cardbridge admin`` through the load balancer (or ``server``), with the deployment's
        admin token (made by node A's ``server init``)."""
        token = (self.base / "node-a" / "admin-token").read_text().strip()
        ca = self.base / "node-a" / "ca.pem"
        return cardbridge("admin", "--server", server or self.lb.url, "--token", token,
                          "--ca", ca, *args, input=input)  # fmt: skip

    def enroll(self, name: str, *, through: str) -> dict[str, Any]:
        """Add and enroll ``name`` through the node called ``through``; ``enroll --json``."""
        url = self.nodes[through].url
        self.admin("user", "add", name, "--password-stdin", server=url, input=PASSWORD + "\n")
        result: dict[str, Any] = json.loads(
            self.admin("enroll", name, "--alg", "p256", "--json", server=url).stdout
        )
        return result

    def sign_records(self) -> list[dict[str, Any]]:
        records = json.loads(self.admin("audit", "export", "--json").stdout)
        return [r for r in records if r["event"] == "sign"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    pg = PgCluster()
    pg.start()
    hsm = NetworkHsm(base / "hsm")
    nodes: dict[str, LiveServer] = {}
    ports = {name: free_port() for name in NODES}
    lb = LoadBalancer(
        base, f"127.0.0.1:{ports['node-a']}", f"127.0.0.1:{ports['node-b']}", base / "node-a"
    )
    try:
        hsm.start()
        db_url = pg.create_database()
        c = Cluster(base, pg, db_url, hsm, nodes, lb)
        common = [*c.hsm_args(), "--public-url", lb.url]
        cardbridge("server", "init", "--data", base / "node-a", "--db", db_url, *common,
                   "--token-label", hsm.label, "--node-name", "node-a",
                   env=hsm.client_env, timeout=300)  # fmt: skip
        joined = cardbridge("server", "join", "--data", base / "node-b", "--db", db_url, *common,
                            "--node-name", "node-b", env=hsm.client_env, timeout=300)  # fmt: skip
        assert "admin-token" not in joined.stdout and "tls" in joined.stdout
        for name in NODES:  # the signing loops authorize many times a minute: PIN alone
            set_policy(base / name, csc_authorize_otp=False)
        for name, workers in (("node-a", 2), ("node-b", 1)):
            nodes[name] = start_server(
                base / name, port=ports[name], workers=workers, env=hsm.client_env
            )
        lb.start()
        yield c
    finally:
        for node in nodes.values():
            node.stop()
        lb.stop()
        hsm.stop()
        pg.stop()


# -- helpers ---------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def csc_login(http: httpx.Client, user: str) -> dict[str, str]:
    resp = http.post("/csc/v2/auth/login", json={}, auth=(user, PASSWORD))
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


AUTHORIZE, SIGN = "/csc/v2/credentials/authorize", "/csc/v2/signatures/signHash"


def authorize_body(cred: str, pin: str, d: bytes) -> dict[str, Any]:
    return {"credentialID": cred, "numSignatures": 1, "hashes": [b64(d)],
            "hashAlgorithmOID": SHA256, "PIN": pin}  # fmt: skip


def sign_body(cred: str, sad: str, d: bytes) -> dict[str, Any]:
    return {"credentialID": cred, "SAD": sad, "hashes": [b64(d)], "signAlgo": ECDSA_SHA256}


def authorize(
    http: httpx.Client, headers: dict[str, str], cred: str, pin: str, d: bytes
) -> httpx.Response:
    return http.post(AUTHORIZE, json=authorize_body(cred, pin, d), headers=headers)


def sign(
    http: httpx.Client, headers: dict[str, str], cred: str, sad: str, d: bytes
) -> httpx.Response:
    return http.post(SIGN, json=sign_body(cred, sad, d), headers=headers)


def public_key(http: httpx.Client, headers: dict[str, str], cred: str) -> ec.EllipticCurvePublicKey:
    r = http.post("/csc/v2/credentials/info", json={"credentialID": cred, "certificates": "single"},
                  headers=headers)  # fmt: skip
    assert r.status_code == 200, r.text
    cert = x509.load_der_x509_certificate(base64.b64decode(r.json()["cert"]["certificates"][0]))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def readiness(node: LiveServer) -> int:
    return node.http.get("/readyz").status_code


def backend_errors(cluster: Cluster, backend: str) -> float:
    """``cardbridge_backend_errors_total`` of ``backend`` answered 503, over both nodes, read
    with each node's own metrics token (no database needed: it answers during an outage)."""
    total = 0.0
    for node in cluster.nodes.values():
        token = (node.data / "metrics-token").read_text().strip()
        r = node.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        for family in text_string_to_metric_families(r.text):
            total += sum(s.value for s in family.samples
                         if s.name == "cardbridge_backend_errors_total"
                         and s.labels == {"backend": backend, "error": "temporarily_unavailable"})
    return total


def assert_unavailable(resp: httpx.Response) -> None:
    """A 503 as the issue asks for it: ``temporarily_unavailable`` with ``Retry-After``."""
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable", resp.text
    assert int(resp.headers["Retry-After"]) >= 1


def assert_clean_logs(cluster: Cluster) -> None:
    """Outages are logged as one line each: no traceback, no unexpected error."""
    for name, node in cluster.nodes.items():
        log = node.log()
        assert "Traceback" not in log and "unexpected error" not in log, (name, log[-3000:])


@dataclass
class Answer:
    started: float
    step: str
    status: int
    """HTTP status, or 0 for a transport error (the connection broke)."""
    error: str | None = None
    retry_after: str | None = None


@dataclass
class Signed:
    started: float
    request_id: str
    digest: bytes


class SigningLoop(threading.Thread):
    """Authorize and sign one digest after another through the load balancer until stopped,
    recording every answer. A signHash whose connection broke is sent again with the same SAD
    (through another node), as a client that never saw the answer would."""

    def __init__(self, cluster: Cluster, enrollment: dict[str, Any], tag: str) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(
            base_url=cluster.lb.url, verify=ca_context(cluster.lb.data), timeout=30,
            limits=httpx.Limits(max_keepalive_connections=0),
        )  # fmt: skip
        self.headers = csc_login(self.http, enrollment["user"])
        self.cred = credential_for(enrollment, "9c")
        self.pin = enrollment["pin"]
        self.tag = tag
        self.answers: list[Answer] = []
        self.signed: list[Signed] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            d = digest(f"{self.tag} {n}")
            started = time.monotonic()
            auth = self._post("authorize", AUTHORIZE, authorize_body(self.cred, self.pin, d))
            if auth is None or auth.status_code != 200:
                time.sleep(0.2)
                continue
            body = sign_body(self.cred, auth.json()["SAD"], d)
            for _ in range(2):
                signed = self._post("sign", SIGN, body)
                if signed is not None:
                    break
            if signed is not None and signed.status_code == 200:
                self.signed.append(Signed(started, signed.headers["X-Request-Id"], d))
            else:
                time.sleep(0.2)

    def _post(self, step: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        started = time.monotonic()
        try:
            resp = self.http.post(path, json=body, headers=self.headers)
        except httpx.TransportError:
            self.answers.append(Answer(started, step, 0))
            return None
        error = resp.json().get("error") if resp.status_code != 200 else None
        self.answers.append(
            Answer(started, step, resp.status_code, error, resp.headers.get("Retry-After"))
        )
        return resp

    def signed_since(self, t: float) -> int:
        return sum(1 for s in self.signed if s.started > t)

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
        self.http.close()


@dataclass
class Loops:
    """Signing loops of one user each, started together."""

    loops: list[SigningLoop] = field(default_factory=list)

    def start(self, cluster: Cluster, name: str, count: int = 1) -> Loops:
        for i in range(count):
            enrollment = enroll_user(cluster.nodes["node-a"], f"{name}{i}", PASSWORD, alg="p256")
            self.loops.append(SigningLoop(cluster, enrollment, f"{name}{i}"))
        for loop in self.loops:
            loop.start()
        return self

    @property
    def answers(self) -> list[Answer]:
        return [a for loop in self.loops for a in loop.answers]

    @property
    def signed(self) -> list[Signed]:
        return [s for loop in self.loops for s in loop.signed]

    def signed_since(self, t: float) -> int:
        return sum(loop.signed_since(t) for loop in self.loops)

    def finish(self) -> None:
        for loop in self.loops:
            loop.finish()


# -- the deployment --------------------------------------------------------------------------


def test_init_on_a_database_that_holds_a_deployment_refuses_and_names_join(
    cluster: Cluster,
) -> None:
    before = cluster.admin("audit", "export", "--json").stdout
    forked = cluster.base / "forked"
    res = cardbridge("server", "init", "--data", forked, "--db", cluster.db_url,
                     *cluster.hsm_args(), "--token-label", cluster.hsm.label,
                     env=cluster.hsm.client_env, check=False)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "cardbridge server join" in res.stderr
    assert not forked.exists()
    # Nothing was recorded: no second CA, no second admin token.
    assert cluster.admin("audit", "export", "--json").stdout == before


def test_a_token_without_the_ca_key_can_neither_join_nor_serve(
    cluster: Cluster, tmp_path: Path
) -> None:
    other = NetworkHsm(tmp_path / "other-hsm", label=cluster.hsm.label)
    other.start()
    try:
        res = cardbridge("server", "join", "--data", tmp_path / "node-c", "--db",
                         cluster.db_url, *cluster.hsm_args(other), env=other.client_env,
                         check=False)  # fmt: skip
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "does not hold the deployment's CA key" in res.stderr
        assert not (tmp_path / "node-c").exists()

        # A joined node whose token is swapped for another refuses to start.
        swapped = tmp_path / "swapped"
        node_b = cluster.base / "node-b"
        swapped.mkdir(mode=0o700)
        for name in ("server.json", "ca.pem"):
            (swapped / name).write_bytes((node_b / name).read_bytes())
        settings = json.loads((swapped / "server.json").read_text())
        settings["hsm_pin_file"] = str(other.pin_file)
        (swapped / "server.json").write_text(json.dumps(settings))
        run = cardbridge("server", "run", "--data", swapped, "--bind",
                         f"127.0.0.1:{free_port()}", env=other.client_env, check=False,
                         timeout=60)  # fmt: skip
        assert run.returncode == 1
        assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1, run.stderr
        assert "does not hold the deployment's CA key" in run.stderr
    finally:
        other.stop()


@pytest.mark.parametrize("through", NODES)
def test_a_user_enrolled_on_one_node_signs_through_haproxy_on_both(
    cluster: Cluster, through: str
) -> None:
    name = f"carol-{through}"
    enrollment = cluster.enroll(name, through=through)
    cred = credential_for(enrollment, "9c")
    http = cluster.lb.http
    headers = csc_login(http, name)
    key = public_key(http, headers, cred)
    received: dict[str, bytes] = {}
    for i in range(6):
        d = digest(f"{name} {i}")
        auth = authorize(http, headers, cred, enrollment["pin"], d)
        assert auth.status_code == 200, auth.text
        signed = sign(http, headers, cred, auth.json()["SAD"], d)
        assert signed.status_code == 200, signed.text
        key.verify(base64.b64decode(signed.json()["signatures"][0]), d,
                   ec.ECDSA(Prehashed(hashes.SHA256())))  # fmt: skip
        received[signed.headers["X-Request-Id"]] = d
        if i % 2:  # one more request, so that authorize and signHash swap nodes each time
            assert http.get("/healthz").status_code == 200

    # Each signature the client received is in the audit log: node, request, SAD, digest.
    records = {r["details"].get("request"): r["details"] for r in cluster.sign_records()}
    for request_id, d in received.items():
        details = records[request_id]
        assert details["digests"] == [b64(d)] and details["count"] == 1
        assert details["node"] in NODES and isinstance(details["sad"], int)
    assert {records[rid]["node"] for rid in received} == set(NODES)
    assert "OK" in cluster.admin("audit", "verify").stdout


def test_pyhanko_signs_through_haproxy(cluster: Cluster) -> None:
    enrollment = enroll_user(cluster.nodes["node-a"], "pdf-lb", PDF_PASSWORD, alg="p256",
                             otp_per_signature=True)  # fmt: skip
    before = {r["details"].get("request") for r in cluster.sign_records()}
    status, auth, _ = asyncio.run(
        sign_and_validate(cluster.lb, enrollment, prefer_pss=False, connection_per_request=True)
    )
    assert auth.authorizations == 1
    assert status.bottom_line, status.pretty_print_details()
    new = [r for r in cluster.sign_records() if r["details"].get("request") not in before]
    assert len(new) == 1 and new[0]["details"]["node"] in NODES


# -- outages ---------------------------------------------------------------------------------


def test_postgresql_restart_under_a_signing_loop(cluster: Cluster) -> None:
    lb, nodes = cluster.lb, cluster.nodes.values()
    loops = Loops().start(cluster, "pg-loop")
    try:
        wait_until(lambda: len(loops.signed) >= 3, "the loop signs")
        since = lb.log_size()
        down_at = time.monotonic()
        cluster.pg.stop_server()
        wait_until(lambda: all(readiness(n) == 503 for n in nodes), "readiness fails")
        for name in NODES:
            lb.wait_for_log(f"{name} is DOWN", since=since)
        wait_until(lambda: sum(a.started > down_at and a.status == 503 for a in loops.answers)
                   >= 2, "the loop sees the outage")  # fmt: skip
        # Scraped while the database is down; an answer is counted once sent, so poll.
        wait_until(lambda: backend_errors(cluster, "database") >= 2, "the outage is counted")
        since = lb.log_size()
        cluster.pg.start_server()
        up_at = time.monotonic()
        wait_until(lambda: all(readiness(n) == 200 for n in nodes), "readiness recovers")
        for name in NODES:
            lb.wait_for_log(f"{name} is UP", since=since)
        wait_until(lambda: loops.signed_since(up_at) >= 4, "the loop signs again", timeout=60)
    finally:
        loops.finish()

    answers = loops.answers
    assert {a.status for a in answers} <= {200, 503}, [a for a in answers if a.status not in
                                                       (200, 503)]  # fmt: skip
    outage = [a for a in answers if a.status == 503]
    assert outage and all(
        a.error == "temporarily_unavailable" and a.retry_after is not None and
        int(a.retry_after) >= 1 for a in outage
    )  # fmt: skip
    assert all(a.status == 200 for a in answers if a.started > up_at)
    assert "OK" in cluster.admin("audit", "verify").stdout
    assert_clean_logs(cluster)
    assert any("temporarily_unavailable" in n.log() for n in nodes)


def test_network_hsm_restart_answers_503_then_recovers(cluster: Cluster) -> None:
    enrollment = enroll_user(cluster.nodes["node-a"], "hsm-restart", PASSWORD, alg="p256")
    cred, pin = credential_for(enrollment, "9c"), enrollment["pin"]
    http = cluster.lb.http
    headers = csc_login(http, "hsm-restart")
    pids = {name: node.proc.pid for name, node in cluster.nodes.items()}

    def sign_once(n: int) -> httpx.Response:
        d = digest(f"hsm-restart {n}")
        auth = authorize(http, headers, cred, pin, d)
        if auth.status_code != 200:  # its audit record's MAC needs the HSM too
            return auth
        return sign(http, headers, cred, auth.json()["SAD"], d)

    assert sign_once(0).status_code == 200
    counted = backend_errors(cluster, "hsm")
    cluster.hsm.stop()
    try:
        for n in range(1, 5):  # through both nodes
            assert_unavailable(sign_once(n))
        for node in cluster.nodes.values():
            assert_unavailable(node.http.get("/readyz"))
        wait_until(lambda: backend_errors(cluster, "hsm") - counted >= 4 + len(cluster.nodes),
                   "every refusal is counted")  # each is counted once its answer is sent
    finally:
        cluster.hsm.start()

    # The nodes recover by themselves: a worker's first use of its lost session may still
    # answer 503, then every signature succeeds.
    statuses: list[int] = []
    for n in range(5, 40):
        resp = sign_once(n)
        statuses.append(resp.status_code)
        if resp.status_code == 503:
            assert_unavailable(resp)
        if statuses[-4:] == [200] * 4:
            break
    assert statuses[-4:] == [200] * 4 and set(statuses) <= {200, 503}, statuses
    wait_until(lambda: all(readiness(n) == 200 for n in cluster.nodes.values()), "ready again")
    assert {name: node.proc.pid for name, node in cluster.nodes.items()} == pids
    assert all(node.proc.poll() is None for node in cluster.nodes.values())
    assert_clean_logs(cluster)


def test_kill_9_of_a_node_mid_loop(cluster: Cluster) -> None:
    lb = cluster.lb
    loops = Loops().start(cluster, "kill-loop", count=2)
    try:
        wait_until(lambda: all(len(loop.signed) >= 2 for loop in loops.loops), "the loops sign")
        since = lb.log_size()
        killed_at = time.monotonic()
        cluster.nodes["node-b"].proc.kill()
        lb.wait_for_log("node-b is DOWN", since=since)
        out_at = time.monotonic()
        wait_until(lambda: loops.signed_since(out_at) >= 8, "the loops go on", timeout=60)
    finally:
        loops.finish()

    answers = loops.answers
    # Only requests in flight on node B when it died broke (one per loop at most); a signHash
    # sent again after its spend was committed on node B is refused as a replay, never signed
    # twice.
    broken = [a for a in answers if a.status == 0]
    assert len(broken) <= len(loops.loops), broken
    assert all(killed_at - 10 < a.started < out_at for a in broken), broken
    assert all(a.status == 200 or a.status == 0 or a.error == "invalid_request"
               for a in answers), answers  # fmt: skip
    assert all(a.status == 200 for a in answers if a.started > out_at + 1)

    # No SAD was spent twice, and every spend has exactly one audit record (and vice versa).
    records = cluster.sign_records()
    spends: dict[int, int] = {}
    for r in records:
        spends[r["details"]["sad"]] = spends.get(r["details"]["sad"], 0) + 1
    engine = make_engine(cluster.db_url)
    try:
        with engine.connect() as conn:
            sads = conn.execute(
                select(Sad.id, Sad.remaining).join(Credential).where(
                    Credential.user_id.in_(
                        select(Credential.user_id).where(
                            Credential.id.in_([loop.cred for loop in loops.loops])
                        )
                    )
                )
            ).all()
    finally:
        engine.dispose()
    assert sads
    for sad_id, remaining in sads:
        assert remaining in (0, 1)
        assert spends.get(sad_id, 0) == 1 - remaining, (sad_id, remaining)
    assert max(spends.values()) == 1
    by_request = {r["details"]["request"]: r["details"] for r in records}
    for s in loops.signed:
        assert by_request[s.request_id]["digests"] == [b64(s.digest)]
    assert any(by_request[s.request_id]["node"] == "node-a" for s in loops.signed
               if s.started > out_at)  # fmt: skip
    assert "OK" in cluster.admin("audit", "verify").stdout
