# SPDX-License-Identifier: Apache-2.0
"""Issue 10's acceptance beyond the formats, through the real server process and SoftHSM2,
judged by pyHanko and openssl with the server's CA as the only trust anchor:

- RSA-2048, RSA-3072, P-256 and P-384 keys (``admin enroll --alg``) all sign;
- 50 PDFs sign under one ``credentials/authorize`` and each validates; with one corrupt file
  among 50, the other 49 are signed, the run exits 1 and the bad file gets one line;
- where the policy asks no TOTP of an authorization, the PIN alone authorizes each group;
- after ``admin revoke``, ``openssl crl`` parses the CRL that lists the user's certificate,
  ``cardbridge sign --level B-LT`` is refused in one line, and pyHanko's B-LT validation (the
  document's own data, nothing fetched) reports a signature made afterwards with the user's key
  as revoked.

The server authorizes up to 50 signatures at once; each test enrolls users of its own (a TOTP
time step is accepted once per user).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from bridge import RemoteCard, enroll_card, signed_outputs
from cryptography.hazmat.primitives.serialization import Encoding
from live_server import LiveServer, running_server
from pcsc_stack import run
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import DocumentSecurityStore

from relay.demo import pdf_status, sample_pdf, validate_pdf

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

MULTISIGN = 50
BATCH = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server whose credentials authorize up to MULTISIGN signatures at once."""
    with running_server(tmp_path_factory.mktemp("accept") / "data", multisign=MULTISIGN) as srv:
        yield srv


# --- every key type ---------------------------------------------------------------------------

KEYS = {  # alg: (key algorithm, bits, the digest pyHanko picks for the key)
    "rsa2048": ("rsa", 2048, "sha256"),
    "rsa3072": ("rsa", 3072, "sha384"),
    "p256": ("ec", 256, "sha256"),
    "p384": ("ec", 384, "sha384"),
}


@pytest.mark.parametrize("alg", list(KEYS))
def test_every_key_type_signs_pades_b_lt_and_cades(
    server: LiveServer, tmp_path: Path, alg: str
) -> None:
    card, ca = enroll_card(server, f"keys-{alg}", tmp_path / "card", alg=alg), server.ca
    kind, bits, digest = KEYS[alg]
    source = tmp_path / "contract.pdf"
    source.write_bytes(sample_pdf(f"signed with {alg}"))
    (signed,) = signed_outputs(card.sign("--format", "pades", "--level", "B-LT", str(source)))
    pdf = signed.read_bytes()
    verdict = validate_pdf(pdf, ca)
    assert verdict.intact and verdict.valid and verdict.timestamp, verdict.summary
    assert verdict.signer == f"CN={card.user}"
    assert validate_pdf(pdf, ca, long_term=True).valid  # offline, revocation checked
    embedded = PdfFileReader(BytesIO(pdf)).embedded_signatures[0]
    key = embedded.signer_cert.public_key
    assert (key.algorithm, key.bit_size) == (kind, bits)
    assert embedded.signer_info["digest_algorithm"]["algorithm"].native == digest

    content = tmp_path / "data.bin"
    content.write_bytes(alg.encode() * 1000)
    (p7s,) = signed_outputs(card.sign("--format", "cades", "--level", "B-T", str(content)))
    verify = ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", p7s,
              "-CAfile", server.data / "ca.pem", "-out", "/dev/null", "-content"]  # fmt: skip
    assert "Verification successful" in run(*verify, content)
    content.write_bytes(alg.encode() * 999 + b"X")
    assert "Verification failure" in run(*verify, content, ok=False)
    signer = cms.ContentInfo.load(p7s.read_bytes())["content"]["signer_infos"][0]
    assert signer["digest_algorithm"]["algorithm"].native == digest
    assert signer["signature_algorithm"].signature_algo == (
        "ecdsa" if kind == "ec" else "rsassa_pkcs1v15"
    )


# --- 50 documents, one authorization ----------------------------------------------------------


def pdfs(where: Path, count: int) -> list[Path]:
    where.mkdir()
    paths = []
    for n in range(count):
        paths.append(where / f"doc{n:02d}.pdf")
        paths[-1].write_bytes(sample_pdf(f"document {n} of the batch"))
    return paths


def mine(server: LiveServer, card: RemoteCard, since: int) -> list[dict[str, Any]]:
    return [r for r in server.audit()[since:] if r["actor"] == f"user:{card.user}"
            and r["event"] in ("credential.authorize", "sign")]  # fmt: skip


def test_fifty_pdfs_take_one_authorization_and_a_corrupt_one_leaves_the_other_49_signed(
    server: LiveServer, tmp_path: Path
) -> None:
    card, ca = enroll_card(server, "batch-fifty", tmp_path / "card", alg="p256"), server.ca
    sources = pdfs(tmp_path / "in", BATCH)
    before = len(server.audit())
    report = card.sign("--format", "pades", "--level", "B-T", *map(str, sources),
                       "--out-dir", str(tmp_path / "out"))  # fmt: skip
    signed = signed_outputs(report)
    assert len(signed) == BATCH == len(set(signed))
    for path in signed:
        verdict = validate_pdf(path.read_bytes(), ca)
        assert verdict.intact and verdict.valid and verdict.timestamp, (path, verdict.summary)
    records = mine(server, card, before)
    assert [r["event"] for r in records] == ["credential.authorize", "sign"]
    assert records[1]["details"]["count"] == BATCH
    # A timestamp per document, and one asked once to size them all (not one per document).
    stamps = [r for r in server.audit()[before:] if r["event"] == "tsa.timestamp"]
    assert len(stamps) == BATCH + 1

    # One of 50 is corrupt (a PDF cut in half): one line for it, the other 49 in one batch.
    inputs = pdfs(tmp_path / "in2", BATCH)
    corrupt = inputs[17]
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    before = len(server.audit())
    proc = card.sign_process("--format", "pades", "--level", "B-T", *map(str, inputs),
                             "--out-dir", str(tmp_path / "out2"))  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"Error: {corrupt}: not a PDF (Could not read malformed PDF file)"
    ]
    lines = proc.stdout.splitlines()
    assert len(lines) == BATCH - 1 and all(line.startswith("signed ") for line in lines)
    assert not (tmp_path / "out2" / f"{corrupt.stem}-signed.pdf").exists()
    good = sorted((tmp_path / "out2").glob("*-signed.pdf"))
    assert len(good) == BATCH - 1
    for path in good:
        assert validate_pdf(path.read_bytes(), ca).valid, path
    records = mine(server, card, before)
    assert [r["event"] for r in records] == ["credential.authorize", "sign"]
    assert records[1]["details"]["count"] == BATCH - 1


def test_where_no_totp_is_asked_the_pin_alone_authorizes_each_further_group(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A deployment that relaxes the CSC second factor (``csc_authorize_otp`` false): the run
    asks no TOTP (stdin holds only the password, so a prompt would fail) and authorizes each
    group of ``multisign`` documents with the PIN."""
    data = tmp_path_factory.mktemp("relaxed") / "data"
    with running_server(data, multisign=3, csc_authorize_otp=False) as relaxed:
        card = enroll_card(relaxed, "relaxed-rae", tmp_path / "card", alg="p256")
        sources = pdfs(tmp_path / "in", 7)
        before = len(relaxed.audit())
        proc = card.sign_process("--format", "pades", *map(str, sources), "--out-dir",
                                 str(tmp_path / "out"), "--json", otp=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for path in signed_outputs(json.loads(proc.stdout)):
            assert validate_pdf(path.read_bytes(), relaxed.ca).valid, path
        records = mine(relaxed, card, before)
        assert [r["event"] for r in records] == ["credential.authorize", "sign"] * 3
        assert [r["details"]["count"] for r in records if r["event"] == "sign"] == [3, 3, 1]


# --- revocation -------------------------------------------------------------------------------

REFUSED = "Error: this device was revoked (admin revoke); enroll it again (forbidden)"
"""What ``cardbridge sign`` says after ``admin revoke``, which revokes the user's devices."""

SIGN_WITH_THE_TOKEN = """
import os, sys
from pathlib import Path
data, label, cert_pem, tsa_url, source, target = sys.argv[1:]
from server.config import Settings
settings = Settings.load(Path(data))
os.environ["SOFTHSM2_CONF"] = str(settings.softhsm_conf)
import httpx, pkcs11
from asn1crypto import pem, x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, pkcs11 as p11, signers
from relay.docsign.longterm import HttpTimeStamper
cert = x509.Certificate.load(pem.unarmor(Path(cert_pem).read_bytes())[2])
def post(query):
    answer = httpx.post(tsa_url, content=query, verify=str(Path(data) / "ca.pem"),
                        headers={"Content-Type": "application/timestamp-query"})
    answer.raise_for_status()
    return answer.content
token = pkcs11.lib(settings.hsm_module).get_token(token_label=settings.token_label)
with token.open(user_pin=settings.hsm_pin()) as session:
    signer = p11.PKCS11Signer(session, key_label=label, signing_cert=cert,
                              use_raw_mechanism=True)
    meta = signers.PdfSignatureMetadata(field_name="Later", md_algorithm="sha256",
                                        subfilter=fields.SigSeedSubFilter.PADES)
    pdf_signer = signers.PdfSigner(meta, signer, timestamper=HttpTimeStamper(post))
    with open(source, "rb") as f:
        out = pdf_signer.sign_pdf(IncrementalPdfFileWriter(f))
    Path(target).write_bytes(out.getvalue())
"""
"""A PAdES B-T signature made with the user's key straight from the HSM token (as whoever kept
a copy of the token could), timestamped by the server's ``/tsa``: after ``admin revoke`` the
server makes none."""


def test_after_admin_revoke_the_crl_lists_the_certificate_and_b_lt_validation_says_revoked(
    server: LiveServer, tmp_path: Path
) -> None:
    card, ca = enroll_card(server, "revoked-rex", tmp_path / "card", alg="p256"), server.ca
    cert = card.certificate("9c")
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    source = tmp_path / "doc.pdf"
    source.write_bytes(sample_pdf("signed before and after the revocation"))
    (before,) = signed_outputs(card.sign("--format", "pades", "--level", "B-LT", str(source)))
    status = pdf_status(before.read_bytes(), ca, long_term=True)
    assert status.bottom_line and not status.revoked, status.summary()

    server.admin("revoke", card.user)
    revoked_at = next(r["time"] for r in reversed(server.audit()) if r["event"] == "revoke")
    crl_der = server.http.get("/crl").content
    (tmp_path / "crl.der").write_bytes(crl_der)
    text = run("openssl", "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-CAfile",
               server.data / "ca.pem", "-noout", "-text")  # fmt: skip
    assert "verify OK" in text
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big")
    assert f"Serial Number: {serial.hex().upper()}\n" in text  # openssl: whole bytes in hex

    # cardbridge sign makes no signature any more: the server refuses the revoked user's device
    # at the login, before the CRL is asked for (README). One line, nothing written.
    refused = card.sign_process("--format", "pades", "--level", "B-LT", str(source), "--out",
                                str(tmp_path / "refused.pdf"))  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [REFUSED], refused.stderr
    assert not refused.stdout and not (tmp_path / "refused.pdf").exists()

    # A signature made afterwards with the key itself, its B-LT data added (the certificates
    # and the CRL that revokes it, in the document security store): pyHanko reports it revoked,
    # at the time of admin revoke, with a timestamp that is valid and later than that.
    later = tmp_path / "later.pdf"
    label = f"{card.user}/9c/{card.credential('9c')}"
    subprocess.run([sys.executable, "-c", SIGN_WITH_THE_TOKEN, str(server.data), label,
                    str(tmp_path / "cert.pem"), f"{server.url}/tsa", str(before), str(later)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    stream = BytesIO(later.read_bytes())
    embedded = PdfFileReader(stream).embedded_signatures[-1]
    (token,) = next(a["values"] for a in embedded.signer_info["unsigned_attrs"]
                    if a["type"].native == "signature_time_stamp_token")  # fmt: skip
    certs = [asn1_x509.Certificate.load(c.public_bytes(Encoding.DER)) for c in (cert, ca)]
    certs += [c.chosen for c in token["content"]["certificates"]]  # the TSA's
    DocumentSecurityStore.add_dss(stream, None, certs=certs,
                                  crls=[asn1_crl.CertificateList.load(crl_der)])  # fmt: skip
    status = pdf_status(stream.getvalue(), ca, index=-1, long_term=True)
    assert status.intact and status.revoked and not status.bottom_line, status.summary()
    when = status.revocation_details.revocation_date
    assert abs(when - dt.datetime.fromisoformat(revoked_at)) < dt.timedelta(seconds=2), when
    stamp = status.timestamp_validity
    assert stamp is not None and stamp.valid and stamp.trusted and stamp.timestamp > when
