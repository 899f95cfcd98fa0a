# SPDX-License-Identifier: Apache-2.0
"""Value spaces of the PIV card edge (NIST SP 800-73-4 Part 2, Yubico extensions).

Enums carry behaviour; TLV tags are prefixed module ints because their values repeat.
"""

from __future__ import annotations

from enum import Enum, IntEnum, unique
from typing import Final


@unique
class SW(IntEnum):
    """Status words the card answers (SP 800-73-4 Part 2, table 6; ISO 7816-4)."""

    OK = 0x9000
    MORE_DATA = 0x6100
    VERIFY_FAIL = 0x63C0
    EXECUTION_ERROR = 0x6400
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    INCORRECT_DATA = 0x6A80
    FILE_NOT_FOUND = 0x6A82
    NO_SPACE = 0x6A84
    INCORRECT_P1P2 = 0x6A86
    REFERENCE_NOT_FOUND = 0x6A88
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    UNKNOWN = 0x6F00


@unique
class Ins(IntEnum):
    """Instruction bytes the card understands; anything else is answered 6D00."""

    VERIFY = 0x20
    CHANGE_REFERENCE = 0x24
    RESET_RETRY = 0x2C
    GENERATE_ASYMMETRIC = 0x47
    GENERAL_AUTHENTICATE = 0x87
    SELECT = 0xA4
    GET_RESPONSE = 0xC0
    GET_DATA = 0xCB
    PUT_DATA = 0xDB
    GET_METADATA = 0xF7  # Yubico
    GET_SERIAL = 0xF8  # Yubico
    GET_VERSION = 0xFD  # Yubico
    SET_MGMKEY = 0xFF  # Yubico


@unique
class Aid(bytes, Enum):
    """Application identifiers; PIV is the only application this card hosts."""

    PIV = bytes.fromhex("a000000308000010000100")


#: Smallest prefix of the PIV AID a SELECT may use (the RID plus the PIX's first byte is
#: not required: ykpiv selects with the 5-byte RID ``A0 00 00 03 08``).
PIV_AID_MIN_PREFIX: Final[int] = 5


@unique
class ObjectId(IntEnum):
    """Data object tags (SP 800-73-4 Part 1, table 3) plus Yubico's."""

    CARD_AUTH = 0x5FC101  # certificate for 9E
    CHUID = 0x5FC102
    FINGERPRINTS = 0x5FC103
    AUTHENTICATION = 0x5FC105  # certificate for 9A
    SECURITY = 0x5FC106
    CAPABILITY = 0x5FC107  # CCC
    FACIAL = 0x5FC108
    PRINTED = 0x5FC109
    SIGNATURE = 0x5FC10A  # certificate for 9C
    KEY_MANAGEMENT = 0x5FC10B  # certificate for 9D
    KEY_HISTORY = 0x5FC10C
    RETIRED1 = 0x5FC10D
    RETIRED2 = 0x5FC10E
    RETIRED3 = 0x5FC10F
    RETIRED4 = 0x5FC110
    RETIRED5 = 0x5FC111
    RETIRED6 = 0x5FC112
    RETIRED7 = 0x5FC113
    RETIRED8 = 0x5FC114
    RETIRED9 = 0x5FC115
    RETIRED10 = 0x5FC116
    RETIRED11 = 0x5FC117
    RETIRED12 = 0x5FC118
    RETIRED13 = 0x5FC119
    RETIRED14 = 0x5FC11A
    RETIRED15 = 0x5FC11B
    RETIRED16 = 0x5FC11C
    RETIRED17 = 0x5FC11D
    RETIRED18 = 0x5FC11E
    RETIRED19 = 0x5FC11F
    RETIRED20 = 0x5FC120
    IRIS = 0x5FC121
    BITGT = 0x7F61
    SM_SIGNER = 0x5FC122
    PC_REF_DATA = 0x5FC123
    DISCOVERY = 0x7E
    YUBICO_ADMIN = 0x5FFF00
    ATTESTATION = 0x5FFF01

    @property
    def pin_protected(self) -> bool:
        """Whether GET DATA needs a verified PIN (SP 800-73-4 Part 1, table 3)."""
        return self in _PIN_PROTECTED_OBJECTS

    @property
    def encoded_tag(self) -> bytes:
        """The tag as it appears after 5C in GET DATA / PUT DATA (1 or 3 bytes)."""
        return self.value.to_bytes(1 if self.value <= 0xFF else (self.value.bit_length() + 7) // 8)


_PIN_PROTECTED_OBJECTS: Final = frozenset(
    {ObjectId.FINGERPRINTS, ObjectId.FACIAL, ObjectId.PRINTED, ObjectId.IRIS}
)


@unique
class Slot(IntEnum):
    """Asymmetric key references (SP 800-78-4 table 4; Part 1 §3.3)."""

    AUTHENTICATION = 0x9A
    SIGNATURE = 0x9C
    KEY_MANAGEMENT = 0x9D
    CARD_AUTH = 0x9E
    RETIRED1 = 0x82
    RETIRED2 = 0x83
    RETIRED3 = 0x84
    RETIRED4 = 0x85
    RETIRED5 = 0x86
    RETIRED6 = 0x87
    RETIRED7 = 0x88
    RETIRED8 = 0x89
    RETIRED9 = 0x8A
    RETIRED10 = 0x8B
    RETIRED11 = 0x8C
    RETIRED12 = 0x8D
    RETIRED13 = 0x8E
    RETIRED14 = 0x8F
    RETIRED15 = 0x90
    RETIRED16 = 0x91
    RETIRED17 = 0x92
    RETIRED18 = 0x93
    RETIRED19 = 0x94
    RETIRED20 = 0x95

    def __str__(self) -> str:
        return f"{self.value:02X} ({self.name})"

    @property
    def object_id(self) -> ObjectId:
        """The data object that holds this slot's certificate."""
        return _SLOT_OBJECTS[self]

    @property
    def default_pin_policy(self) -> PinPolicy:
        """9E never, 9C always, the rest once per session (edge reference §4)."""
        if self is Slot.CARD_AUTH:
            return PinPolicy.NEVER
        if self is Slot.SIGNATURE:
            return PinPolicy.ALWAYS
        return PinPolicy.ONCE


_SLOT_OBJECTS: Final[dict[Slot, ObjectId]] = {
    Slot.AUTHENTICATION: ObjectId.AUTHENTICATION,
    Slot.SIGNATURE: ObjectId.SIGNATURE,
    Slot.KEY_MANAGEMENT: ObjectId.KEY_MANAGEMENT,
    Slot.CARD_AUTH: ObjectId.CARD_AUTH,
    **{Slot(0x82 + i): ObjectId(ObjectId.RETIRED1 + i) for i in range(20)},
}


@unique
class KeyType(IntEnum):
    """Asymmetric algorithm identifiers (SP 800-78-4 table 5; Yubico 16 and E0)."""

    RSA2048 = 0x07
    RSA3072 = 0x05
    RSA4096 = 0x16
    ECCP256 = 0x11
    ECCP384 = 0x14
    ED25519 = 0xE0

    @classmethod
    def from_name(cls, name: str) -> KeyType:
        """Parse a CLI name (``p256``, ``rsa2048``, ``ed25519`` ...)."""
        for key_type in cls:
            if key_type.cli_name == name.lower():
                return key_type
        raise ValueError(f"unknown key type {name!r}; use one of {', '.join(cls.cli_names())}")

    @classmethod
    def cli_names(cls) -> list[str]:
        return [key_type.cli_name for key_type in cls]

    @property
    def cli_name(self) -> str:
        return _CLI_NAMES[self]

    @property
    def is_rsa(self) -> bool:
        return self in (KeyType.RSA2048, KeyType.RSA3072, KeyType.RSA4096)

    @property
    def is_ec(self) -> bool:
        """NIST curve keys: ECDSA and ECDH."""
        return self in (KeyType.ECCP256, KeyType.ECCP384)

    @property
    def bit_len(self) -> int:
        return _BIT_LENS[self]

    @property
    def size(self) -> int:
        """Bytes of an RSA block, of an EC field element, or of an Ed25519 key."""
        return (self.bit_len + 7) // 8


_CLI_NAMES: Final[dict[KeyType, str]] = {
    KeyType.RSA2048: "rsa2048",
    KeyType.RSA3072: "rsa3072",
    KeyType.RSA4096: "rsa4096",
    KeyType.ECCP256: "p256",
    KeyType.ECCP384: "p384",
    KeyType.ED25519: "ed25519",
}
_BIT_LENS: Final[dict[KeyType, int]] = {
    KeyType.RSA2048: 2048,
    KeyType.RSA3072: 3072,
    KeyType.RSA4096: 4096,
    KeyType.ECCP256: 256,
    KeyType.ECCP384: 384,
    KeyType.ED25519: 256,
}


@unique
class PinPolicy(IntEnum):
    """When a private key needs the PIN (Yubico's encoding, GENERATE tag AA)."""

    DEFAULT = 0x00
    NEVER = 0x01
    ONCE = 0x02
    ALWAYS = 0x03


@unique
class TouchPolicy(IntEnum):
    """Yubico touch policy; this card has no button, so only NEVER is reported."""

    DEFAULT = 0x00
    NEVER = 0x01


@unique
class MgmtAlg(IntEnum):
    """Management key (9B) algorithms (SP 800-78-4 table 5)."""

    TDES = 0x03
    AES128 = 0x08
    AES192 = 0x0A
    AES256 = 0x0C

    @property
    def key_len(self) -> int:
        return {MgmtAlg.TDES: 24, MgmtAlg.AES128: 16, MgmtAlg.AES192: 24, MgmtAlg.AES256: 32}[self]

    @property
    def block_size(self) -> int:
        return 8 if self is MgmtAlg.TDES else 16


#: The well-known default management key (3DES), as shipped on YubiKeys.
DEFAULT_MANAGEMENT_KEY: Final[bytes] = bytes.fromhex(
    "010203040506070801020304050607080102030405060708"
)
DEFAULT_PIN: Final[bytes] = b"123456"
DEFAULT_PUK: Final[bytes] = b"12345678"
PIN_TRIES: Final[int] = 3
PUK_TRIES: Final[int] = 3

#: Key references that are not key slots.
KEYREF_PIN: Final[int] = 0x80
KEYREF_PUK: Final[int] = 0x81
KEYREF_MGMT: Final[int] = 0x9B

#: ATR: T=1, historical bytes 80 + compact tag F9 carrying the PIV AID (edge reference §1).
ATR: Final[bytes] = bytes.fromhex("3bfb1300008131fe1580f9a0000003080000100071")

#: Yubico firmware version this card claims (5.7 brings RSA-4096 and Ed25519).
VERSION: Final[tuple[int, int, int]] = (5, 7, 0)

# BER-TLV tags (SP 800-73-4 Part 2 §3; Yubico metadata).
TAG_OBJ_ID: Final[int] = 0x5C
TAG_OBJ_DATA: Final[int] = 0x53
TAG_DYN_AUTH: Final[int] = 0x7C
TAG_AUTH_WITNESS: Final[int] = 0x80
TAG_AUTH_CHALLENGE: Final[int] = 0x81
TAG_AUTH_RESPONSE: Final[int] = 0x82
TAG_AUTH_EXPONENTIATION: Final[int] = 0x85
TAG_GEN_TEMPLATE: Final[int] = 0xAC
TAG_GEN_ALGORITHM: Final[int] = 0x80
TAG_GEN_PIN_POLICY: Final[int] = 0xAA
TAG_GEN_TOUCH_POLICY: Final[int] = 0xAB
TAG_PUBKEY: Final[int] = 0x7F49
TAG_RSA_MODULUS: Final[int] = 0x81
TAG_RSA_EXPONENT: Final[int] = 0x82
TAG_EC_POINT: Final[int] = 0x86
TAG_CERTIFICATE: Final[int] = 0x70
TAG_CERT_INFO: Final[int] = 0x71
TAG_ERROR_DETECTION: Final[int] = 0xFE
TAG_APT: Final[int] = 0x61
TAG_AID: Final[int] = 0x4F
TAG_AUTHORITY: Final[int] = 0x79
TAG_APP_LABEL: Final[int] = 0x50
TAG_ALG_INFO: Final[int] = 0xAC
TAG_ALG_ID: Final[int] = 0x80
TAG_OID: Final[int] = 0x06
TAG_PIN_USAGE_POLICY: Final[int] = 0x5F2F
TAG_METADATA_ALGO: Final[int] = 0x01
TAG_METADATA_POLICY: Final[int] = 0x02
TAG_METADATA_ORIGIN: Final[int] = 0x03
TAG_METADATA_PUBLIC_KEY: Final[int] = 0x04
TAG_METADATA_IS_DEFAULT: Final[int] = 0x05
TAG_METADATA_RETRIES: Final[int] = 0x06

#: Metadata algorithm byte for PIN and PUK.
METADATA_ALG_PIN: Final[int] = 0xFF
#: Metadata origin: the key was generated on the card.
ORIGIN_GENERATED: Final[int] = 0x01
