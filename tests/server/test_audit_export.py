# SPDX-License-Identifier: Apache-2.0
"""``GET /api/v1/admin/audit/export`` with filters (``cardbridge admin audit export --user
--event --since``; the CLI is tested end to end in test_e2e_cli.py), and what a signature's
record names on every path: the node, the request id its client received, the credential, what
was signed, and for CSC the SAD."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from apikit import Api, api_db_url_fixture, api_fixture, assert_error  # noqa: F401
from test_api_piv import op, pkcs1_block, pss_block, result

URL = "/api/v1/admin/audit/export"
SHA256 = "2.16.840.1.101.3.4.2.1"
ECDSA_SHA256 = "1.2.840.10045.4.3.2"


def export(api: Api, **params: str) -> list[dict[str, Any]]:
    r = api.client.get(URL, params=params, headers=api.admin)
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()
    return records


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_filter_by_user_event_and_time(api: Api) -> None:
    alice, bob = api.user(prefix="exp-alice"), api.user(prefix="exp-bob")
    api.login(alice)
    api.login(bob)
    # A failed login typed in another case is alice's too (names are unique without case).
    r = api.client.post("/csc/v1/auth/login", json={},
                        auth=httpx.BasicAuth(alice.name.upper(), "wrong password"))  # fmt: skip
    assert r.status_code == 401
    everything = export(api)

    mine = export(api, user=alice.name)
    assert mine == export(api, user=alice.name.upper())
    who = {f"user:{alice.name}"}
    assert mine and all({r["actor"].lower(), r["subject"].lower()} & who for r in mine)
    assert mine == [r for r in everything if {r["actor"].lower(), r["subject"].lower()} & who]
    events = {r["event"] for r in mine}
    assert {"admin.user.add", "enroll", "login.ok", "login.failed"} <= events
    assert not [r for r in mine if bob.name in (r["actor"] + r["subject"])]

    logins = export(api, event="login.ok")
    assert logins and {r["event"] for r in logins} == {"login.ok"}
    assert [r for r in logins if r["actor"] == f"user:{alice.name}"] == export(
        api, user=alice.name, event="login.ok")  # fmt: skip

    # Since: from a record's own time on, whatever the offset it is written with.
    pivot = everything[-4]
    at = datetime.fromisoformat(pivot["time"])
    later = [r for r in everything if r["seq"] >= pivot["seq"]]
    for since in (pivot["time"], at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                  at.astimezone(UTC).replace(tzinfo=None).isoformat(),  # naive: UTC
                  at.astimezone(timezone(timedelta(hours=2))).isoformat()):  # fmt: skip
        assert export(api, since=since) == later, since
    assert export(api, since=(at + timedelta(microseconds=1)).isoformat()) == later[1:]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert export(api, since=future) == []
    assert export(api, user=alice.name, event="login.failed", since=pivot["time"]) == [
        r for r in later if r["event"] == "login.failed" and alice.name.upper() in r["actor"]
    ]
    assert export(api, user="nobody-by-that-name") == []


@pytest.mark.parametrize(
    "params",
    [{"event": "sign.everything"}, {"event": ""}, {"since": "yesterday"},
     {"since": "2026-13-01T00:00:00Z"}, {"user": "bad name"}, {"user": ""},
     {"user": "x" * 65}, {"user": "a'; DROP TABLE audit_log; --"}],
)  # fmt: skip
def test_bad_filters_are_400_invalid_request(api: Api, params: dict[str, str]) -> None:
    r = api.client.get(URL, params=params, headers=api.admin)
    assert_error(r, 400, "invalid_request")
    assert "DROP" not in r.text


def test_filters_need_the_admin_token(api: Api) -> None:
    user = api.user(prefix="exp-nosy")
    assert_error(api.client.get(URL, params={"user": user.name}), 401)
    r = api.client.get(URL, params={"user": user.name}, headers=api.csc_login(user))
    assert_error(r, 403, "forbidden")


def test_each_signature_record_names_node_request_credential_and_what_was_signed(
    api: Api,
) -> None:
    node = api.settings.node_name
    # CSC signHash: the SAD and every digest of the batch.
    user = api.user(alg="rsa2048", prefix="exp-signer")
    h = api.csc_login(user, "v2")
    digests = [hashlib.sha256(f"reconcile {i}".encode()).digest() for i in range(2)]
    auth = api.client.post("/csc/v2/credentials/authorize", headers=h, json={
        "credentialID": user.credentials["9c"], "numSignatures": 2,
        "hashes": [b64(d) for d in digests], "hashAlgorithmOID": SHA256, "PIN": user.pin,
        "authData": [{"id": "OTP", "value": user.otp()}]})  # fmt: skip
    assert auth.status_code == 200, auth.text
    signed = api.client.post("/csc/v2/signatures/signHash", headers=h, json={
        "credentialID": user.credentials["9c"], "SAD": auth.json()["SAD"],
        "hashes": [b64(d) for d in digests], "hashAlgorithmOID": SHA256,
        "signAlgo": "1.2.840.113549.1.1.11"})  # fmt: skip
    assert signed.status_code == 200, signed.text

    # /api/v1: PKCS#1 v1.5 (its digest), PSS (the block's SHA-256), Ed25519 (the message's).
    api.login(user)
    assert api.verify_pin(user).status_code == 200
    v15 = op(api, user, "9a", "rsa-raw", "block", pkcs1_block(b"v1.5"))
    result(v15)
    pss = pss_block(b"pss")
    pss_signed = op(api, user, "9a", "rsa-raw", "block", pss)
    result(pss_signed)
    ed = api.user(alg="ed25519", prefix="exp-ed")
    api.login(ed)
    assert api.verify_pin(ed).status_code == 200
    ed_signed = op(api, ed, "9a", "eddsa", "message", b"ssh session data")
    result(ed_signed)

    records = {r["details"].get("request"): r for r in export(api, event="sign")}

    def record(resp: Any) -> dict[str, Any]:
        rec: dict[str, Any] = records[resp.headers["X-Request-Id"]]
        assert rec["details"]["node"] == node
        return rec

    csc = record(signed)
    assert csc["subject"] == f"credential:{user.credentials['9c']}"
    assert csc["details"]["digests"] == [b64(d) for d in digests]
    assert isinstance(csc["details"]["sad"], int) and csc["details"]["count"] == 2
    rec = record(v15)
    assert rec["subject"] == f"credential:{user.credentials['9a']}"
    assert rec["details"]["digest"] == b64(hashlib.sha256(b"v1.5").digest())
    rec = record(pss_signed)
    assert rec["details"]["scheme"] == "pss"
    assert rec["details"]["block_sha256"] == b64(hashlib.sha256(pss).digest())
    rec = record(ed_signed)
    assert rec["subject"] == f"credential:{ed.credentials['9a']}"
    assert rec["details"]["message_sha256"] == b64(hashlib.sha256(b"ssh session data").digest())
