"""The app as a whole: the OpenAPI document, health and readiness, request ids, the error
format of requests that never reach a handler (unknown paths, wrong methods, malformed JSON),
and 503 answers while the database is down."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Annotated

import pytest
from apikit import Api, api_db_url_fixture, api_fixture  # noqa: F401
from fastapi import Depends
from fastapi.testclient import TestClient

from server.api.limits import MAX_BODY
from server.api.pipeline import APIRouter, UserDep
from server.app import create_app
from server.db import make_engine, session_factory
from server.services.tokens import Principal


def test_openapi_documents_every_api_and_only_400_for_bad_input(api: Api) -> None:
    r = api.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    paths = set(doc["paths"])
    for version in ("v1", "v2"):
        for method in ("info", "auth/login", "auth/revoke", "credentials/list",
                       "credentials/info", "credentials/authorize",
                       "credentials/extendTransaction", "signatures/signHash"):
            assert f"/csc/{version}/{method}" in paths
    assert {"/api/v1/auth/login", "/api/v1/pin/verify", "/api/v1/devices/enroll",
            "/api/v1/credentials/{credential_id}/rsa-raw", "/api/v1/admin/users",
            "/api/v1/admin/audit/verify", "/healthz"} <= paths
    operations = [op for path in doc["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    sign_hash = doc["paths"]["/csc/v2/signatures/signHash"]["post"]
    assert sign_hash["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )


def test_health(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_ready_when_the_database_and_the_hsm_answer(api: Api) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/healthz", "/nowhere", "/api/v1/admin/users"])
def test_every_response_carries_a_request_id(api: Api, path: str) -> None:
    first, second = api.client.get(path), api.client.get(path)
    ids = [r.headers["X-Request-Id"] for r in (first, second)]
    assert all(re.fullmatch("[0-9a-f]{24}", i) for i in ids) and ids[0] != ids[1]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("lb-1234.abc:def_9", True), ("x" * 64, True), ("x" * 65, False), ("a b", False),
     ("<script>", False), ("", False)],
)  # fmt: skip
def test_an_incoming_request_id_is_kept_only_when_sane(api: Api, sent: str, kept: bool) -> None:
    got = api.client.get("/healthz", headers={"X-Request-Id": sent}).headers["X-Request-Id"]
    assert (got == sent) is kept
    assert kept or re.fullmatch("[0-9a-f]{24}", got)


def test_a_database_that_is_down_is_503_with_retry_after_and_one_log_line(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request that needs the database answers 503; the log has one line each."""
    down = make_engine("postgresql://nobody@/cardbridge?host=/nonexistent&port=1")
    app = create_app(api.settings, hsm=api.client.app.state.hsm,  # type: ignore[attr-defined]
                     sessions=session_factory(down))  # fmt: skip
    caplog.set_level(logging.INFO)
    with TestClient(app) as client:
        answers = [
            client.get("/readyz"),
            client.post("/csc/v1/auth/login", json={}, auth=("someone", "password")),
            client.get("/api/v1/admin/users", headers=api.admin),
        ]
    down.dispose()
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "temporarily_unavailable"
        assert r.headers["Retry-After"] == "3"
    assert not [rec for rec in caplog.records if rec.exc_info]  # no traceback anywhere
    lines = [rec for rec in caplog.records if rec.name == "server.api.errors"]
    assert len(lines) == len(answers)
    for rec, r in zip(lines, answers, strict=True):
        assert rec.levelno == logging.WARNING and rec.exc_info is None
        assert r.headers["X-Request-Id"] in rec.getMessage()
        assert "database" in rec.getMessage()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/csc/v2/signatures/signHash", 405, "method_not_allowed"),
        ("DELETE", "/api/v1/admin/users", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_use_the_error_format(
    api: Api, method: str, path: str, status: int, code: str
) -> None:
    r = api.client.request(method, path)
    assert r.status_code == status
    assert r.json()["error"] == code and r.json()["error_description"]


def test_malformed_json_is_400_and_echoes_no_secret(api: Api) -> None:
    r = api.client.post("/api/v1/auth/login", content=b'{"username": "a", "password": "s3cr3t!',
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = api.client.post("/api/v1/auth/login",
                        json={"username": "a", "password": "hunter2hunter2", "otp": "12"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "hunter2" not in r.text and "otp" in r.json()["error_description"]


def test_oversized_bodies_are_413_before_and_while_streaming(api: Api) -> None:
    big = b'{"username": "' + b"a" * (MAX_BODY + 1) + b'"}'
    r = api.client.post("/api/v1/auth/login", content=big,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"username": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = api.client.post("/api/v1/auth/login", content=chunks(),
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"
    r = api.client.post("/api/v1/auth/login", content=b"{}",
                        headers={"Content-Type": "application/json", "Content-Length": "x"})
    assert r.status_code == 400


# --- one pipeline: authenticate -> authorize -> validate -> act ------------------------------

SIGN_HASH_BODY = {"credentialID": "c", "SAD": "sad-value-not-to-be-echoed",
                  "hashes": ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],
                  "signAlgo": "1.2.840.10045.4.3.2"}
LOGIN_ROUTES = {"/csc/v1/auth/login", "/csc/v2/auth/login"}
"""Where a user authenticates with a password (HTTP Basic or a refresh token in the body)."""


def protected_operations(api: Api) -> list[tuple[str, str]]:
    """Every (method, path) whose OpenAPI operation declares a token scheme."""
    doc = api.client.get("/openapi.json").json()
    found = [
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if any("HTTPBearer" in req for req in op.get("security", []))
    ]
    assert len(found) > 25  # CSC, PIV, PIN, admin, audit
    return found


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"},
                                     {"Authorization": "DPoP not-a-token"},
                                     {"Authorization": "Basic dTpw"}])
def test_every_protected_route_answers_401_whatever_the_body(
    api: Api, headers: dict[str, str]
) -> None:
    for method, path in protected_operations(api):
        url = path.replace("{name}", "x").replace("{credential_id}", "c").replace("{slot}", "9c")
        # A body that is not even JSON: any parsing before authentication would answer 400.
        r = api.client.request(method, url, content=b'{"broken',
                               headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthorized", (method, path, r.text)
        assert "Bearer" in r.headers["WWW-Authenticate"]
        assert "DPoP" in r.headers["WWW-Authenticate"]


def test_a_bad_body_is_answered_in_pipeline_order(api: Api) -> None:
    """Validation runs before the hand-off to the thread pool, its answer after authentication
    and authorization: 401, then 403, then 400, and only then the endpoint."""
    broken = {"content": b'{"broken', "headers": {"Content-Type": "application/json"}}
    user = api.user(prefix="order")
    csc = api.csc_login(user)
    piv = api.login(user)
    sign_hash = "/csc/v2/signatures/signHash"
    r = api.client.post(sign_hash, **broken)  # type: ignore[arg-type]
    assert r.status_code == 401
    r = api.client.post(sign_hash, content=b'{"broken', headers={
        **api.admin, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = api.client.post(sign_hash, content=b'{"broken', headers={
        **csc, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    # A PIV route: a password-only CSC session is the wrong kind, a device session is let in.
    r = api.client.post("/api/v1/pin/verify", content=b'{"broken', headers={
        **csc, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = api.client.post("/api/v1/pin/verify", auth=piv, **broken)  # type: ignore[arg-type]
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


async def _name_of(user: UserDep) -> str:
    return user.name


def test_a_protected_endpoint_must_be_sync_and_take_its_principal_itself() -> None:
    """The pipeline authenticates in the endpoint's worker thread: an async endpoint, or a
    principal solved inside another dependency (before authentication), is refused at import."""
    router = APIRouter()

    async def asynchronous(user: UserDep) -> None: ...

    with pytest.raises(TypeError, match="sync"):
        router.add_api_route("/a", asynchronous)

    def nested(name: Annotated[str, Depends(_name_of)]) -> None: ...

    with pytest.raises(TypeError, match="principal"):
        router.add_api_route("/b", nested)

    def fine(user: UserDep) -> Principal:
        return user

    router.add_api_route("/c", fine)


def test_public_routes_are_exactly_these(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    public = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if not op.get("security")
    }
    assert public == {
        ("POST", "/csc/v1/info"), ("POST", "/csc/v2/info"), ("GET", "/healthz"), ("GET", "/readyz"),
        ("POST", "/api/v1/auth/login"), ("POST", "/api/v1/auth/refresh"),
        ("POST", "/api/v1/devices/enroll"), ("GET", "/api/v1/ca"),
        ("POST", "/tsa"), ("GET", "/crl"), ("GET", "/ca.crt"),
    }
    with_password = {(m.upper(), p) for p, item in doc["paths"].items()
                     for m, op in item.items()
                     if any("HTTPBasic" in req for req in op.get("security", []))}
    assert with_password == {("POST", path) for path in LOGIN_ROUTES}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sign_hash_bad_bodies_are_400_and_echo_no_secret(api: Api, version: str) -> None:
    path = f"/csc/{version}/signatures/signHash"
    auth = api.csc_login(api.user(prefix="badbody"))
    r = api.client.post(path, content=b'{"SAD": "sad-value-not-to-be-echoed', headers={
        **auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "sad-value" not in r.text
    r = api.client.post(path, content=b"{}", headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = api.client.post(path, json={k: v for k, v in SIGN_HASH_BODY.items() if k != "signAlgo"},
                        headers=auth)
    assert r.status_code == 400 and "signAlgo" in r.json()["error_description"]
    r = api.client.post(path, json={**SIGN_HASH_BODY, "hashes": "not-a-list"}, headers=auth)
    assert r.status_code == 400 and "sad-value" not in r.text
    r = api.client.post(path, content=b'{"SAD": "' + b"a" * (MAX_BODY + 1) + b'"}',
                        headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"


# --- odd input never reaches a 500 or the database (findings 7 and 11) ------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("token", ["\ud800", "\udfff", "a\ud800b", "\x00", "x" * 10_000])
def test_odd_refresh_tokens_are_400_not_500(api: Api, version: str, token: str) -> None:
    """The review's unauthenticated 500: a lone surrogate in a refresh token reached
    token_digest's encode(); now the body is refused while it is validated."""
    body = json.dumps({"refresh_token": token})  # ASCII JSON: "\ud800" as its escape
    r = api.client.post(f"/csc/{version}/auth/login", content=body,
                        headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text


def test_overlong_names_are_refused_before_the_database(api: Api) -> None:
    """A 10,000-character user name was stored in a 256-character column (the login's audit
    record); every field has a limit, HTTP Basic credentials and path segments included."""
    user = api.csc_login(api.user(prefix="long"))
    before = len(api.client.get("/api/v1/admin/audit/export", headers=api.admin).json())
    long_name = "a" * 10_000
    cases = [
        api.client.post("/csc/v2/auth/login", json={}, auth=(long_name, "password1")),
        api.client.post("/csc/v2/auth/login", json={}, auth=("alice", "p" * 10_000)),
        api.client.post("/api/v1/auth/login",
                        json={"username": long_name, "password": "x", "otp": "123456"}),
        api.client.post("/api/v1/admin/users", json={"name": long_name}, headers=api.admin),
        api.client.post(f"/api/v1/admin/users/{long_name}/disable", headers=api.admin),
        api.client.post("/csc/v2/credentials/info", json={"credentialID": "c" * 10_000},
                        headers=user),
    ]
    for r in cases:
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    after = api.client.get("/api/v1/admin/audit/export", headers=api.admin).json()
    assert len(after) == before  # nothing reached a service
