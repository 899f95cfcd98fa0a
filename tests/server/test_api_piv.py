"""The PIV operations under ``/api/v1`` from the relay's and an attacker's side: rule 3's block
checks on raw RSA, decryption and ECDH only with the 9D key, the per-session PIN policy
(9A/9D once, 9C before each use, 9E never), server-side PIN counters, the second factor, the
device binding (DPoP, RFC 9449: a stolen token or a replayed request is refused), and an audit
record for every key use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

import httpx
import pytest
from apikit import PASSWORD, Api, Enrolled, api_db_url_fixture, api_fixture, b64  # noqa: F401
from apikit import assert_error as error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.dpop import DeviceKey, DpopAuth
from server.models import utcnow
from server.services.dpop import b64url

DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def result(resp: object) -> bytes:
    assert resp.status_code == 200, resp.text  # type: ignore[attr-defined]
    return base64.b64decode(resp.json()["result"], validate=True)  # type: ignore[attr-defined]


def certs(api: Api, user: Enrolled) -> dict[str, x509.Certificate]:
    r = api.client.get("/api/v1/credentials", auth=user.auth)
    assert r.status_code == 200, r.text
    return {c["slot"]: x509.load_pem_x509_certificate(c["certificate"].encode()) for c in r.json()}


def op(api: Api, user: Enrolled, slot: str, name: str, field: str, data: bytes) -> object:
    return api.client.post(
        f"/api/v1/credentials/{user.credentials[slot]}/{name}",
        json={field: b64(data)},
        auth=user.auth,
    )


def pkcs1_block(message: bytes, k: int = 256) -> bytes:
    t = DIGEST_INFO_SHA256 + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


def type2_block(k: int = 256) -> bytes:
    ps = bytes(b % 255 + 1 for b in os.urandom(k - 3 - 16))
    return b"\x00\x02" + ps + b"\x00" + os.urandom(16)


def pss_block(message: bytes, k: int = 256) -> bytes:
    """A genuine EMSA-PSS encoding (salt = hLen): sign with a throwaway key of the same size
    and undo the RSA operation with its public key."""
    key = rsa.generate_private_key(65537, k * 8)
    sig = key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    n, e = key.public_key().public_numbers().n, key.public_key().public_numbers().e
    return pow(int.from_bytes(sig, "big"), e, n).to_bytes(k, "big")


@pytest.fixture(scope="module")
def rsa_user(api: Api) -> Enrolled:
    user = api.user(alg="rsa2048", prefix="piv-rsa")
    api.login(user)
    return user


@pytest.fixture(scope="module")
def ec_user(api: Api) -> Enrolled:
    user = api.user(alg="p256", prefix="piv-ec")
    api.login(user)
    return user


# --- rule 3: raw RSA -----------------------------------------------------------------------


def test_raw_rsa_accepts_pkcs1_v15_and_pss_blocks(api: Api, rsa_user: Enrolled) -> None:
    assert api.verify_pin(rsa_user).status_code == 200
    public = certs(api, rsa_user)["9a"].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    sig = result(op(api, rsa_user, "9a", "rsa-raw", "block", pkcs1_block(b"hello")))
    public.verify(sig, b"hello", padding.PKCS1v15(), hashes.SHA256())
    sig = result(op(api, rsa_user, "9a", "rsa-raw", "block", pss_block(b"pss")))
    public.verify(sig, b"pss", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(os.urandom(256), id="random"),
        pytest.param(b"\x00" + os.urandom(255), id="random-below-modulus"),
        pytest.param(type2_block(), id="type-2"),
        pytest.param(pkcs1_block(b"short", 128), id="wrong-length"),
        pytest.param(b"\x00\x01" + b"\xff" * 221 + b"\x00" + b"\x55" * 32, id="no-digestinfo"),
        pytest.param(
            b"\x00\x01" + b"\xff" * 218 + b"\x00"
            + bytes.fromhex("3021300906052b0e03021a05000414") + b"\x00" * 20,
            id="sha1",
        ),
    ],
)
def test_raw_rsa_refuses_anything_else(api: Api, rsa_user: Enrolled, block: bytes) -> None:
    assert api.verify_pin(rsa_user).status_code == 200
    error(op(api, rsa_user, "9a", "rsa-raw", "block", block), 400, "invalid_padding")
    error(op(api, rsa_user, "9c", "rsa-raw", "block", block), 400, "invalid_padding")


def test_decryption_only_with_the_9d_key(api: Api, rsa_user: Enrolled) -> None:
    assert api.verify_pin(rsa_user).status_code == 200
    keys = certs(api, rsa_user)
    for slot in ("9a", "9e"):
        public = keys[slot].public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        ciphertext = public.encrypt(b"secret", padding.PKCS1v15())
        error(op(api, rsa_user, slot, "decrypt", "block", ciphertext), 403, "forbidden")
    public = keys["9d"].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    ciphertext = public.encrypt(b"session key", padding.PKCS1v15())
    block = result(op(api, rsa_user, "9d", "decrypt", "block", ciphertext))
    assert block[:2] == b"\x00\x02" and block.endswith(b"\x00session key") and len(block) == 256
    # The 9D key signs nothing.
    error(op(api, rsa_user, "9d", "rsa-raw", "block", pkcs1_block(b"x")), 403, "forbidden")


def test_the_9d_key_is_neither_a_padding_oracle_nor_a_signing_oracle(api: Api) -> None:
    """Finding 3, as the attacker of the review: to forge a PKCS#1 signature of M with the
    key-management key, blind it (c = M·s^e) and ask for decryptions until one conforms; its
    answer unblinds to M^d. Now every answer is a well-formed type-2 block (same status, same
    length, deterministic), none is the raw c^d, so none unblinds to a signature, the queries
    stop at the decryption budget, and the refusal is audited."""
    user = api.user(alg="rsa2048", prefix="oracle")
    api.login(user)
    assert api.verify_pin(user).status_code == 200
    public = certs(api, user)["9d"].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    n, e = public.public_numbers().n, public.public_numbers().e
    target = int.from_bytes(pkcs1_block(b"wire 1,000,000 to mallory"), "big")
    budget = api.settings.policy.decrypt_budget
    answers: dict[int, bytes] = {}
    for _ in range(budget - 2):
        s = int.from_bytes(os.urandom(255), "big") % n
        c = target * pow(s, e, n) % n
        r = op(api, user, "9d", "decrypt", "block", c.to_bytes(256, "big"))
        answer = result(r)  # 200 whatever the padding: nothing to learn from the status
        assert len(answer) == 256 and answer[:2] == b"\x00\x02", answer[:2]
        y = int.from_bytes(answer, "big")
        assert pow(y, e, n) != c  # never the raw result ...
        assert pow(y * pow(s, -1, n) % n, e, n) != target  # ... so never a signature of M
        answers[c] = answer
    c, first = next(iter(answers.items()))
    assert result(op(api, user, "9d", "decrypt", "block", c.to_bytes(256, "big"))) == first
    genuine = public.encrypt(b"session key", padding.PKCS1v15())
    answer = result(op(api, user, "9d", "decrypt", "block", genuine))
    assert answer.endswith(b"\x00session key")
    assert pow(int.from_bytes(answer, "big"), e, n) != int.from_bytes(genuine, "big")
    # The budget of this key for this login is spent: an audited refusal, not an answer.
    r = op(api, user, "9d", "decrypt", "block", genuine)
    error(r, 429, "decryption_budget_exhausted")
    events = api.client.get("/api/v1/admin/audit/export", headers=api.admin).json()
    refused = [x for x in events if x["event"] == "key.refused"
               and x["subject"] == f"credential:{user.credentials['9d']}"]
    assert [x["details"]["reason"] for x in refused] == ["decryption_budget_exhausted"]
    decrypts = [x for x in events if x["event"] == "decrypt"
                and x["subject"] == f"credential:{user.credentials['9d']}"]
    # The records of conforming and forged ciphertexts say the same (but for the request id).
    same = [{k: v for k, v in x["details"].items() if k != "request"} for x in decrypts]
    assert len(decrypts) == budget and all(d == same[0] for d in same)
    api.login(user)  # another login has its own budget
    api.verify_pin(user)
    assert result(op(api, user, "9d", "decrypt", "block", genuine)).endswith(b"\x00session key")


# --- EC and EdDSA --------------------------------------------------------------------------


def test_ecdsa_and_ecdh(api: Api, ec_user: Enrolled) -> None:
    assert api.verify_pin(ec_user).status_code == 200
    keys = certs(api, ec_user)
    digest = hashlib.sha256(b"ecdsa").digest()
    sig = result(op(api, ec_user, "9a", "ecdsa", "digest", digest))
    public = keys["9a"].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    error(op(api, ec_user, "9a", "ecdsa", "digest", digest[:20]), 400, "invalid_request")
    error(op(api, ec_user, "9a", "rsa-raw", "block", pkcs1_block(b"x")), 400, "invalid_request")

    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    card_public = keys["9d"].public_key()
    assert isinstance(card_public, ec.EllipticCurvePublicKey)
    shared = result(op(api, ec_user, "9d", "ecdh", "peer_point", point))
    assert shared == peer.exchange(ec.ECDH(), card_public)
    error(op(api, ec_user, "9a", "ecdh", "peer_point", point), 403, "forbidden")
    error(op(api, ec_user, "9d", "ecdh", "peer_point", b"\x04" + b"\x01" * 64), 400,
          "invalid_request")


def test_eddsa(api: Api) -> None:
    user = api.user(alg="ed25519")
    api.login(user)
    assert api.verify_pin(user).status_code == 200
    sig = result(op(api, user, "9a", "eddsa", "message", b"ssh session data"))
    public = certs(api, user)["9a"].public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(sig, b"ssh session data")


# --- PIN policy and state ------------------------------------------------------------------


def test_pin_policy_per_slot(api: Api) -> None:
    user = api.user(alg="p256")
    api.login(user)
    digest = hashlib.sha256(b"policy").digest()
    # 9E (card authentication) never needs the PIN.
    result(op(api, user, "9e", "ecdsa", "digest", digest))
    # 9A needs it once per session.
    error(op(api, user, "9a", "ecdsa", "digest", digest), 403, "pin_required")
    status = api.client.get("/api/v1/pin/status", auth=user.auth).json()
    assert status["verified"] is False and status["pin_retries"] == 3
    assert api.verify_pin(user).json()["verified"] is True
    for _ in range(3):
        result(op(api, user, "9a", "ecdsa", "digest", digest))
    # 9C (PIN always) needs a verification right before each signature.
    result(op(api, user, "9c", "ecdsa", "digest", digest))
    error(op(api, user, "9c", "ecdsa", "digest", digest), 403, "pin_required")
    api.verify_pin(user)
    result(op(api, user, "9c", "ecdsa", "digest", digest))
    # A wrong PIN clears the session's verification (a card's security status).
    error(api.verify_pin(user, "000000"), 400, "invalid_pin")
    error(op(api, user, "9a", "ecdsa", "digest", digest), 403, "pin_required")
    api.verify_pin(user)
    r = api.client.post("/api/v1/pin/reset", auth=user.auth)
    assert r.status_code == 204
    error(op(api, user, "9a", "ecdsa", "digest", digest), 403, "pin_required")


def test_pin_state_belongs_to_one_session(api: Api) -> None:
    user = api.user(alg="p256")
    first = api.login(user)
    api.verify_pin(user)
    second = api.login(user)
    digest = hashlib.sha256(b"session").digest()
    r = api.client.post(f"/api/v1/credentials/{user.credentials['9a']}/ecdsa",
                        json={"digest": b64(digest)}, auth=second)
    error(r, 403, "pin_required")
    r = api.client.post(f"/api/v1/credentials/{user.credentials['9a']}/ecdsa",
                        json={"digest": b64(digest)}, auth=first)
    assert r.status_code == 200, r.text


def test_pin_counters_block_and_the_puk_unblocks(api: Api) -> None:
    user = api.user(alg="p256")
    api.login(user)
    for left in (2, 1, 0):
        r = api.verify_pin(user, "111111")
        error(r, 400, "invalid_pin")
        assert f"{left} tries left" in r.json()["error_description"]
    error(api.verify_pin(user), 403, "pin_blocked")
    digest = hashlib.sha256(b"blocked").digest()
    error(op(api, user, "9e", "ecdsa", "digest", digest), 403, "pin_blocked")
    status = api.client.get("/api/v1/pin/status", auth=user.auth).json()
    assert status["pin_blocked"] is True and status["puk_retries"] == 3
    r = api.client.post("/api/v1/pin/unblock", json={"puk": "00000000", "new_pin": "24682468"},
                        auth=user.auth)
    error(r, 400, "invalid_puk")
    r = api.client.post("/api/v1/pin/unblock", json={"puk": user.puk, "new_pin": "24682468"},
                        auth=user.auth)
    assert r.status_code == 204, r.text
    assert api.verify_pin(user, "24682468").status_code == 200
    r = api.client.post("/api/v1/pin/change", json={"pin": "24682468", "new_pin": "13571357"},
                        auth=user.auth)
    assert r.status_code == 204, r.text
    error(api.verify_pin(user, "24682468"), 400, "invalid_pin")
    assert api.verify_pin(user, "13571357").status_code == 200


def test_a_pin_verification_does_not_outlive_a_block_an_unblock_or_a_puk_reset(
    api: Api,
) -> None:
    """Finding 6, as an attacker whose session (a stolen device's) verified the PIN once: the
    owner's PIN gets blocked, an administrator unblocks it, the owner resets it with the PUK;
    after each, the attacker's session must verify the new PIN before it uses a key again."""
    user = api.user(alg="p256")
    attacker = api.login(user)
    owner = api.login(user)
    digest = hashlib.sha256(b"after the reset").digest()

    def attack() -> httpx.Response:
        return api.client.post(f"/api/v1/credentials/{user.credentials['9a']}/ecdsa",
                               json={"digest": b64(digest)}, auth=attacker)

    def verified() -> bool:
        r = api.client.get("/api/v1/pin/status", auth=attacker)
        return bool(r.json()["verified"])

    def block() -> None:
        for _ in range(3):
            api.client.post("/api/v1/pin/verify", json={"pin": "00000000"}, auth=owner)

    assert api.client.post("/api/v1/pin/verify", json={"pin": user.pin},
                           auth=attacker).status_code == 200
    assert attack().status_code == 200
    block()
    assert not verified()
    r = api.client.post(f"/api/v1/admin/users/{user.name}/unblock", headers=api.admin)
    new_pin = r.json()["pin"]
    error(attack(), 403, "pin_required")

    assert api.client.post("/api/v1/pin/verify", json={"pin": new_pin},
                           auth=attacker).status_code == 200
    r = api.client.post("/api/v1/pin/unblock", json={"puk": user.puk, "new_pin": "86428642"},
                        auth=owner)
    assert r.status_code == 204, r.text
    assert not verified()
    error(attack(), 403, "pin_required")


def test_otp_per_signature_holds_on_piv_operations(api: Api) -> None:
    """Finding 2, as an attacker with the user's device session and PIN but not their
    authenticator: an ECDSA signature with the 9C key of an --otp-per-signature credential
    needs a fresh TOTP on /api/v1 as on CSC (keyuse.check_otp); a reused one is refused."""
    user = api.user(alg="p256", otp_per_signature=True)
    api.login(user)
    digest = hashlib.sha256(b"sole control").digest()
    url = f"/api/v1/credentials/{user.credentials['9c']}/ecdsa"
    api.verify_pin(user)
    error(api.client.post(url, json={"digest": b64(digest)}, auth=user.auth), 400, "invalid_otp")
    code = user.otp()
    api.verify_pin(user)
    sig = result(api.client.post(url, json={"digest": b64(digest), "otp": code}, auth=user.auth))
    public = certs(api, user)["9c"].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    api.verify_pin(user)
    r = api.client.post(url, json={"digest": b64(digest), "otp": code}, auth=user.auth)
    error(r, 400, "invalid_otp")
    # The other keys of the user keep their own policy: 9A needs no TOTP.
    assert api.client.post(f"/api/v1/credentials/{user.credentials['9a']}/ecdsa",
                           json={"digest": b64(digest)}, auth=user.auth).status_code == 200


def test_piv_operations_need_the_second_factor_and_ownership(
    api: Api, ec_user: Enrolled
) -> None:
    digest = hashlib.sha256(b"owner").digest()
    # A CSC login (password only) opens no PIV session.
    csc = api.csc_login(ec_user)
    r = api.client.post("/api/v1/pin/verify", json={"pin": ec_user.pin}, headers=csc)
    error(r, 403, "forbidden")
    r = api.client.post(f"/api/v1/credentials/{ec_user.credentials['9e']}/ecdsa",
                        json={"digest": b64(digest)}, headers=csc)
    error(r, 403, "forbidden")
    # Another user cannot use ec_user's keys, even with a verified PIN of their own.
    other = api.user(alg="p256")
    api.login(other)
    api.verify_pin(other)
    r = api.client.post(f"/api/v1/credentials/{ec_user.credentials['9e']}/ecdsa",
                        json={"digest": b64(digest)}, auth=other.auth)
    error(r, 404, "not_found")
    # The admin token is not a user.
    r = api.client.post(f"/api/v1/credentials/{ec_user.credentials['9e']}/ecdsa",
                        json={"digest": b64(digest)}, headers=api.admin)
    error(r, 403, "forbidden")
    error(api.client.get("/api/v1/pin/status"), 401, "unauthorized")


def test_logout_ends_the_session_and_refresh_rotates(api: Api) -> None:
    user = api.user(alg="p256")
    first = api.login(user)
    refresh = user.refresh_token
    device = DpopAuth(user.device)
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": refresh}, auth=device)
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["token_type"] == "DPoP"
    error(api.client.get("/api/v1/pin/status", auth=first), 401, "unauthorized")
    h = DpopAuth(user.device, rotated["access_token"])
    assert api.client.get("/api/v1/pin/status", auth=h).status_code == 200
    assert api.client.post("/api/v1/auth/logout", auth=h).status_code == 204
    error(api.client.get("/api/v1/pin/status", auth=h), 401, "unauthorized")
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]},
                        auth=device)
    error(r, 401, "unauthorized")


def test_a_reused_refresh_token_revokes_its_whole_family(api: Api) -> None:
    """Finding 9, as a thief who copied a refresh token: the owner rotates it first; when the
    copy is presented again the server cannot tell who is who, so the whole login ends (the
    owner's new tokens too) and the reuse is audited (RFC 9700 §4.14.2)."""
    user = api.user(alg="p256")
    api.login(user)
    stolen = user.refresh_token
    device = DpopAuth(user.device)
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": stolen}, auth=device)
    assert r.status_code == 200, r.text
    owner = DpopAuth(user.device, r.json()["access_token"])
    owner_refresh = r.json()["refresh_token"]
    assert api.client.get("/api/v1/pin/status", auth=owner).status_code == 200
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": stolen}, auth=device)
    error(r, 401, "unauthorized")
    error(api.client.get("/api/v1/pin/status", auth=owner), 401, "unauthorized")
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": owner_refresh},
                        auth=device)
    error(r, 401, "unauthorized")
    # The same through CSC auth/login's refresh_token (unbound tokens, rememberMe).
    r = api.client.post("/csc/v2/auth/login", json={"rememberMe": True},
                        auth=(user.name, PASSWORD))
    first = r.json()["refresh_token"]
    r = api.client.post("/csc/v2/auth/login", json={"refresh_token": first})
    assert r.status_code == 200, r.text
    rotated = r.json()
    error(api.client.post("/csc/v2/auth/login", json={"refresh_token": first}), 401)
    r = api.client.post("/csc/v2/credentials/list", json={},
                        headers={"Authorization": f"Bearer {rotated['access_token']}"})
    error(r, 401, "unauthorized")
    error(api.client.post("/csc/v2/auth/login", json={"refresh_token": rotated["refresh_token"]}),
          401)
    events = api.client.get("/api/v1/admin/audit/export", headers=api.admin).json()
    reused = [e for e in events if e["event"] == "login.refresh.reused"
              and e["subject"] == f"user:{user.name}"]
    # Every presentation of a revoked refresh token: the two copies, then the owner's own.
    assert len(reused) == 4 and reused[0]["details"]["device_bound"] is True


def login_as(api: Api, user: Enrolled, otp: str, password: str = PASSWORD,
             key: DeviceKey | None = None) -> httpx.Response:
    return api.client.post("/api/v1/auth/login",
                           json={"username": user.name, "password": password, "otp": otp},
                           auth=DpopAuth(key or user.device))


def test_login_needs_password_and_fresh_otp(api: Api) -> None:
    user = api.user(alg="p256")
    api.enroll_device(user)
    code = user.otp()
    error(login_as(api, user, code, "wrong password"), 401, "unauthorized")
    error(login_as(api, user, "000000"), 400, "invalid_otp")
    assert login_as(api, user, code).status_code == 200
    error(login_as(api, user, code), 400, "invalid_otp")  # a time step is accepted once


# --- device binding (DPoP, RFC 9449), as an attacker ------------------------------------------


def test_login_needs_a_proof_of_an_enrolled_device_of_that_user(api: Api) -> None:
    user = api.user(alg="p256")
    api.enroll_device(user)
    r = api.client.post("/api/v1/auth/login",
                        json={"username": user.name, "password": PASSWORD, "otp": user.otp()})
    error(r, 401, "invalid_dpop_proof")  # no proof at all
    error(login_as(api, user, user.otp(), key=DeviceKey.generate()), 403, "forbidden")
    other = api.user(alg="p256")
    api.enroll_device(other)
    error(login_as(api, user, user.otp(), key=other.device), 403, "forbidden")
    assert login_as(api, user, user.otp()).status_code == 200


def test_a_stolen_token_is_useless_without_the_device_key(api: Api, ec_user: Enrolled) -> None:
    assert ec_user.auth is not None
    token = ec_user.auth.token
    url = "/api/v1/pin/status"
    # As a Bearer token, with no proof, or with a proof of the thief's own key: refused.
    error(api.client.get(url, headers={"Authorization": f"Bearer {token}"}), 401, "unauthorized")
    error(api.client.get(url, headers={"Authorization": f"DPoP {token}"}), 401,
          "invalid_dpop_proof")
    error(api.client.get(url, auth=DpopAuth(DeviceKey.generate(), token)), 401,
          "invalid_dpop_proof")
    # The refresh token too: a thief's proof cannot rotate it.
    r = api.client.post("/api/v1/auth/refresh", json={"refresh_token": ec_user.refresh_token},
                        auth=DpopAuth(DeviceKey.generate()))
    error(r, 401, "unauthorized")
    assert api.client.get(url, auth=ec_user.auth).status_code == 200


def test_a_replayed_or_misbound_proof_is_refused(api: Api, ec_user: Enrolled) -> None:
    assert ec_user.auth is not None and ec_user.auth.token is not None
    token, key = ec_user.auth.token, ec_user.device
    url = f"{api.client.base_url}/api/v1/pin/status"

    def send(*proofs: str) -> httpx.Response:
        headers = [("Authorization", f"DPoP {token}"), *(("DPoP", p) for p in proofs)]
        return api.client.get("/api/v1/pin/status", headers=headers)

    proof = key.proof("GET", url, access_token=token)
    assert send(proof).status_code == 200
    error(send(proof), 401, "invalid_dpop_proof")  # the same request again: a replay
    stale = utcnow().timestamp() - 600
    for bad in (
        key.proof("POST", url, access_token=token),  # another method
        key.proof("GET", url.replace("pin/status", "credentials"), access_token=token),
        key.proof("GET", url),  # no ath
        key.proof("GET", url, access_token="another-token"),  # another token's ath
        key.proof("GET", url, access_token=token, now=stale),
        key.proof("GET", url, access_token=token)[:-4] + "AAAA",  # a forged signature
        "not.a.jwt",
        b64url(b"[1]") + ".e30.AAAA",  # a header that is not an object
        b64url(b"\xff\xfe") + ".e30.AAAA",  # nor UTF-8
        "!" + key.proof("GET", url, access_token=token),  # a signed header behind junk
    ):
        error(send(bad), 401, "invalid_dpop_proof")
    two = (key.proof("GET", url, access_token=token), key.proof("GET", url, access_token=token))
    error(send(*two), 401, "invalid_dpop_proof")  # exactly one proof


def test_a_proof_stays_spent_when_its_request_fails(api: Api, ec_user: Enrolled) -> None:
    # The endpoint's unit of work rolls back (an unknown credential), the proof's record not:
    # whoever captured the request cannot replay it once the state has changed.
    assert ec_user.auth is not None and ec_user.auth.token is not None
    token, key = ec_user.auth.token, ec_user.device
    path = "/api/v1/credentials/no-such-credential/ecdsa"
    proof = key.proof("POST", f"{api.client.base_url}{path}", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    body = {"digest": base64.b64encode(bytes(32)).decode()}
    error(api.client.post(path, json=body, headers=headers), 404, "not_found")
    error(api.client.post(path, json=body, headers=headers), 401, "invalid_dpop_proof")


def test_a_revoked_device_loses_its_session(api: Api) -> None:
    user = api.user(alg="p256")
    auth = api.login(user)
    assert api.client.get("/api/v1/pin/status", auth=auth).status_code == 200
    assert api.client.post(f"/api/v1/admin/users/{user.name}/revoke",
                           headers=api.admin).status_code == 200
    error(api.client.get("/api/v1/pin/status", auth=auth), 401, "unauthorized")
    refused = login_as(api, user, user.otp())
    error(refused, 403, "forbidden")
    assert "this device was revoked" in refused.json()["error_description"]


def test_every_key_use_is_audited(api: Api) -> None:
    user = api.user(alg="rsa2048")
    api.login(user)
    api.verify_pin(user)
    signed = op(api, user, "9a", "rsa-raw", "block", pkcs1_block(b"audited"))
    result(signed)
    public = certs(api, user)["9d"].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    result(op(api, user, "9d", "decrypt", "block", public.encrypt(b"k", padding.PKCS1v15())))
    error(op(api, user, "9a", "rsa-raw", "block", type2_block()), 400, "invalid_padding")
    r = api.client.get("/api/v1/admin/audit/export", headers=api.admin)
    assert r.status_code == 200
    mine = [rec for rec in r.json() if rec["actor"] == f"user:{user.name}"]
    events = [(rec["event"], rec["subject"]) for rec in mine]
    assert ("pin.verify.ok", f"user:{user.name}") in events
    assert ("sign", f"credential:{user.credentials['9a']}") in events
    assert ("decrypt", f"credential:{user.credentials['9d']}") in events
    sign_rec = next(rec for rec in mine if rec["event"] == "sign")
    # The record names the node and the request whose X-Request-Id the client received.
    request_id = signed.headers["X-Request-Id"]  # type: ignore[attr-defined]
    assert sign_rec["details"] == {"slot": "9a", "op": "rsa-raw", "scheme": "pkcs1v15",
                                   "hash": "sha256", "node": api.settings.node_name,
                                   "request": request_id,
                                   "digest": b64(hashlib.sha256(b"audited").digest())}
    refused = next(rec for rec in mine if rec["event"] == "key.refused")
    assert refused["subject"] == f"credential:{user.credentials['9a']}"
    assert refused["details"]["reason"] == "invalid_padding"
    assert user.pin not in json.dumps(r.json())


def test_device_enrollment_redeems_a_code_once(api: Api) -> None:
    name = "device-user"
    assert api.client.post("/api/v1/admin/users", json={"name": name, "password": PASSWORD},
                           headers=api.admin).status_code == 201
    code = api.client.post(f"/api/v1/admin/users/{name}/enroll", json={"alg": "p256"},
                           headers=api.admin).json()["enrollment_code"]
    device = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    r = api.client.post("/api/v1/devices/enroll", json={"code": code, "device_public_key": device})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user"] == name
    assert {c["slot"] for c in body["credentials"]} == {"9a", "9c", "9d", "9e"}
    assert body["ca_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    r = api.client.post("/api/v1/devices/enroll", json={"code": code, "device_public_key": device})
    assert r.status_code in (400, 409), r.text
