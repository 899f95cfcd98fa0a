"""The CSC API from a client's and an attacker's side (csc-api.md §4 checklist, DESIGN.md
rules 2 and 4): v1 and v2 field names, SCAL 2 hash pinning, SAD binding and replay, PIN
counters, OTP per signature, and errors that are 4xx with a stable code.

Real SoftHSM2 keys and a real SQLite database under the real app (TestClient).
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from apikit import PASSWORD, Api, Enrolled, api_fixture, assert_error, b64  # noqa: F401
from asn1crypto import algos
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pgcluster import PgCluster
from sqlalchemy import select, update

from server.app import create_app
from server.config import Policy
from server.hsm import KeyAlg, KeyRef
from server.models import Credential, Sad, utcnow
from server.services import audit

SHA256, SHA384 = "2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.2.2"
SHA256_RSA, RSA_ENC, PSS = "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.1", "1.2.840.113549.1.1.10"
ECDSA_SHA256, ECDSA_SHA384 = "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3"
PREHASHED_SHA256 = Prehashed(hashes.SHA256())


def digest(text: str, alg: str = "sha256") -> bytes:
    return hashlib.new(alg, text.encode()).digest()


def cert_of(api: Api, headers: dict[str, str], cred: str) -> x509.Certificate:
    r = api.client.post(
        "/csc/v1/credentials/info", json={"credentialID": cred, "certificates": "single"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return x509.load_der_x509_certificate(base64.b64decode(r.json()["cert"]["certificates"][0]))


def authorize(
    api: Api, user: Enrolled, headers: dict[str, str], digests: list[bytes], *,
    otp: bool = True, **extra: Any,
) -> Any:
    """credentials/authorize (v1 body) with the PIN and, unless ``otp`` is False (a request
    refused before its OTP is looked at), a fresh TOTP: the server's default policy."""
    body = {
        "credentialID": user.credentials["9c"],
        "numSignatures": len(digests),
        "hash": [b64(d) for d in digests],
        "PIN": user.pin,
        **({"OTP": user.otp()} if otp else {}),
        **extra,
    }
    return api.client.post("/csc/v1/credentials/authorize", json=body, headers=headers)


def sign(api: Api, user: Enrolled, headers: dict[str, str], sad: str, digests: list[bytes],
         sign_algo: str = ECDSA_SHA256, version: str = "v1", **extra: Any) -> Any:
    names = ("hash", "hashAlgo") if version == "v1" else ("hashes", "hashAlgorithmOID")
    body = {
        "credentialID": user.credentials["9c"],
        "SAD": sad,
        names[0]: [b64(d) for d in digests],
        names[1]: SHA256,
        "signAlgo": sign_algo,
        **extra,
    }
    return api.client.post(f"/csc/{version}/signatures/signHash", json=body, headers=headers)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every CSC test runs on SQLite and on PostgreSQL (several server nodes share it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('cscdb') / 'cardbridge.db'}"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database()


@pytest.fixture
def p256(api: Api) -> Enrolled:
    """A fresh user per test: each authorization spends a TOTP time step of its user."""
    return api.user(alg="p256", prefix="ec")


@pytest.fixture(scope="module")
def rsa_user(api: Api) -> Enrolled:
    return api.user(alg="rsa2048", prefix="rsa")


# --- info, list, credentials/info ----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_info_needs_no_token_and_lists_the_methods(api: Api, version: str) -> None:
    r = api.client.post(f"/csc/{version}/info", json={})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert "signatures/signHash" in body["methods"]
    assert body["authType"] == ["basic"]
    assert body["specs"] == {"v1": "1.0.4.0", "v2": "2.0.0.2"}[version]


def test_credentials_info_v1_is_what_pyhanko_reads(api: Api, rsa_user: Enrolled) -> None:
    h = api.csc_login(rsa_user)
    r = api.client.post(
        "/csc/v1/credentials/info",
        json={"credentialID": rsa_user.credentials["9c"], "certificates": "chain",
              "certInfo": False},
        headers=h,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    algos_ = body["key"]["algo"]
    assert isinstance(algos_, list) and algos_[0] == SHA256_RSA
    assert {PSS, RSA_ENC} <= set(algos_)
    assert body["key"]["len"] == 2048 and body["key"]["status"] == "enabled"
    assert body["SCAL"] == "2"
    assert int(body["multisign"]) >= 1
    assert body["authMode"] == "explicit" and body["PIN"]["presence"] == "true"
    assert body["OTP"]["presence"] == "true"  # by default, beside the PIN (finding 10)
    chain = [x509.load_der_x509_certificate(base64.b64decode(c))
             for c in body["cert"]["certificates"]]
    assert len(chain) == 2
    ca_cert = x509.load_pem_x509_certificate(api.settings.ca_cert.read_bytes())
    assert chain[1] == ca_cert and chain[0].issuer == ca_cert.subject  # end entity first
    assert chain[0].subject.rfc4514_string().endswith(rsa_user.name)


def test_credentials_info_v2_describes_the_factors(api: Api) -> None:
    user = api.user(alg="p384", otp_per_signature=True)
    h = api.csc_login(user, "v2")
    r = api.client.post(
        "/csc/v2/credentials/info",
        json={"credentialID": user.credentials["9c"], "certInfo": True}, headers=h,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["key"]["curve"] == "1.3.132.0.34" and body["key"]["len"] == 384
    assert body["key"]["algo"] == [ECDSA_SHA256, ECDSA_SHA384, "1.2.840.10045.4.3.4"]
    assert body["auth"]["mode"] == "explicit"
    assert {o["id"] for o in body["auth"]["objects"]} == {"PIN", "OTP"}
    assert body["cert"]["validTo"].endswith("Z") and len(body["cert"]["validTo"]) == 15
    assert "authMode" not in body


def test_ed25519_is_not_offered_through_csc(api: Api) -> None:
    user = api.user(alg="ed25519")
    h = api.csc_login(user)
    r = api.client.post("/csc/v1/credentials/list", json={}, headers=h)
    assert r.status_code == 200 and r.json()["credentialIDs"] == []
    r = api.client.post(
        "/csc/v1/credentials/info", json={"credentialID": user.credentials["9c"]}, headers=h
    )
    assert_error(r, 404)


def test_list_shows_only_the_callers_signing_credential(
    api: Api, p256: Enrolled, rsa_user: Enrolled
) -> None:
    h = api.csc_login(p256, "v2")
    r = api.client.post("/csc/v2/credentials/list", json={"credentialInfo": True}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["credentialIDs"] == [p256.credentials["9c"]]
    assert len(r.json()["credentialInfos"]) == 1
    r = api.client.post("/csc/v2/credentials/list", json={"userID": rsa_user.name}, headers=h)
    assert_error(r, 403)
    # Another user's credential does not exist for this caller.
    r = api.client.post(
        "/csc/v2/credentials/info", json={"credentialID": rsa_user.credentials["9c"]}, headers=h
    )
    assert_error(r, 404, "not_found")


# --- authorize + signHash round trips ------------------------------------------------------


def test_v1_p256_round_trip_without_hash_oid_in_authorize(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    digests = [digest("one"), digest("two"), digest("three")]
    r = authorize(api, p256, h, digests)
    assert r.status_code == 200, r.text
    assert r.json()["expiresIn"] > 0
    r = sign(api, p256, h, r.json()["SAD"], digests)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    sigs = r.json()["signatures"]
    assert len(sigs) == 3
    public = cert_of(api, h, p256.credentials["9c"]).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for d, s in zip(digests, sigs, strict=True):  # input order, DER ECDSA
        raw = base64.b64decode(s, validate=True)
        assert raw[0] == 0x30
        public.verify(raw, d, ec.ECDSA(PREHASHED_SHA256))
    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(sigs[0]), digests[1], ec.ECDSA(PREHASHED_SHA256))


def test_v2_rsa_pkcs1_and_pss_round_trips(api: Api, rsa_user: Enrolled) -> None:
    h = api.csc_login(rsa_user, "v2")
    public = cert_of(api, h, rsa_user.credentials["9c"]).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    pss_params = algos.RSASSAPSSParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        "salt_length": 222,  # pyHanko's choice: the maximum for RSA-2048 and SHA-256
    })
    d1, d2 = digest("pkcs1"), digest("pss")
    r = api.client.post(
        "/csc/v2/credentials/authorize",
        json={"credentialID": rsa_user.credentials["9c"], "numSignatures": 2,
              "hashes": [b64(d1), b64(d2)], "hashAlgorithmOID": SHA256,
              "authData": [{"id": "PIN", "value": rsa_user.pin},
                           {"id": "OTP", "value": rsa_user.otp()}]},
        headers=h,
    )
    assert r.status_code == 200, r.text
    sad = r.json()["SAD"]
    r = sign(api, rsa_user, h, sad, [d1], SHA256_RSA, "v2")
    assert r.status_code == 200, r.text
    public.verify(base64.b64decode(r.json()["signatures"][0]), d1, padding.PKCS1v15(),
                  PREHASHED_SHA256)
    r = sign(api, rsa_user, h, sad, [d2], PSS, "v2", signAlgoParams=b64(pss_params.dump()))
    assert r.status_code == 200, r.text
    public.verify(
        base64.b64decode(r.json()["signatures"][0]), d2,
        padding.PSS(padding.MGF1(hashes.SHA256()), 222), PREHASHED_SHA256,
    )


def test_bare_rsa_encryption_needs_a_hash_oid(api: Api) -> None:
    user = api.user(alg="rsa2048")
    h = api.csc_login(user)
    d = digest("bare")
    sad = authorize(api, user, h, [d]).json()["SAD"]
    body = {"credentialID": user.credentials["9c"], "SAD": sad, "hash": [b64(d)],
            "signAlgo": RSA_ENC}
    assert_error(api.client.post("/csc/v1/signatures/signHash", json=body, headers=h), 400)
    body["hashAlgo"] = SHA256
    r = api.client.post("/csc/v1/signatures/signHash", json=body, headers=h)
    assert r.status_code == 200, r.text


# --- SAD rules (rule 4) --------------------------------------------------------------------


def test_sad_cannot_be_replayed(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d = digest("replay")
    sad = authorize(api, p256, h, [d]).json()["SAD"]
    assert sign(api, p256, h, sad, [d]).status_code == 200
    assert_error(sign(api, p256, h, sad, [d]), 400, "invalid_request")


def test_sad_cannot_be_spent_by_another_user(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d = digest("theft")
    sad = authorize(api, p256, h, [d]).json()["SAD"]
    thief = api.user(alg="p256")
    th = api.csc_login(thief)
    # Neither on the victim's credential (not the thief's) nor on the thief's own credential.
    assert_error(sign(api, p256, th, sad, [d]), 404)
    body = {"credentialID": thief.credentials["9c"], "SAD": sad, "hash": [b64(d)],
            "hashAlgo": SHA256, "signAlgo": ECDSA_SHA256}
    assert_error(api.client.post("/csc/v1/signatures/signHash", json=body, headers=th), 400)
    # The SAD is still good for its owner: the failed attempts spent nothing.
    assert sign(api, p256, h, sad, [d]).status_code == 200


def test_sad_covers_only_its_pinned_hashes_and_count(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d1, d2, other = digest("a"), digest("b"), digest("not pinned")
    sad = authorize(api, p256, h, [d1, d2]).json()["SAD"]
    assert_error(sign(api, p256, h, sad, [other]), 400)
    assert_error(sign(api, p256, h, sad, [d1, d1]), 400)  # a pinned hash is signed once
    assert sign(api, p256, h, sad, [d2]).status_code == 200
    assert_error(sign(api, p256, h, sad, [d2]), 400)
    assert sign(api, p256, h, sad, [d1]).status_code == 200
    assert_error(sign(api, p256, h, sad, [d1]), 400)


def test_expired_sad_is_refused(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d = digest("expired")
    sad = authorize(api, p256, h, [d]).json()["SAD"]
    with api.sessions() as s:
        s.execute(update(Sad).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    r = sign(api, p256, h, sad, [d])
    assert_error(r, 400)
    assert "expired" in r.json()["error_description"]


def test_inferred_hash_algorithm_is_enforced_at_sign_hash(api: Api) -> None:
    user = api.user(alg="p384")
    h = api.csc_login(user)
    d = digest("inferred")  # 32 bytes: authorize infers SHA-256
    sad = authorize(api, user, h, [d]).json()["SAD"]
    # SHA-384 claimed for a 32-byte digest: wrong length.
    assert_error(sign(api, user, h, sad, [d], ECDSA_SHA384, hashAlgo=SHA384), 400)
    # hashAlgo contradicting signAlgo.
    assert_error(sign(api, user, h, sad, [d], ECDSA_SHA384), 400)
    # A signAlgo the key does not have.
    assert_error(sign(api, user, h, sad, [d], SHA256_RSA), 400)
    assert sign(api, user, h, sad, [d], ECDSA_SHA256).status_code == 200


def extend(api: Api, user: Enrolled, headers: dict[str, str], sad: str,
           digests: list[bytes] | None = None) -> Any:
    body = {"credentialID": user.credentials["9c"], "SAD": sad}
    if digests is not None:
        body["hash"] = [b64(d) for d in digests]
    return api.client.post("/csc/v1/credentials/extendTransaction", json=body, headers=headers)


def test_extend_transaction_moves_the_budget_to_a_new_sad(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d1, d2 = digest("first"), digest("nested")
    old = authorize(api, p256, h, [d1, d2]).json()["SAD"]
    assert sign(api, p256, h, old, [d1]).status_code == 200
    r = extend(api, p256, h, old, [d2])
    assert r.status_code == 200, r.text
    new = r.json()["SAD"]
    assert_error(sign(api, p256, h, old, [d2]), 400)
    assert sign(api, p256, h, new, [d2]).status_code == 200


def test_extend_transaction_cannot_widen_an_authorization(api: Api) -> None:
    """Finding 1, as an attacker holding a SAD (or the session that got it) of a credential
    enrolled --otp-per-signature: extendTransaction takes no PIN and no OTP, so it must not
    re-pin the SAD to documents the user never saw, grow its count, or outlive it."""
    user = api.user(alg="p256", otp_per_signature=True)
    h = api.csc_login(user)
    seen, also_seen, unseen = digest("contract p.1"), digest("contract p.2"), digest("evil")
    sad = authorize(api, user, h, [seen, also_seen]).json()["SAD"]
    assert sign(api, user, h, sad, [seen]).status_code == 200
    for digests in ([unseen], [seen], [also_seen, also_seen]):
        assert_error(extend(api, user, h, sad, digests), 400)  # not pinned, signed, too many
    with api.sessions() as s:  # the authorization has 20 s left
        s.execute(update(Sad).where(Sad.remaining > 0)
                  .values(expires_at=utcnow() + timedelta(seconds=20)))
        s.commit()
    for _ in range(3):  # a chain of extensions ends with the authorization
        r = extend(api, user, h, sad, [also_seen])
        assert r.status_code == 200, r.text
        assert r.json()["expiresIn"] <= 20
        sad = r.json()["SAD"]
    assert_error(sign(api, user, h, sad, [unseen]), 400)
    assert_error(sign(api, user, h, sad, [also_seen, also_seen]), 400)
    assert sign(api, user, h, sad, [also_seen]).status_code == 200
    assert_error(extend(api, user, h, sad), 400)  # used up: nothing left to extend


# --- factors: PIN counters and OTP ---------------------------------------------------------


def test_three_wrong_pins_block_and_survive_a_restart(api: Api) -> None:
    user = api.user(alg="p256")
    h = api.csc_login(user)
    d = digest("pin")
    for left in (2, 1, 0):
        r = authorize(api, user, h, [d], otp=False, PIN="000000")
        assert_error(r, 400, "invalid_pin")
        assert f"{left} tries left" in r.json()["error_description"]
    assert_error(authorize(api, user, h, [d], otp=False), 403, "pin_blocked")
    # A new app instance (a restarted server) over the same database still refuses.
    from fastapi.testclient import TestClient

    hsm_ = api.client.app.state.hsm  # type: ignore[attr-defined]
    with TestClient(create_app(api.settings, hsm=hsm_, sessions=api.sessions)) as fresh:
        r = fresh.post("/csc/v1/credentials/authorize", headers=h, json={
            "credentialID": user.credentials["9c"], "numSignatures": 1, "hash": [b64(d)],
            "PIN": user.pin})
        assert_error(r, 403, "pin_blocked")
    # The PUK unblocks (through the PIV API, which needs the second factor).
    api.login(user)
    r = api.client.post("/api/v1/pin/unblock", json={"puk": user.puk, "new_pin": "654321"},
                        auth=user.auth)
    assert r.status_code == 204, r.text
    assert authorize(api, user, h, [d], PIN="654321").status_code == 200


def test_a_sad_is_useless_once_the_pin_is_blocked(api: Api) -> None:
    user = api.user(alg="p256")
    h = api.csc_login(user)
    d = digest("blocked later")
    sad = authorize(api, user, h, [d]).json()["SAD"]
    for _ in range(3):
        authorize(api, user, h, [d], otp=False, PIN="999999")
    assert_error(sign(api, user, h, sad, [d]), 403, "pin_blocked")


@pytest.mark.parametrize("per_signature", [True, False], ids=["otp-per-signature", "default"])
def test_authorize_needs_a_fresh_otp_beside_the_pin(api: Api, per_signature: bool) -> None:
    """Finding 10: CSC auth/login takes the password alone, so by default every
    credentials/authorize needs a fresh TOTP beside the PIN (not only --otp-per-signature
    credentials), and credentials/info says so; one authorization covers a whole batch."""
    user = api.user(alg="p256", otp_per_signature=per_signature)
    h = api.csc_login(user)
    d = digest("otp")
    assert_error(authorize(api, user, h, [d], otp=False), 400, "invalid_otp")
    assert_error(authorize(api, user, h, [d], otp=False, OTP="000000"), 400, "invalid_otp")
    code = user.otp()
    batch = [digest(f"page {i}") for i in range(5)]
    r = authorize(api, user, h, batch, otp=False, OTP=code)
    assert r.status_code == 200, r.text
    assert sign(api, user, h, r.json()["SAD"], batch).status_code == 200
    assert_error(authorize(api, user, h, [d], otp=False, OTP=code), 400, "invalid_otp")  # reused
    r = api.client.post("/csc/v2/credentials/info",
                        json={"credentialID": user.credentials["9c"]}, headers=h)
    assert r.json()["auth"]["expression"] == "PIN AND OTP"
    r = api.client.post(
        "/csc/v2/credentials/authorize",
        json={"credentialID": user.credentials["9c"], "numSignatures": 1, "hashes": [b64(d)],
              "authData": [{"id": "PIN", "value": user.pin}, {"id": "OTP", "value": user.otp()}]},
        headers=h,
    )
    assert r.status_code == 200, r.text


def test_the_server_setting_relaxes_the_otp_for_ordinary_credentials(api: Api) -> None:
    """``policy.csc_authorize_otp: false``: PIN alone, except for --otp-per-signature keys."""
    from fastapi.testclient import TestClient

    relaxed = api.settings.model_copy(update={"policy": Policy(csc_authorize_otp=False)})
    hsm_ = api.client.app.state.hsm  # type: ignore[attr-defined]
    plain, strict = api.user(alg="p256"), api.user(alg="p256", otp_per_signature=True)
    with TestClient(create_app(relaxed, hsm=hsm_, sessions=api.sessions)) as client:
        for user, needs_otp in ((plain, False), (strict, True)):
            h = api.csc_login(user)
            r = client.post("/csc/v1/credentials/info",
                            json={"credentialID": user.credentials["9c"]}, headers=h)
            assert r.json()["OTP"]["presence"] == ("true" if needs_otp else "false")
            r = client.post("/csc/v1/credentials/authorize", headers=h, json={
                "credentialID": user.credentials["9c"], "numSignatures": 1,
                "hash": [b64(digest("relaxed"))], "PIN": user.pin})
            if needs_otp:
                assert_error(r, 400, "invalid_otp")
            else:
                assert r.status_code == 200, r.text


# --- tokens and bad input ------------------------------------------------------------------


def test_tokens_are_checked(api: Api, p256: Enrolled) -> None:
    r = api.client.post("/csc/v1/credentials/list", json={})
    assert_error(r, 401)
    assert "Bearer" in r.headers["www-authenticate"]
    r = api.client.post("/csc/v1/credentials/list", json={},
                        headers={"Authorization": "Bearer nope"})
    assert_error(r, 401)
    assert_error(api.client.post("/csc/v1/credentials/list", json={}, headers=api.admin), 403)
    r = api.client.post("/csc/v1/auth/login", json={}, auth=("nobody", "wrong password"))
    assert_error(r, 401)
    r = api.client.post("/csc/v1/auth/login", json={})
    assert_error(r, 401)


def test_revoke_ends_the_token(api: Api, p256: Enrolled) -> None:
    r = api.client.post("/csc/v2/auth/login", json={"rememberMe": True},
                        auth=(p256.name, PASSWORD))
    body = r.json()
    assert body["refresh_token"]
    h = {"Authorization": f"Bearer {body['access_token']}"}
    r = api.client.post("/csc/v2/auth/revoke", json={"token": body["refresh_token"]}, headers=h)
    assert r.status_code == 204
    assert_error(api.client.post("/csc/v2/credentials/list", json={}, headers=h), 401)


@pytest.mark.parametrize(
    "hash_value",
    [
        "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq8-",  # base64url alphabet
        "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq8_=",
        "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80",  # padding missing
        "",
        "not base64!",
    ],
)
def test_only_standard_base64_is_accepted(api: Api, p256: Enrolled, hash_value: str) -> None:
    h = api.csc_login(p256)
    body = {"credentialID": p256.credentials["9c"], "numSignatures": 1, "hash": [hash_value],
            "PIN": p256.pin}
    assert_error(api.client.post("/csc/v1/credentials/authorize", json=body, headers=h), 400,
                 "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"credentialID": 5}',
        b'{"credentialID": "x", "numSignatures": 0, "hash": []}',
        b'{"credentialID": "x", "numSignatures": "many"}',
        b'{"credentialID": "x", "numSignatures": 1, "hash": ["AAAA"], "PIN": "123456"}',
        b'{"credentialID": "x", "numSignatures": 1, "authData": [{"id": "FACE", "value": "y"}]}',
    ],
)
def test_bad_authorize_bodies_are_4xx(api: Api, p256: Enrolled, body: bytes) -> None:
    h = {**api.csc_login(p256), "Content-Type": "application/json"}
    r = api.client.post("/csc/v1/credentials/authorize", content=body, headers=h)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "error_description"}


def test_wrong_digest_length_is_refused_at_authorize(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    r = authorize(api, p256, h, [b"\x01" * 31])
    assert_error(r, 400)
    assert r.json()["error_description"] == "Invalid digest value length"
    r = authorize(api, p256, h, [digest("x")], hashAlgo=SHA384)
    assert_error(r, 400)


def test_concurrent_spends_of_one_sad_sign_once(api: Api, p256: Enrolled) -> None:
    h = api.csc_login(p256)
    d = digest("race")
    sad = authorize(api, p256, h, [d]).json()["SAD"]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: sign(api, p256, h, sad, [d]).status_code, range(8)))
    assert sorted(statuses) == [200] + [400] * 7


# --- the HSM signs before anything is spent or audited ---------------------------------------


def _sign_records(api: Api, cred: str) -> list[dict[str, Any]]:
    with api.sessions() as s:
        return [r for r in audit.export(s)
                if r["event"] == "sign" and r["subject"] == f"credential:{cred}"]  # fmt: skip


# python-pkcs11's search finalizer fails again on the closed session (the server's processes
# silence it: server.hsm.pkcs11.quiet_search_finalizers).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_lost_hsm_session_is_503_and_leaves_the_sad_to_sign_once(api: Api) -> None:
    user = api.user(alg="p256")
    h = api.csc_login(user)
    d = digest("the HSM restarted")
    sad = authorize(api, user, h, [d]).json()["SAD"]
    # The HSM lost the session (a restarted network HSM): nothing is spent, nothing audited.
    api.client.app.state.hsm._shared.session.close()  # type: ignore[attr-defined]
    r = sign(api, user, h, sad, [d])
    assert_error(r, 503, "temporarily_unavailable")
    assert int(r.headers["Retry-After"]) >= 1
    assert _sign_records(api, user.credentials["9c"]) == []
    # The next request logs in again and the same SAD signs, once.
    r = sign(api, user, h, sad, [d])
    assert r.status_code == 200, r.text
    [record] = _sign_records(api, user.credentials["9c"])
    assert record["details"]["request"] == r.headers["X-Request-Id"]
    assert record["details"]["digests"] == [b64(d)]
    assert record["details"]["node"] == api.settings.node_name
    assert_error(sign(api, user, h, sad, [d]), 400)


def test_a_key_missing_from_the_hsm_spends_nothing_and_audits_nothing(api: Api) -> None:
    user = api.user(alg="p256")
    h = api.csc_login(user)
    d = digest("no key")
    sad = authorize(api, user, h, [d]).json()["SAD"]
    cred = user.credentials["9c"]
    with api.sessions() as s:
        key_id = s.get_one(Credential, cred).key_id
    api.client.app.state.hsm.destroy_key(KeyRef(key_id, KeyAlg.P256))  # type: ignore[attr-defined]
    assert_error(sign(api, user, h, sad, [d]), 404, "not_found")
    with api.sessions() as s:
        assert s.scalars(select(Sad).where(Sad.credential_id == cred)).one().remaining == 1
    assert _sign_records(api, cred) == []
