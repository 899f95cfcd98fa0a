# SPDX-License-Identifier: Apache-2.0
"""``GET /api/v1/admin/audit/export`` with filters (``cardbridge admin audit export --user
--event --since``; the CLI is tested end to end in test_e2e_cli.py), and what a signature's
record names on every path: the node, the request id its client received, the credential, what
was signed, and for CSC the SAD."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from apikit import Api, api_db_url_fixture, api_fixture, assert_error, b64  # noqa: F401
from test_api_csc import SHA256_RSA, authorize, extend, sign
from test_api_piv import op, pkcs1_block, pss_block, result

from server.errors import HsmError, HsmUnavailable, ServerError

URL = "/api/v1/admin/audit/export"


def export(api: Api, **params: str) -> list[dict[str, Any]]:
    r = api.client.get(URL, params=params, headers=api.admin)
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()
    return records


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
    digests = [hashlib.sha256(f"reconcile {i}".encode()).digest() for i in range(3)]
    auth = authorize(api, user, h, digests)
    assert auth.status_code == 200, auth.text
    sad_value = auth.json()["SAD"]
    signed = sign(api, user, h, sad_value, digests[:2], SHA256_RSA, "v2")
    assert signed.status_code == 200, signed.text
    # What the SAD has left moves to a new one (extendTransaction), which signs the last digest.
    extended = extend(api, user, h, sad_value)
    assert extended.status_code == 200, extended.text
    extended_value = extended.json()["SAD"]
    signed_too = sign(api, user, h, extended_value, digests[2:], SHA256_RSA, "v2")
    assert signed_too.status_code == 200, signed_too.text

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
    ec = api.user(alg="p256", prefix="exp-ec")
    api.login(ec)
    assert api.verify_pin(ec).status_code == 200
    ec_digest = hashlib.sha256(b"tls handshake").digest()
    ec_signed = op(api, ec, "9a", "ecdsa", "digest", ec_digest)
    result(ec_signed)

    everything = export(api)
    records = {r["details"].get("request"): r for r in everything if r["event"] == "sign"}

    def record(resp: Any) -> dict[str, Any]:
        rec: dict[str, Any] = records[resp.headers["X-Request-Id"]]
        assert rec["details"]["node"] == node
        return rec

    csc, csc_too = record(signed), record(signed_too)
    for rec, batch in ((csc, digests[:2]), (csc_too, digests[2:])):
        assert rec["subject"] == f"credential:{user.credentials['9c']}"
        assert rec["details"]["digests"] == [b64(d) for d in batch]
        assert rec["details"]["count"] == len(batch)
    # The SAD is named by its number, which leads back to the authorization (PIN and OTP
    # checked, by whom, when) through the extension; never by the bearer value itself.
    sads = {r["event"]: r["details"] for r in everything
            if r["subject"] == f"credential:{user.credentials['9c']}"}  # fmt: skip
    assert sads["credential.authorize"]["sad"] == csc["details"]["sad"]
    assert sads["credential.extend"]["from_sad"] == csc["details"]["sad"]
    assert sads["credential.extend"]["sad"] == csc_too["details"]["sad"] != csc["details"]["sad"]
    assert sad_value not in json.dumps(everything)
    assert extended_value not in json.dumps(everything)
    rec = record(v15)
    assert rec["subject"] == f"credential:{user.credentials['9a']}"
    assert rec["details"]["digest"] == b64(hashlib.sha256(b"v1.5").digest())
    rec = record(pss_signed)
    assert rec["details"]["scheme"] == "pss"
    assert rec["details"]["block_sha256"] == b64(hashlib.sha256(pss).digest())
    rec = record(ed_signed)
    assert rec["subject"] == f"credential:{ed.credentials['9a']}"
    assert rec["details"]["message_sha256"] == b64(hashlib.sha256(b"ssh session data").digest())
    rec = record(ec_signed)
    assert rec["subject"] == f"credential:{ec.credentials['9a']}"
    assert rec["details"]["digest"] == b64(ec_digest)


@pytest.mark.parametrize("failure", [HsmError, HsmUnavailable])
def test_a_signature_the_hsm_fails_spends_nothing_and_writes_no_sign_record(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    failure: type[ServerError],
) -> None:
    """The client retries with the same SAD; the log has one line that names the failed
    request, the audit log only the signature that was made."""
    user = api.user(prefix="exp-hsm-failure")
    h = api.csc_login(user, "v2")
    d = [hashlib.sha256(b"the HSM fails this one").digest()]
    auth = authorize(api, user, h, d)
    assert auth.status_code == 200, auth.text
    sad_value = auth.json()["SAD"]

    def fail(*_: Any, **__: Any) -> bytes:
        raise failure("the HSM failed [FunctionFailed]")

    monkeypatch.setattr(api.client.app.state.hsm, "sign_digest", fail)  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="server.api.errors")
    failed = sign(api, user, h, sad_value, d, version="v2")
    assert_error(failed, failure.status, failure.code)
    failed_id = failed.headers["X-Request-Id"]
    lines = [rec for rec in caplog.records if failed_id in rec.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    monkeypatch.undo()

    retried = sign(api, user, h, sad_value, d, version="v2")
    assert retried.status_code == 200, retried.text
    signs = export(api, user=user.name, event="sign")
    assert [r["details"]["request"] for r in signs] == [retried.headers["X-Request-Id"]]
    assert failed_id not in json.dumps(export(api, user=user.name))
