"""Fixtures and helpers of the HTTP API tests: the real app (``create_app``) over a migrated
SQLite database and the shared SoftHSM2 token, driven in-process by FastAPI's TestClient, with a
CA in the HSM, the admin token, and enrolled users that log in like real clients: each with a
device key registered through ``/api/v1/devices/enroll`` that signs a DPoP proof (RFC 9449) for
every request of its session (``auth=user.auth``).

Import with ``from apikit import Api, api_fixture, api_db_url_fixture  # noqa: F401`` (the
fixtures are ``api`` and ``api_db_url``; a module may override ``api_db_url``).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyotp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi.testclient import TestClient
from hsm_fixtures import HsmToken
from live_server import Authenticator
from sqlalchemy.orm import Session, sessionmaker

from relay.dpop import DeviceKey, DpopAuth
from server import ca
from server.app import create_app
from server.config import Settings
from server.db import make_engine, migrate, session_factory, unit_of_work
from server.hsm import Hsm
from server.hsm.secrets import ServerKeys
from server.services import tokens

PASSWORD = "correct horse battery staple"
_names = itertools.count()


@dataclass
class Enrolled:
    """A user enrolled through the Administration API, with the secrets it printed once."""

    name: str
    pin: str
    puk: str
    totp: pyotp.TOTP
    credentials: dict[str, str]
    """slot -> credential id"""
    enrollment_code: str
    device: DeviceKey = field(default_factory=DeviceKey.generate)
    enrolled_device: bool = False
    auth: DpopAuth | None = None
    """The current session's: a DPoP proof and the access token on every request."""
    refresh_token: str | None = None
    app: Authenticator | None = None

    def otp(self) -> str:
        """A TOTP code of a time step not used yet (:class:`live_server.Authenticator`)."""
        if self.app is None:
            self.app = Authenticator(self.totp)
        return self.app.code()


@dataclass
class Api:
    """The app under test and what a test needs to talk to it."""

    client: TestClient
    settings: Settings
    sessions: sessionmaker[Session]
    admin: dict[str, str]

    def user(
        self, *, alg: str = "p256", otp_per_signature: bool = False, prefix: str = "u"
    ) -> Enrolled:
        """Add and enroll a fresh user through the Administration API."""
        name = f"{prefix}{next(_names)}"
        r = self.client.post(
            "/api/v1/admin/users",
            json={"name": name, "password": PASSWORD, "email": f"{name}@example.test"},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        r = self.client.post(
            f"/api/v1/admin/users/{name}/enroll",
            json={"alg": alg, "otp_per_signature": otp_per_signature},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return Enrolled(
            name,
            body["pin"],
            body["puk"],
            pyotp.parse_uri(body["otp_uri"]),
            {c["slot"]: c["credential_id"] for c in body["credentials"]},
            body["enrollment_code"],
        )

    def enroll_device(self, user: Enrolled) -> None:
        """Register the user's device key with its enrollment code (once)."""
        if user.enrolled_device:
            return
        r = self.client.post(
            "/api/v1/devices/enroll",
            json={"code": user.enrollment_code, "device_public_key": user.device.public_pem()},
        )
        assert r.status_code == 200, r.text
        user.enrolled_device = True

    def login(self, user: Enrolled) -> DpopAuth:
        """``/api/v1/auth/login`` from the user's device with password + TOTP + DPoP; the
        session's httpx auth (also kept on ``user.auth``)."""
        self.enroll_device(user)
        r = self.client.post(
            "/api/v1/auth/login",
            json={"username": user.name, "password": PASSWORD, "otp": user.otp()},
            auth=DpopAuth(user.device),
        )
        assert r.status_code == 200, r.text
        assert r.json()["token_type"] == "DPoP"
        user.auth = DpopAuth(user.device, r.json()["access_token"])
        user.refresh_token = r.json()["refresh_token"]
        return user.auth

    def csc_login(self, user: Enrolled, version: str = "v1") -> dict[str, str]:
        """CSC ``auth/login`` with HTTP Basic (password only)."""
        r = self.client.post(
            f"/csc/{version}/auth/login", json={}, auth=httpx.BasicAuth(user.name, PASSWORD)
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def verify_pin(self, user: Enrolled, pin: str | None = None) -> httpx.Response:
        return self.client.post("/api/v1/pin/verify", json={"pin": pin or user.pin}, auth=user.auth)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> None:
    """An error answer: ``status`` and exactly ``{"error": code, "error_description": ...}``
    (plus ``retries`` for a wrong PIN or PUK)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    extra = {"retries"} if body.get("error") in ("invalid_pin", "invalid_puk") else set()
    assert set(body) == {"error", "error_description"} | extra, body
    if code is not None:
        assert body["error"] == code, body


@pytest.fixture(scope="module", name="api_db_url")
def api_db_url_fixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The API tests' database: SQLite unless a module overrides this fixture."""
    return f"sqlite:///{tmp_path_factory.mktemp('apidb') / 'cardbridge.db'}"


@pytest.fixture(scope="module", name="api")
def api_fixture(
    hsm: Hsm, hsm_token: HsmToken, tmp_path_factory: pytest.TempPathFactory, api_db_url: str
) -> Iterator[Api]:
    """One app per test module: a freshly migrated database, CA in the shared SoftHSM2 token."""
    data: Path = tmp_path_factory.mktemp("api")
    url = api_db_url
    migrate(url)
    ca_ref, ca_cert = ca.create_ca(hsm, f"cardbridge test CA {data.name}")
    (data / "ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    settings = Settings.for_data_dir(
        data,
        db_url=url,
        hsm_module=hsm_token.module,
        token_label=hsm_token.label,
        ca_key_id=ca_ref.key_id,
        ca_key_alg=str(ca_ref.alg),
    )
    engine = make_engine(url)
    sessions = session_factory(engine, ServerKeys.ensure(hsm))
    with unit_of_work(sessions()) as s:
        admin_token = tokens.create_admin_token(s)
    app = create_app(settings, hsm=hsm, sessions=sessions)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, settings, sessions, {"Authorization": f"Bearer {admin_token}"})
    engine.dispose()
