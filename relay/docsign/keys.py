# SPDX-License-Identifier: Apache-2.0
"""The remote 9C key in the shapes the signature libraries take: a pyHanko :class:`Signer`
(for CMS: PAdES and CAdES) and cryptography private-key objects (for signxml: XAdES). Each
hashes what the library gives it and hands the digest to its :class:`Participant` of the
batch; the private key stays in the server's HSM.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, NoReturn

from asn1crypto import algos
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from cryptography.utils import Buffer
from pyhanko.sign.signers.pdf_cms import Signer
from pyhanko_certvalidator.registry import SimpleCertificateStore

from relay.docsign.remote import Participant


class RemoteSigner(Signer):
    """pyHanko's signer of CMS signatures (RFC 5652) with the remote key: pyHanko builds the
    signed attributes; their digest is signed through the participant.

    :param participant: the document's seat in the batch.
    """

    def __init__(self, participant: Participant) -> None:
        credential = participant.credential
        super().__init__(
            signing_cert=credential.certificate,
            cert_registry=SimpleCertificateStore.from_certs(credential.chain[1:]),
            signature_mechanism=algos.SignedDigestAlgorithm({"algorithm": credential.mechanism}),
        )
        self.participant = participant

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        """The signature of ``data``'s digest; for pyHanko's size estimate, zeros as long as
        the largest signature the key makes."""
        if dry_run:
            return bytes(self.participant.credential.signature_size)
        return await self.participant.sign(hashlib.new(digest_algorithm, data).digest())


class _RemoteKey:
    """What both key types share: the participant, the event loop the batch runs on (the XML
    signer runs in a worker thread), and no private numbers to give out."""

    def __init__(self, participant: Participant, loop: asyncio.AbstractEventLoop) -> None:
        self.participant = participant
        self.loop = loop
        self._public = load_der_public_key(participant.credential.certificate.public_key.dump())

    def _sign(self, data: Buffer, algorithm: Any) -> bytes:
        if not isinstance(algorithm, hashes.HashAlgorithm):
            raise UnsupportedAlgorithm("the remote key signs messages with a hash")
        if algorithm.name != self.participant.credential.digest:
            raise UnsupportedAlgorithm(
                f"the remote key signs with {self.participant.credential.digest} only"
            )
        digest = hashlib.new(algorithm.name, bytes(data)).digest()
        return asyncio.run_coroutine_threadsafe(self.participant.sign(digest), self.loop).result()

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self

    def private_numbers(self) -> NoReturn:
        raise UnsupportedAlgorithm("the private key stays in the server's HSM")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        raise UnsupportedAlgorithm("the private key stays in the server's HSM")


class RemoteEcKey(_RemoteKey, ec.EllipticCurvePrivateKey):
    """The remote key as cryptography's EC private key: ECDSA (DER), nothing else."""

    def sign(
        self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA) or isinstance(
            signature_algorithm.algorithm, utils.Prehashed
        ):
            raise UnsupportedAlgorithm("the remote key signs ECDSA over a message")
        return self._sign(data, signature_algorithm.algorithm)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithm("the signature key does no key agreement")

    def public_key(self) -> ec.EllipticCurvePublicKey:
        assert isinstance(self._public, ec.EllipticCurvePublicKey)  # noqa: S101 -- by type
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size


class RemoteRsaKey(_RemoteKey, rsa.RSAPrivateKey):
    """The remote key as cryptography's RSA private key: PKCS#1 v1.5 signatures only."""

    def sign(
        self,
        data: Buffer,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
    ) -> bytes:
        if padding.name != "EMSA-PKCS1-v1_5":
            raise UnsupportedAlgorithm("the remote key signs PKCS#1 v1.5")
        return self._sign(data, algorithm)

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithm("the signature key does not decrypt")

    def public_key(self) -> rsa.RSAPublicKey:
        assert isinstance(self._public, rsa.RSAPublicKey)  # noqa: S101 -- by type
        return self._public

    @property
    def key_size(self) -> int:
        return self.public_key().key_size


def remote_key(
    participant: Participant, loop: asyncio.AbstractEventLoop
) -> RemoteEcKey | RemoteRsaKey:
    """The participant's key as a cryptography private key, for code that runs in a worker
    thread while ``loop`` runs the batch."""
    if participant.credential.is_ec:
        return RemoteEcKey(participant, loop)
    return RemoteRsaKey(participant, loop)
