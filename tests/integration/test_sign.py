# SPDX-License-Identifier: Apache-2.0
"""Acceptance of ``cardbridge sign`` without a running card (a login of its own): PAdES, CAdES
and XAdES at B-B, B-T and B-LT, signed with users' 9C keys in the real server process's
SoftHSM2 token, judged by validators that are not ours, with the server's CA as the only trust
anchor: pyHanko (fetching disabled), ``openssl cms -verify``, ``openssl ts -verify``,
``xmlsec1 --verify`` and signxml's XAdES verifier. Every refusal is one line, and no input is
ever changed.

Each TOTP time step is accepted once per user (rule 6), so tests enroll users of their own
rather than wait for the next step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from asn1crypto import cms
from bridge import RemoteCard, enroll_card, signed_outputs
from cryptography import x509
from live_server import CARDBRIDGE, LiveServer, running_server
from lxml import etree
from pcsc_stack import run
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.writer import copy_into_new_writer
from pyhanko.sign import fields
from signxml.exceptions import InvalidDigest
from signxml.xades.xades import XAdESVerifier

from relay.demo import sample_pdf, validate_pdf

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

MULTISIGN = 4
NS = {"ds": "http://www.w3.org/2000/09/xmldsig#", "xades": "http://uri.etsi.org/01903/v1.3.2#"}
XML = b"<?xml version='1.0'?>\n<invoice xmlns='urn:example:invoice'><total>12.50</total></invoice>"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server whose credentials authorize at most MULTISIGN signatures at once."""
    with running_server(tmp_path_factory.mktemp("sign") / "data", multisign=MULTISIGN) as srv:
        yield srv


@pytest.fixture
def ca(server: LiveServer) -> x509.Certificate:
    return server.ca


def user(server: LiveServer, tmp_path: Path, name: str, alg: str = "p256") -> RemoteCard:
    return enroll_card(server, name, tmp_path / name, alg=alg)


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- PAdES ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "level"), [("p256", "B-B"), ("p256", "B-T"), ("rsa2048", "B-LT")])
def test_pades_levels_validate_with_pyhanko(
    server: LiveServer, ca: x509.Certificate, tmp_path: Path, alg: str, level: str
) -> None:
    card = user(server, tmp_path, f"pades-{alg}-{level.lower()}", alg)
    source = tmp_path / "contract.pdf"
    source.write_bytes(sample_pdf("a contract"))
    report = card.sign("--format", "pades", "--level", level, str(source))
    assert report["session"] == "login" and report["level"] == level
    (signed,) = signed_outputs(report)
    assert signed == tmp_path / "contract-signed.pdf"
    pdf = signed.read_bytes()

    verdict = validate_pdf(pdf, ca)
    assert verdict.intact and verdict.valid, verdict.summary
    assert verdict.signer == f"CN={card.user}"
    assert verdict.timestamp is (None if level == "B-B" else True), verdict.summary
    # Only the document security store of a B-LT signature validates it offline, revocation
    # checked: the chain and the CRL are in the file.
    offline = validate_pdf(pdf, ca, long_term=True)
    assert offline.valid is (level == "B-LT"), offline.summary
    tampered = bytearray(pdf)
    tampered[pdf.index(b"a contract")] ^= 0x01
    assert not validate_pdf(bytes(tampered), ca).intact


def test_a_visible_signature_and_a_countersignature_keep_the_first_valid(
    server: LiveServer, ca: x509.Certificate, tmp_path: Path
) -> None:
    alice = user(server, tmp_path, "pades-alice")
    bob = user(server, tmp_path, "pades-bob", "rsa2048")
    source = tmp_path / "deal.pdf"
    source.write_bytes(sample_pdf("a deal between two parties"))
    first = tmp_path / "deal-alice.pdf"
    alice.sign("--format", "pades", "--level", "B-T", "--field", "Alice", "--page", "1",
               "--box", "20,20,200,70", str(source), "--out", str(first))  # fmt: skip
    reader = PdfFileReader(BytesIO(first.read_bytes()))
    ((name, _, field),) = fields.enumerate_sig_fields(reader)
    assert name == "Alice"
    assert [float(v) for v in field.get_object()["/Rect"]] == [20, 20, 200, 70]

    both = tmp_path / "deal-both.pdf"
    bob.sign("--format", "pades", str(first), "--out", str(both))
    pdf = both.read_bytes()
    assert [s.field_name for s in PdfFileReader(BytesIO(pdf)).embedded_signatures] == [
        "Alice", "Signature1"]  # fmt: skip
    for index, signer in enumerate((alice.user, bob.user)):
        verdict = validate_pdf(pdf, ca, index=index)
        assert verdict.intact and verdict.valid and verdict.signer == f"CN={signer}", (
            verdict.summary
        )
    # The same signer again is refused; the file is left as it was.
    before = both.read_bytes()
    report = alice.sign("--format", "pades", str(both), "--out", str(tmp_path / "x.pdf"),
                        ok=False)  # fmt: skip
    assert report["results"][0]["error"] == "the PDF already holds a signature of this signer"
    assert both.read_bytes() == before and not (tmp_path / "x.pdf").exists()


# --- CAdES ------------------------------------------------------------------------------------


def test_cades_detached_and_enveloping_verify_with_openssl(
    server: LiveServer, tmp_path: Path
) -> None:
    card = user(server, tmp_path, "cades-carol", "rsa2048")
    ca_pem = server.data / "ca.pem"
    content = tmp_path / "data.bin"
    content.write_bytes(bytes(range(256)) * 40)

    (detached,) = signed_outputs(card.sign("--format", "cades", "--level", "B-LT", str(content)))
    assert detached == tmp_path / "data.bin.p7s"
    verify = ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", detached,
              "-CAfile", ca_pem, "-out", "/dev/null"]  # fmt: skip
    run(*verify, "-content", content)
    # B-LT carries the CRL: openssl checks revocation with it, offline.
    run(*verify, "-content", content, "-crl_check")
    bad = tmp_path / "data-flipped.bin"
    bad.write_bytes(flipped(content.read_bytes(), 5000))
    assert "Verification failure" in run(*verify, "-content", bad, ok=False)

    signed_data = cms.ContentInfo.load(detached.read_bytes())["content"]
    signer = signed_data["signer_infos"][0]
    attributes = {a["type"].native: a["values"][0] for a in signer["signed_attrs"]}
    (ess,) = attributes["signing_certificate_v2"]["certs"]
    leaf = next(c.chosen for c in signed_data["certificates"]
                if c.chosen.subject.native["common_name"] == card.user)  # fmt: skip
    assert ess["cert_hash"].native == hashlib.sha256(leaf.dump()).digest()
    assert "signing_time" in attributes
    assert signed_data["encap_content_info"]["content"].native is None  # detached
    assert len(signed_data["crls"]) == 1

    (enveloping,) = signed_outputs(card.sign("--format", "cades", "--packaging", "enveloping",
                                      "--level", "B-T", str(content)))  # fmt: skip
    assert enveloping == tmp_path / "data.bin.p7m"
    extracted = tmp_path / "extracted.bin"
    run("openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", enveloping,
        "-CAfile", ca_pem, "-out", extracted)  # fmt: skip
    assert extracted.read_bytes() == content.read_bytes()
    der = enveloping.read_bytes()
    at = der.index(content.read_bytes()) + 5000
    (tmp_path / "bad.p7m").write_bytes(flipped(der, at))
    out = run("openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
              tmp_path / "bad.p7m", "-CAfile", ca_pem, "-out", "/dev/null", ok=False)  # fmt: skip
    assert "Verification failure" in out

    # The signature timestamp (B-T) is over the signature value, by the server's TSA.
    signer = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    (stamp,) = [a["values"][0] for a in signer["unsigned_attrs"]
                if a["type"].native == "signature_time_stamp_token"]  # fmt: skip
    (tmp_path / "token.der").write_bytes(stamp.dump())
    digest = hashlib.sha256(signer["signature"].native).hexdigest()
    out = run("openssl", "ts", "-verify", "-digest", digest, "-token_in", "-in",
              tmp_path / "token.der", "-CAfile", ca_pem)  # fmt: skip
    assert "Verification: OK" in out


# --- XAdES ------------------------------------------------------------------------------------


def xmlsec1(signature: Path, ca_pem: Path, *, ok: bool = True) -> str:
    """Debian's xmlsec1, run where the signature is (a detached reference is relative)."""
    return run("xmlsec1", "--verify", "--trusted-pem", ca_pem, signature.name,
               ok=ok, cwd=signature.parent)  # fmt: skip


def test_xades_enveloped_and_detached_verify_with_xmlsec1_and_signxml(
    server: LiveServer, tmp_path: Path
) -> None:
    card = user(server, tmp_path, "xades-xena")
    ca_pem = server.data / "ca.pem"
    source = tmp_path / "invoice.xml"
    source.write_bytes(XML)

    (enveloped,) = signed_outputs(card.sign("--format", "xades", "--level", "B-LT", str(source)))
    assert enveloped == tmp_path / "invoice-signed.xml"
    assert "OK" in xmlsec1(enveloped, ca_pem)
    results = XAdESVerifier().verify(enveloped.read_bytes(), ca_pem_file=str(ca_pem))
    assert len(results) == 3  # the document, the signed properties, the key info
    doc = etree.fromstring(enveloped.read_bytes())
    assert doc.find("{urn:example:invoice}total").text == "12.50"
    changed = enveloped.read_bytes().replace(b"12.50", b"99.50")
    (tmp_path / "changed.xml").write_bytes(changed)
    assert "FAIL" in xmlsec1(tmp_path / "changed.xml", ca_pem, ok=False)
    with pytest.raises(InvalidDigest):
        XAdESVerifier().verify(changed, ca_pem_file=str(ca_pem))

    # B-LT: the TSA's certificate and the CA's CRL, after the timestamp.
    unsigned = doc.find(".//xades:UnsignedSignatureProperties", NS)
    assert [etree.QName(e).localname for e in unsigned] == [
        "SignatureTimeStamp", "CertificateValues", "RevocationValues"]  # fmt: skip
    crl_der = base64.b64decode(unsigned.find(".//xades:EncapsulatedCRLValue", NS).text)
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(x509.load_pem_x509_certificate(ca_pem.read_bytes()).public_key())
    tsa_cert = x509.load_der_x509_certificate(
        base64.b64decode(unsigned.find(".//xades:EncapsulatedX509Certificate", NS).text))
    assert tsa_cert.subject.rfc4514_string() == "CN=cardbridge TSA"

    (detached,) = signed_outputs(card.sign("--format", "xades", "--packaging", "detached",
                                    "--level", "B-T", str(source)))  # fmt: skip
    assert detached == tmp_path / "invoice.xades.xml"
    assert "OK" in xmlsec1(detached, ca_pem)
    data_root = etree.fromstring(source.read_bytes())
    XAdESVerifier().verify(detached.read_bytes(), ca_pem_file=str(ca_pem),
                           uri_resolver=lambda uri: data_root if uri == "invoice.xml" else None)
    # The signature timestamp covers the canonical SignatureValue (EN 319 132-1 §5.3).
    signature = etree.fromstring(detached.read_bytes())
    value = signature.find("ds:SignatureValue", NS)
    stamp = base64.b64decode(signature.find(".//xades:EncapsulatedTimeStamp", NS).text)
    (tmp_path / "token.der").write_bytes(stamp)
    digest = hashlib.sha256(etree.tostring(value, method="c14n", exclusive=True)).hexdigest()
    assert "Verification: OK" in run("openssl", "ts", "-verify", "-digest", digest, "-token_in",
                                     "-in", tmp_path / "token.der", "-CAfile", ca_pem)  # fmt: skip

    source.write_bytes(XML.replace(b"12.50", b"12.51"))  # the data changed after signing
    assert "FAIL" in xmlsec1(detached, ca_pem, ok=False)
    changed_root = etree.fromstring(source.read_bytes())
    with pytest.raises(InvalidDigest):
        XAdESVerifier().verify(detached.read_bytes(), ca_pem_file=str(ca_pem),
                               uri_resolver=lambda uri: changed_root)  # fmt: skip


# --- many files, one authorization; refusals ------------------------------------------------


def test_many_files_take_one_authorization_per_multisign_documents(
    server: LiveServer, ca: x509.Certificate, tmp_path: Path
) -> None:
    card = user(server, tmp_path, "batch-bea")
    sources = []
    for n in range(MULTISIGN):
        sources.append(tmp_path / f"doc{n}.pdf")
        sources[-1].write_bytes(sample_pdf(f"document {n}"))
    before = len(server.audit())
    report = card.sign("--format", "pades", *map(str, sources), "--out-dir", str(tmp_path / "out"))
    for path in signed_outputs(report):
        assert validate_pdf(path.read_bytes(), ca).valid
    mine = [r for r in server.audit()[before:] if r["actor"] == f"user:{card.user}"]
    assert [r["event"] for r in mine if r["event"] in ("credential.authorize", "sign")] == [
        "credential.authorize", "sign"]  # fmt: skip
    assert next(r for r in mine if r["event"] == "sign")["details"]["count"] == MULTISIGN

    # One more than an authorization covers: with --otp and no terminal, the rest is refused.
    extra = tmp_path / "one-more.pdf"
    extra.write_bytes(sample_pdf("one more"))
    report = card.sign("--format", "pades", *map(str, sources), str(extra),
                       "--out-dir", str(tmp_path / "out2"), ok=False)  # fmt: skip
    results = report["results"]
    assert [r["ok"] for r in results] == [True] * MULTISIGN + [False]
    assert results[-1]["error"].startswith("not signed: another one-time password is needed")


def test_inputs_that_cannot_be_signed_get_one_line_each_and_the_others_are_signed(
    server: LiveServer, ca: x509.Certificate, tmp_path: Path
) -> None:
    card = user(server, tmp_path, "refusals-rob")
    good, garbage, missing = tmp_path / "good.pdf", tmp_path / "garbage.pdf", tmp_path / "no.pdf"
    good.write_bytes(sample_pdf("good"))
    garbage.write_bytes(b"%PDF-1.7 but nothing after it")
    encrypted = tmp_path / "locked.pdf"
    writer = copy_into_new_writer(PdfFileReader(BytesIO(sample_pdf("secret"))))
    writer.encrypt("owner password", "user password")
    buffer = BytesIO()
    writer.write(buffer)
    encrypted.write_bytes(buffer.getvalue())
    inputs = [good, garbage, missing, encrypted]
    before = {p: p.read_bytes() for p in inputs if p.exists()}

    proc = card.sign_process("--format", "pades", *map(str, inputs))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"signed {good} -> {tmp_path / 'good-signed.pdf'}"]
    assert proc.stderr.splitlines() == [
        f"Error: {garbage}: not a PDF (Could not read malformed PDF file)",
        f"Error: {missing}: cannot read it: No such file or directory",
        f"Error: {encrypted}: the PDF is encrypted (it has an encryption dictionary); "
        "decrypt it first",
    ]
    assert validate_pdf((tmp_path / "good-signed.pdf").read_bytes(), ca).valid
    assert {p: p.read_bytes() for p in before} == before  # no input changed
    assert sorted(p.name for p in tmp_path.glob("*-signed.pdf")) == ["good-signed.pdf"]


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"a.xml": XML}, ["--format", "pades", "--level", "B-X"],
         "unknown level 'B-X' (one of B-B, B-T, B-LT)"),
        ({"a.xml": XML}, ["--format", "jades"],
         "unknown format 'jades' (one of pades, cades, xades)"),
        ({"a.xml": XML}, ["--format", "cades", "--packaging", "enveloped"],
         "cades signs detached or enveloping, not 'enveloped'"),
        ({"a.xml": XML}, ["--format", "xades", "--box", "1,1,9,9"],
         "--field, --page and --box are for --format pades"),
        ({"a.xml": XML}, ["--format", "pades", "--box", "9,9,1,1"],
         "--box: X2 and Y2 must be greater than X1 and Y1"),
        ({"a.xml": XML}, ["--format", "xades", "--tsa", "https://tsa.example"],
         "--tsa is for --level B-T (a B-B signature has no timestamp)"),
        ({"a.xml": XML}, ["--format", "xades", "--level", "B-LT", "--tsa", "https://tsa.example"],
         "--level B-LT uses the deployment's own TSA, whose revocation data the server "
         "publishes; use --tsa with --level B-T"),
        ({"a.xml": XML, "b.xml": XML}, ["--format", "xades", "--out", "x.xml"],
         "--out takes one input; give --out-dir DIR for several"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_before_anything_is_asked(
    tmp_path: Path, files: dict[str, bytes], args: list[str], message: str
) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    proc = sign_here(tmp_path, *files, *args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"Error: {message}\n"


def sign_here(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cardbridge sign ARGS`` in ``where``, with no card enrolled and nothing on stdin."""
    env = {**os.environ, "CARDBRIDGE_CONFIG": str(where / "no-card"),
           "CARDBRIDGE_RUNTIME_DIR": str(where / "no-run")}  # fmt: skip
    return subprocess.run([CARDBRIDGE, "sign", *args], capture_output=True, text=True,
                          cwd=where, input="", timeout=60, env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "name", "data", "extra", "message"),
    [
        ("cades", "sig.p7s", None, [], "the file is a CMS signature already"),
        ("xades", "signed.xml", None, [],
         "the document holds an XML signature already (another enveloped one would break "
         "it; sign it --packaging detached)"),
        ("xades", "notes.txt", b"plain text, not XML", [],
         "not XML (Start tag expected, '<' not found, line 1, column 1)"),
        ("xades", "dtd.xml", b"<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", [],
         "the document has a DTD, which signxml refuses (its entities could change what the "
         "signature covers)"),
        ("pades", "a.xml", XML, ["--out", "a.xml"], "the output a.xml would overwrite an input"),
    ],
)  # fmt: skip
def test_what_cannot_be_signed_is_refused_in_one_line_and_left_alone(
    server: LiveServer, tmp_path: Path, fmt: str, name: str, data: bytes | None,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    elif fmt == "cades":  # a signature made by cardbridge sign itself
        path.write_bytes(_signed(server, tmp_path, "cades"))
    else:
        path.write_bytes(_signed(server, tmp_path, "xades"))
    before = path.read_bytes()
    proc = sign_here(tmp_path, "--format", fmt, name, *extra, "--otp", "000000")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"Error: {name}: {message}\n"
    assert path.read_bytes() == before


_made: dict[str, bytes] = {}


def _signed(server: LiveServer, tmp_path: Path, fmt: str) -> bytes:
    """A CAdES signature, or an enveloped XAdES document, made once by ``cardbridge sign``."""
    if fmt not in _made:
        card = user(server, tmp_path, f"maker-{fmt}")
        source = tmp_path / ("made.bin" if fmt == "cades" else "made.xml")
        source.write_bytes(b"made" if fmt == "cades" else XML)
        (out,) = signed_outputs(card.sign("--format", fmt, str(source)))
        _made[fmt] = out.read_bytes()
    return _made[fmt]


# --- another TSA --------------------------------------------------------------------------------


def test_tsa_option_stamps_with_another_authority(
    server: LiveServer, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    data = tmp_path_factory.mktemp("other-tsa") / "data"
    with running_server(data) as other:
        card = user(server, tmp_path, "tsa-tom")
        content = tmp_path / "report.txt"
        content.write_text("stamped elsewhere\n")
        # Another TSA is trusted the system's way, here through $SSL_CERT_FILE.
        proc = card.sign_process("--format", "cades", "--level", "B-T", "--tsa",
                                 f"{other.url}/tsa", str(content), "--json",
                                 env={"SSL_CERT_FILE": str(data / "ca.pem")})  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (out,) = signed_outputs(json.loads(proc.stdout))
        signer = cms.ContentInfo.load(out.read_bytes())["content"]["signer_infos"][0]
        (stamp,) = [a["values"][0] for a in signer["unsigned_attrs"]
                    if a["type"].native == "signature_time_stamp_token"]  # fmt: skip
        (tmp_path / "token.der").write_bytes(stamp.dump())
        digest = hashlib.sha256(signer["signature"].native).hexdigest()
        verify = ["openssl", "ts", "-verify", "-digest", digest, "-token_in", "-in",
                  tmp_path / "token.der", "-CAfile"]  # fmt: skip
        assert "Verification: OK" in run(*verify, data / "ca.pem")
        assert "Verification: FAILED" in run(*verify, server.data / "ca.pem", ok=False)
        stamps = [r for r in other.audit() if r["event"] == "tsa.timestamp"]
        assert stamps and not [r for r in server.audit() if r["event"] == "tsa.timestamp"
                               and r["details"]["imprint"] == stamps[-1]["details"]["imprint"]]

        unreachable = card.sign("--format", "cades", "--level", "B-T", "--tsa",
                                "https://127.0.0.1:9/tsa", str(content), ok=False)  # fmt: skip
        (result,) = unreachable["results"]
        assert result["error"].startswith("the TSA https://127.0.0.1:9/tsa cannot be reached")
