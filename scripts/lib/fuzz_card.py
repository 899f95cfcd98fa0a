"""The fuzzer behind ``scripts/fuzz-card``: random and PIV-shaped APDUs through pcscd + vpcd.

It plays hostile and buggy clients against a running card: random bytes, mutated commands,
and PIV commands (SP 800-73-4 Part 2 §3) with hostile BER-TLV bodies in GENERAL
AUTHENTICATE, PUT DATA, GENERATE and Yubico's IMPORT, short and extended, chained (ISO
7816-4 §5.1) and abandoned mid-chain, in episodes that start from a card reset with or
without the PIN verified and the management key (9B) authenticated.

Every response must be well formed (a known SW1, data only with 9000/61xx, never more than
Ne, never 6F00) and come within ``UNANSWERED_AFTER`` seconds. After every few commands it
checks that SELECT PIV answers 9000 even after a chain cut short by a refused command, that
a refused command drops a pending 61xx, that the CHUID reads back unchanged (unless a PUT
DATA succeeded since), and that the PIN's retry counter moved only if a VERIFY, CHANGE
REFERENCE DATA or RESET RETRY COUNTER was sent. The first broken invariant ends the run
with exit status 1 and the APDUs of the episode that broke it.

The commands come from one ``random.Random(seed)`` that no card answer influences, so a
seed and a count replay the same commands; the checks, GET RESPONSE follow-ups and upkeep
(restoring the PIN and PUK counters) come on top and do not draw from it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import inf
from pathlib import Path
from typing import Final

from smartcard import scard

from vcard.apdu import CommandApdu
from vcard.constants import (
    DEFAULT_MANAGEMENT_KEY,
    DEFAULT_PIN,
    DEFAULT_PUK,
    PIN_TRIES,
    PUK_TRIES,
    Aid,
    Ins,
    MgmtAlg,
    ObjectId,
)
from vcard.doctor import PcscError, PcscReader, card_answers, card_ready, list_readers
from vcard.errors import WrongLength
from vcard.mgmt import encrypt_block
from vcard.tlv import Tlv

READER: Final = "cardbridge vpcd 00 00"
VPCD: Final = "127.0.0.1:35963"
CARDBRIDGE: Final = str(Path(sys.executable).with_name("cardbridge"))
#: An APDU not answered within this many seconds is "unanswered" (the card's own bound,
#: ``--apdu-timeout``, is 30 s: past it the card answers 6400).
UNANSWERED_AFTER: Final = 60.0
#: Status word groups a PIV card answers (SP 800-73-4 Part 2 table 6, ISO 7816-4).
VALID_SW1: Final = frozenset({0x61, 0x63, 0x64, 0x67, 0x68, 0x69, 0x6A, 0x6D, 0x6E, 0x90})
#: 1-byte APDUs that vpcd's framing cannot tell from its control codes (see vcard.vpcd).
CONTROL_BYTES: Final = frozenset({b"\x00", b"\x01", b"\x02", b"\x04"})
#: vpcd frames at most 0xFFFF bytes; it drops the card on a longer APDU.
MAX_APDU: Final = 0xFFFF
PIN_COMMANDS: Final = frozenset({Ins.VERIFY, Ins.CHANGE_REFERENCE, Ins.RESET_RETRY})
INS_IMPORT: Final = 0xFE  # Yubico IMPORT ASYMMETRIC KEY

PIN: Final = DEFAULT_PIN
PUK: Final = DEFAULT_PUK


def pad_pin(pin: bytes) -> bytes:
    """A PIN field: ASCII padded with FF to 8 bytes (SP 800-73-4 Part 2 §2.4.3)."""
    return pin.ljust(8, b"\xff")


SELECT_PIV: Final = b"\x00\xa4\x04\x00\x09" + Aid.PIV[:9] + b"\x00"
#: A command the card refuses before reading its header (6E00): like any command that is
#: not a chain's next part or GET RESPONSE, it ends a pending chain and drops a pending
#: 61xx (ISO 7816-4 §5.1).
REFUSED: Final = bytes.fromhex("8020F446")
CHAINED_SELECT_PART: Final = bytes.fromhex("10A40400051122334455")
GET_CHUID: Final = bytes.fromhex("00CB3FFF055C035FC10200")
#: The first 8 bytes of the Discovery object (20 bytes, read-only): 61xx follows.
GET_DISCOVERY_8: Final = bytes.fromhex("00CB3FFF035C017E08")
GET_RESPONSE: Final = bytes.fromhex("00C0000000")
VERIFY_PIN: Final = b"\x00\x20\x00\x80\x08" + pad_pin(PIN)
PIN_METADATA: Final = bytes.fromhex("00F7008000")
PUK_METADATA: Final = bytes.fromhex("00F7008100")

SLOTS: Final = (0x9A, 0x9C, 0x9D, 0x9E, 0x82, 0x83, 0x84, 0x85, 0x95)
KEY_ALGS: Final = (0x07, 0x11, 0x14, 0xE0, 0x05, 0x16)
OBJECT_TAGS: Final = tuple(o.value for o in ObjectId)
#: The generator points of P-256 and P-384 (SEC 2): valid ECDH peers.
P256_G: Final = bytes.fromhex(
    "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
P384_G: Final = bytes.fromhex(
    "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e"
    "3872760ab73617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e81"
    "9d7a431d7c90ea0e5f"
)


# -- the commands ----------------------------------------------------------------------------


@dataclass
class Step:
    """One fuzz step: APDUs sent in a row, and whether 61xx is followed with GET RESPONSE."""

    apdus: list[bytes]
    follow: bool = True


def encode(
    rng: random.Random, cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None
) -> list[bytes]:
    """A command as one short or extended APDU, or as a chain of short parts, some broken."""
    header = bytes([cla, ins, p1, p2])
    extended = len(data) > 255 or (le is not None and le > 256) or rng.random() < 0.15
    if extended and len(data) + 9 <= MAX_APDU and (len(data) <= 255 or rng.random() < 0.5):
        body = b"\x00" + (len(data).to_bytes(2, "big") + data if data else b"")
        if le is not None:
            body += (le & 0xFFFF).to_bytes(2, "big")
        return [header + body]
    short_le = b"" if le is None else bytes([le & 0xFF])
    if len(data) <= 255 and rng.random() < 0.8:
        return [header + (bytes([len(data)]) + data if data else b"") + short_le]
    parts, rest = [], data
    while len(rest) > 255 or (rest and rng.random() < 0.2):
        size = rng.choice((255, 255, rng.randint(1, 255)))
        parts.append(bytes([cla | 0x10, ins, p1, p2, min(size, len(rest))]) + rest[:size])
        rest = rest[size:]
    final = header + (bytes([len(rest)]) + rest if rest else b"") + short_le
    roll = rng.random()
    if roll < 0.05:  # abandoned: the final part never comes
        return parts or [final]
    if roll < 0.10 and parts:  # another command cuts in
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(JUNK))
    elif roll < 0.13 and parts:  # the header changes mid-chain
        i = rng.randrange(len(parts))
        parts[i] = parts[i][:2] + bytes([parts[i][2] ^ 1]) + parts[i][3:]
    return [*parts, final]


JUNK: Final = (
    bytes.fromhex("8020F446"),
    bytes.fromhex("FFA4040009A00000030800001000"),
    b"\xdb",
    bytes.fromhex("00C0000000"),
    bytes.fromhex("0CCB3FFF035C017E00"),
    bytes.fromhex("00A4040005A0"),
)


def der_length(n: int) -> bytes:
    """The minimal BER-TLV length field for ``n`` (ISO 7816-4)."""
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def tlv_length(rng: random.Random, n: int) -> bytes:
    """A BER length for ``n`` bytes: minimal, or non-minimal, lying, indefinite, absurd."""
    roll = rng.random()
    if roll < 0.6:
        return der_length(n)
    if roll < 0.7:
        return b"\x82" + n.to_bytes(2, "big")  # not minimal
    if roll < 0.8:
        return der_length(max(0, n + rng.choice((-2, -1, 1, 2, 100))))  # lies
    return rng.choice((b"\x80", b"\x84\xff\xff\xff\xff", b"\x85", b"\x83\x01\x00", b"\x81"))


def hostile_tlv(rng: random.Random, tags: tuple[int, ...], depth: int = 0) -> bytes:
    """A TLV with a tag from ``tags`` (or a random one), a nested or random value and a
    length that may lie about it."""
    tag = rng.choice(tags) if rng.random() < 0.8 else rng.choice((0x00, 0xFF, 0x1F, 0x5F, 0x7F))
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    if depth < 2 and rng.random() < 0.3:
        value = b"".join(hostile_tlv(rng, tags, depth + 1) for _ in range(rng.randint(1, 3)))
    else:
        value = rng.randbytes(rng.choice((0, 0, 1, 2, 8, 32, 65, 127, 128, 256, 300)))
    return tag_bytes + tlv_length(rng, len(value)) + value


def gen_general_authenticate(rng: random.Random) -> Step:
    """GENERAL AUTHENTICATE (Part 2 §3.2.4): sign, decrypt, ECDH, 9B, or hostile templates."""
    alg = rng.choice((*KEY_ALGS, 0x03, 0x00, 0x08, rng.randrange(256)))
    slot = rng.choice((*SLOTS, 0x9B, 0x9B, rng.randrange(256)))
    roll = rng.random()
    body: bytes
    if roll < 0.45:
        if alg in (0x07, 0x05, 0x16):
            size = {0x07: 256, 0x05: 384, 0x16: 512}[alg]
            t = rng.randbytes(rng.choice((19, 51)))
            block = b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t
            payload = rng.choice((block, rng.randbytes(size), b"\xff" * size, block[:-1]))
        else:
            payload = rng.randbytes(rng.choice((0, 1, 20, 32, 48, 49, 64, 300)))
        if rng.random() < 0.2:
            body = Tlv(0x7C, Tlv(0x82) + Tlv(0x85, rng.choice((P256_G, P384_G, payload))))
        elif rng.random() < 0.1:
            body = Tlv(0x7C, Tlv(0x85) + Tlv(0x81, rng.choice((P256_G, P384_G))))
        else:
            body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, payload))
    elif roll < 0.6:  # 9B management key steps
        block = rng.randbytes(rng.choice((8, 16, 7)))
        body = Tlv(0x7C, rng.choice((
            Tlv(0x80), Tlv(0x81), Tlv(0x82, block), Tlv(0x80, block) + Tlv(0x81, block),
            Tlv(0x80, block) + Tlv(0x81, block) + Tlv(0x82),
        )))  # fmt: skip
    elif roll < 0.9:
        body = b"\x7c" + hostile_body(rng, (0x80, 0x81, 0x82, 0x85))
    else:
        body = rng.randbytes(rng.randint(0, 40))
    return Step(encode(rng, 0x00, Ins.GENERAL_AUTHENTICATE, alg, slot, body, rng.choice((0, None))))


def hostile_body(rng: random.Random, tags: tuple[int, ...]) -> bytes:
    """A length and a sequence of hostile TLVs (the value of a template)."""
    inner = b"".join(hostile_tlv(rng, tags) for _ in range(rng.randint(0, 4)))
    return tlv_length(rng, len(inner)) + inner


def gen_put_data(rng: random.Random) -> Step:
    """PUT DATA (Part 2 §3.3.1): ``5C tag 53 value``, well formed or not, up to 3.1 kB."""
    tag = rng.choice(OBJECT_TAGS) if rng.random() < 0.85 else rng.randrange(1 << 24)
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    size = rng.choice((0, 1, 10, 200, 255, 256, 1000, 3063, 3064, 3100))
    if rng.random() < 0.6:
        value = Tlv(0x70, rng.randbytes(max(0, size - 8))) + Tlv(0x71, b"\x00") + Tlv(0xFE)
        data = Tlv(0x5C, tag_bytes) + Tlv(0x53, value[:size])
    else:
        data = b"\x5c" + tlv_length(rng, len(tag_bytes)) + tag_bytes
        data += b"\x53" + hostile_body(rng, (0x70, 0x71, 0xFE, 0x53))
    p1p2 = (0x3F, 0xFF) if rng.random() < 0.9 else (rng.randrange(256), rng.randrange(256))
    return Step(encode(rng, 0x00, Ins.PUT_DATA, *p1p2, data, None))


def gen_generate(rng: random.Random) -> Step:
    """GENERATE ASYMMETRIC KEY PAIR (Part 2 §3.3.2); mostly fast algorithms, RSA rarely."""
    algs, weights = (0x11, 0x14, 0xE0, 0x07, 0x05, 0x16, 0x00, 0xFF), (30, 20, 20, 3, 1, 1, 5, 5)
    alg = rng.choices(algs, weights)[0]
    slot = rng.choice((*SLOTS, 0x9B, 0x80, rng.randrange(256)))
    body: bytes
    if rng.random() < 0.6:
        items: bytes = Tlv(0x80, bytes([alg]))
        if rng.random() < 0.4:
            items += Tlv(0xAA, bytes([rng.choice((0, 1, 2, 3, 9))]))
        if rng.random() < 0.3:
            items += Tlv(0xAB, bytes([rng.choice((0, 1, 2, 3))]))
        body = Tlv(0xAC, items)
    else:
        body = b"\xac" + hostile_body(rng, (0x80, 0xAA, 0xAB, 0x81))
    p1 = 0x00 if rng.random() < 0.9 else rng.randrange(256)
    return Step(encode(rng, 0x00, Ins.GENERATE_ASYMMETRIC, p1, slot, body, rng.choice((0, None))))


def gen_import(rng: random.Random) -> Step:
    """Yubico IMPORT ASYMMETRIC KEY (FE): RSA CRT parts 01-05, EC private 06, policies."""
    alg, slot = rng.choice(KEY_ALGS), rng.choice(SLOTS)
    body = b"".join(hostile_tlv(rng, (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0xAA, 0xAB))
                    for _ in range(rng.randint(0, 6)))  # fmt: skip
    return Step(encode(rng, 0x00, INS_IMPORT, alg, slot, body, None))


def gen_pin(rng: random.Random) -> Step:
    """VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER (Part 2 §3.2.1-3). The right PUK
    is never sent here (a mutation could change it); a right PIN only where mutations can
    at worst change the PIN, which the upkeep's RESET RETRY COUNTER restores."""
    wrong = pad_pin(str(rng.randrange(10**6, 10**8)).encode())
    odd = rng.choice((b"", b"1234", pad_pin(b"12345\xff6"), b"\xff" * 8, rng.randbytes(8), wrong))
    roll = rng.random()
    if roll < 0.35:
        data = rng.choice((pad_pin(PIN), wrong, odd, b""))
        p1 = rng.choice((0x00, 0x00, 0xFF, 0x01))
        p2 = rng.choice((0x80, 0x80, 0x81, 0x00, 0x9B))
        return Step(encode(rng, 0x00, Ins.VERIFY, p1, p2, data, rng.choice((None, 0))))
    if roll < 0.5:  # OpenSC's 9C sequence: VERIFY right before the signature
        body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, rng.randbytes(32)))
        sign = bytes([0x00, Ins.GENERAL_AUTHENTICATE, 0x11, 0x9C, len(body)]) + body + b"\x00"
        return Step([VERIFY_PIN, sign])
    if roll < 0.8:
        old = rng.choice((pad_pin(PIN), wrong, odd))
        new = rng.choice((pad_pin(PIN), b"\xff" * 8, odd, pad_pin(b"12345")))
        p2 = rng.choice((0x80, 0x81, 0x81, 0x00))
        return Step(encode(rng, 0x00, Ins.CHANGE_REFERENCE, 0x00, p2, old + new, None))
    data = rng.choice((wrong, odd)) + rng.choice((pad_pin(PIN), odd))
    p2 = rng.choice((0x80, 0x80, 0x81))
    return Step(encode(rng, 0x00, Ins.RESET_RETRY, 0x00, p2, data, None))


def gen_get_data(rng: random.Random) -> Step:
    """GET DATA (Part 2 §3.1.2), SELECT (§3.1.1), GET METADATA/VERSION/SERIAL, GET RESPONSE."""
    roll = rng.random()
    if roll < 0.5:
        tag = rng.choice(OBJECT_TAGS) if rng.random() < 0.8 else rng.randrange(1 << 32)
        tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
        data: bytes
        if rng.random() < 0.8:
            data = Tlv(0x5C, tag_bytes)
        else:
            data = b"\x5c" + tlv_length(rng, len(tag_bytes)) + tag_bytes
        le = rng.choice((0, 0, 8, 1, 255, None, 0x10000, 3))
        step = Step(encode(rng, 0x00, Ins.GET_DATA, 0x3F, 0xFF, data, le))
        step.follow = rng.random() < 0.8
        return step
    if roll < 0.7:
        aid = rng.choice((Aid.PIV[: rng.randint(0, 11)], rng.randbytes(rng.randint(1, 16))))
        p2 = rng.choice((0x00, 0x0C, 0x04, rng.randrange(256)))
        p1 = rng.choice((0x04, 0x04, 0x00, 0x02))
        return Step(encode(rng, 0x00, Ins.SELECT, p1, p2, aid, rng.choice((0, None, 8))))
    if roll < 0.85:
        p2 = rng.choice((0x80, 0x81, 0x9B, *SLOTS, rng.randrange(256)))
        return Step(encode(rng, 0x00, Ins.GET_METADATA, 0x00, p2, b"", 0))
    ins = rng.choice((Ins.GET_VERSION, Ins.GET_SERIAL, Ins.GET_RESPONSE, 0x84, 0xB0, 0xCA))
    return Step(encode(rng, 0x00, ins, 0x00, 0x00, b"", rng.choice((0, 5, None))))


def gen_set_management_key(rng: random.Random) -> Step:
    """Yubico SET MANAGEMENT KEY (FF): the default key again, or malformed data. Never
    another key: the 9B steps of later episodes must still authenticate."""
    good = bytes([MgmtAlg.TDES]) + Tlv(0x9B, DEFAULT_MANAGEMENT_KEY)
    data = rng.choice((good, good[:-1], bytes([0x0A]) + Tlv(0x9B, bytes(3)), rng.randbytes(5)))
    p2 = rng.choice((0xFF, 0xFE))
    return Step([bytes([0x00, Ins.SET_MGMKEY, 0xFF, p2, len(data)]) + data])


def gen_structured(rng: random.Random) -> Step:
    """A well-framed command with random CLA, INS, P1, P2, body and Le."""
    cla = rng.choice((0x00, 0x00, 0x10, 0x80, 0x0C, 0x01, 0xFF, 0x40))
    ins = rng.choice((*(i for i in Ins if i != Ins.SET_MGMKEY), INS_IMPORT, rng.randrange(256)))
    data = rng.randbytes(rng.choice((0, 1, 5, 16, 255, 256, 300)))
    le = rng.choice((None, 0, 1, 256, 0x10000))
    return Step(encode(rng, cla, ins, rng.randrange(256), rng.randrange(256), data, le))


def gen_random(rng: random.Random) -> Step:
    """Random bytes, mostly too short to be a command."""
    size = rng.choice((1, 1, 2, 3, 4, 5, 6, 7, 8, 12, 40, 261, 300, rng.randint(0, 4000)))
    return Step([rng.randbytes(size)], follow=False)


def gen_mutated(rng: random.Random) -> Step:
    """A PIV-shaped command with a few bytes flipped, set, cut, added or removed."""
    apdu = bytearray(rng.choice(GENERATORS[:-2])(rng).apdus[-1])
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(6), rng.randrange(max(1, len(apdu)))
        if op == 0 and apdu:
            apdu[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and apdu:
            apdu[pos] = rng.randrange(256)
        elif op == 2:
            del apdu[pos:]
        elif op == 3:
            apdu += rng.randbytes(rng.randint(1, 8))
        elif op == 4:
            apdu[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif apdu:
            del apdu[pos]
    return Step([bytes(apdu)], follow=rng.random() < 0.5)


GENERATORS: Final[tuple[Callable[[random.Random], Step], ...]] = (
    gen_general_authenticate,
    gen_put_data,
    gen_generate,
    gen_import,
    gen_pin,
    gen_get_data,
    gen_set_management_key,
    gen_structured,
    gen_random,
    gen_mutated,
)
WEIGHTS: Final = (22, 10, 6, 5, 8, 14, 2, 12, 8, 13)


def allowed(apdu: bytes, ins_ff_ok: bool) -> bool:
    """Whether the fuzzer may send ``apdu``: not vpcd's known limits (1-byte control codes,
    empty, over 0xFFFF bytes), and SET MANAGEMENT KEY only from its own generator, since a
    random key would lock the fuzzer out of the 9B steps (a card that takes another key
    anyway fails the next episode's 9B authentication)."""
    if not apdu or len(apdu) > MAX_APDU or apdu in CONTROL_BYTES:
        return False
    return ins_ff_ok or len(apdu) < 4 or apdu[1:4] != b"\xff\xff\xff"


def commands(rng: random.Random) -> Iterator[Step]:
    """The fuzz steps of one seed, forever."""
    while True:
        generator = rng.choices(GENERATORS, WEIGHTS)[0]
        step = generator(rng)
        ff_ok = generator is gen_set_management_key
        step.apdus = [a for a in step.apdus if allowed(a, ff_ok)]
        if step.apdus:
            yield step


# -- running it ------------------------------------------------------------------------------


class InvariantBroken(Exception):
    """An invariant broke; the message says which."""


@dataclass
class Stats:
    sent: int = 0
    fuzz: int = 0
    follow_ups: int = 0
    upkeep: int = 0
    checks: int = 0
    episodes: int = 0
    sw: Counter[int] = field(default_factory=Counter)  # of the fuzz APDUs and follow-ups
    slowest: tuple[float, bytes] = (0.0, b"")


class Fuzzer:
    """Sends the steps through pyscard and checks every answer and the invariants."""

    def __init__(
        self, reader: str, card_pid: int, rng: random.Random, on_abort: Callable[[], None]
    ) -> None:
        self.reader = reader
        self.card_pid = card_pid
        self.rng = rng
        self.on_abort = on_abort
        self.stats = Stats()
        self.history: list[str] = []  # this episode's APDUs and answers
        self.conn: PcscReader | None = None
        self.chuid = b""
        self.pin_tries = PIN_TRIES
        self.pin_touched = False
        self.pin_changed = False  # a PIN or PUK command answered 9000: the PIN may be another
        self.put_data_ok = False
        self._inflight: tuple[bytes, float] | None = None
        self._unanswered = False
        threading.Thread(target=self._watch, name="unanswered", daemon=True).start()

    # One APDU ----------------------------------------------------------------------------

    def send(self, apdu: bytes, kind: str = "fuzz") -> tuple[bytes, int]:
        assert self.conn is not None
        self._inflight = (apdu, time.monotonic())
        start = time.perf_counter()
        try:
            data, sw = self.conn.transmit(apdu)
        except PcscError as e:
            if self._unanswered:
                self.history.append(f"{apdu.hex()}  # no answer")
                raise InvariantBroken(f"no answer after {UNANSWERED_AFTER:.0f} s") from e
            self.history.append(f"{apdu.hex()}  # {e}")
            raise InvariantBroken(f"PC/SC failed on {apdu[:16].hex(' ')}: {e}") from e
        finally:
            self._inflight = None
        elapsed = time.perf_counter() - start
        stats = self.stats
        stats.sent += 1
        if kind == "upkeep":
            stats.upkeep += 1
        else:
            stats.sw[sw] += 1
            stats.fuzz += kind == "fuzz"
            stats.follow_ups += kind == "follow"
        if elapsed > stats.slowest[0]:
            stats.slowest = (elapsed, apdu)
        self.history.append(f"{apdu.hex()}  # {sw:04X} {len(data)} bytes {elapsed * 1e3:.1f} ms")
        check_answer(apdu, data, sw)
        return data, sw

    def _watch(self) -> None:
        """SCardTransmit has no timeout: when an APDU stays unanswered, stop the card, so
        that vpcd drops it and the transmit fails; if it still hangs, report and exit."""
        while not self._unanswered:
            time.sleep(1.0)
            inflight = self._inflight
            if inflight is not None:
                self._unanswered = time.monotonic() - inflight[1] > UNANSWERED_AFTER
        self.on_abort()
        time.sleep(10)
        self.report(f"no answer after {UNANSWERED_AFTER:.0f} s, and none after stopping the card")
        os._exit(1)  # the main thread is still stuck in SCardTransmit

    def read_all(self, apdu: bytes, kind: str) -> tuple[bytes, int]:
        data, sw = self.send(apdu, kind)
        while sw >> 8 == 0x61:
            more, sw = self.send(bytes([0x00, 0xC0, 0x00, 0x00, sw & 0xFF]), "follow")
            data += more
        return data, sw

    # Episodes ----------------------------------------------------------------------------

    def new_episode(self) -> None:
        """Reset the card, then verify the PIN and authenticate 9B as the seed says."""
        if self.conn is not None:
            self.conn.close(scard.SCARD_RESET_CARD)
        self.conn = PcscReader(self.reader)
        self.history = ["# episode: card reset"]
        self.stats.episodes += 1
        with_pin, with_mgmt = self.rng.random() < 0.5, self.rng.random() < 0.5
        self.expect(SELECT_PIV, 0x9000, "SELECT PIV")
        if with_pin:
            _, sw = self.read_all(VERIFY_PIN, "upkeep")
            if sw != 0x9000 and self.pin_changed:  # a fuzz CHANGE REFERENCE DATA had the PIN
                self.unblock()
                _, sw = self.read_all(VERIFY_PIN, "upkeep")
            if sw != 0x9000:
                raise InvariantBroken(f"VERIFY with the PIN answered {sw:04X}")
        if with_mgmt:
            self.authenticate()

    def authenticate(self) -> None:
        """9B external authentication (Part 2 Appendix A.1) with the known key."""
        data, _ = self.expect(bytes.fromhex("0087039B047C02810000"), 0x9000, "9B challenge")
        challenge = Tlv.unpack(0x81, Tlv.unpack(0x7C, data))
        response = encrypt_block(MgmtAlg.TDES, DEFAULT_MANAGEMENT_KEY, challenge)
        answer = Tlv(0x7C, Tlv(0x82, response))
        self.expect(bytes([0x00, 0x87, 0x03, 0x9B, len(answer)]) + answer, 0x9000, "9B answer")

    def expect(self, apdu: bytes, sw: int, what: str) -> tuple[bytes, int]:
        data, got = self.read_all(apdu, "upkeep")
        if got != sw:
            raise InvariantBroken(f"{what} answered {got:04X}, not {sw:04X}")
        return data, got

    def run_step(self, step: Step) -> None:
        """Send the step's APDUs; note what may legitimately change the state the checks
        compare; after a command that may have counted a wrong PUK, restore the PUK's
        tries, so that the fuzzer can always unblock the PIN."""
        puk_checked = False
        for apdu in step.apdus:
            data, sw = self.read_all(apdu, "fuzz") if step.follow else self.send(apdu)
            ins = apdu[1] if len(apdu) >= 4 else None
            self.pin_touched |= ins in PIN_COMMANDS
            puk_checked |= ins in (Ins.CHANGE_REFERENCE, Ins.RESET_RETRY)
            self.pin_changed |= sw == 0x9000 and ins in (Ins.CHANGE_REFERENCE, Ins.RESET_RETRY)
            self.put_data_ok |= sw == 0x9000 and ins == Ins.PUT_DATA
        if puk_checked and self.tries(PUK_METADATA) < PUK_TRIES:
            self.unblock()

    # Invariants --------------------------------------------------------------------------

    def baseline(self) -> None:
        self.expect(SELECT_PIV, 0x9000, "SELECT PIV")
        self.chuid, _ = self.expect(GET_CHUID, 0x9000, "GET DATA CHUID")
        self.pin_tries = self.tries(PIN_METADATA)

    def tries(self, metadata: bytes) -> int:
        data, _ = self.expect(metadata, 0x9000, "GET METADATA")
        return Tlv.parse_dict(data)[0x06][1]

    def check(self) -> None:
        """A chain cut short by a refused command is not glued to the next SELECT PIV, which
        answers 9000; a 61xx is dropped by a refused command; the CHUID is unchanged; the
        PIN tries moved only on VERIFY, CHANGE REFERENCE DATA or RESET RETRY COUNTER."""
        self.stats.checks += 1
        self.expect(CHAINED_SELECT_PART, 0x9000, "a chained SELECT part")
        self.expect(REFUSED, 0x6E00, "a proprietary-class command")
        data, sw = self.read_all(SELECT_PIV, "upkeep")
        if sw != 0x9000 or data[:1] != b"\x61":
            raise InvariantBroken(f"SELECT PIV answered {sw:04X} with {data[:4].hex()}")
        _, sw = self.send(GET_DISCOVERY_8, "upkeep")
        if sw >> 8 != 0x61:
            raise InvariantBroken(f"GET DATA Discovery with Le=8 answered {sw:04X}, not 61xx")
        self.expect(REFUSED, 0x6E00, "a proprietary-class command")
        self.expect(GET_RESPONSE, 0x6985, "GET RESPONSE after a refused command")
        chuid, sw = self.read_all(GET_CHUID, "upkeep")
        if (sw, chuid) != (0x9000, self.chuid) and not self.put_data_ok:
            raise InvariantBroken(f"the CHUID changed without PUT DATA ({sw:04X})")
        self.chuid, self.put_data_ok = chuid, False
        tries = self.tries(PIN_METADATA)
        if tries != self.pin_tries and not self.pin_touched:
            raise InvariantBroken(f"PIN tries went {self.pin_tries} -> {tries} without VERIFY")
        self.pin_tries, self.pin_touched = tries, False
        if tries < PIN_TRIES:
            self.unblock()

    def unblock(self) -> None:
        """RESET RETRY COUNTER with the right PUK: PIN back to the default, both counters full."""
        reset = b"\x00\x2c\x00\x80\x10" + pad_pin(PUK) + pad_pin(PIN)
        self.expect(reset, 0x9000, "RESET RETRY COUNTER with the right PUK")
        self.pin_tries = self.tries(PIN_METADATA)
        self.pin_changed = False

    # The run -----------------------------------------------------------------------------

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.card_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.card_pid}")

    def report(self, why: str) -> None:
        print(f"\nINVARIANT BROKEN after {self.stats.sent} APDUs: {why}", flush=True)
        print("The episode's APDUs (hex, one per line; the last one broke it):")
        print("\n".join(self.history), flush=True)


def check_answer(apdu: bytes, data: bytes, sw: int) -> None:
    """A well-formed answer: known SW1, never 6F00, data only with 9000/61xx, at most Ne."""
    if sw >> 8 not in VALID_SW1 or sw == 0x6F00:
        raise InvariantBroken(f"status word {sw:04X}")
    if data and sw != 0x9000 and sw >> 8 != 0x61:
        raise InvariantBroken(f"{len(data)} bytes of data with {sw:04X}")
    try:
        command = CommandApdu.parse(apdu)
    except WrongLength:
        if sw != 0x6700:
            raise InvariantBroken(f"a malformed APDU answered {sw:04X}, not 6700") from None
        return
    ne = command.ne or 256
    if len(data) > (ne if command.extended else min(ne, 256)):
        raise InvariantBroken(f"{len(data)} bytes answered, more than Ne={ne}")


def start_card(work: Path) -> subprocess.Popen[bytes]:
    """``cardbridge card init-soft`` + ``card run --soft`` in the reader."""
    card = work / "card"
    subprocess.run([CARDBRIDGE, "card", "init-soft", str(card)], check=True, capture_output=True)
    log = (work / "card.log").open("wb")
    proc = subprocess.Popen(
        [CARDBRIDGE, "card", "run", "--soft", str(card), "--vpcd", VPCD],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not card_ready(READER):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"fuzz-card: the card did not come up:\n{(work / 'card.log').read_text()}")
        time.sleep(0.1)
    return proc


def stop_card(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.monotonic() + 10
    while card_answers(READER) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class Limits:
    """When a run ends: after ``count`` APDUs or at ``until`` (time.monotonic), first."""

    count: float
    until: float

    def reached(self, sent: int) -> bool:
        return sent >= self.count or time.monotonic() >= self.until


def fuzz(fuzzer: Fuzzer, steps: Iterator[Step], limits: Limits) -> float:
    """Episodes of 20-300 steps from a card reset, with the checks every 6-24 steps and at
    the end of each; raises ``InvariantBroken``. Prints the figures at the end and returns
    how many MB the card's RSS grew since the start."""
    rng, stats = fuzzer.rng, fuzzer.stats
    start = time.monotonic()
    rss = {"start": fuzzer.rss_mb()}
    warm_at = 0  # APDUs sent when the warm-up RSS was read
    warm_up = min(limits.count / 10, 20_000)
    next_progress = start + 30
    fuzzer.new_episode()
    fuzzer.baseline()
    while not limits.reached(stats.sent):
        fuzzer.new_episode()
        checks_every = rng.randint(6, 24)
        for i in range(rng.randint(20, 300)):
            fuzzer.run_step(next(steps))
            if (i + 1) % checks_every == 0:
                fuzzer.check()
            if limits.reached(stats.sent):
                break
        fuzzer.check()
        if "warm" not in rss and stats.sent >= warm_up:
            rss["warm"], warm_at = fuzzer.rss_mb(), stats.sent
        if time.monotonic() >= next_progress:
            next_progress += 30
            print(f"  {stats.sent:>8} APDUs, {stats.sent / (time.monotonic() - start):.0f}/s",
                  flush=True)  # fmt: skip
    elapsed = time.monotonic() - start
    rss["end"] = fuzzer.rss_mb()
    rss.setdefault("warm", rss["start"])
    print(f"APDUs            {stats.sent} in {elapsed:.1f} s: {stats.sent / elapsed:.0f} APDUs/s "
          f"({stats.fuzz} fuzz, {stats.follow_ups} GET RESPONSE follow-ups, {stats.upkeep} "
          "checks and upkeep)")  # fmt: skip
    print(f"episodes         {stats.episodes}, each from a card reset; {stats.checks} invariant "
          "checks, 0 broken")  # fmt: skip
    print(f"unanswered       0 (none took over {UNANSWERED_AFTER:.0f} s)")
    print("6F00             0 (any 6F00 ends the run)")
    slow_s, slow = stats.slowest
    more = " ..." if len(slow) > 12 else ""
    print(f"slowest APDU     {slow_s * 1e3:.1f} ms: {slow[:12].hex(' ')}{more} ({len(slow)} bytes)")
    print(f"card RSS         {rss['start']:.1f} MB at start, {rss['warm']:.1f} MB after {warm_at} "
          f"APDUs, {rss['end']:.1f} MB at the end: {rss['end'] - rss['warm']:+.1f} MB since "
          f"APDU {warm_at}, {rss['end'] - rss['start']:+.1f} MB since the start")
    print("status words of the fuzz APDUs and their follow-ups:")
    print("                 " + histogram(stats.sw))
    return rss["end"] - rss["start"]


def histogram(sws: Counter[int]) -> str:
    """Status words by frequency, 61xx and 63Cx each counted as one."""
    groups: Counter[str] = Counter()
    for sw, n in sws.items():
        name = "61xx" if sw >> 8 == 0x61 else "63Cx" if sw >> 4 == 0x63C else f"{sw:04X}"
        groups[name] += n
    total = sum(groups.values())
    cells = [f"{name} {n / total:6.2%}" for name, n in groups.most_common()]
    return "\n                 ".join("   ".join(cells[i : i + 5]) for i in range(0, len(cells), 5))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz-card",
        description="Fuzz the card through pcscd + vpcd; exit 1 when an invariant breaks.",
    )
    parser.add_argument(
        "--count", type=int, default=None,
        help="APDUs to send (default 20000, or no limit with --minutes)",
    )  # fmt: skip
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--max-rss-growth", type=float, metavar="MB", default=5.0,
        help="exit 1 when the card's RSS grew more than this since the start (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--attach", type=int, metavar="PID", default=None,
        help="fuzz the card already in the reader, run by process PID (default PIN, PUK and "
        "management key; its keys and objects get overwritten) instead of starting one",
    )  # fmt: skip
    args = parser.parse_args()
    seed = random.SystemRandom().randrange(1 << 32) if args.seed is None else args.seed
    count = args.count if args.count is not None else 20_000 if args.minutes is None else inf
    until = time.monotonic() + args.minutes * 60 if args.minutes is not None else inf
    try:
        if READER not in list_readers():
            sys.exit(f"fuzz-card: no reader {READER!r}; start pcscd with etc/reader.conf.d")
    except PcscError as e:
        sys.exit(f"fuzz-card: {e}")
    if args.attach is None and card_answers(READER):
        sys.exit(f"fuzz-card: a card is already in {READER!r}; stop it or use --attach PID")
    if args.attach is not None and not card_answers(READER):
        sys.exit(f"fuzz-card: no card answers in {READER!r} to attach to")
    print(f"fuzz-card --seed {seed} --count {count}"
          + (f" --minutes {args.minutes}" if args.minutes is not None else "")
          + f": through pcscd + vpcd ({READER})", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fuzz-card.") as work:
        card = None if args.attach is not None else start_card(Path(work))
        pid = card.pid if card is not None else args.attach
        print(f"card: pid {pid}" + ("" if card is None else ", a new p256 soft card"), flush=True)

        def abort() -> None:
            if card is not None:
                stop_card(card)

        rng = random.Random(seed)
        fuzzer = Fuzzer(READER, pid, rng, on_abort=abort)
        try:
            growth = fuzz(fuzzer, commands(rng), Limits(count, until))
        except InvariantBroken as e:
            fuzzer.report(str(e))
            print(f"Replay: scripts/fuzz-card --seed {seed} --count {fuzzer.stats.sent}")
            if card is not None:
                print("The card's log ends with:")
                print((Path(work) / "card.log").read_text()[-3000:])
            return 1
        finally:
            if card is not None:
                stop_card(card)
    if growth > args.max_rss_growth:
        print(f"fuzz-card: the card's RSS grew {growth:.1f} MB, more than "
              f"--max-rss-growth {args.max_rss_growth:g}")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
