# SPDX-License-Identifier: Apache-2.0
"""CSC/X.509 algorithm tables: OIDs, DigestInfo prefixes, PSS parameters."""

from __future__ import annotations

import base64
import hashlib

import pytest
from asn1crypto import algos
from asn1crypto.core import Null

from server.algorithms import (
    HASHES,
    KeyAlg,
    Scheme,
    csc_hash_for_length,
    hash_by_name,
    hash_by_oid,
    key_algos,
    max_pss_salt_length,
    parse_pss_params,
    sign_algo,
)
from server.errors import InvalidRequest


@pytest.mark.parametrize("name", sorted(HASHES))
def test_digest_info_prefix_matches_asn1(name: str) -> None:
    digest = hashlib.new(name, b"x").digest()
    expected = algos.DigestInfo(
        {"digest_algorithm": {"algorithm": name, "parameters": Null()}, "digest": digest}
    ).dump()
    assert HASHES[name].digest_info(digest) == expected
    assert hash_by_oid(algos.DigestAlgorithmId(name).dotted) is HASHES[name]
    assert HASHES[name].size == len(digest)


def test_hash_lookups_refuse_sha1_and_unknown() -> None:
    assert hash_by_name("SHA-256") is HASHES["sha256"]
    for bad in ("sha1", "md5", "sha3_256"):
        with pytest.raises(InvalidRequest):
            hash_by_name(bad)
    with pytest.raises(InvalidRequest):
        hash_by_oid("1.3.14.3.2.26")
    with pytest.raises(InvalidRequest, match="length"):
        HASHES["sha256"].digest_info(bytes(31))


def test_digest_length_inference_is_csc_only() -> None:
    assert csc_hash_for_length(32).name == "sha256"
    assert csc_hash_for_length(48).name == "sha384"
    assert csc_hash_for_length(64).name == "sha512"
    for bad in (20, 28, 0):
        with pytest.raises(InvalidRequest, match="Invalid digest value length"):
            csc_hash_for_length(bad)


@pytest.mark.parametrize(
    ("oid", "scheme", "hash_name"),
    [
        ("1.2.840.113549.1.1.1", Scheme.PKCS1V15, None),
        ("1.2.840.113549.1.1.11", Scheme.PKCS1V15, "sha256"),
        ("1.2.840.113549.1.1.12", Scheme.PKCS1V15, "sha384"),
        ("1.2.840.113549.1.1.13", Scheme.PKCS1V15, "sha512"),
        ("1.2.840.113549.1.1.10", Scheme.PSS, None),
        ("1.2.840.10045.4.3.2", Scheme.ECDSA, "sha256"),
        ("1.2.840.10045.4.3.3", Scheme.ECDSA, "sha384"),
        ("1.2.840.10045.4.3.4", Scheme.ECDSA, "sha512"),
    ],
)
def test_sign_algos(oid: str, scheme: Scheme, hash_name: str | None) -> None:
    algo = sign_algo(oid)
    assert algo.scheme is scheme
    assert (algo.hash.name if algo.hash else None) == hash_name


@pytest.mark.parametrize("oid", ["1.3.101.112", "1.2.840.113549.1.1.5", "0.4.0.127.0.7.1.1.4.1.3"])
def test_sign_algo_refuses_eddsa_sha1_and_plain_ecdsa(oid: str) -> None:
    with pytest.raises(InvalidRequest):
        sign_algo(oid)


def test_key_algos_are_composite_first_and_usable() -> None:
    rsa_algos = key_algos(KeyAlg.RSA2048)
    assert rsa_algos[0] == "1.2.840.113549.1.1.11"
    assert "1.2.840.113549.1.1.10" in rsa_algos and "1.2.840.113549.1.1.1" in rsa_algos
    assert key_algos(KeyAlg.RSA4096) == rsa_algos
    assert key_algos(KeyAlg.P256) == ["1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3",
                                      "1.2.840.10045.4.3.4"]
    assert key_algos(KeyAlg.P384) == key_algos(KeyAlg.P256)
    assert key_algos(KeyAlg.ED25519) == []
    for alg in KeyAlg:
        for oid in key_algos(alg):
            sign_algo(oid)


def test_key_alg_properties() -> None:
    assert [a.bits for a in KeyAlg] == [256, 384, 2048, 3072, 4096, 255]
    assert KeyAlg("rsa3072").is_rsa and not KeyAlg.P256.is_rsa
    assert KeyAlg.P384.curve_oid == "1.3.132.0.34"
    assert KeyAlg.ED25519.curve_oid is None and KeyAlg.RSA2048.curve_oid is None


def _pss_params(hash_name: str, mgf_hash: str, salt: int) -> str:
    der = algos.RSASSAPSSParams({
        "hash_algorithm": {"algorithm": hash_name},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": mgf_hash}},
        "salt_length": salt,
    }).dump()
    return base64.b64encode(der).decode()


def test_pss_params_as_pyhanko_sends_them() -> None:
    params = parse_pss_params(_pss_params("sha256", "sha256", 222))
    assert params.hash.name == "sha256" and params.salt_length == 222
    assert max_pss_salt_length(2048, HASHES["sha256"]) == 222
    assert max_pss_salt_length(3072, HASHES["sha384"]) == 334
    assert parse_pss_params(_pss_params("sha512", "sha512", 64)).salt_length == 64


@pytest.mark.parametrize(
    "b64",
    [
        pytest.param(_pss_params("sha256", "sha384", 32), id="mgf-hash-mismatch"),
        pytest.param(base64.b64encode(bytes.fromhex("3000")).decode(), id="sha1-defaults"),
        pytest.param(_pss_params("sha224", "sha224", 28), id="sha224-not-csc"),
        pytest.param("not base64!", id="bad-base64"),
        pytest.param(base64.b64encode(b"\x30\x03\x02\x01").decode(), id="bad-der"),
        pytest.param("", id="empty"),
    ],
)
def test_bad_pss_params_are_refused(b64: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_pss_params(b64)
