# SPDX-License-Identifier: Apache-2.0
"""``GET /metrics``: who may read it (the attacker's side first), and that what it counts is
what happened: requests by route template, signatures by endpoint, algorithm and outcome, PIN
blocks, database failures while the database is down. The real server with several workers
sums them over its processes (``test_workers_are_summed_in_one_scrape``); HSM failures are
counted in test_cluster.py, with a real network HSM stopped."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from apikit import Api, api_db_url_fixture, api_fixture, assert_error, b64  # noqa: F401
from fastapi.testclient import TestClient
from live_server import ca_context, enroll_user, init_data_dir, start_server, wait_until
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from test_api_csc import authorize, sign

from server.api.metrics import CONTENT_TYPE
from server.app import create_app
from server.db import make_engine, session_factory

SIGN_HASH = "/csc/v2/signatures/signHash"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition (parsed by prometheus-client's parser,
    so a malformed one fails here)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return parse(text).get((name, frozenset(labels.items())), 0.0)


def scrape(api: Api) -> str:
    r = api.client.get("/metrics", headers=api.metrics)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    return r.text


# -- who may read it ---------------------------------------------------------------------------


def test_metrics_answer_only_the_metrics_token_and_the_admin_token(api: Api) -> None:
    user = api.user()
    api.login(user)
    assert_error(api.client.get("/metrics"), 401, "unauthorized")
    assert_error(api.client.get("/metrics", headers={"Authorization": "Bearer guessed"}), 401)
    # The metrics token sent as a DPoP token, or under another scheme, is no credential.
    scheme, token = api.metrics["Authorization"].split(" ")
    assert_error(api.client.get("/metrics", headers={"Authorization": f"DPoP {token}"}), 401)
    assert_error(api.client.get("/metrics", headers={"Authorization": f"Basic {token}"}), 401)
    # A user's tokens are real credentials of the wrong kind: 403, whatever the session.
    assert_error(api.client.get("/metrics", headers=api.csc_login(user)), 403, "forbidden")
    assert_error(api.client.get("/metrics", auth=user.auth), 403, "forbidden")
    assert "cardbridge_http_requests_total" in scrape(api)
    r = api.client.get("/metrics", headers=api.admin)
    assert r.status_code == 200 and "cardbridge_http_requests_total" in r.text
    # The metrics token opens nothing else.
    assert_error(api.client.get("/api/v1/admin/users", headers=api.metrics), 401, "unauthorized")
    assert_error(api.client.get("/api/v1/admin/audit/export", headers=api.metrics), 401)


def test_a_node_without_a_metrics_token_serves_the_admin_token_only(api: Api) -> None:
    settings = api.settings.model_copy(update={"metrics_token_file": Path("/nonexistent/x")})
    app = create_app(settings, hsm=api.client.app.state.hsm,  # type: ignore[attr-defined]
                     sessions=api.sessions)  # fmt: skip
    with TestClient(app) as client:
        assert_error(client.get("/metrics", headers=api.metrics), 401)
        assert client.get("/metrics", headers=api.admin).status_code == 200


# -- what it counts ----------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_method_and_status(api: Api) -> None:
    user = api.user()
    api.login(user)
    assert api.verify_pin(user).status_code == 200
    cred = user.credentials["9a"]
    template = "/api/v1/credentials/{credential_id}/ecdsa"
    ok = {"endpoint": template, "method": "POST", "status": "200"}
    before = scrape(api)
    for i in range(3):
        d = hashlib.sha256(f"metrics {i}".encode()).digest()
        r = api.client.post(f"/api/v1/credentials/{cred}/ecdsa", json={"digest": b64(d)},
                            auth=user.auth)  # fmt: skip
        assert r.status_code == 200, r.text
    api.client.get("/no/such/path/for-metrics")
    api.client.delete("/healthz")
    after = scrape(api)

    counted = "cardbridge_http_requests_total"
    assert value(after, counted, **ok) - value(before, counted, **ok) == 3
    latency = "cardbridge_http_request_duration_seconds_count"
    timed = {"endpoint": template, "method": "POST"}
    assert value(after, latency, **timed) - value(before, latency, **timed) == 3
    assert value(after, counted, endpoint="unmatched", method="GET", status="404") >= 1
    assert value(after, counted, endpoint="/healthz", method="DELETE", status="405") >= 1
    # Never the raw path: no credential id, no path a client made up.
    assert cred not in after and "for-metrics" not in after
    buckets = [k for k in parse(after) if k[0].endswith("_bucket") and ("endpoint", template)
               in k[1]]  # fmt: skip
    assert len(buckets) >= 10


def test_signatures_by_endpoint_algorithm_and_outcome(api: Api) -> None:
    user = api.user(alg="p256")
    h = api.csc_login(user, "v2")
    digests = [hashlib.sha256(f"batch {i}".encode()).digest() for i in range(3)]
    auth = authorize(api, user, h, digests)
    assert auth.status_code == 200, auth.text
    sad = auth.json()["SAD"]
    sigs = "cardbridge_signatures_total"
    ok = {"endpoint": SIGN_HASH, "algorithm": "p256", "outcome": "ok"}
    replayed = {**ok, "outcome": "invalid_request"}
    before = scrape(api)
    assert sign(api, user, h, sad, digests, version="v2").status_code == 200
    assert_error(sign(api, user, h, sad, digests, version="v2"), 400, "invalid_request")
    after = scrape(api)
    assert value(after, sigs, **ok) - value(before, sigs, **ok) == 3  # a batch counts each
    assert value(after, sigs, **replayed) - value(before, sigs, **replayed) == 3

    # /api/v1: a signature without the PIN verified is counted with its refusal.
    api.login(user)
    piv = {"endpoint": "/api/v1/credentials/{credential_id}/ecdsa", "algorithm": "p256"}
    d = b64(digests[0])
    url = f"/api/v1/credentials/{user.credentials['9a']}/ecdsa"
    before = scrape(api)
    assert_error(api.client.post(url, json={"digest": d}, auth=user.auth), 403, "pin_required")
    assert api.verify_pin(user).status_code == 200
    assert api.client.post(url, json={"digest": d}, auth=user.auth).status_code == 200
    after = scrape(api)
    for outcome in ("pin_required", "ok"):
        assert value(after, sigs, **piv, outcome=outcome) - value(
            before, sigs, **piv, outcome=outcome) == 1  # fmt: skip
    # A decryption is not a signature.
    assert not [k for k in parse(after) if k[0] == sigs and ("outcome", "ok") in k[1]
                and any(v.endswith("/decrypt") for _, v in k[1])]  # fmt: skip


def test_a_pin_block_is_counted_once(api: Api) -> None:
    user = api.user()
    api.login(user)
    blocks = "cardbridge_pin_blocks_total"
    before = value(scrape(api), blocks, secret="pin")
    statuses = [api.verify_pin(user, "00000000").status_code for _ in range(4)]
    assert statuses == [400, 400, 400, 403]  # the third wrong PIN blocks; the fourth is refused
    assert value(scrape(api), blocks, secret="pin") - before == 1


def test_a_scrape_answers_while_the_database_is_down_and_counts_it(api: Api) -> None:
    down = make_engine("postgresql://nobody@/cardbridge?host=/nonexistent&port=1")
    app = create_app(api.settings, hsm=api.client.app.state.hsm,  # type: ignore[attr-defined]
                     sessions=session_factory(down))  # fmt: skip
    failed = {"backend": "database", "error": "temporarily_unavailable"}
    try:
        with TestClient(app) as client:
            before = client.get("/metrics", headers=api.metrics)
            assert before.status_code == 200, before.text
            assert client.get("/api/v1/admin/users", headers=api.admin).status_code == 503
            assert client.get("/readyz").status_code == 503
            after = client.get("/metrics", headers=api.metrics).text
            # The admin token needs the database to be checked; the metrics token does not.
            assert client.get("/metrics", headers=api.admin).status_code == 503
    finally:
        down.dispose()
    name = "cardbridge_backend_errors_total"
    assert value(after, name, **failed) - value(before.text, name, **failed) == 2


# -- the real server, several workers ---------------------------------------------------------


def _workers(pid: int) -> list[int]:
    """The uvicorn worker processes of the server ``pid`` (not multiprocessing's helpers)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _healthz_count(path: Path) -> float:
    """What one worker's file holds for ``GET /healthz`` answered 200."""
    labels = {"endpoint": "/healthz", "method": "GET", "status": "200"}
    return sum(
        v for key, v, _, _ in MmapedDict.read_all_values_from_file(str(path))
        if json.loads(key)[1] == "cardbridge_http_requests_total" and json.loads(key)[2] == labels
    )


def _metrics_dir(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    found = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert found, "a worker without PROMETHEUS_MULTIPROC_DIR"
    return Path(os.fsdecode(found[0]))


@pytest.mark.hsm
@pytest.mark.slow
def test_workers_are_summed_in_one_scrape(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_data_dir(data)
    assert (data / "metrics-token").stat().st_mode & 0o777 == 0o600
    server = start_server(data, workers=2)
    try:
        token = (data / "metrics-token").read_text().strip()
        user = enroll_user(server, "scraped", "metrics password", alg="p256")
        workers = _workers(server.proc.pid)
        assert len(workers) == 2
        directory = _metrics_dir(workers[0])
        assert directory.stat().st_mode & 0o777 == 0o700
        assert _metrics_dir(workers[1]) == directory

        # The attacker's side, over HTTPS: no token, a user's token.
        with httpx.Client(base_url=server.url, verify=ca_context(data)) as anonymous:
            assert anonymous.get("/metrics").status_code == 401
            login = anonymous.post("/csc/v2/auth/login", json={},
                                   auth=(user["user"], "metrics password"))  # fmt: skip
            user_token = {"Authorization": f"Bearer {login.json()['access_token']}"}
            r = anonymous.get("/metrics", headers=user_token)
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            assert "cardbridge" not in r.text

        # Requests on fresh connections from several threads, so both workers serve some.
        requests = 200

        def hit(n: int) -> None:
            with httpx.Client(base_url=server.url, verify=ca_context(data),
                              limits=httpx.Limits(max_keepalive_connections=0)) as c:  # fmt: skip
                for _ in range(n):
                    assert c.get("/healthz").status_code == 200

        threads = [threading.Thread(target=hit, args=(requests // 8,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Each worker counted some of them in its own file (a request is counted once its
        # answer is sent, so the last ones may still be on their way)...
        healthz = {"endpoint": "/healthz", "method": "GET", "status": "200"}

        def counted() -> dict[int, float]:
            return {pid: _healthz_count(directory / f"counter_{pid}.db") for pid in workers}

        wait_until(lambda: sum(counted().values()) >= requests, "every request is counted")
        served = counted()
        assert all(n > 0 for n in served.values()), served
        total = sum(served.values())
        assert total >= requests
        # ...and whichever worker answers a scrape, it shows their sum.
        scraped = {"Authorization": f"Bearer {token}"}
        for _ in range(6):
            with httpx.Client(base_url=server.url, verify=ca_context(data)) as c:
                text = c.get("/metrics", headers=scraped).text
            assert value(text, "cardbridge_http_requests_total", **healthz) == total
            assert value(text, "cardbridge_http_request_duration_seconds_count",
                         endpoint="/healthz", method="GET") == total  # fmt: skip
    finally:
        assert server.stop() == 0
    assert not directory.exists()  # removed with the server
