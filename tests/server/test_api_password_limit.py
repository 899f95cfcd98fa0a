# SPDX-License-Identifier: Apache-2.0
"""Finding 5 over HTTP, as the attacker of the review: wrong passwords from one client lock out
that client (429 ``rate_limited``, for any name), not the owner logging in from another address;
and an unknown name is answered exactly like a known one, before and after its budget is spent
(no user enumeration). The client address is the TCP peer (``TestClient(client=...)``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apikit import PASSWORD, Api, api_db_url_fixture, api_fixture  # noqa: F401
from fastapi.testclient import TestClient

from relay.dpop import DpopAuth
from server.config import Policy


@pytest.fixture
def attacker(api: Api) -> Iterator[TestClient]:
    """The same app, reached from another address."""
    with TestClient(api.client.app, client=("203.0.113.66", 40000)) as client:
        yield client


def test_one_clients_failures_do_not_lock_the_owner_out(api: Api, attacker: TestClient) -> None:
    user = api.user()
    budget = Policy().login_address_failures
    for _ in range(budget):
        r = attacker.post("/csc/v1/auth/login", json={}, auth=(user.name, "wrong password"))
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), r.text
    for name in (user.name, "nobody-at-all"):  # the attacker's address is spent, any name
        r = attacker.post("/csc/v1/auth/login", json={}, auth=(name, PASSWORD))
        assert (r.status_code, r.json()["error"]) == (429, "rate_limited"), r.text
    # The owner, from their own address, with the right password: in.
    r = api.client.post("/csc/v1/auth/login", json={}, auth=(user.name, PASSWORD))
    assert r.status_code == 200, r.text
    api.enroll_device(user)
    r = api.client.post(
        "/api/v1/auth/login",
        json={"username": user.name, "password": PASSWORD, "otp": user.otp()},
        auth=DpopAuth(user.device),
    )
    assert r.status_code == 200, r.text
    r = api.client.get("/api/v1/admin/users", headers=api.admin)
    me = next(u for u in r.json() if u["name"] == user.name)
    assert (me["login_failures"], me["login_locked"]) == (budget, False)


def test_unknown_and_known_names_get_the_same_answers(api: Api) -> None:
    user = api.user()
    answers = {}
    budget = Policy().login_address_failures
    for i, name in enumerate((user.name, "nobody-here")):
        with TestClient(api.client.app, client=(f"198.51.100.{i + 1}", 40000)) as client:
            seen = []
            for _ in range(budget + 1):
                r = client.post("/csc/v1/auth/login", json={}, auth=(name, "wrong password"))
                seen.append((r.status_code, r.json()))
            answers[name] = seen
    assert answers[user.name] == answers["nobody-here"]
    assert [status for status, _ in answers["nobody-here"]] == [401] * budget + [429]
