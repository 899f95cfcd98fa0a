# SPDX-License-Identifier: Apache-2.0
"""Nothing blocks the event loop (DESIGN.md, "How code is laid out"): while an HSM call (or an
argon2id check) of one request is stuck, ``/healthz`` still answers, and the stuck request
finishes once it is released.

No timing is measured: the slow call waits for the test's signal, and the test sends that
signal only after ``/healthz`` answered. Were the call on the event loop, ``/healthz`` could
not answer before the signal (whose wait gives up after ``STUCK`` seconds) and the stuck
request would be done first.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from apikit import PASSWORD, Api, api_db_url_fixture, api_fixture, b64  # noqa: F401

from server.app import create_app
from server.services import users

STUCK = 10.0


class Gate:
    """Where a slow call waits: ``entered`` once it is stuck, ``open`` releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def stuck(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            self.open.wait(STUCK)
            return call(*args, **kwargs)

        return stuck


class SlowHsm:
    """The test's HSM, with signatures that wait at a gate."""

    def __init__(self, hsm: Any, gate: Gate) -> None:
        self._hsm = hsm
        self.sign_digest = gate.wrap(hsm.sign_digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)


async def _while_stuck(app: Any, request: Callable[[httpx.AsyncClient], Any], gate: Gate) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        slow = asyncio.create_task(request(client))
        assert await asyncio.to_thread(gate.entered.wait, STUCK), "the slow call never started"
        health = await client.get("/healthz")
        assert health.json() == {"status": "ok"}
        assert not slow.done(), "/healthz answered only after the stuck request"
        gate.open.set()
        response = await slow
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["csc", "piv"])
def test_health_answers_while_an_hsm_call_is_stuck(api: Api, path: str) -> None:
    gate = Gate()
    hsm = api.client.app.state.hsm  # type: ignore[attr-defined]
    app = create_app(api.settings, hsm=SlowHsm(hsm, gate), sessions=api.sessions)
    user = api.user(alg="p256", prefix=f"loop-{path}")
    digest = hashlib.sha256(b"slow").digest()
    if path == "csc":
        h = api.csc_login(user)
        r = api.client.post("/csc/v2/credentials/authorize", headers=h, json={
            "credentialID": user.credentials["9c"], "numSignatures": 1, "hashes": [b64(digest)],
            "authData": [{"id": "PIN", "value": user.pin}, {"id": "OTP", "value": user.otp()}]})
        body = {"credentialID": user.credentials["9c"], "SAD": r.json()["SAD"],
                "hashes": [b64(digest)], "signAlgo": "1.2.840.10045.4.3.2"}

        def request(client: httpx.AsyncClient) -> Any:
            return client.post("/csc/v2/signatures/signHash", json=body, headers=h)
    else:
        auth = api.login(user)
        assert api.verify_pin(user).status_code == 200

        def request(client: httpx.AsyncClient) -> Any:
            return client.post(f"/api/v1/credentials/{user.credentials['9a']}/ecdsa",
                               json={"digest": b64(digest)}, auth=auth)

    asyncio.run(_while_stuck(app, request, gate))


def test_health_answers_while_a_password_check_is_stuck(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate()
    user = api.user(alg="p256", prefix="loop-argon2")
    monkeypatch.setattr(users, "verify_secret", gate.wrap(users.verify_secret))
    app = create_app(api.settings, hsm=api.client.app.state.hsm,  # type: ignore[attr-defined]
                     sessions=api.sessions)

    def request(client: httpx.AsyncClient) -> Any:
        return client.post("/csc/v2/auth/login", json={}, auth=(user.name, PASSWORD))

    asyncio.run(_while_stuck(app, request, gate))
