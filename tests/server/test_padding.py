# SPDX-License-Identifier: Apache-2.0
"""Rule 3: which raw RSA blocks a signing key accepts, which decrypted blocks pass, and what a
9D decryption answers instead of refusing (implicit rejection)."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from server import padding as rule3
from server.algorithms import HASHES, Scheme
from server.errors import PaddingRejected
from server.padding import check_decrypted_block, check_signing_block, implicit_rejection

KEY = rsa.generate_private_key(65537, 2048)
N = KEY.public_key().public_numbers().n
K = 256
HASH_ALGS: dict[str, hashes.HashAlgorithm] = {
    "sha224": hashes.SHA224(), "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(), "sha512": hashes.SHA512(),
}


def _encoded(signature: bytes) -> bytes:
    """The encoded message inside a signature: s^e mod n (what the card sends the HSM)."""
    e = KEY.public_key().public_numbers().e
    return pow(int.from_bytes(signature, "big"), e, N).to_bytes(K, "big")


def _pkcs1(digest_info: bytes, ps_len: int | None = None) -> bytes:
    ps_len = K - 3 - len(digest_info) if ps_len is None else ps_len
    block = b"\x00\x01" + b"\xff" * ps_len + b"\x00" + digest_info
    return block


def _pss(hash_name: str, salt: int) -> bytes:
    h = HASH_ALGS[hash_name]
    digest = hashlib.new(hash_name, b"msg").digest()
    sig = KEY.sign(digest, padding.PSS(padding.MGF1(h), salt), utils.Prehashed(h))
    return _encoded(sig)


def _digest_info(hash_name: str) -> bytes:
    return HASHES[hash_name].digest_info(hashlib.new(hash_name, b"msg").digest())


SHA1_INFO = bytes.fromhex("3021300906052b0e03021a05000414") + hashlib.sha1(b"m").digest()  # noqa: S324
MD5_INFO = bytes.fromhex("3020300c06082a864886f70d020505000410") + hashlib.md5(b"m").digest()  # noqa: S324
TYPE2 = b"\x00\x02" + bytes(range(1, 201)) + b"\x00" + os.urandom(K - 203)

ACCEPTED = [
    pytest.param(_pkcs1(_digest_info(name)), Scheme.PKCS1V15, name, id=f"pkcs1-{name}")
    for name in HASH_ALGS
] + [
    pytest.param(_encoded(KEY.sign(b"msg", padding.PKCS1v15(), hashes.SHA256())),
                 Scheme.PKCS1V15, "sha256", id="pkcs1-from-cryptography"),
    pytest.param(_pss("sha256", 32), Scheme.PSS, "sha256", id="pss-sha256-salt-hlen"),
    pytest.param(_pss("sha384", 48), Scheme.PSS, "sha384", id="pss-sha384-salt-hlen"),
    pytest.param(_pss("sha512", 64), Scheme.PSS, "sha512", id="pss-sha512-salt-hlen"),
    pytest.param(_pss("sha256", 0), Scheme.PSS, "sha256", id="pss-sha256-no-salt"),
    pytest.param(_pss("sha256", 20), Scheme.PSS, "sha256", id="pss-sha256-short-salt"),
]

REFUSED = [
    pytest.param(os.urandom(K), id="random"),
    pytest.param(TYPE2, id="type-2-block-on-signing-key"),
    pytest.param(_pkcs1(MD5_INFO), id="pkcs1-unknown-digestinfo-md5"),
    pytest.param(_pkcs1(SHA1_INFO), id="pkcs1-sha1-refused"),
    pytest.param(_pkcs1(_digest_info("sha256"))[:-1], id="truncated-block"),
    pytest.param(_pkcs1(_digest_info("sha256")[:-1], K - 3 - 50), id="truncated-digestinfo"),
    pytest.param(b"\x00\x01" + b"\xff" * 7 + b"\x00" + os.urandom(K - 10), id="ps-too-short"),
    pytest.param(_pkcs1(_digest_info("sha256")).replace(b"\xff\xff", b"\xff\xfe", 1),
                 id="ps-not-all-ff"),
    pytest.param(b"\x00\x01" + b"\xff" * (K - 2), id="no-separator"),
    pytest.param(_pkcs1(_digest_info("sha256"), K - 3 - 51 - 1)[:-1] + b"\x00\x00",
                 id="digestinfo-with-trailing-bytes"),
    pytest.param(_pss("sha256", 222), id="pss-max-salt-refused-for-raw"),
    pytest.param(bytes([_pss("sha256", 32)[0] | 0x80]) + _pss("sha256", 32)[1:],
                 id="pss-leftmost-bit-set"),
    pytest.param(_pss("sha256", 32)[:100] + bytes([_pss("sha256", 32)[100] ^ 1])
                 + _pss("sha256", 32)[101:], id="pss-masked-db-tampered"),
    pytest.param(b"\xff" * K, id="block-not-below-modulus"),
    pytest.param(N.to_bytes(K, "big"), id="block-equals-modulus"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize(("block", "scheme", "hash_name"), ACCEPTED)
def test_accepted_signing_blocks(block: bytes, scheme: Scheme, hash_name: str) -> None:
    result = check_signing_block(block, K)
    assert result.scheme is scheme
    assert result.hash.name == hash_name


@pytest.mark.parametrize("block", REFUSED)
def test_refused_signing_blocks(block: bytes) -> None:
    with pytest.raises(PaddingRejected) as info:
        check_signing_block(block, K)
    assert info.value.code == "invalid_padding"
    assert info.value.status == 400


def test_sha1_refusal_says_why() -> None:
    with pytest.raises(PaddingRejected, match="SHA-1"):
        check_signing_block(_pkcs1(SHA1_INFO), K)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=K - 1, max_size=K - 1))
def test_random_blocks_shaped_like_pss_are_refused(body: bytes) -> None:
    block = bytes([body[0] & 0x7F]) + body[1:] + b"\xbc"
    assert len(block) == K
    with pytest.raises(PaddingRejected):
        check_signing_block(block, K)


def test_decrypted_type2_block_yields_the_message() -> None:
    ciphertext = KEY.public_key().encrypt(b"secret key", padding.PKCS1v15())
    block = pow(int.from_bytes(ciphertext, "big"), KEY.private_numbers().d, N).to_bytes(K, "big")
    assert check_decrypted_block(block) == b"secret key"


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(_pkcs1(_digest_info("sha256")), id="type-1"),
        pytest.param(os.urandom(K), id="random"),
        pytest.param(b"\x00\x02" + b"\x01" * 7 + b"\x00" + b"m" * (K - 10), id="ps-too-short"),
        pytest.param(b"\x00\x02" + b"\x01" * (K - 2), id="no-separator"),
        pytest.param(b"\x01\x02" + b"\x01" * 10 + b"\x00" + b"m" * (K - 13), id="bad-first-byte"),
    ],
)
def test_refused_decrypted_blocks(block: bytes) -> None:
    with pytest.raises(PaddingRejected):
        check_decrypted_block(block)


def _emsa_pss_encode(m_hash: bytes, salt: bytes) -> bytes:
    """RFC 8017 §9.1.1 EMSA-PSS-ENCODE with SHA-256/MGF1-SHA-256, emBits = 2047."""
    h = hashlib.sha256(b"\x00" * 8 + m_hash + salt).digest()
    db = bytes(K - len(salt) - 32 - 2) + b"\x01" + salt
    mask = b"".join(hashlib.sha256(h + i.to_bytes(4, "big")).digest() for i in range(7))
    masked = bytes(a ^ b for a, b in zip(db, mask, strict=False))
    return bytes([masked[0] & 0x7F]) + masked[1:] + h + b"\xbc"


def test_pss_block_starting_like_pkcs1_is_still_accepted() -> None:
    m_hash = hashlib.sha256(b"msg").digest()
    for i in range(1_000_000):
        em = _emsa_pss_encode(m_hash, i.to_bytes(32, "big"))
        if em[:2] == b"\x00\x01":
            break
    else:
        pytest.fail("no PSS encoding starting with 00 01 found")
    assert check_signing_block(em, K).scheme is Scheme.PSS
    # The hand-made encoder agrees with cryptography's: the signature of EM verifies.
    sig = pow(int.from_bytes(em, "big"), KEY.private_numbers().d, N).to_bytes(K, "big")
    h = hashes.SHA256()
    KEY.public_key().verify(sig, m_hash, padding.PSS(padding.MGF1(h), 32), utils.Prehashed(h))


# --- implicit rejection (finding 3) -----------------------------------------------------------

NOT_TYPE2 = [
    pytest.param(_pkcs1(_digest_info("sha256")), id="type-1"),
    pytest.param(os.urandom(K), id="random"),
    pytest.param(b"\x00\x02" + b"\x01" * 7 + b"\x00" + b"m" * (K - 10), id="ps-too-short"),
    pytest.param(b"\x00\x02" + b"\x01" * (K - 2), id="no-separator"),
    pytest.param(b"\x01\x02" + b"\x01" * 10 + b"\x00" + b"m" * (K - 13), id="bad-first-byte"),
]


def test_a_type2_block_keeps_its_message_under_a_fresh_padding() -> None:
    kdk = os.urandom(32)
    out = implicit_rejection(TYPE2, kdk)
    assert len(out) == K and check_decrypted_block(out) == check_decrypted_block(TYPE2)
    assert out != TYPE2  # never the raw result c^d: its PS comes from the key, not the block
    assert implicit_rejection(TYPE2, kdk) == out
    assert implicit_rejection(TYPE2, os.urandom(32)) != out


@pytest.mark.parametrize("block", NOT_TYPE2)
def test_anything_else_gets_a_synthetic_type2_block(block: bytes) -> None:
    kdk = os.urandom(32)
    out = implicit_rejection(block, kdk)
    assert len(out) == K and out[:2] == b"\x00\x02"
    message = check_decrypted_block(out)  # a well-formed block: the host unpads it
    assert implicit_rejection(block, kdk) == out  # the same ciphertext, the same answer
    assert check_decrypted_block(implicit_rejection(block, os.urandom(32))) != message


def test_synthetic_messages_take_every_length_up_to_k_minus_11() -> None:
    lengths = {len(check_decrypted_block(implicit_rejection(b"\x00" * K, os.urandom(32))))
               for _ in range(2000)}
    assert max(lengths) <= K - 11 and min(lengths) >= 0
    assert len(lengths) > 200  # spread over the whole range, not a few fixed sizes


def test_both_outcomes_cost_the_same_derivations(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early return: conforming or not, the same pseudo-random derivations run."""
    calls: list[tuple[bytes, int]] = []
    real = rule3._irprf

    def counting(kdk: bytes, label: bytes, length: int) -> bytes:
        calls.append((label, length > 0))
        return real(kdk, label, length)

    monkeypatch.setattr(rule3, "_irprf", counting)
    kdk = os.urandom(32)
    implicit_rejection(TYPE2, kdk)
    conforming, calls[:] = list(calls), []
    implicit_rejection(os.urandom(K), kdk)
    assert sorted(calls) == sorted(conforming)
    assert {label for label, _ in calls} == {b"message", b"length", b"padding"}
