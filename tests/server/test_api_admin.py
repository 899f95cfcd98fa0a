"""The Administration and Logging APIs: admin token only, users, enrollment, revocation,
unblock, CSR and certificate import for an external CA, and audit verification that names the
first tampered record.
"""

from __future__ import annotations

import datetime as dt

import pytest
from apikit import PASSWORD, Api, api_db_url_fixture, api_fixture  # noqa: F401
from apikit import assert_error as error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlalchemy.orm import Session


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/admin/users"),
        ("POST", "/api/v1/admin/users/x/disable"),
        ("POST", "/api/v1/admin/users/x/enroll"),
        ("GET", "/api/v1/admin/audit/verify"),
        ("POST", "/api/v1/admin/audit/verify"),
        ("GET", "/api/v1/admin/audit/checkpoint"),
        ("GET", "/api/v1/admin/audit/export"),
    ],
)
def test_admin_routes_need_the_admin_token(api: Api, method: str, path: str) -> None:
    error(api.client.request(method, path), 401, "unauthorized")
    error(api.client.request(method, path, headers={"Authorization": "Bearer x"}), 401,
          "unauthorized")
    user = api.user(prefix="notadmin")
    error(api.client.request(method, path, auth=api.login(user)), 403, "forbidden")


def test_add_list_and_disable_users(api: Api) -> None:
    r = api.client.post("/api/v1/admin/users", json={"name": "gen"}, headers=api.admin)
    assert r.status_code == 201, r.text
    generated = r.json()["password"]
    assert isinstance(generated, str) and len(generated) >= 16
    r = api.client.post("/api/v1/admin/users", json={"name": "given", "password": PASSWORD,
                                                     "upn": "given@corp.test"}, headers=api.admin)
    assert r.status_code == 201 and r.json()["password"] is None
    error(api.client.post("/api/v1/admin/users", json={"name": "given", "password": PASSWORD},
                          headers=api.admin), 409, "conflict")
    error(api.client.post("/api/v1/admin/users", json={"name": "../etc"}, headers=api.admin),
          400, "invalid_request")
    listed = {u["name"]: u for u in api.client.get("/api/v1/admin/users",
                                                   headers=api.admin).json()}
    assert listed["given"]["upn"] == "given@corp.test" and listed["given"]["enrolled"] is False
    # The generated password works; disabling ends the session and further logins.
    r = api.client.post("/csc/v1/auth/login", json={}, auth=("gen", generated))
    assert r.status_code == 200, r.text
    h = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = api.client.post("/api/v1/admin/users/gen/disable", headers=api.admin)
    assert r.status_code == 200 and r.json()["disabled"] is True
    error(api.client.post("/csc/v1/credentials/list", json={}, headers=h), 401, "unauthorized")
    error(api.client.post("/csc/v1/auth/login", json={}, auth=("gen", generated)), 401,
          "unauthorized")
    error(api.client.post("/api/v1/admin/users/nobody/disable", headers=api.admin), 404,
          "not_found")


def test_enroll_answers_the_cli_contract(api: Api) -> None:
    assert api.client.post("/api/v1/admin/users", json={"name": "enr", "password": PASSWORD},
                           headers=api.admin).status_code == 201
    error(api.client.post("/api/v1/admin/users/enr/enroll", json={"alg": "dsa"},
                          headers=api.admin), 400, "invalid_request")
    r = api.client.post("/api/v1/admin/users/enr/enroll",
                        json={"alg": "rsa2048", "otp_per_signature": True}, headers=api.admin)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"user", "pin", "puk", "otp_uri", "enrollment_code", "credentials"}
    assert body["otp_uri"].startswith("otpauth://totp/")
    assert [c["slot"] for c in body["credentials"]] == ["9a", "9c", "9d", "9e"]
    assert {c["alg"] for c in body["credentials"]} == {"rsa2048"}
    error(api.client.post("/api/v1/admin/users/enr/enroll", json={}, headers=api.admin), 409,
          "conflict")
    error(api.client.post("/api/v1/admin/users/ghost/enroll", json={}, headers=api.admin), 404,
          "not_found")


def test_revoke_makes_every_credential_unusable(api: Api) -> None:
    user = api.user()
    csc = api.csc_login(user)
    api.login(user)
    r = api.client.post(f"/api/v1/admin/users/{user.name}/revoke", headers=api.admin)
    assert r.status_code == 200 and r.json()["revoked"] == 4
    error(api.client.post("/csc/v1/credentials/list", json={}, headers=csc), 401,
          "unauthorized")
    csc = api.csc_login(user)
    r = api.client.post("/csc/v1/credentials/info",
                        json={"credentialID": user.credentials["9c"]}, headers=csc)
    error(r, 403, "forbidden")
    assert api.client.post("/csc/v1/credentials/list", json={},
                           headers=csc).json()["credentialIDs"] == []


def test_admin_unblock_sets_a_new_pin(api: Api) -> None:
    user = api.user()
    api.login(user)
    for _ in range(3):
        api.verify_pin(user, "999999")
    error(api.verify_pin(user), 403, "pin_blocked")
    r = api.client.post(f"/api/v1/admin/users/{user.name}/unblock", headers=api.admin)
    assert r.status_code == 200, r.text
    assert api.verify_pin(user, r.json()["pin"]).status_code == 200


def test_csr_and_external_certificate_import(api: Api) -> None:
    user = api.user(alg="p256")
    r = api.client.post(f"/api/v1/admin/users/{user.name}/certs/9c/csr", headers=api.admin)
    assert r.status_code == 200, r.text
    csr = x509.load_pem_x509_csr(r.json()["csr"].encode())
    assert csr.is_signature_valid  # signed in the HSM with the slot's key

    ext_key = ec.generate_private_key(ec.SECP256R1())
    ext_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "External CA")])
    now = dt.datetime.now(dt.UTC)

    def issue(public_key: ec.EllipticCurvePublicKey) -> str:
        cert = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ext_name)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .sign(ext_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    wrong = issue(ec.generate_private_key(ec.SECP256R1()).public_key())
    r = api.client.put(f"/api/v1/admin/users/{user.name}/certs/9c",
                       json={"certificate": wrong}, headers=api.admin)
    assert r.status_code == 400, r.text
    r = api.client.put(f"/api/v1/admin/users/{user.name}/certs/9c",
                       json={"certificate": "garbage"}, headers=api.admin)
    assert r.status_code == 400, r.text
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    good = issue(public)
    r = api.client.put(f"/api/v1/admin/users/{user.name}/certs/9c",
                       json={"certificate": good}, headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json()["slot"] == "9c" and r.json()["credential_id"] == user.credentials["9c"]
    r = api.client.post("/csc/v1/credentials/info",
                        json={"credentialID": user.credentials["9c"], "certInfo": True},
                        headers=api.csc_login(user))
    assert r.json()["cert"]["issuerDN"] == "CN=External CA"
    error(api.client.post(f"/api/v1/admin/users/{user.name}/certs/9x/csr", headers=api.admin),
          404, "not_found")


def _swap(s: Session, a: int, b: int) -> None:
    s.execute(text("UPDATE audit_log SET seq = -1 WHERE seq = :a"), {"a": a})
    s.execute(text("UPDATE audit_log SET seq = :a WHERE seq = :b"), {"a": a, "b": b})
    s.execute(text("UPDATE audit_log SET seq = :b WHERE seq = -1"), {"b": b})


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder"])
def test_audit_verify_names_the_first_bad_record(api: Api, tamper: str) -> None:
    api.user(prefix=f"audit-{tamper}")  # a few more records
    body = api.client.get("/api/v1/admin/audit/verify", headers=api.admin).json()
    assert body["ok"] is True and body["first_bad"] is None and body["records"] > 10
    target = api.client.get("/api/v1/admin/audit/export", headers=api.admin).json()[-3]["seq"]
    with api.sessions() as s:
        found = s.execute(text("SELECT * FROM audit_log WHERE seq = :s"), {"s": target})
        row = found.mappings().one()
        if tamper == "edit":
            s.execute(text("UPDATE audit_log SET actor = 'nobody' WHERE seq = :s"), {"s": target})
        elif tamper == "delete":
            s.execute(text("DELETE FROM audit_log WHERE seq = :s"), {"s": target})
        else:
            _swap(s, target, target + 1)
        s.commit()
    body = api.client.get("/api/v1/admin/audit/verify", headers=api.admin).json()
    assert body["ok"] is False and body["first_bad"] == target and body["reason"], body
    with api.sessions() as s:  # put it back: the next case starts from an intact chain
        if tamper == "edit":
            s.execute(text("UPDATE audit_log SET actor = :a WHERE seq = :s"),
                      {"a": row["actor"], "s": target})
        elif tamper == "delete":
            columns = ", ".join(row.keys())
            values = ", ".join(f":{k}" for k in row.keys())
            s.execute(text(f"INSERT INTO audit_log ({columns}) VALUES ({values})"), dict(row))  # noqa: S608
        else:
            _swap(s, target, target + 1)
        s.commit()
    assert api.client.get("/api/v1/admin/audit/verify", headers=api.admin).json()["ok"] is True


def test_a_checkpoint_catches_a_cut_chain(api: Api) -> None:
    """Finding 4 over the API: the admin keeps a checkpoint; whoever can write the database
    deletes the last records and moves the head back (every remaining MAC is genuine), and
    verification against the checkpoint fails; a checkpoint forged to match does too."""
    api.user(prefix="checkpointed")
    cp = api.client.get("/api/v1/admin/audit/checkpoint", headers=api.admin).json()
    assert set(cp) == {"seq", "hash", "count", "time", "mac"} and cp["count"] == cp["seq"]
    verify = "/api/v1/admin/audit/verify"
    assert api.client.post(verify, json={"checkpoints": [cp]}, headers=api.admin).json()["ok"]
    with api.sessions() as s:
        keep = s.execute(text("SELECT seq, hash FROM audit_log WHERE seq = :s"),
                         {"s": cp["seq"] - 2}).one()
        tail = s.execute(text("SELECT * FROM audit_log WHERE seq > :s"),
                         {"s": keep.seq}).mappings().all()
        head = s.execute(text("SELECT last_seq, last_hash FROM audit_head")).one()
        s.execute(text("DELETE FROM audit_log WHERE seq > :s"), {"s": keep.seq})
        s.execute(text("UPDATE audit_head SET last_seq = :s, last_hash = :h"),
                  {"s": keep.seq, "h": keep.hash})
        s.commit()
    try:
        assert api.client.get(verify, headers=api.admin).json()["ok"] is True  # MACs hold ...
        body = api.client.post(verify, json={"checkpoints": [cp]}, headers=api.admin).json()
        assert body["ok"] is False and body["first_bad"] == keep.seq + 1, body  # ... the cut
        forged = {**cp, "seq": keep.seq, "count": keep.seq, "hash": keep.hash}
        body = api.client.post(verify, json={"checkpoints": [forged]}, headers=api.admin).json()
        assert body["ok"] is False and "not signed" in body["reason"], body
        error(api.client.post(verify, json={"checkpoints": [{**cp, "mac": "zz"}]},
                              headers=api.admin), 400, "invalid_request")
    finally:
        with api.sessions() as s:  # put the tail back for the tests after this one
            for row in tail:
                columns = ", ".join(row.keys())
                values = ", ".join(f":{k}" for k in row.keys())
                s.execute(text(f"INSERT INTO audit_log ({columns}) VALUES ({values})"),  # noqa: S608
                          dict(row))
            s.execute(text("UPDATE audit_head SET last_seq = :s, last_hash = :h"),
                      {"s": head[0], "h": head[1]})
            s.commit()
    assert api.client.post(verify, json={"checkpoints": [cp]}, headers=api.admin).json()["ok"]
