# SPDX-License-Identifier: Apache-2.0
"""The PIV application: one handler per instruction (NIST SP 800-73-4 Part 2 §3).

Handlers take a de-chained ``CommandApdu`` and the session's ``SecurityState``, return the
response data, and only raise (``CardError`` or ``ValueError``); ``VirtualCard.transmit``
turns that into status words. SELECT, GET RESPONSE, chaining and Le live in ``card.py``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable, Collection
from enum import IntEnum
from typing import Final, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vcard.apdu import CommandApdu
from vcard.constants import (
    DEFAULT_MANAGEMENT_KEY,
    KEYREF_MGMT,
    KEYREF_PIN,
    KEYREF_PUK,
    METADATA_ALG_PIN,
    ORIGIN_GENERATED,
    TAG_AID,
    TAG_ALG_ID,
    TAG_ALG_INFO,
    TAG_APP_LABEL,
    TAG_APT,
    TAG_AUTH_CHALLENGE,
    TAG_AUTH_EXPONENTIATION,
    TAG_AUTH_RESPONSE,
    TAG_AUTH_WITNESS,
    TAG_AUTHORITY,
    TAG_DYN_AUTH,
    TAG_EC_POINT,
    TAG_ERROR_DETECTION,
    TAG_GEN_ALGORITHM,
    TAG_GEN_PIN_POLICY,
    TAG_GEN_TEMPLATE,
    TAG_GEN_TOUCH_POLICY,
    TAG_METADATA_ALGO,
    TAG_METADATA_IS_DEFAULT,
    TAG_METADATA_ORIGIN,
    TAG_METADATA_POLICY,
    TAG_METADATA_PUBLIC_KEY,
    TAG_METADATA_RETRIES,
    TAG_OBJ_DATA,
    TAG_OBJ_ID,
    TAG_OID,
    TAG_PIN_USAGE_POLICY,
    TAG_PUBKEY,
    TAG_RSA_EXPONENT,
    TAG_RSA_MODULUS,
    VERSION,
    Aid,
    Ins,
    KeyType,
    MgmtAlg,
    ObjectId,
    PinPolicy,
    Slot,
    TouchPolicy,
)
from vcard.errors import (
    IncorrectData,
    IncorrectP1P2,
    InsNotSupported,
    NoSpace,
    NotFound,
    PinBlocked,
    PinIncorrect,
    ReferenceNotFound,
    SecurityStatusNotSatisfied,
)
from vcard.keys import KeyBackend, PinStatus, PublicKey
from vcard.mgmt import encrypt_block
from vcard.state import Challenge, SecurityState
from vcard.tlv import Tlv

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=IntEnum)
Handler = Callable[[CommandApdu, SecurityState], bytes]

#: Largest data object value PUT DATA accepts (a YubiKey 5 stores 3052-byte certificates
#: plus their container; ykpiv 2.2 reads at most 3072 bytes).
MAX_OBJECT_SIZE: Final[int] = 3063
#: Application label in the SELECT reply (not "PivApplet v", which OpenSC maps to Yubico).
APP_LABEL: Final[bytes] = b"cardbridge"

# Yubico's CHUID template values (yubico-piv-tool util.c): FASC-N of agency 9999, expiry.
CHUID_FASCN: Final[bytes] = bytes.fromhex("d4e739da739ced39ce739d836858210842108421c84210c3eb")
CHUID_EXPIRY: Final[bytes] = b"20300101"
# CCC card identifier prefix: GSC-RID A0 00 00 01 16, manufacturer FF, card type 02 (JavaCard).
CCC_ID_PREFIX: Final[bytes] = bytes.fromhex("a000000116ff02")
_APT_ALGORITHMS: Final = (*MgmtAlg, *KeyType)
_PIN_PAD: Final[int] = 0xFF


def encode_public_key(key: PublicKey) -> bytes:
    """Public key data objects as in GENERATE's reply (Part 2 §3.3.2, table 11)."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return Tlv(TAG_RSA_MODULUS, n) + Tlv(TAG_RSA_EXPONENT, e)
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return Tlv(TAG_EC_POINT, point)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Tlv(TAG_EC_POINT, raw)


def unpad_pin(field: bytes) -> bytes:
    """An 8-byte PIN field: ASCII padded with FF (Part 2 §2.4.3); 6A80 otherwise."""
    if len(field) != 8:
        raise IncorrectData("a PIN field is 8 bytes")
    pin = field.rstrip(bytes([_PIN_PAD]))
    if not pin or _PIN_PAD in pin:
        raise IncorrectData("malformed PIN padding")
    return pin


def _status_error(status: PinStatus) -> PinIncorrect | PinBlocked:
    """63Cx with the tries left, or 6983 (Part 2 §3.2.1)."""
    return PinBlocked() if status.remaining <= 0 else PinIncorrect(status.remaining)


def _enum_or_none(enum: type[E], value: int) -> E | None:
    try:
        return enum(value)
    except ValueError:
        return None


class PivApplet:
    """PIV card application over a ``KeyBackend``.

    :param backend: keys, objects and PIN state.
    :param pin_always_slots: slots whose keys need a VERIFY right before each use. None
        (the default) follows each key's own PIN policy (9C always); an explicit set
        overrides it, e.g. ``frozenset()`` for middleware that cannot re-verify.
    """

    def __init__(
        self, backend: KeyBackend, *, pin_always_slots: Collection[Slot] | None = None
    ) -> None:
        self.backend = backend
        self.pin_always_slots = None if pin_always_slots is None else frozenset(pin_always_slots)
        self._handlers: dict[int, Handler] = {
            Ins.VERIFY: self.verify,
            Ins.CHANGE_REFERENCE: self.change_reference,
            Ins.RESET_RETRY: self.reset_retry,
            Ins.GENERAL_AUTHENTICATE: self.general_authenticate,
            Ins.GENERATE_ASYMMETRIC: self.generate,
            Ins.GET_DATA: self.get_data,
            Ins.PUT_DATA: self.put_data,
            Ins.GET_METADATA: self.get_metadata,
            Ins.GET_SERIAL: self.get_serial,
            Ins.GET_VERSION: self.get_version,
            Ins.SET_MGMKEY: self.set_management_key,
        }

    def process(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """Run one complete command; any command but 9B GENERAL AUTHENTICATE voids a
        pending management-key challenge."""
        if not (apdu.ins == Ins.GENERAL_AUTHENTICATE and apdu.p2 == KEYREF_MGMT):
            state.challenge = None
        handler = self._handlers.get(apdu.ins)
        if handler is None:
            raise InsNotSupported(f"INS {apdu.ins:02X}")
        return handler(apdu, state)

    def application_property_template(self) -> bytes:
        """SELECT reply (Part 2 §3.1.1, table 3): AID, authority, label, algorithms."""
        algorithms = b"".join(
            Tlv(TAG_ALG_INFO, Tlv(TAG_ALG_ID, bytes([alg])) + Tlv(TAG_OID, b"\x00"))
            for alg in _APT_ALGORITHMS
        )
        return Tlv(
            TAG_APT,
            Tlv(TAG_AID, Aid.PIV)
            + Tlv(TAG_AUTHORITY, Tlv(TAG_AID, Aid.PIV[:5]))
            + Tlv(TAG_APP_LABEL, APP_LABEL)
            + algorithms,
        )

    # VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER ---------------------------------------

    def verify(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """VERIFY (Part 2 §3.2.1): P1=FF resets, no data queries, 8 bytes verify."""
        if apdu.p1 not in (0x00, 0xFF):
            raise IncorrectP1P2("VERIFY P1 must be 00 or FF")
        if apdu.p2 != KEYREF_PIN:
            raise ReferenceNotFound("only the PIV PIN (80) can be verified")
        if apdu.p1 == 0xFF:
            if apdu.data:
                raise IncorrectData("VERIFY P1=FF takes no data")
            state.clear_pin()
            return b""
        if not apdu.data:
            if state.pin_verified:
                return b""
            raise _status_error(self.backend.pin_status())
        pin = unpad_pin(apdu.data)
        try:
            self.backend.verify_pin(pin)
        except (PinIncorrect, PinBlocked):
            state.clear_pin()
            raise
        state.pin_verified = True
        state.pin_always_armed = True
        return b""

    def change_reference(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """CHANGE REFERENCE DATA (Part 2 §3.2.2) of the PIN (80) or PUK (81)."""
        if apdu.p1 != 0x00:
            raise IncorrectP1P2("CHANGE REFERENCE DATA P1 must be 00")
        if apdu.p2 not in (KEYREF_PIN, KEYREF_PUK):
            raise ReferenceNotFound("only the PIN (80) and PUK (81) can be changed")
        if len(apdu.data) != 16:
            raise IncorrectData("CHANGE REFERENCE DATA takes 16 bytes")
        old, new = unpad_pin(apdu.data[:8]), unpad_pin(apdu.data[8:])
        if apdu.p2 == KEYREF_PUK:
            self.backend.change_puk(old, new)
            return b""
        try:
            self.backend.change_pin(old, new)
        except (PinIncorrect, PinBlocked):
            state.clear_pin()
            raise
        return b""

    def reset_retry(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """RESET RETRY COUNTER (Part 2 §3.2.3): PUK and new PIN."""
        if apdu.p1 != 0x00:
            raise IncorrectP1P2("RESET RETRY COUNTER P1 must be 00")
        if apdu.p2 != KEYREF_PIN:
            raise ReferenceNotFound("RESET RETRY COUNTER applies to the PIN (80) only")
        if len(apdu.data) != 16:
            raise IncorrectData("RESET RETRY COUNTER takes 16 bytes")
        self.backend.unblock_pin(unpad_pin(apdu.data[:8]), unpad_pin(apdu.data[8:]))
        return b""

    # GENERAL AUTHENTICATE --------------------------------------------------------------------

    def general_authenticate(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """GENERAL AUTHENTICATE (Part 2 §3.2.4): sign, decrypt, ECDH, or 9B authentication."""
        if apdu.p2 == KEYREF_MGMT:
            return self._authenticate_management(apdu, state)
        slot = _enum_or_none(Slot, apdu.p2)
        key_type = _enum_or_none(KeyType, apdu.p1)
        if slot is None or key_type is None:
            raise IncorrectP1P2("unknown key reference or algorithm")
        if self.backend.key_type(slot) != key_type:
            raise IncorrectData(f"slot {slot} holds no {key_type.name} key")
        self._check_pin_policy(slot, state)
        items = Tlv.parse_dict(Tlv.unpack(TAG_DYN_AUTH, apdu.data))
        if items.get(TAG_AUTH_RESPONSE) == b"" and len(items) == 2:
            if items.get(TAG_AUTH_CHALLENGE):
                result = self._private_operation(slot, key_type, items[TAG_AUTH_CHALLENGE])
            elif items.get(TAG_AUTH_EXPONENTIATION) and key_type.is_ec:
                result = self.backend.ecdh(slot, items[TAG_AUTH_EXPONENTIATION])
            else:
                raise IncorrectData("GENERAL AUTHENTICATE template names no operation")
        elif (
            # Apple's PIVToken sample asks for ECDH as {85 00; 81 point}.
            items.get(TAG_AUTH_EXPONENTIATION) == b""
            and len(items) == 2
            and items.get(TAG_AUTH_CHALLENGE)
            and key_type.is_ec
        ):
            result = self.backend.ecdh(slot, items[TAG_AUTH_CHALLENGE])
        else:
            raise IncorrectData("malformed GENERAL AUTHENTICATE template")
        return Tlv(TAG_DYN_AUTH, Tlv(TAG_AUTH_RESPONSE, result))

    def _private_operation(self, slot: Slot, key_type: KeyType, data: bytes) -> bytes:
        if key_type.is_rsa:
            return self.backend.rsa_raw(slot, data)
        if key_type.is_ec:
            return self.backend.ecdsa_sign(slot, data)
        return self.backend.eddsa_sign(slot, data)

    def effective_pin_policy(self, slot: Slot) -> PinPolicy:
        """The key's PIN policy, with ``pin_always_slots`` applied."""
        policy = self.backend.pin_policy(slot)
        if self.pin_always_slots is None:
            return policy
        if slot in self.pin_always_slots:
            return PinPolicy.ALWAYS
        return PinPolicy.ONCE if policy is PinPolicy.ALWAYS else policy

    def _check_pin_policy(self, slot: Slot, state: SecurityState) -> None:
        policy = self.effective_pin_policy(slot)
        if policy is PinPolicy.NEVER:
            return
        if not state.pin_verified:
            raise SecurityStatusNotSatisfied(f"slot {slot} needs the PIN")
        if policy is PinPolicy.ALWAYS and not state.pin_always_fresh:
            raise SecurityStatusNotSatisfied(f"slot {slot} needs a VERIFY before each use")

    def _authenticate_management(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """9B challenge/response (Part 2 Appendix A.1; Yubico mutual authentication)."""
        alg, key = self.backend.management_key()
        if apdu.p1 not in (0x00, alg):
            raise IncorrectP1P2(f"the management key is {alg.name}")
        items = Tlv.parse_dict(Tlv.unpack(TAG_DYN_AUTH, apdu.data))
        pending, state.challenge = state.challenge, None
        if items == {TAG_AUTH_WITNESS: b""}:
            witness = secrets.token_bytes(alg.block_size)
            state.challenge = (Challenge.MUTUAL, witness)
            return Tlv(TAG_DYN_AUTH, Tlv(TAG_AUTH_WITNESS, encrypt_block(alg, key, witness)))
        if items == {TAG_AUTH_CHALLENGE: b""}:
            challenge = secrets.token_bytes(alg.block_size)
            state.challenge = (Challenge.EXTERNAL, challenge)
            return Tlv(TAG_DYN_AUTH, Tlv(TAG_AUTH_CHALLENGE, challenge))
        if set(items) == {TAG_AUTH_RESPONSE} and items[TAG_AUTH_RESPONSE]:
            if pending is None or pending[0] is not Challenge.EXTERNAL:
                raise SecurityStatusNotSatisfied("no management-key challenge pending")
            expected = encrypt_block(alg, key, pending[1])
            self._conclude(state, hmac.compare_digest(items[TAG_AUTH_RESPONSE], expected))
            return b""
        if set(items) == {TAG_AUTH_WITNESS, TAG_AUTH_CHALLENGE} or set(items) == {
            TAG_AUTH_WITNESS,
            TAG_AUTH_CHALLENGE,
            TAG_AUTH_RESPONSE,
        }:
            if pending is None or pending[0] is not Challenge.MUTUAL:
                raise SecurityStatusNotSatisfied("no management-key witness pending")
            host_challenge = items[TAG_AUTH_CHALLENGE]
            if len(host_challenge) != alg.block_size:
                raise IncorrectData(f"the host challenge is {alg.block_size} bytes")
            self._conclude(state, hmac.compare_digest(items[TAG_AUTH_WITNESS], pending[1]))
            return Tlv(
                TAG_DYN_AUTH, Tlv(TAG_AUTH_RESPONSE, encrypt_block(alg, key, host_challenge))
            )
        raise IncorrectData("malformed management-key template")

    @staticmethod
    def _conclude(state: SecurityState, ok: bool) -> None:
        state.mgmt_authenticated = ok
        if not ok:
            raise SecurityStatusNotSatisfied("wrong management-key response")

    def _require_management(self, state: SecurityState) -> None:
        if not state.mgmt_authenticated:
            raise SecurityStatusNotSatisfied("authenticate with the management key (9B) first")

    # GENERATE, GET DATA, PUT DATA ------------------------------------------------------------

    def generate(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """GENERATE ASYMMETRIC KEY PAIR (Part 2 §3.3.2), Yubico's AA/AB policy tags."""
        slot = _enum_or_none(Slot, apdu.p2)
        if apdu.p1 != 0x00 or slot is None:
            raise IncorrectP1P2("GENERATE takes P1=00 and a key slot in P2")
        self._require_management(state)
        items = Tlv.parse_dict(Tlv.unpack(TAG_GEN_TEMPLATE, apdu.data))
        key_type = _single_enum(items, TAG_GEN_ALGORITHM, KeyType)
        pin_policy = _single_enum(items, TAG_GEN_PIN_POLICY, PinPolicy, PinPolicy.DEFAULT)
        touch = _single_enum(items, TAG_GEN_TOUCH_POLICY, TouchPolicy, TouchPolicy.DEFAULT)
        known = {TAG_GEN_ALGORITHM, TAG_GEN_PIN_POLICY, TAG_GEN_TOUCH_POLICY}
        if key_type is None or pin_policy is None or set(items) - known:
            raise IncorrectData("malformed GENERATE template")
        if touch is None:
            raise IncorrectData("this card has no touch sensor")
        public_key = self.backend.generate_key(slot, key_type, pin_policy)
        return Tlv(TAG_PUBKEY, encode_public_key(public_key))

    def get_data(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """GET DATA (Part 2 §3.1.2): ``5C tag`` -> ``53 value`` (Discovery: ``7E``)."""
        if apdu.p1p2 != 0x3FFF:
            raise IncorrectP1P2("GET DATA takes P1P2=3FFF")
        tag = _object_tag(apdu.data)
        if tag == ObjectId.DISCOVERY:
            return self.discovery()
        object_id = _enum_or_none(ObjectId, tag)
        if object_id is None:
            raise NotFound(f"no data object {tag:X}")
        if object_id.pin_protected and not state.pin_verified:
            raise SecurityStatusNotSatisfied(f"object {tag:X} needs the PIN")
        value = self.backend.read_object(tag)
        if value is None:
            value = self._default_object(object_id)
        return Tlv(TAG_OBJ_DATA, value)

    def put_data(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """PUT DATA (Part 2 §3.3.1): ``5C tag; 53 value``; an empty value deletes."""
        if apdu.p1p2 != 0x3FFF:
            raise IncorrectP1P2("PUT DATA takes P1P2=3FFF")
        self._require_management(state)
        parts = Tlv.parse_list(apdu.data)
        if len(parts) != 2 or parts[1].tag != TAG_OBJ_DATA:
            raise IncorrectData("PUT DATA takes 5C tag, 53 value")
        tag = _object_tag(parts[0])
        if tag == ObjectId.DISCOVERY or _enum_or_none(ObjectId, tag) is None:
            raise IncorrectData(f"object {tag:X} cannot be written")
        value = parts[1].value
        if len(value) > MAX_OBJECT_SIZE:
            raise NoSpace(f"objects hold at most {MAX_OBJECT_SIZE} bytes")
        self.backend.write_object(tag, value or None)
        return b""

    def discovery(self) -> bytes:
        """Discovery object (Part 1 §3.3.2): PIV AID; PIN usage policy = PIV PIN only."""
        return Tlv(
            ObjectId.DISCOVERY,
            Tlv(TAG_AID, Aid.PIV) + Tlv(TAG_PIN_USAGE_POLICY, b"\x40\x00"),
        )

    def _default_object(self, object_id: ObjectId) -> bytes:
        """CHUID, CCC and Key History exist even when nobody wrote them."""
        guid = self.backend.card_guid()
        if object_id is ObjectId.CHUID:
            return (
                Tlv(0x30, CHUID_FASCN)
                + Tlv(0x34, guid)
                + Tlv(0x35, CHUID_EXPIRY)
                + Tlv(0x3E)
                + Tlv(TAG_ERROR_DETECTION)
            )
        if object_id is ObjectId.CAPABILITY:
            fixed = bytes.fromhex("f10121f20121f300f40100f50110f600f700fa00fb00fc00fd00fe00")
            return Tlv(0xF0, CCC_ID_PREFIX + guid[:14]) + fixed
        if object_id is ObjectId.KEY_HISTORY:
            return (
                Tlv(0xC1, bytes([self.retired_certificates()]))
                + Tlv(0xC2, b"\x00")
                + Tlv(TAG_ERROR_DETECTION)
            )
        raise NotFound(f"no data object {object_id.value:X}")

    def retired_certificates(self) -> int:
        """How many retired slots, contiguous from 82, hold a certificate (Key History C1)."""
        count = 0
        for slot in (Slot(0x82 + i) for i in range(20)):
            if self.backend.read_object(slot.object_id) is None:
                break
            count += 1
        return count

    # Yubico extensions ----------------------------------------------------------------------

    def get_version(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """Yubico GET VERSION (FD): major, minor, patch."""
        return bytes(VERSION)

    def get_serial(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """Yubico GET SERIAL (F8): 4 bytes big-endian, derived from the GUID."""
        serial = int.from_bytes(self.backend.card_guid()[:4], "big") & 0x7FFFFFFF
        return (serial or 1).to_bytes(4, "big")

    def get_metadata(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """Yubico GET METADATA (F7) for the PIN, PUK, management key or a key slot."""
        if apdu.p1 != 0x00:
            raise IncorrectP1P2("GET METADATA takes P1=00")
        if apdu.p2 in (KEYREF_PIN, KEYREF_PUK):
            status = (
                self.backend.pin_status() if apdu.p2 == KEYREF_PIN else self.backend.puk_status()
            )
            return (
                Tlv(TAG_METADATA_ALGO, bytes([METADATA_ALG_PIN]))
                + Tlv(TAG_METADATA_IS_DEFAULT, bytes([status.is_default]))
                + Tlv(TAG_METADATA_RETRIES, bytes([status.total, status.remaining]))
            )
        if apdu.p2 == KEYREF_MGMT:
            alg, key = self.backend.management_key()
            is_default = alg is MgmtAlg.TDES and key == DEFAULT_MANAGEMENT_KEY
            return (
                Tlv(TAG_METADATA_ALGO, bytes([alg]))
                + Tlv(TAG_METADATA_POLICY, bytes([PinPolicy.NEVER, TouchPolicy.NEVER]))
                + Tlv(TAG_METADATA_IS_DEFAULT, bytes([is_default]))
            )
        slot = _enum_or_none(Slot, apdu.p2)
        key_type = None if slot is None else self.backend.key_type(slot)
        if slot is None or key_type is None:
            raise ReferenceNotFound(f"no key in {apdu.p2:02X}")
        policy = self.effective_pin_policy(slot)
        return (
            Tlv(TAG_METADATA_ALGO, bytes([key_type]))
            + Tlv(TAG_METADATA_POLICY, bytes([policy, TouchPolicy.NEVER]))
            + Tlv(TAG_METADATA_ORIGIN, bytes([ORIGIN_GENERATED]))
            + Tlv(TAG_METADATA_PUBLIC_KEY, encode_public_key(self.backend.public_key(slot)))
        )

    def set_management_key(self, apdu: CommandApdu, state: SecurityState) -> bytes:
        """Yubico SET MANAGEMENT KEY (FF): ``alg; 9B len key``; P2=FE (touch) unsupported."""
        if apdu.p1p2 != 0xFFFF:
            raise IncorrectP1P2("SET MANAGEMENT KEY takes P1P2=FFFF")
        self._require_management(state)
        if len(apdu.data) < 3:
            raise IncorrectData("SET MANAGEMENT KEY takes alg, 9B, key")
        alg = _enum_or_none(MgmtAlg, apdu.data[0])
        key = Tlv.unpack(KEYREF_MGMT, apdu.data[1:])
        if alg is None or len(key) != alg.key_len:
            raise IncorrectData("bad management key algorithm or length")
        self.backend.set_management_key(alg, key)
        return b""


def _object_tag(data: bytes) -> int:
    """The object tag of a ``5C`` TLV (1 to 3 bytes)."""
    tag = Tlv.unpack(TAG_OBJ_ID, data)
    if not 1 <= len(tag) <= 3:
        raise IncorrectData("a data object tag is 1 to 3 bytes")
    return int.from_bytes(tag, "big")


def _single_enum(
    items: dict[int, bytes], tag: int, enum: type[E], default: E | None = None
) -> E | None:
    """A one-byte enum value from a template; ``default`` if absent, None if invalid."""
    value = items.get(tag)
    if value is None:
        return default
    return _enum_or_none(enum, value[0]) if len(value) == 1 else None
