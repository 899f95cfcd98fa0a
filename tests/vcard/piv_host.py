"""A minimal PIV host for the pure card tests: APDU building, chaining, 9B auth."""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vcard.card import VirtualCard
from vcard.constants import DEFAULT_MANAGEMENT_KEY, KeyType, MgmtAlg, Slot
from vcard.tlv import Tlv

PIN = b"123456"
PUK = b"12345678"

#: Every key type once; 9C keeps its PIN-always default, 9E its PIN-never default.
KEYS: dict[Slot, KeyType] = {
    Slot.AUTHENTICATION: KeyType.RSA2048,
    Slot.SIGNATURE: KeyType.ECCP256,
    Slot.KEY_MANAGEMENT: KeyType.ECCP384,
    Slot.CARD_AUTH: KeyType.ECCP256,
    Slot.RETIRED1: KeyType.RSA3072,
    Slot.RETIRED2: KeyType.RSA4096,
    Slot.RETIRED3: KeyType.ED25519,
    Slot.RETIRED4: KeyType.RSA2048,
}


def pad_pin(pin: bytes) -> bytes:
    return pin.ljust(8, b"\xff")


def ecb(alg: MgmtAlg, key: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    """The host side of 9B authentication, written against cryptography directly."""
    algorithm = TripleDES(key) if alg is MgmtAlg.TDES else algorithms.AES(key)
    cipher = Cipher(algorithm, modes.ECB())  # noqa: S305
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(block) + ctx.finalize()


class Host:
    """A minimal PIV host: builds APDUs, follows 61xx, chains long commands."""

    def __init__(self, card: VirtualCard) -> None:
        self.card = card

    def raw(self, apdu: bytes | str) -> tuple[bytes, int]:
        if isinstance(apdu, str):
            apdu = bytes.fromhex(apdu)
        response = self.card.transmit(apdu)
        assert len(response) >= 2
        return response[:-2], int.from_bytes(response[-2:], "big")

    def send(self, ins: int, p1: int, p2: int, data: bytes = b"", le: int = 0) -> tuple[bytes, int]:
        """Short APDUs, 255-byte chaining, GET RESPONSE until done (like OpenSC)."""
        while len(data) > 255:
            chunk, data = data[:255], data[255:]
            _, sw = self.raw(bytes([0x10, ins, p1, p2, 255]) + chunk)
            assert sw == 0x9000, f"chained part answered {sw:04X}"
        apdu = bytes([0, ins, p1, p2]) + (bytes([len(data)]) + data if data else b"")
        out, sw = self.raw(apdu + bytes([le]))
        while sw >> 8 == 0x61:
            more, sw = self.raw(bytes([0, 0xC0, 0, 0, sw & 0xFF]))
            out += more
        return out, sw

    def ok(self, ins: int, p1: int, p2: int, data: bytes = b"") -> bytes:
        out, sw = self.send(ins, p1, p2, data)
        assert sw == 0x9000, f"{ins:02X} answered {sw:04X}"
        return out

    def verify(self, pin: bytes = PIN) -> int:
        return self.send(0x20, 0x00, 0x80, pad_pin(pin))[1]

    def authenticate(self, key: bytes = DEFAULT_MANAGEMENT_KEY, alg: MgmtAlg = MgmtAlg.TDES) -> int:
        """Yubico's mutual authentication with the 9B key; returns the final SW."""
        out = self.ok(0x87, alg, 0x9B, bytes.fromhex("7c028000"))
        assert out[:4] == bytes([0x7C, alg.block_size + 2, 0x80, alg.block_size])
        witness = ecb(alg, key, out[4:], decrypt=True)
        challenge = bytes(range(alg.block_size))
        body = bytes([0x80, len(witness)]) + witness + bytes([0x81, len(challenge)]) + challenge
        out, sw = self.send(0x87, alg, 0x9B, bytes([0x7C, len(body)]) + body)
        if sw == 0x9000:
            assert out == bytes([0x7C, alg.block_size + 2, 0x82, alg.block_size]) + ecb(
                alg, key, challenge
            )
        return sw

    def gen_auth(self, slot: Slot, key_type: KeyType, tag: int, data: bytes) -> tuple[bytes, int]:
        """GENERAL AUTHENTICATE {82 00; tag data}; returns the 82 value on success."""
        out, sw = self.send(0x87, key_type, slot, Tlv(0x7C, Tlv(0x82) + Tlv(tag, data)))
        if sw != 0x9000:
            return out, sw
        inner = Tlv.parse_list(Tlv.unpack(0x7C, out))
        assert len(inner) == 1 and inner[0].tag == 0x82
        return inner[0].value, sw
