# SPDX-License-Identifier: Apache-2.0
"""Wrong passwords are rate limited over HTTP too (DESIGN.md rule 6): 401 until the user's
failure budget is spent, then 429 ``rate_limited`` even for the right password."""

from __future__ import annotations

from apikit import PASSWORD, Api, api_db_url_fixture, api_fixture  # noqa: F401

from relay.dpop import DpopAuth
from server.config import Policy


def test_wrong_passwords_end_in_429_even_for_the_right_one(api: Api) -> None:
    user = api.user()
    budget = Policy().otp_max_failures
    for _ in range(budget):
        r = api.client.post("/csc/v1/auth/login", json={}, auth=(user.name, "wrong password"))
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), r.text
    r = api.client.post("/csc/v1/auth/login", json={}, auth=(user.name, PASSWORD))
    assert (r.status_code, r.json()["error"]) == (429, "rate_limited"), r.text
    api.enroll_device(user)
    r = api.client.post(
        "/api/v1/auth/login",
        json={"username": user.name, "password": PASSWORD, "otp": user.otp()},
        auth=DpopAuth(user.device),
    )
    assert (r.status_code, r.json()["error"]) == (429, "rate_limited"), r.text
    r = api.client.post("/csc/v1/auth/login", json={}, auth=("nobody", "wrong password"))
    assert r.status_code == 401, r.text  # unknown names are never told apart by a 429
