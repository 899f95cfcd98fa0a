# SPDX-License-Identifier: Apache-2.0
"""``cardbridge sign``'s pure parts, fast, with a CSC channel that signs with a local key: one
authorization per batch, documents that leave, a refused authorization, the credential's
algorithms, and the remote key as signxml's cryptography key."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import threading
from typing import Any

import pytest
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from relay.client import ServerRefused
from relay.docsign.keys import RemoteEcKey, remote_key
from relay.docsign.longterm import Level, ValidationData
from relay.docsign.remote import Batch, Credential, SignError

KEY = ec.generate_private_key(ec.SECP256R1())
ECDSA_SHA256 = "1.2.840.10045.4.3.2"


def certificate() -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(KEY.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(KEY, hashes.SHA256())
    )  # fmt: skip


CERT = certificate()


class Channel:
    """A CSC server in a list: credentials/info, authorize (or a refusal), signHash."""

    def __init__(self, *, algos: list[str] | None = None, refuse: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.algos = [ECDSA_SHA256] if algos is None else algos
        self.refuse = refuse

    def csc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((method, body))
        if method == "credentials/info":
            der = base64.b64encode(CERT.public_bytes(serialization.Encoding.DER)).decode()
            return {"key": {"algo": self.algos}, "cert": {"certificates": [der]}, "multisign": 4}
        if method == "credentials/authorize":
            if self.refuse:
                raise ServerRefused(400, "invalid_pin", "Incorrect PIN, 2 tries left", 2)
            return {"SAD": "sad-1", "expiresIn": 300}
        assert method == "signatures/signHash" and body["SAD"] == "sad-1"
        prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        return {"signatures": [base64.b64encode(KEY.sign(base64.b64decode(h), prehashed)).decode()
                               for h in body["hashes"]]}  # fmt: skip

    def close(self) -> None:
        pass


def verify(signature: bytes, digest: bytes) -> None:
    KEY.public_key().verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_the_credential_names_the_algorithms_the_key_offers() -> None:
    credential = Credential.describe(Channel(), "cred-1")
    assert credential.mechanism == "sha256_ecdsa" and credential.sign_algo == ECDSA_SHA256
    assert credential.hash_oid == "2.16.840.1.101.3.4.2.1" and credential.multisign == 4
    assert credential.signature_size == 72  # DER SEQUENCE of two 33-byte INTEGERs
    assert credential.certificate.dump() == CERT.public_bytes(serialization.Encoding.DER)
    with pytest.raises(SignError, match="does not offer sha256_ecdsa"):
        Credential.describe(Channel(algos=["1.2.840.113549.1.1.11"]), "cred-1")


def test_one_authorization_pins_every_digest_of_the_batch() -> None:
    channel = Channel()
    credential = Credential.describe(channel, "cred-1")
    batch = Batch(channel, credential, "123456", "654321", participants=3)
    digests = [credential.hash(b"first"), credential.hash(b"second")]

    async def run() -> list[bytes]:
        leaving = batch.participant()
        signing = [batch.participant().sign(d) for d in digests]
        leaving.leave()  # a document that failed before its digest existed
        return await asyncio.gather(*signing)

    signatures = asyncio.run(run())
    for signature, digest in zip(signatures, digests, strict=True):
        verify(signature, digest)
    methods = [m for m, _ in channel.calls]
    assert methods == ["credentials/info", "credentials/authorize", "signatures/signHash"]
    authorize = channel.calls[1][1]
    assert authorize["numSignatures"] == 2
    assert authorize["hashes"] == [base64.b64encode(d).decode() for d in digests]
    assert authorize["authData"] == [{"id": "PIN", "value": "123456"},
                                     {"id": "OTP", "value": "654321"}]  # fmt: skip
    assert channel.calls[2][1]["signAlgo"] == ECDSA_SHA256 and batch.failure is None


def test_a_refused_authorization_fails_every_document_of_the_batch() -> None:
    channel = Channel(refuse=True)
    credential = Credential.describe(channel, "cred-1")
    batch = Batch(channel, credential, "000000", "654321", participants=2)

    async def run() -> list[object]:
        signing = [batch.participant().sign(credential.hash(m)) for m in (b"a", b"b")]
        return await asyncio.gather(*signing, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, SignError) and "Incorrect PIN" in str(o) for o in outcomes)
    assert isinstance(batch.failure, ServerRefused)
    assert "signatures/signHash" not in [m for m, _ in channel.calls]


def test_a_broken_answer_fails_the_batch_instead_of_leaving_it_waiting() -> None:
    class Broken(Channel):
        def csc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
            if method == "signatures/signHash":
                raise ValueError("garbled answer")  # a bug anywhere below the batch
            return super().csc(method, body)

    channel = Broken()
    credential = Credential.describe(channel, "cred-1")
    batch = Batch(channel, credential, "1", "2", participants=1)

    async def run() -> bytes:
        return await asyncio.wait_for(batch.participant().sign(credential.hash(b"x")), 10)

    with pytest.raises(SignError, match="ValueError: garbled answer"):
        asyncio.run(run())
    assert isinstance(batch.failure, SignError)


def test_a_batch_whose_documents_all_left_asks_nothing() -> None:
    channel = Channel()
    batch = Batch(channel, Credential.describe(channel, "c"), "1", "2", participants=2)
    batch.participant().leave()
    batch.participant().leave()
    assert [m for m, _ in channel.calls] == ["credentials/info"]
    with pytest.raises(ValueError, match="1 to multisign"):
        Batch(channel, Credential.describe(channel, "c"), "1", "2", participants=5)


def test_the_remote_key_signs_from_a_worker_thread_and_gives_nothing_away() -> None:
    channel = Channel()
    credential = Credential.describe(channel, "cred-1")

    async def run() -> bytes:
        batch = Batch(channel, credential, "1", "2", participants=1)
        key = remote_key(batch.participant(), asyncio.get_running_loop())
        assert isinstance(key, RemoteEcKey) and key.key_size == 256
        with pytest.raises(UnsupportedAlgorithm, match="sha256 only"):
            key.sign(b"m", ec.ECDSA(hashes.SHA384()))
        with pytest.raises(UnsupportedAlgorithm):
            key.private_numbers()
        result: list[bytes] = []
        worker = threading.Thread(target=lambda: result.append(
            key.sign(b"signed info", ec.ECDSA(hashes.SHA256()))))  # fmt: skip
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        return result[0]

    signature = asyncio.run(run())
    KEY.public_key().verify(signature, b"signed info", ec.ECDSA(hashes.SHA256()))


def test_levels_parse_case_blind_and_refuse_others() -> None:
    assert Level.parse("b-lt") is Level.B_LT
    with pytest.raises(SignError, match=r"unknown level 'B-LTA' \(one of B-B, B-T, B-LT\)"):
        Level.parse("B-LTA")


def test_long_term_data_is_refused_for_a_certificate_its_crl_revokes() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(7)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(CERT.subject).issuer_name(ca_name)
        .public_key(KEY.public_key()).serial_number(8)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                       critical=True)
        .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier("https://unit.invalid/crl")], None, None, None)]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def crl(*revoked: int) -> asn1_crl.CertificateList:
        builder = (
            x509.CertificateRevocationListBuilder().issuer_name(ca_name)
            .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
        )  # fmt: skip
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build()
            )  # fmt: skip
        der = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        return asn1_crl.CertificateList.load(der)

    def der(cert: x509.Certificate) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))

    credential = Credential("c", (der(leaf), der(ca_cert)), "sha256", "sha256_ecdsa", 1)
    asyncio.run(ValidationData(der(ca_cert), (crl(),)).check_signer(credential))
    with pytest.raises(SignError, match="the certificate of Common Name: unit does not validate"):
        asyncio.run(ValidationData(der(ca_cert), (crl(8),)).check_signer(credential))
