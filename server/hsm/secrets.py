# SPDX-License-Identifier: Apache-2.0
"""The server's own secret keys, generated in the HSM and never extractable (rule 1).

- ``cardbridge/audit-mac`` (HMAC-SHA256): the MAC of every audit record and of the audit
  checkpoints (:mod:`server.services.audit`), so whoever can write the database cannot
  rewrite the chain without the HSM.
- ``cardbridge/seal`` (HMAC-SHA256): derives the AES-256-GCM key of each sealed value, the
  secrets the server must read back, the TOTP seeds (:mod:`server.services.otp`). The AES
  step runs in software on a key the HSM derives for that value alone: p11-kit 0.24's RPC,
  the network-HSM stand-in, refuses CKM_AES_GCM's parameters, and HMAC passes everywhere.
- ``cardbridge/rsa-implicit-rejection`` (HMAC-SHA256): the key-derivation key of RSA
  implicit rejection (:mod:`server.padding`, draft-irtf-cfrg-rsa-guidance §7.2).

``cardbridge server init`` creates whichever is missing (a new data directory, or an upgrade
of an existing one); a server process only :meth:`ServerKeys.load`\\ s them, from the token
every node shares.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import HsmError
from server.hsm.pkcs11 import Hsm, SecretKind

AUDIT_MAC: Final = "cardbridge/audit-mac"
SEAL: Final = "cardbridge/seal"
IMPLICIT_REJECTION: Final = "cardbridge/rsa-implicit-rejection"
NONCE: Final = 12
"""Bytes of a sealed value's random nonce (also what its key is derived from)."""
_SEAL_CONTEXT: Final = b"cardbridge seal v1\x00"
KEYS: Final = {
    AUDIT_MAC: SecretKind.HMAC,
    SEAL: SecretKind.HMAC,
    IMPLICIT_REJECTION: SecretKind.HMAC,
}


class ServerKeys:
    """The three server keys of one HSM token; thread-safe like the :class:`Hsm` it uses."""

    def __init__(self, hsm: Hsm) -> None:
        self.hsm = hsm

    @classmethod
    def ensure(cls, hsm: Hsm) -> ServerKeys:
        """Generate the keys the token lacks (idempotent: existing keys are kept)."""
        for label, kind in KEYS.items():
            if not hsm.has_secret_key(label):
                hsm.generate_secret_key(kind, label)
        return cls(hsm)

    @classmethod
    def load(cls, hsm: Hsm) -> ServerKeys:
        """The keys of a token ``server init`` prepared.

        :raises HsmError: one is missing (a data directory from before they existed).
        """
        missing = [label for label in KEYS if not hsm.has_secret_key(label)]
        if missing:
            raise HsmError(
                f"the HSM token lacks {', '.join(missing)}: run `cardbridge server init` "
                "on the data directory to upgrade it"
            )
        return cls(hsm)

    def audit_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the audit key."""
        return self.hsm.hmac_sha256(AUDIT_MAC, data)

    def _sealing_key(self, nonce: bytes) -> AESGCM:
        """The AES-256-GCM key of one sealed value: HMAC-SHA256 in the HSM over its nonce
        (NIST SP 800-108 style derivation with a fixed context)."""
        return AESGCM(self.hsm.hmac_sha256(SEAL, _SEAL_CONTEXT + nonce))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM (NIST SP 800-38D) under a key derived for this value from a random
        96-bit nonce: ``nonce ‖ ciphertext ‖ tag``. ``aad`` binds the value to its place (e.g.
        the user it belongs to), so it cannot be moved."""
        nonce = os.urandom(NONCE)
        return nonce + self._sealing_key(nonce).encrypt(nonce, plaintext, aad)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        """Open what :meth:`seal` sealed for ``aad``.

        :raises HsmError: tampered, moved, or sealed by another key.
        """
        nonce = sealed[:NONCE]
        try:
            return self._sealing_key(nonce).decrypt(nonce, sealed[NONCE:], aad)
        except InvalidTag as e:
            raise HsmError("the sealed value does not open with this key") from e

    def rejection_kdk(self, ciphertext: bytes) -> bytes:
        """The implicit-rejection key-derivation key of one RSA ciphertext (HMAC in the HSM)."""
        return self.hsm.hmac_sha256(IMPLICIT_REJECTION, ciphertext)
