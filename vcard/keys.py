# SPDX-License-Identifier: Apache-2.0
"""The ``KeyBackend`` protocol: what the PIV card needs from whoever holds its keys.

It is PIV-shaped (DESIGN.md): the host pre-hashes and pads, so the backend works on
padded RSA blocks, ECDSA digests and whole EdDSA messages. PIN and PUK counters live in
the backend (for a remote backend, on the server), so VERIFY always goes through it.

Errors: backends raise ``vcard.errors`` exceptions (``PinIncorrect``, ``PinBlocked``,
``SecurityStatusNotSatisfied`` ...) or ``ValueError`` for bad input (the card answers 6A80).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vcard.constants import KeyType, MgmtAlg, PinPolicy, Slot

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class PinStatus:
    """Retry counter of the PIN or PUK.

    :param total: tries allowed after a successful verification.
    :param remaining: tries left now; 0 means blocked.
    :param is_default: whether the value is still the factory default.
    """

    total: int
    remaining: int
    is_default: bool


class KeyBackend(Protocol):
    """Keys, data objects and PIN state of one PIV card."""

    # Keys -------------------------------------------------------------------------------

    def key_type(self, slot: Slot) -> KeyType | None:
        """The algorithm of the key in ``slot``, or None if the slot is empty."""
        ...

    def public_key(self, slot: Slot) -> PublicKey:
        """The public key in ``slot``; ``KeyError`` if empty."""
        ...

    def pin_policy(self, slot: Slot) -> PinPolicy:
        """When the key in ``slot`` needs the PIN (never ``PinPolicy.DEFAULT``)."""
        ...

    def rsa_raw(self, slot: Slot, block: bytes) -> bytes:
        """x^d mod n on a host-padded block, left-padded to the modulus length.

        ``ValueError`` if the block has the wrong length or is not below the modulus.
        """
        ...

    def ecdsa_sign(self, slot: Slot, digest: bytes) -> bytes:
        """ECDSA on a digest of 1..field-size bytes; DER ``SEQUENCE {r, s}``."""
        ...

    def ecdh(self, slot: Slot, peer_point: bytes) -> bytes:
        """ECDH with an uncompressed peer point ``04||X||Y``; returns the shared X."""
        ...

    def eddsa_sign(self, slot: Slot, message: bytes) -> bytes:
        """Ed25519 over the whole message (64 bytes)."""
        ...

    def generate_key(
        self, slot: Slot, key_type: KeyType, pin_policy: PinPolicy = PinPolicy.DEFAULT
    ) -> PublicKey:
        """Replace the key in ``slot`` with a new one and return its public key."""
        ...

    def power_cycle(self) -> None:
        """The card was powered off or reset: forget security state kept for this card
        session outside the card (a remote backend clears the server's PIN mark)."""
        ...

    # Data objects -----------------------------------------------------------------------

    def read_object(self, tag: int) -> bytes | None:
        """The value of data object ``tag`` (the content of its 53 container), or None."""
        ...

    def write_object(self, tag: int, value: bytes | None) -> None:
        """Store (or with None, delete) data object ``tag``."""
        ...

    def card_guid(self) -> bytes:
        """The card's 16-byte GUID: stable and non-zero (CHUID tag 34, serial)."""
        ...

    # PIN, PUK, management key -------------------------------------------------------------

    def verify_pin(self, pin: bytes) -> None:
        """Check the PIN (unpadded); raises ``PinIncorrect`` or ``PinBlocked``."""
        ...

    def pin_status(self) -> PinStatus: ...

    def puk_status(self) -> PinStatus: ...

    def change_pin(self, old: bytes, new: bytes) -> None:
        """Check ``old`` like ``verify_pin``, then set ``new``."""
        ...

    def change_puk(self, old: bytes, new: bytes) -> None:
        """Check the PUK ``old`` (raises like ``verify_pin``), then set ``new``."""
        ...

    def unblock_pin(self, puk: bytes, new_pin: bytes) -> None:
        """Check the PUK, then set the PIN and restore its retry counter."""
        ...

    def management_key(self) -> tuple[MgmtAlg, bytes]:
        """The 9B key: its algorithm and value."""
        ...

    def set_management_key(self, alg: MgmtAlg, key: bytes) -> None: ...
