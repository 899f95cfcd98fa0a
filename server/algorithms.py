# SPDX-License-Identifier: Apache-2.0
"""Algorithm tables for CSC signHash and X.509: digests, DigestInfo prefixes, signAlgo OIDs.

SHA-1 is refused everywhere (digests, DigestInfo blocks, PSS): chosen-prefix collisions make
a SHA-1 signature over a digest the server cannot see a forgery risk, and the CSC API itself
requires SHA-256 or stronger (csc-api.md §5). SHA-224 is accepted for raw PIV blocks only
because it is a full-strength SHA-2 member that some card clients still emit.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from asn1crypto import algos

from server.errors import InvalidRequest


class KeyAlg(StrEnum):
    """Key algorithms, named as on the command line (``--alg``)."""

    P256 = "p256"
    P384 = "p384"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    RSA4096 = "rsa4096"
    ED25519 = "ed25519"

    @property
    def is_rsa(self) -> bool:
        """True for the RSA sizes."""
        return self.value.startswith("rsa")

    @property
    def bits(self) -> int:
        """Modulus or field size in bits."""
        return {"p256": 256, "p384": 384, "ed25519": 255}.get(self.value) or int(self.value[3:])

    @property
    def curve_oid(self) -> str | None:
        """Named-curve OID of an ECDSA/ECDH key (SEC 2), None for RSA and Ed25519."""
        return {"p256": "1.2.840.10045.3.1.7", "p384": "1.3.132.0.34"}.get(self.value)


@dataclass(frozen=True)
class HashAlg:
    """One digest algorithm: its short name, OID, output length and DigestInfo prefix."""

    name: str
    oid: str
    size: int
    digest_info_prefix: bytes

    def digest_info(self, digest: bytes) -> bytes:
        """DER DigestInfo (RFC 8017 §9.2 step 2) for ``digest``, checking its length."""
        check_digest_length(digest, self)
        return self.digest_info_prefix + digest


# RFC 8017 §9.2 note 1: DER of DigestInfo up to the OCTET STRING header.
HASHES: Final[dict[str, HashAlg]] = {
    h.name: h
    for h in (
        HashAlg("sha224", "2.16.840.1.101.3.4.2.4", 28,
                bytes.fromhex("302d300d06096086480165030402040500041c")),
        HashAlg("sha256", "2.16.840.1.101.3.4.2.1", 32,
                bytes.fromhex("3031300d060960864801650304020105000420")),
        HashAlg("sha384", "2.16.840.1.101.3.4.2.2", 48,
                bytes.fromhex("3041300d060960864801650304020205000430")),
        HashAlg("sha512", "2.16.840.1.101.3.4.2.3", 64,
                bytes.fromhex("3051300d060960864801650304020305000440")),
    )
}
HASHES_BY_OID: Final[dict[str, HashAlg]] = {h.oid: h for h in HASHES.values()}

#: Digests the CSC API signs (csc-api.md §5: SHA-256 or stronger).
CSC_HASHES: Final[frozenset[str]] = frozenset({"sha256", "sha384", "sha512"})

OID_RSA_ENCRYPTION: Final = "1.2.840.113549.1.1.1"
OID_RSASSA_PSS: Final = "1.2.840.113549.1.1.10"
OID_ED25519: Final = "1.3.101.112"


class Scheme(StrEnum):
    """How a signature is computed on a prehashed digest (csc-api.md §5)."""

    PKCS1V15 = "pkcs1v15"
    PSS = "pss"
    ECDSA = "ecdsa"


@dataclass(frozen=True)
class SignAlgo:
    """A CSC ``signAlgo``: its scheme and, when the OID implies one, its hash."""

    oid: str
    scheme: Scheme
    hash: HashAlg | None


SIGN_ALGOS: Final[dict[str, SignAlgo]] = {
    a.oid: a
    for a in (
        SignAlgo(OID_RSA_ENCRYPTION, Scheme.PKCS1V15, None),
        SignAlgo("1.2.840.113549.1.1.11", Scheme.PKCS1V15, HASHES["sha256"]),
        SignAlgo("1.2.840.113549.1.1.12", Scheme.PKCS1V15, HASHES["sha384"]),
        SignAlgo("1.2.840.113549.1.1.13", Scheme.PKCS1V15, HASHES["sha512"]),
        SignAlgo(OID_RSASSA_PSS, Scheme.PSS, None),
        SignAlgo("1.2.840.10045.4.3.2", Scheme.ECDSA, HASHES["sha256"]),
        SignAlgo("1.2.840.10045.4.3.3", Scheme.ECDSA, HASHES["sha384"]),
        SignAlgo("1.2.840.10045.4.3.4", Scheme.ECDSA, HASHES["sha512"]),
    )
}

_RSA_ALGOS: Final = [
    "1.2.840.113549.1.1.11",
    "1.2.840.113549.1.1.12",
    "1.2.840.113549.1.1.13",
    OID_RSA_ENCRYPTION,
    OID_RSASSA_PSS,
]
_EC_ALGOS: Final = ["1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4"]


def key_algos(alg: KeyAlg) -> list[str]:
    """signAlgo OIDs for ``credentials/info`` ``key.algo`` of a key of CLI type ``alg``.

    Composite OIDs come first because pyHanko refuses a key that advertises only
    rsaEncryption (csc-api.md §4). Ed25519 gets none: signHash cannot produce an RFC 8419
    signature from a digest (csc-api.md §5 rule 4); EdDSA lives under ``/api/v1`` only.
    """
    if alg.is_rsa:
        return list(_RSA_ALGOS)
    if alg.curve_oid is not None:
        return list(_EC_ALGOS)
    return []


def hash_by_name(name: str) -> HashAlg:
    """Look up a digest by short name (``sha256``); SHA-1 and unknown names are refused."""
    try:
        return HASHES[name.lower().replace("-", "")]
    except KeyError:
        raise InvalidRequest(f"Unsupported hash algorithm {name!r}") from None


def hash_by_oid(oid: str) -> HashAlg:
    """Look up a digest by OID (``hashAlgorithmOID`` / v1 ``hashAlgo``)."""
    try:
        return HASHES_BY_OID[oid]
    except KeyError:
        raise InvalidRequest(f"Unsupported hash algorithm OID {oid!r}") from None


def csc_hash_for_length(length: int) -> HashAlg:
    """Infer the digest from its length, for authorize calls without a hash OID (§4)."""
    for name in sorted(CSC_HASHES):
        if HASHES[name].size == length:
            return HASHES[name]
    raise InvalidRequest("Invalid digest value length")


def check_digest_length(digest: bytes, hash_alg: HashAlg) -> None:
    """Refuse a digest whose length does not match its algorithm."""
    if len(digest) != hash_alg.size:
        raise InvalidRequest("Invalid digest value length")


def sign_algo(oid: str) -> SignAlgo:
    """Look up a CSC ``signAlgo`` OID; Ed25519 and unknown OIDs are refused."""
    try:
        return SIGN_ALGOS[oid]
    except KeyError:
        raise InvalidRequest(f"Unsupported signAlgo {oid!r}") from None


@dataclass(frozen=True)
class PssParams:
    """RSASSA-PSS parameters (RFC 8017 A.2.3) restricted to MGF1 with the message hash."""

    hash: HashAlg
    salt_length: int


def parse_pss_params(params_b64: str) -> PssParams:
    """Parse CSC ``signAlgoParams``: base64 DER RSASSA-PSS-params (RFC 4055 §3.1).

    Only MGF1 with the same hash as the message digest and trailer field 1 are accepted,
    which is what every CSC client sends. Absent fields take RFC 4055's SHA-1 defaults and
    are therefore refused.
    """
    try:
        der = base64.b64decode(params_b64, validate=True)
        params = algos.RSASSAPSSParams.load(der)
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        mgf_name = mgf["algorithm"].native
        mgf_hash = mgf["parameters"]["algorithm"].native
        salt_length = int(params["salt_length"].native)
        trailer = params["trailer_field"].native
    except (binascii.Error, ValueError, TypeError, KeyError) as e:
        raise InvalidRequest("Invalid parameter signAlgoParams") from e
    hash_alg = hash_by_name(hash_name)
    if hash_alg.name not in CSC_HASHES:
        raise InvalidRequest(f"Unsupported PSS hash {hash_name!r}")
    if mgf_name != "mgf1" or mgf_hash != hash_name:
        raise InvalidRequest("PSS requires MGF1 with the message hash")
    if trailer != "trailer_field_bc" or salt_length < 0:
        raise InvalidRequest("Invalid parameter signAlgoParams")
    return PssParams(hash_alg, salt_length)


def max_pss_salt_length(key_bits: int, hash_alg: HashAlg) -> int:
    """Largest PSS salt for a modulus of ``key_bits`` (RFC 8017 §9.1.1: emLen - hLen - 2)."""
    em_len = (key_bits - 1 + 7) // 8
    return em_len - hash_alg.size - 2
