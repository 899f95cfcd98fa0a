# SPDX-License-Identifier: Apache-2.0
"""cryptography private-key objects whose private operations run in the HSM.

cryptography's X.509 builders recognise a key by ``isinstance`` against its private-key ABCs
and then call ``key.sign(data, ...)`` (field-notes.md, style-models.md §3), so these
subclasses let ``CertificateBuilder.sign`` and ``CertificateSigningRequestBuilder.sign`` use
keys that never leave the HSM. Asking for the private numbers or bytes raises.
"""

from __future__ import annotations

from typing import Any, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.utils import Buffer

from server.algorithms import KeyAlg, hash_by_name, max_pss_salt_length
from server.errors import HsmError
from server.hsm.pkcs11 import Hsm, KeyRef
from server.padding import check_decrypted_block


def _wrong_key(ref: KeyRef) -> HsmError:
    return HsmError(f"Key {ref.key_id} is not {ref.alg.value}")


def _refuse_export() -> NoReturn:
    raise UnsupportedAlgorithm("The private key stays in the HSM")


def _digest(
    data: Buffer, algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo
) -> tuple[bytes, str]:
    """The digest to sign and its hash name: hash ``data`` unless it is already a digest."""
    if isinstance(algorithm, utils.NoDigestInfo):
        raise UnsupportedAlgorithm("Signing without a DigestInfo is refused (rule 3)")
    if isinstance(algorithm, utils.Prehashed):
        return bytes(data), algorithm._algorithm.name
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm.name


class _HsmKey:
    """What every HSM-backed key holds: the HSM handle and the key reference."""

    def __init__(self, hsm: Hsm, ref: KeyRef) -> None:
        self.hsm = hsm
        self.ref = ref

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self

    def private_numbers(self) -> NoReturn:
        _refuse_export()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        _refuse_export()


class HsmEcPrivateKey(_HsmKey, ec.EllipticCurvePrivateKey):
    """A P-256 / P-384 key in the HSM: ECDSA (DER) and ECDH."""

    def sign(
        self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        """ECDSA with CKM_ECDSA on the digest; DER out (what X.509 and CMS need)."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("Only ECDSA")
        digest, name = _digest(data, signature_algorithm.algorithm)
        return self.hsm.sign_digest(self.ref, digest, name)

    def exchange(
        self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey
    ) -> bytes:
        """ECDH in the HSM with an uncompressed peer point."""
        point = peer_public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return self.hsm.ecdh(self.ref, point)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.hsm.public_key(self.ref)
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key
        raise _wrong_key(self.ref)

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size


class HsmRsaPrivateKey(_HsmKey, rsa.RSAPrivateKey):
    """An RSA key in the HSM: PKCS#1 v1.5 and PSS signatures, PKCS#1 v1.5 decryption."""

    def sign(
        self,
        data: Buffer,
        padding: asym_padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
    ) -> bytes:
        """PKCS#1 v1.5 over a DigestInfo, or PSS with MGF1 of the same hash."""
        digest, name = _digest(data, algorithm)
        if isinstance(padding, asym_padding.PKCS1v15):
            return self.hsm.sign_digest(self.ref, digest, name)
        if isinstance(padding, asym_padding.PSS):
            mgf = padding._mgf
            if not isinstance(mgf, asym_padding.MGF1) or mgf._algorithm.name != name:
                raise UnsupportedAlgorithm("PSS needs MGF1 with the message hash")
            return self.hsm.sign_digest(
                self.ref, digest, name, pss_salt_len=self._salt_length(padding, name)
            )
        raise UnsupportedAlgorithm(f"Unsupported padding {padding.name}")

    def _salt_length(self, padding: asym_padding.PSS, hash_name: str) -> int:
        salt = padding._salt_length
        if isinstance(salt, int):
            return salt
        hash_alg = hash_by_name(hash_name)
        if salt is asym_padding.PSS.MAX_LENGTH:
            return max_pss_salt_length(self.key_size, hash_alg)
        if salt is asym_padding.PSS.DIGEST_LENGTH:
            return hash_alg.size
        raise UnsupportedAlgorithm("PSS salt length must be fixed to sign")

    def decrypt(self, ciphertext: bytes, padding: asym_padding.AsymmetricPadding) -> bytes:
        """PKCS#1 v1.5 decryption: raw RSA in the HSM, then the type-2 check."""
        if not isinstance(padding, asym_padding.PKCS1v15):
            raise UnsupportedAlgorithm("Only PKCS#1 v1.5 decryption")
        return check_decrypted_block(self.hsm.rsa_decrypt_raw(self.ref, ciphertext))

    def public_key(self) -> rsa.RSAPublicKey:
        key = self.hsm.public_key(self.ref)
        if isinstance(key, rsa.RSAPublicKey):
            return key
        raise _wrong_key(self.ref)

    @property
    def key_size(self) -> int:
        return self.ref.alg.bits


class HsmEd25519PrivateKey(_HsmKey, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in the HSM (pure EdDSA over the whole message)."""

    def sign(self, data: Buffer) -> bytes:
        return self.hsm.eddsa_sign(self.ref, bytes(data))

    def public_key(self) -> ed25519.Ed25519PublicKey:
        key = self.hsm.public_key(self.ref)
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key
        raise _wrong_key(self.ref)

    def private_bytes_raw(self) -> bytes:
        _refuse_export()


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey | HsmEd25519PrivateKey


def private_key(hsm: Hsm, ref: KeyRef) -> HsmPrivateKey:
    """The cryptography private-key object for an HSM key."""
    if ref.alg.is_rsa:
        return HsmRsaPrivateKey(hsm, ref)
    if ref.alg is KeyAlg.ED25519:
        return HsmEd25519PrivateKey(hsm, ref)
    return HsmEcPrivateKey(hsm, ref)
