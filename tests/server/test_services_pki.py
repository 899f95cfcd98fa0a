# SPDX-License-Identifier: Apache-2.0
"""The time-stamping authority and the CRL against the real SoftHSM2 token, on SQLite and
PostgreSQL; tokens and CRLs are checked by ``openssl``, not by our own code."""

from __future__ import annotations

import secrets
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import tsp
from conftest import PASSWORD
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from server import ca
from server.config import Policy, Settings
from server.db import make_engine, session_factory, unit_of_work
from server.errors import Conflict, NotFound, RateLimited
from server.hsm import Hsm
from server.hsm.secrets import ServerKeys
from server.models import RevocationList, utcnow
from server.services import (
    audit,
    budgets,
    credentials,
    deployment,
    enrollment,
    revocation,
    tsa,
    users,
)

pytestmark = pytest.mark.hsm

ORIGIN = audit.Origin("node-t", "req-1")
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM


def set_up(hsm: Hsm, data: Path, db_url: str, sessions: sessionmaker[Session]) -> Settings:
    """A deployment (CA and TSA recorded) in a fresh database."""
    ca_ref, ca_cert = ca.create_ca(hsm, "pki test CA", label=f"ca:{secrets.token_hex(4)}")
    s = Settings.for_data_dir(
        data, db_url=db_url, ca_key_id=ca_ref.key_id, ca_key_alg=str(ca_ref.alg)
    )
    s.ca_cert.write_bytes(ca_cert.public_bytes(PEM))
    ref = hsm.generate_key(tsa.KEY_ALG, f"tsa:{secrets.token_hex(4)}", sign_only=True)
    cert = ca.issue_tsa_cert(hsm, ca_ref, ca_cert, hsm.public_key(ref), base_url=s.base_url)
    with unit_of_work(sessions()) as session:
        deployment.record(session, ca_ref, ca_cert, "test", node="node-t")
        row = deployment.find(session)
        assert row is not None
        deployment.record_tsa(session, row, ref, cert, node="node-t")
    (data / "tsa.pem").write_bytes(cert.public_bytes(PEM))
    return s


@pytest.fixture
def settings(hsm: Hsm, tmp_path: Path, db_url: str, sessions: sessionmaker[Session]) -> Settings:
    """A deployment on SQLite, then on PostgreSQL."""
    return set_up(hsm, tmp_path, db_url, sessions)


def openssl(*args: str | Path, ok: bool = True) -> str:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def stamp(
    sessions: sessionmaker[Session], hsm: Hsm, query: bytes, *, policy: Policy | None = None,
    client: str = "192.0.2.7",
) -> bytes:  # fmt: skip
    with unit_of_work(sessions()) as session:
        return tsa.timestamp(session, hsm, query, policy=policy or Policy(), origin=ORIGIN,
                             client=client)  # fmt: skip


def records(sessions: sessionmaker[Session], event: str) -> list[dict[str, object]]:
    with sessions() as session:
        return [r for r in audit.export(session) if r["event"] == event]


@pytest.mark.parametrize("with_cert", [True, False])
def test_a_timestamp_verifies_with_openssl_and_is_audited(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session], tmp_path: Path,
    with_cert: bool,
) -> None:  # fmt: skip
    doc, query, reply = tmp_path / "doc", tmp_path / "q.tsq", tmp_path / "r.tsr"
    doc.write_bytes(b"a document that never leaves the workstation")
    openssl("ts", "-query", "-data", doc, "-sha384", *(["-cert"] if with_cert else []),
            "-out", query)  # fmt: skip
    reply.write_bytes(stamp(sessions, hsm, query.read_bytes()))

    # openssl checks the imprint, the nonce, the signature, ESSCertIDv2 and the chain to the CA.
    untrusted = [] if with_cert else ["-untrusted", tmp_path / "tsa.pem"]
    openssl("ts", "-verify", "-in", reply, "-queryfile", query, "-CAfile", settings.ca_cert,
            *untrusted)  # fmt: skip
    openssl("ts", "-verify", "-in", reply, "-data", doc, "-CAfile", settings.ca_cert, *untrusted)
    text = openssl("ts", "-reply", "-in", reply, "-text")
    assert "Status: Granted." in text and f"Policy OID: {tsa.POLICY}" in text
    assert "Hash Algorithm: sha384" in text and "TSA: DirName:/CN=cardbridge TSA" in text
    token = tsp.TimeStampResp.load(reply.read_bytes())["time_stamp_token"]["content"]
    assert bool(token["certificates"].native) is with_cert  # RFC 3161 §2.4.1 certReq
    other = tmp_path / "other"
    other.write_bytes(b"another document")
    openssl("ts", "-verify", "-in", reply, "-data", other, "-CAfile", settings.ca_cert,
            *untrusted, ok=False)  # fmt: skip

    (record,) = records(sessions, "tsa.timestamp")
    serial = token["encap_content_info"]["content"].parsed["serial_number"].native
    assert record["actor"] == "client:192.0.2.7" and record["subject"] == f"timestamp:{serial:x}"
    details = record["details"]
    assert isinstance(details, dict)
    assert details["hash"] == "sha384" and details["node"] == "node-t"
    assert details["request"] == "req-1"


def _query(**fields: object) -> bytes:
    base: dict[str, object] = {
        "version": "v1",
        "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": bytes(32)},
    }
    return bytes(tsp.TimeStampReq({**base, **fields}).dump())


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (b"not a request", "the data submitted has the wrong format"),
        (_query(message_imprint={"hash_algorithm": {"algorithm": "sha1"},
                                 "hashed_message": bytes(20)}),
         "unrecognized or unsupported algorithm identifier"),
        (_query(message_imprint={"hash_algorithm": {"algorithm": "sha256"},
                                 "hashed_message": bytes(20)}),
         "the data submitted has the wrong format"),
        (_query(req_policy="1.2.3.4"), "the requested tsa policy is not supported by the tsa"),
        (_query(extensions=[{"extn_id": "1.2.3.5", "extn_value": b"\x05\x00"}]),
         "the requested extension is not supported by the tsa"),
        (_query(version=2), "transaction not permitted or supported"),
    ],
    ids=["garbage", "sha1", "short-imprint", "policy", "extension", "version"],
)  # fmt: skip
def test_a_bad_request_gets_a_rejection_that_names_why(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session], tmp_path: Path,
    query: bytes, reason: str,
) -> None:  # fmt: skip
    reply = tmp_path / "r.tsr"
    reply.write_bytes(stamp(sessions, hsm, query))
    text = openssl("ts", "-reply", "-in", reply, "-text")
    assert "Status: Rejected." in text and f"failure info: {reason}" in text.lower(), text
    assert records(sessions, "tsa.timestamp") == []


def test_a_deployment_without_a_tsa_answers_not_found(
    hsm: Hsm, sessions: sessionmaker[Session]
) -> None:
    ca_ref, ca_cert = ca.create_ca(hsm, "no tsa CA", label=f"ca:{secrets.token_hex(4)}")
    with unit_of_work(sessions()) as session:
        deployment.record(session, ca_ref, ca_cert, "test", node="n")
    with pytest.raises(NotFound, match="server init"):
        stamp(sessions, hsm, _query())


def test_a_deployment_gets_one_tsa_and_a_second_is_refused(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session]
) -> None:
    """Two ``server init`` runs that both found no TSA: the second to record loses, its key is
    for its caller to destroy, and the first stays."""
    ca_ref, ca_cert = enrollment.load_ca(settings)
    ref = hsm.generate_key(tsa.KEY_ALG, f"tsa:{secrets.token_hex(4)}", sign_only=True)
    cert = ca.issue_tsa_cert(hsm, ca_ref, ca_cert, hsm.public_key(ref), base_url=settings.base_url)
    with sessions() as session:
        row = deployment.find(session)
        assert row is not None
        kept = row.tsa_key_id
    with pytest.raises(Conflict), unit_of_work(sessions()) as session:
        deployment.record_tsa(session, row, ref, cert, node="late")
    with sessions() as session:
        assert (row := deployment.find(session)) is not None and row.tsa_key_id == kept
    assert len(records(sessions, "tsa.key")) == 1


def test_each_address_has_a_budget_of_requests_a_minute_and_a_refusal_is_audited(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = Policy(tsa_per_minute=3)
    for _ in range(3):
        stamp(sessions, hsm, _query(), policy=policy)
    granted = len(records(sessions, "tsa.timestamp"))
    with pytest.raises(RateLimited, match="too many timestamp requests"):
        stamp(sessions, hsm, _query(), policy=policy)
    with pytest.raises(RateLimited):  # a malformed request counts as well: nothing is checked
        stamp(sessions, hsm, b"not a request", policy=policy)
    assert len(records(sessions, "tsa.timestamp")) == granted == 3
    refused = records(sessions, "tsa.refused")
    assert [(r["actor"], r["details"]) for r in refused] == [  # committed although refused
        ("client:192.0.2.7", {"reason": "rate_limited", "node": "node-t", "request": "req-1"})
    ] * 2
    stamp(sessions, hsm, _query(), policy=policy, client="192.0.2.8")  # its own budget

    later = utcnow() + tsa.WINDOW + timedelta(seconds=1)
    monkeypatch.setattr(budgets, "utcnow", lambda: later)  # the next window
    stamp(sessions, hsm, _query(), policy=policy)
    assert len(records(sessions, "tsa.timestamp")) == 5


def test_parallel_requests_never_exceed_the_budget(sessions: sessionmaker[Session]) -> None:
    """Spent on the database every node shares: 12 requests at once (SQLite, PostgreSQL), 5
    counted."""
    policy = Policy(tsa_per_minute=5)
    start = threading.Barrier(12, timeout=60)
    counted: list[bool] = []

    def spend() -> None:
        with unit_of_work(sessions()) as session:
            start.wait()
            counted.append(tsa.spend_request(session, policy, "198.51.100.1"))

    threads = [threading.Thread(target=spend) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(counted) == [False] * 7 + [True] * 5


# --- the CRL ----------------------------------------------------------------------------------


def crl_now(
    sessions: sessionmaker[Session], hsm: Hsm, settings: Settings
) -> x509.CertificateRevocationList:
    with unit_of_work(sessions()) as session:
        der = revocation.current_crl(session, hsm, *enrollment.load_ca(settings))
    return x509.load_der_x509_crl(der)


def number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def enroll(sessions: sessionmaker[Session], hsm: Hsm, settings: Settings, name: str) -> None:
    with unit_of_work(sessions()) as session:
        users.add_user(session, name, password=PASSWORD)
        enrollment.enroll(session, hsm, settings, name)


def test_the_crl_is_kept_and_lists_revocations_from_the_next_one_on(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    enroll(sessions, hsm, settings, "ann")
    first = crl_now(sessions, hsm, settings)
    assert number(first) == 1 and list(first) == []
    assert crl_now(sessions, hsm, settings) == first  # kept: the same CRL, not a new one
    path = tmp_path / "crl.der"
    path.write_bytes(first.public_bytes(DER))
    openssl("crl", "-inform", "DER", "-in", path, "-CAfile", settings.ca_cert, "-noout")

    with unit_of_work(sessions()) as session:
        enrollment.revoke(session, "ann")
        user = users.get_user(session, "ann")
        revoked = {
            x509.load_pem_x509_certificate(c.cert_pem.encode()).serial_number: c.revoked_at
            for c in credentials.list_for_user(session, user.id, only_active=False)
            if c.cert_pem is not None
        }
    second = crl_now(sessions, hsm, settings)
    assert number(second) == 2
    assert {r.serial_number: r.revocation_date_utc for r in second} == {
        serial: when.replace(microsecond=0) for serial, when in revoked.items() if when
    }
    assert len(revoked) == 4
    # openssl, given the CRL, refuses the revoked 9C certificate and accepts another user's.
    enroll(sessions, hsm, settings, "bob")
    with sessions() as session:
        bob_9c = credentials.get_by_slot(session, users.get_user(session, "bob"), "9c").cert_pem
        ann = users.get_user(session, "ann").id
        (ann_9c,) = [c.cert_pem for c in credentials.list_for_user(session, ann, only_active=False)
                     if c.slot == "9c"]  # fmt: skip
    path.write_bytes(crl_now(sessions, hsm, settings).public_bytes(PEM))
    for name, pem, ok in (("bob", bob_9c, True), ("ann", ann_9c, False)):
        leaf = tmp_path / f"{name}.pem"
        leaf.write_text(pem or "")
        out = openssl("verify", "-crl_check", "-CRLfile", path, "-CAfile", settings.ca_cert,
                      "-purpose", "any", leaf, ok=ok)  # fmt: skip
        assert ("certificate revoked" in out) is not ok


def test_the_crl_is_signed_again_before_it_gets_old(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = crl_now(sessions, hsm, settings)
    later = utcnow() + revocation.REFRESH + timedelta(seconds=1)
    monkeypatch.setattr(revocation, "utcnow", lambda: later)
    second = crl_now(sessions, hsm, settings)
    assert number(second) == number(first) + 1
    assert second.last_update_utc == later.replace(microsecond=0)
    assert second.next_update_utc == (later + revocation.LIFETIME).replace(microsecond=0)


def test_certificates_of_another_ca_are_not_on_this_crl(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session]
) -> None:
    enroll(sessions, hsm, settings, "cid")
    other_ref, other_cert = ca.create_ca(hsm, "external CA", label=f"ca:{secrets.token_hex(4)}")
    with unit_of_work(sessions()) as session:
        cred = credentials.get_by_slot(session, users.get_user(session, "cid"), "9a")
        foreign = ca.issue_slot_cert(hsm, other_ref, other_cert, "9a",
                                     hsm.public_key(credentials.key_ref(cred)), "cid",
                                     base_url=settings.base_url)  # fmt: skip
        enrollment.import_cert(session, hsm, "cid", "9a", foreign.public_bytes(PEM))
        enrollment.revoke(session, "cid")
    listed = {r.serial_number for r in crl_now(sessions, hsm, settings)}
    assert len(listed) == 3 and foreign.serial_number not in listed


@pytest.mark.parametrize("first", [True, False])
def test_two_nodes_never_sign_two_crls_with_one_number(
    hsm: Hsm, server_keys: ServerKeys, tmp_path: Path, pg_url: str,
    monkeypatch: pytest.MonkeyPatch, first: bool,
) -> None:  # fmt: skip
    """Another node stores its CRL while this one signs its own, on the PostgreSQL database
    that nodes share: this one answers the other's, for the first CRL (both insert) and for a
    later one (both update)."""
    engine = make_engine(pg_url)
    try:
        sessions = session_factory(engine, server_keys)
        settings = set_up(hsm, tmp_path, pg_url, sessions)
        if not first:
            crl_now(sessions, hsm, settings)
            with unit_of_work(sessions()) as session:  # old enough to be signed again
                session.execute(
                    update(RevocationList).values(this_update=utcnow() - timedelta(days=2))
                )
        real = ca.build_crl

        def racing(*args: Any, **kwargs: Any) -> x509.CertificateRevocationList:
            monkeypatch.setattr(ca, "build_crl", real)
            with unit_of_work(sessions()) as other:  # the other node's whole request
                revocation.current_crl(other, hsm, *enrollment.load_ca(settings))
            return real(*args, **kwargs)

        monkeypatch.setattr(ca, "build_crl", racing)
        with unit_of_work(sessions()) as session:
            mine = revocation.current_crl(session, hsm, *enrollment.load_ca(settings))
        with sessions() as session:
            stored = session.get(RevocationList, revocation.ROW_ID)
            assert stored is not None and stored.der == mine
        assert number(x509.load_der_x509_crl(mine)) == (1 if first else 2)
    finally:
        engine.dispose()


def test_credentials_revoked_record_when(
    settings: Settings, hsm: Hsm, sessions: sessionmaker[Session]
) -> None:
    enroll(sessions, hsm, settings, "dee")
    before = utcnow()
    with unit_of_work(sessions()) as session:
        enrollment.revoke(session, "dee")
    with sessions() as session:
        user = users.get_user(session, "dee")
        times = {c.revoked_at for c in credentials.list_for_user(session, user.id,
                                                                 only_active=False)}  # fmt: skip
    (when,) = times
    assert when is not None and before <= when <= utcnow()
