"""Other real PIV clients: pkcs15-tool, piv-tool, yubico-piv-tool, ssh-keygen."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pcsc_stack import PIN, PKCS11, SoftCard, pkcs11_sign, run

from vcard.constants import Slot
from vcard.softkeys import SoftKeyBackend

pytestmark = pytest.mark.pcsc

YKPIV = ("yubico-piv-tool", "-r", "cardbridge")


def test_pkcs15_dump(soft_card: SoftCard) -> None:
    out = run("pkcs15-tool", "--dump")
    # The token label is the CN of the first certificate.
    assert "PKCS#15 Card [cardbridge soft card]" in out
    assert "Manufacturer ID: piv_II" in out
    assert len(re.findall(r"^X\.509 Certificate \[", out, re.M)) == 4, out
    kind = "RSA" if soft_card.key_type.is_rsa else "EC"
    keys = re.findall(
        rf"^Private {kind} Key \[(.*?)\]\n(?:\t.*\n)*?\tUsage +: \[0x\w+\], (.*)$", out, re.M
    )
    usage = dict(keys)
    assert len(usage) == 4, out
    # The certificates' key usage reaches OpenSC (agency 9999 in the CHUID's FASC-N).
    assert "nonRepudiation" in usage["SIGN key"]
    if soft_card.key_type.is_rsa:
        assert "decrypt" in usage["KEY MAN key"]
    else:
        assert usage["KEY MAN key"] == "derive"


def test_piv_tool_name_and_serial(soft_card: SoftCard) -> None:
    assert "Personal Identity Verification Card" in run("piv-tool", "-n")
    guid = SoftKeyBackend.open(soft_card.path).card_guid()
    out = run("piv-tool", "--serial")
    assert guid.hex(" ").upper() in out, out  # the CHUID's GUID is the serial


@pytest.mark.parametrize(
    ("key", "ok"),
    [("010203040506070801020304050607080102030405060708", True), ("00" * 24, False)],
    ids=["default-key", "wrong-key"],
)
def test_piv_tool_management_key_authentication(
    soft_card: SoftCard, tmp_path: Path, key: str, ok: bool
) -> None:
    """9B mutual authentication (``-A M:9B:03``); OpenSC 0.23's external mode (``A:``) has a
    client-side length bug (OpenSC#2658) and never sends its response."""
    key_file = tmp_path / "9b.hex"
    key_file.write_text(key)
    proc = subprocess.run(
        ["piv-tool", "-A", "M:9B:03"],
        env={**os.environ, "PIV_EXT_AUTH_KEY": str(key_file)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    if not ok:
        assert "admin_mode failed" in proc.stderr


def test_yubico_piv_tool_status(soft_card: SoftCard) -> None:
    out = run(*YKPIV, "-a", "status")
    assert "CHUID:" in out
    assert "PIN tries left:\t3" in out
    for slot in ("9a", "9c", "9d", "9e"):
        assert f"Slot {slot}:" in out, out
    assert "cardbridge soft card" in out


def test_ssh_keygen_lists_the_9a_key(soft_card: SoftCard) -> None:
    out = run("ssh-keygen", "-D", PKCS11)
    public_key = soft_card.certs[Slot.AUTHENTICATION].public_key()
    openssh = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    listed = [" ".join(line.split()[:2]) for line in out.splitlines() if line.strip()]
    assert openssh in listed, out


def _certificate_for(public_pem: Path, subject: str) -> bytes:
    """A certificate over a public key generated on the card, from a throwaway issuer.

    yubico-piv-tool 2.2's own ``selfsign-certificate`` fails under OpenSSL 3 before it sends
    a single APDU ("Failed signing certificate", Yubico/yubico-piv-tool#388), so the
    certificate is made here and the tool's ``test-signature`` exercises its signing path.
    """
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    public_key = serialization.load_pem_public_key(public_pem.read_bytes())
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("algorithm", ["ECCP256", "RSA2048"])
def test_yubico_piv_tool_provisions_a_slot_and_opensc_signs(
    fresh_card: SoftCard, tmp_path: Path, algorithm: str
) -> None:
    """generate and import-certificate go through the 9B-authenticated management commands."""
    pub, cert = tmp_path / "pub.pem", tmp_path / "cert.pem"
    run(*YKPIV, "-s", "9a", "-a", "generate", "-A", algorithm, "-o", pub)
    cert.write_bytes(_certificate_for(pub, "made by yubico-piv-tool"))
    run(*YKPIV, "-s", "9a", "-a", "import-certificate", "-i", cert)

    new_key = serialization.load_pem_public_key(pub.read_bytes())
    assert new_key != fresh_card.certs[Slot.AUTHENTICATION].public_key()
    status = run(*YKPIV, "-a", "status")
    assert "made by yubico-piv-tool" in status
    assert f"Algorithm:\t{algorithm}" in status
    out = run(*YKPIV, "-s", "9a", "-a", "verify-pin", "-P", PIN, "-a", "test-signature", "-i", cert)
    assert "Successful" in out and "verification" in out

    data, sig = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(b"signed with a key yubico-piv-tool generated")
    mechanism = "ECDSA-SHA256" if algorithm == "ECCP256" else "SHA256-RSA-PKCS"
    pkcs11_sign("01", mechanism, data, sig)
    out = run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data)
    assert "Verified OK" in out


def test_yubico_piv_tool_generate_needs_the_management_key(fresh_card: SoftCard) -> None:
    wrong = "000000000000000000000000000000000000000000000000"
    out = run(*YKPIV, f"--key={wrong}", "-s", "9a", "-a", "generate", "-A", "ECCP256", ok=False)
    assert "authenticat" in out.lower(), out
    assert "cardbridge soft card" in run(*YKPIV, "-a", "status")  # 9A untouched
