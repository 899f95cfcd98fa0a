# SPDX-License-Identifier: Apache-2.0
"""server.hsm against a real SoftHSM2 token: every mechanism, key protection, concurrency."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from hsm_fixtures import HsmToken
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from server.errors import Conflict, Forbidden, HsmError, HsmUnavailable, InvalidRequest, NotFound
from server.hsm import Hsm, KeyAlg, KeyRef
from server.padding import check_decrypted_block

pytestmark = pytest.mark.hsm

HASH_ALGS: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()
}


def _label(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def rsa_ref(hsm: Hsm) -> KeyRef:
    return hsm.generate_key(KeyAlg.RSA2048, _label("rsa"))


@pytest.fixture(scope="module")
def p256_ref(hsm: Hsm) -> KeyRef:
    return hsm.generate_key(KeyAlg.P256, _label("p256"))


@pytest.fixture(scope="module")
def p384_ref(hsm: Hsm) -> KeyRef:
    return hsm.generate_key(KeyAlg.P384, _label("p384"))


@pytest.fixture(scope="module")
def ed_ref(hsm: Hsm) -> KeyRef:
    return hsm.generate_key(KeyAlg.ED25519, _label("ed"))


def test_softhsm_is_installed() -> None:
    assert os.path.exists("/usr/lib/softhsm/libsofthsm2.so"), "SoftHSM2 is required"


def test_init_token_is_idempotent(hsm_token: HsmToken) -> None:
    from server.hsm.softhsm import init_token

    again = init_token(hsm_token.data_dir, hsm_token.label, hsm_token.so_pin, hsm_token.pin)
    assert again == hsm_token.module
    tokens = list((hsm_token.data_dir / "tokens").iterdir())
    assert len(tokens) == 1
    assert oct((hsm_token.data_dir / "softhsm2.conf").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("alg", [KeyAlg.RSA2048, KeyAlg.P256, KeyAlg.ED25519])
def test_private_keys_are_sensitive_and_not_extractable(
    hsm: Hsm, hsm_token: HsmToken, alg: KeyAlg
) -> None:
    ref = hsm.generate_key(alg, _label("prot"))
    # A second session of the same process shares the login (PKCS#11 §5.6).
    token = pkcs11.lib(hsm_token.module).get_token(token_label=hsm_token.label)
    with token.open(rw=True) as s:
        priv = s.get_key(ObjectClass.PRIVATE_KEY, id=bytes.fromhex(ref.key_id))
        assert priv[Attribute.TOKEN] is True
        assert priv[Attribute.SENSITIVE] is True
        assert priv[Attribute.EXTRACTABLE] is False
        assert priv[Attribute.ALWAYS_SENSITIVE] is True
        assert priv[Attribute.NEVER_EXTRACTABLE] is True
        secret_attr = Attribute.PRIVATE_EXPONENT if alg.is_rsa else Attribute.VALUE
        with pytest.raises(p11e.AttributeSensitive):
            priv[secret_attr]
        wrapper = s.generate_key(KeyType.AES, 256, store=False)
        with pytest.raises(p11e.KeyUnextractable):
            wrapper.wrap_key(priv)  # type: ignore[attr-defined]
        with pytest.raises(p11e.PKCS11Error):
            priv[Attribute.EXTRACTABLE] = True
        assert priv[Attribute.EXTRACTABLE] is False
    hsm.destroy_key(ref)


def test_labels_are_unique_and_keys_can_be_destroyed(hsm: Hsm) -> None:
    label = _label("uniq")
    ref = hsm.generate_key(KeyAlg.P256, label)
    assert len(bytes.fromhex(ref.key_id)) == 16
    with pytest.raises(Conflict):
        hsm.generate_key(KeyAlg.P256, label)
    hsm.destroy_key(ref)
    with pytest.raises(NotFound):
        hsm.public_key(ref)
    hsm.generate_key(KeyAlg.P256, label)  # the label is free again
    with pytest.raises(NotFound):
        hsm.sign_digest(ref, bytes(32), "sha256")
    with pytest.raises(NotFound):
        hsm.destroy_key(ref)


def test_second_handle_shares_the_session_and_checks_the_pin(
    hsm: Hsm, hsm_token: HsmToken, p256_ref: KeyRef
) -> None:
    with pytest.raises(HsmError):
        Hsm.open(hsm_token.module, hsm_token.label, "000000")
    with Hsm.open(hsm_token.module, hsm_token.label, hsm_token.pin) as other:
        sig = other.sign_digest(p256_ref, bytes(32), "sha256")
    pub = hsm.public_key(p256_ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # Closing the second handle left the first one working.
    assert hsm.sign_digest(p256_ref, bytes(32), "sha256")


def test_unknown_token_is_not_found(hsm_token: HsmToken) -> None:
    with pytest.raises(HsmError):
        Hsm.open(hsm_token.module, "no-such-token", hsm_token.pin)


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rsa_pkcs1v15_over_digest_info_verifies(
    hsm: Hsm, rsa_ref: KeyRef, hash_name: str
) -> None:
    digest = hashlib.new(hash_name, b"document").digest()
    sig = hsm.sign_digest(rsa_ref, digest, hash_name)
    pub = hsm.public_key(rsa_ref)
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    pub.verify(sig, b"document", padding.PKCS1v15(), HASH_ALGS[hash_name])


@pytest.mark.parametrize(("hash_name", "salt"), [("sha256", 222), ("sha256", 32), ("sha512", 64)])
def test_rsa_pss_verifies(hsm: Hsm, rsa_ref: KeyRef, hash_name: str, salt: int) -> None:
    digest = hashlib.new(hash_name, b"document").digest()
    sig = hsm.sign_digest(rsa_ref, digest, hash_name, pss_salt_len=salt)
    h = HASH_ALGS[hash_name]
    pub = hsm.public_key(rsa_ref)
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(sig, b"document", padding.PSS(padding.MGF1(h), salt), h)
    with pytest.raises(InvalidSignature):
        pub.verify(sig, b"other", padding.PSS(padding.MGF1(h), salt), h)


def test_rsa_raw_equals_pkcs1v15(hsm: Hsm, rsa_ref: KeyRef) -> None:
    digest = hashlib.sha256(b"raw").digest()
    t = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(t)) + b"\x00" + t
    assert hsm.rsa_raw(rsa_ref, block) == hsm.sign_digest(rsa_ref, digest, "sha256")


def test_rsa_raw_refuses_block_not_below_modulus(hsm: Hsm, rsa_ref: KeyRef) -> None:
    with pytest.raises(InvalidRequest):
        hsm.rsa_raw(rsa_ref, b"\xff" * 256)


def test_rsa_decrypt_raw_then_type2_check(hsm: Hsm, rsa_ref: KeyRef) -> None:
    pub = hsm.public_key(rsa_ref)
    assert isinstance(pub, rsa.RSAPublicKey)
    ciphertext = pub.encrypt(b"session key", padding.PKCS1v15())
    block = hsm.rsa_decrypt_raw(rsa_ref, ciphertext)
    assert len(block) == 256 and block[:2] == b"\x00\x02"
    assert check_decrypted_block(block) == b"session key"
    with pytest.raises(InvalidRequest):
        hsm.rsa_decrypt_raw(rsa_ref, ciphertext[1:])


@pytest.mark.parametrize(
    ("ref_name", "hash_name"), [("p256_ref", "sha256"), ("p384_ref", "sha384")]
)
def test_ecdsa_returns_der_that_verifies(
    hsm: Hsm, request: pytest.FixtureRequest, ref_name: str, hash_name: str
) -> None:
    ref = request.getfixturevalue(ref_name)
    digest = hashlib.new(hash_name, b"document").digest()
    sig = hsm.sign_digest(ref, digest, hash_name)
    assert sig[0] == 0x30  # DER SEQUENCE { r, s }
    utils.decode_dss_signature(sig)
    pub = hsm.public_key(ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"document", ec.ECDSA(HASH_ALGS[hash_name]))


def test_sign_digest_refuses_bad_input(
    hsm: Hsm, rsa_ref: KeyRef, p256_ref: KeyRef, ed_ref: KeyRef
) -> None:
    with pytest.raises(InvalidRequest, match="length"):
        hsm.sign_digest(rsa_ref, bytes(31), "sha256")
    with pytest.raises(InvalidRequest):
        hsm.sign_digest(rsa_ref, bytes(20), "sha1")
    with pytest.raises(InvalidRequest):
        hsm.sign_digest(ed_ref, bytes(64), "sha512")
    with pytest.raises(InvalidRequest):
        hsm.sign_digest(p256_ref, bytes(32), "sha256", pss_salt_len=32)
    with pytest.raises(InvalidRequest):
        hsm.rsa_raw(p256_ref, bytes(32))
    with pytest.raises(InvalidRequest):
        hsm.eddsa_sign(p256_ref, b"m")


def test_ed25519_verifies(hsm: Hsm, ed_ref: KeyRef) -> None:
    sig = hsm.eddsa_sign(ed_ref, b"a whole message")
    pub = hsm.public_key(ed_ref)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig, b"a whole message")


@pytest.mark.parametrize(("ref_name", "curve"), [("p256_ref", ec.SECP256R1()),
                                                 ("p384_ref", ec.SECP384R1())])
def test_ecdh_matches_cryptography(
    hsm: Hsm, request: pytest.FixtureRequest, ref_name: str, curve: ec.EllipticCurve
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ref = request.getfixturevalue(ref_name)
    peer = ec.generate_private_key(curve)
    point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    pub = hsm.public_key(ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert hsm.ecdh(ref, point) == peer.exchange(ec.ECDH(), pub)
    off_curve = point[:-1] + bytes([point[-1] ^ 1])
    compressed = peer.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    for bad in (off_curve, compressed, b"", point[:-1]):
        with pytest.raises(InvalidRequest):
            hsm.ecdh(ref, bad)


def test_ecdh_refuses_rsa(hsm: Hsm, rsa_ref: KeyRef) -> None:
    with pytest.raises(InvalidRequest):
        hsm.ecdh(rsa_ref, b"\x04" + bytes(64))


def test_public_key_checks_the_algorithm(hsm: Hsm, p256_ref: KeyRef) -> None:
    with pytest.raises(HsmError):
        hsm.public_key(KeyRef(p256_ref.key_id, KeyAlg.P384))


@pytest.mark.parametrize("alg", [KeyAlg.RSA3072, KeyAlg.RSA4096])
@pytest.mark.slow
def test_large_rsa_keys(hsm: Hsm, alg: KeyAlg) -> None:
    ref = hsm.generate_key(alg, _label(alg.value))
    digest = hashlib.sha384(b"x").digest()
    sig = hsm.sign_digest(ref, digest, "sha384")
    pub = hsm.public_key(ref)
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == alg.bits
    pub.verify(sig, b"x", padding.PKCS1v15(), hashes.SHA384())
    hsm.destroy_key(ref)


@pytest.mark.parametrize("ref_name", ["p256_ref", "rsa_ref"])
def test_concurrent_signatures_all_verify(
    hsm: Hsm, request: pytest.FixtureRequest, ref_name: str
) -> None:
    ref = request.getfixturevalue(ref_name)
    pub = hsm.public_key(ref)

    def worker(i: int) -> list[tuple[bytes, bytes]]:
        out = []
        for j in range(50):
            digest = hashlib.sha256(f"{i}/{j}".encode()).digest()
            out.append((digest, hsm.sign_digest(ref, digest, "sha256")))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [pair for chunk in pool.map(worker, range(8)) for pair in chunk]
    assert len(results) == 400
    for digest, sig in results:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        else:
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_a_token_in_another_directory_is_never_opened_by_mistake(
    hsm: Hsm, hsm_token: HsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.hsm.softhsm import init_token

    monkeypatch.setenv("SOFTHSM2_CONF", os.environ["SOFTHSM2_CONF"])  # restored afterwards
    # Same label, other directory: SoftHSM would still serve the first token, so refuse.
    init_token(tmp_path, hsm_token.label, hsm_token.so_pin, hsm_token.pin)
    with pytest.raises(HsmError, match="SOFTHSM2_CONF changed"):
        Hsm.open(hsm_token.module, hsm_token.label, hsm_token.pin)
    assert len(list((tmp_path / "tokens").iterdir())) == 1


def test_a_lost_session_is_replaced_on_the_next_operation(hsm: Hsm, p256_ref: KeyRef) -> None:
    # Close the shared session behind the handle's back, as a restarted network HSM would.
    hsm._shared.session.close()
    with pytest.raises(HsmUnavailable, match="SessionHandleInvalid"):
        hsm.sign_digest(p256_ref, bytes(32), "sha256")
    sig = hsm.sign_digest(p256_ref, bytes(32), "sha256")
    pub = hsm.public_key(p256_ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("alg", [KeyAlg.RSA2048, KeyAlg.P256])
def test_sign_only_keys_cannot_decrypt_or_derive(hsm: Hsm, alg: KeyAlg) -> None:
    ref = hsm.generate_key(alg, _label("signonly"), sign_only=True)
    pub = hsm.public_key(ref)
    if isinstance(pub, rsa.RSAPublicKey):
        with pytest.raises(Forbidden):
            hsm.rsa_decrypt_raw(ref, pub.encrypt(b"k", padding.PKCS1v15()))
        block = hsm.rsa_raw(ref, b"\x00\x01" + b"\xff" * 200 + b"\x00" + bytes(53))
        assert len(block) == 256
    else:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        with pytest.raises(Forbidden):
            hsm.ecdh(ref, peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))
        assert hsm.sign_digest(ref, bytes(32), "sha256")
    hsm.destroy_key(ref)


def test_keys_generated_by_another_process_are_usable(
    hsm: Hsm, hsm_token: HsmToken
) -> None:
    """Server workers are separate processes sharing one token: one enrolls, another signs."""
    code = (
        "import sys; from server.hsm import Hsm, KeyAlg\n"
        "h = Hsm.open(sys.argv[1], sys.argv[2], sys.stdin.read())\n"
        "print(h.generate_key(KeyAlg.P256, sys.argv[3]).key_id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, hsm_token.module, hsm_token.label, _label("other")],
        input=hsm_token.pin, capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]},
    )
    ref = KeyRef(out.stdout.strip(), KeyAlg.P256)
    sig = hsm.sign_digest(ref, bytes(32), "sha256")
    pub = hsm.public_key(ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
