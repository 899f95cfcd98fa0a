# SPDX-License-Identifier: Apache-2.0
"""``SoftKeyBackend``: a card's keys, data objects and PIN state in a local directory.

Layout of a card directory (created with mode 0700)::

    card.json        format marker, GUID, per-slot algorithm and PIN policy
    secrets.json     PIN/PUK scrypt hashes and counters, management key   (0600)
    keys/<slot>.pem  PKCS#8 private keys                                    (0600)
    objects/<tag>    data object values (the content of the 53 container)

Every write goes to a temporary file in the same directory and is moved into place with
``os.replace``, so a crash never leaves a half-written file. PIN counters are persisted
before the result of a verification is returned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Final, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from vcard.constants import (
    DEFAULT_MANAGEMENT_KEY,
    DEFAULT_PIN,
    DEFAULT_PUK,
    PIN_TRIES,
    PUK_TRIES,
    KeyType,
    MgmtAlg,
    PinPolicy,
    Slot,
)
from vcard.errors import NotACard, PinBlocked, PinIncorrect
from vcard.keys import PinStatus, PublicKey

logger = logging.getLogger(__name__)

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

FORMAT: Final[str] = "cardbridge-soft-card"
FORMAT_VERSION: Final[int] = 1
_CARD_FILE: Final[str] = "card.json"
_SECRETS_FILE: Final[str] = "secrets.json"
_SCRYPT_N: Final[int] = 2**12
#: Tries each secret allows after a right value (its retry counter's reset value).
_TRIES: Final[dict[str, int]] = {"pin": PIN_TRIES, "puk": PUK_TRIES}

# DER DigestInfo prefixes (RFC 8017 §9.2 note 1), for the PKCS#1 v1.5 fast path.
_DIGEST_INFOS: Final[dict[bytes, hashes.HashAlgorithm]] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): hashes.SHA1(),  # noqa: S303
    bytes.fromhex("302d300d06096086480165030402040500041c"): hashes.SHA224(),
    bytes.fromhex("3031300d060960864801650304020105000420"): hashes.SHA256(),
    bytes.fromhex("3041300d060960864801650304020205000430"): hashes.SHA384(),
    bytes.fromhex("3051300d060960864801650304020305000440"): hashes.SHA512(),
}
_CURVES: Final[dict[KeyType, ec.EllipticCurve]] = {
    KeyType.ECCP256: ec.SECP256R1(),
    KeyType.ECCP384: ec.SECP384R1(),
}
_PREHASH: Final[dict[KeyType, hashes.HashAlgorithm]] = {
    KeyType.ECCP256: hashes.SHA256(),
    KeyType.ECCP384: hashes.SHA384(),
}


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary sibling, fsync it, and move it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _hash_secret(value: bytes, salt: bytes) -> bytes:
    # The length prefix matters: HMAC zero-pads short keys, so "1234" and "1234\0" would
    # otherwise hash alike.
    return hashlib.scrypt(bytes([len(value)]) + value, salt=salt, n=_SCRYPT_N, r=8, p=1, dklen=32)


def check_new_pin(value: bytes, what: str = "PIN") -> None:
    """A PIN or PUK must be 6-8 printable ASCII bytes (edge reference §3.4).

    :raises ValueError: the card answers 6A80.
    """
    if not 6 <= len(value) <= 8 or any(not 0x20 <= b <= 0x7E for b in value):
        raise ValueError(f"a {what} must be 6 to 8 printable ASCII characters")


def _key_type_of(key: PrivateKey) -> KeyType:
    if isinstance(key, rsa.RSAPrivateKey):
        return {2048: KeyType.RSA2048, 3072: KeyType.RSA3072, 4096: KeyType.RSA4096}[key.key_size]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": KeyType.ECCP256, "secp384r1": KeyType.ECCP384}[key.curve.name]
    return KeyType.ED25519


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """A new software key of ``key_type``."""
    if key_type.is_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=key_type.bit_len)
    if key_type.is_ec:
        return ec.generate_private_key(_CURVES[key_type])
    return ed25519.Ed25519PrivateKey.generate()


class _RsaKey:
    """An RSA private key with its CRT numbers cached for raw exponentiation."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        numbers = key.private_numbers()
        self.n, self.e = numbers.public_numbers.n, numbers.public_numbers.e
        self.p, self.q = numbers.p, numbers.q
        self.dp, self.dq, self.qinv = numbers.dmp1, numbers.dmq1, numbers.iqmp
        self.size = (key.key_size + 7) // 8

    def raw(self, block: bytes) -> bytes:
        if len(block) != self.size:
            raise ValueError(f"RSA input must be {self.size} bytes, got {len(block)}")
        x = int.from_bytes(block, "big")
        if x >= self.n:
            raise ValueError("RSA input is not below the modulus")
        signature = self._pkcs1v15_sign(block)
        if signature is not None:
            return signature
        # Blinding (RFC 8017 §5.1.2 note) hides x from the timing of Python's pow; the
        # final check catches a faulty CRT result before it leaves the card.
        r = secrets.randbelow(self.n - 2) + 2
        blinded = x * pow(r, self.e, self.n) % self.n
        m1 = pow(blinded, self.dp, self.p)
        m2 = pow(blinded, self.dq, self.q)
        m = (m2 + ((self.qinv * (m1 - m2)) % self.p) * self.q) * pow(r, -1, self.n) % self.n
        if pow(m, self.e, self.n) != x:
            raise RuntimeError("RSA CRT self-check failed")
        return m.to_bytes(self.size, "big")

    def _pkcs1v15_sign(self, block: bytes) -> bytes | None:
        """EMSA-PKCS1-v1_5 blocks go through OpenSSL (same result, ~5x faster)."""
        if block[:2] != b"\x00\x01":
            return None
        end = block.find(b"\x00", 2)
        if end < 10 or block[2:end] != b"\xff" * (end - 2):
            return None
        digest_info = block[end + 1 :]
        for prefix, algorithm in _DIGEST_INFOS.items():
            if digest_info[: len(prefix)] == prefix and len(digest_info) == len(prefix) + (
                algorithm.digest_size
            ):
                return self.key.sign(
                    digest_info[len(prefix) :], padding.PKCS1v15(), utils.Prehashed(algorithm)
                )
        return None


class SoftKeyBackend:
    """A ``KeyBackend`` whose keys and state are files in ``path``; see the module doc."""

    def __init__(self, path: Path, card: dict[str, Any], secret: dict[str, Any]) -> None:
        """Use ``create`` or ``open``."""
        self.path = path
        self._card = card
        self._secrets = secret
        self._keys: dict[Slot, PrivateKey] = {}
        self._rsa: dict[Slot, _RsaKey] = {}
        self._objects: dict[int, bytes] = {}
        for name in card["slots"]:
            slot = Slot(int(name, 16))
            pem = (path / "keys" / f"{name}.pem").read_bytes()
            # Our own 0600 key files: skipping OpenSSL's RSA consistency check (about a
            # second for RSA-4096) keeps card start-up fast.
            key = serialization.load_pem_private_key(
                pem, password=None, unsafe_skip_rsa_key_validation=True
            )
            if not isinstance(
                key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
            ):
                raise NotACard(f"{path}: unsupported key in slot {name}")
            self._set_key(slot, key)
        for file in (path / "objects").iterdir():
            if not file.name.startswith("."):
                self._objects[int(file.name, 16)] = file.read_bytes()

    # Lifecycle --------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        pin: bytes = DEFAULT_PIN,
        puk: bytes = DEFAULT_PUK,
        management_key: bytes = DEFAULT_MANAGEMENT_KEY,
        management_alg: MgmtAlg = MgmtAlg.TDES,
    ) -> SoftKeyBackend:
        """Make an empty card (no keys, no objects) in ``path``.

        :raises NotACard: ``path`` already holds a card or is not a directory.
        :raises ValueError: a PIN, PUK or management key of the wrong form.
        """
        root = Path(path)
        if (root / _CARD_FILE).exists():
            raise NotACard(f"{root} already holds a card")
        if root.exists() and not root.is_dir():
            raise NotACard(f"{root} is not a directory")
        check_new_pin(pin)
        check_new_pin(puk, "PUK")
        if len(management_key) != management_alg.key_len:
            raise ValueError(f"a {management_alg.name} key is {management_alg.key_len} bytes")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "keys").mkdir(mode=0o700, exist_ok=True)
        (root / "objects").mkdir(mode=0o700, exist_ok=True)
        guid = secrets.token_bytes(16)
        while not any(guid):
            guid = secrets.token_bytes(16)
        card = {"format": FORMAT, "version": FORMAT_VERSION, "guid": guid.hex(), "slots": {}}
        backend = cls(root, card, {})
        backend._set_secret("pin", pin, default=pin == DEFAULT_PIN)
        backend._set_secret("puk", puk, default=puk == DEFAULT_PUK)
        backend._secrets["mgmt"] = {"alg": int(management_alg), "key": management_key.hex()}
        backend._save_secrets()
        # card.json last: it is what makes the directory a card.
        backend._save_card()
        return backend

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SoftKeyBackend:
        """Load the card in ``path``.

        :raises NotACard: ``path`` is not a card directory (or a damaged one).
        """
        root = Path(path)
        try:
            card = json.loads((root / _CARD_FILE).read_text())
            if not isinstance(card, dict) or card.get("format") != FORMAT:
                raise NotACard(f"{root} is not a cardbridge soft card")
            if card.get("version") != FORMAT_VERSION:
                raise NotACard(f"{root}: unsupported soft card version {card.get('version')}")
            secret = json.loads((root / _SECRETS_FILE).read_text())
            return cls(root, card, secret)
        except NotACard:
            raise
        except FileNotFoundError as e:
            missing = Path(e.filename).name
            raise NotACard(f"{root} is not a cardbridge soft card (no {missing})") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NotACard(f"{root} is not a usable soft card: {e}") from e

    # Keys -------------------------------------------------------------------------------

    def key_type(self, slot: Slot) -> KeyType | None:
        key = self._keys.get(slot)
        return None if key is None else _key_type_of(key)

    def public_key(self, slot: Slot) -> PublicKey:
        return self._keys[slot].public_key()

    def pin_policy(self, slot: Slot) -> PinPolicy:
        entry = self._card["slots"].get(f"{slot.value:02x}")
        policy = PinPolicy(entry["pin_policy"]) if entry else PinPolicy.DEFAULT
        return slot.default_pin_policy if policy is PinPolicy.DEFAULT else policy

    def rsa_raw(self, slot: Slot, block: bytes) -> bytes:
        return self._rsa_key(slot).raw(block)

    def ecdsa_sign(self, slot: Slot, digest: bytes) -> bytes:
        key, key_type = self._ec_key(slot)
        if not 1 <= len(digest) <= key_type.size:
            raise ValueError(f"an ECDSA digest for {key_type.name} is 1..{key_type.size} bytes")
        # Left-padding keeps the integer value of a short digest (SEC 1 §4.1.3 step 5).
        padded = digest.rjust(key_type.size, b"\x00")
        return key.sign(padded, ec.ECDSA(utils.Prehashed(_PREHASH[key_type])))

    def ecdh(self, slot: Slot, peer_point: bytes) -> bytes:
        key, key_type = self._ec_key(slot)
        if len(peer_point) != 2 * key_type.size + 1 or peer_point[0] != 0x04:
            raise ValueError("the peer point must be uncompressed 04||X||Y")
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, peer_point)
        return key.exchange(ec.ECDH(), peer)

    def eddsa_sign(self, slot: Slot, message: bytes) -> bytes:
        key = self._keys.get(slot)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"slot {slot} holds no Ed25519 key")
        return key.sign(message)

    def generate_key(
        self, slot: Slot, key_type: KeyType, pin_policy: PinPolicy = PinPolicy.DEFAULT
    ) -> PublicKey:
        key = generate_private_key(key_type)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        name = f"{slot.value:02x}"
        _atomic_write(self.path / "keys" / f"{name}.pem", pem)
        self._card["slots"][name] = {"type": int(key_type), "pin_policy": int(pin_policy)}
        self._save_card()
        self._set_key(slot, key)
        logger.info("generated a %s key in slot %s", key_type.name, slot)
        return key.public_key()

    # Data objects -----------------------------------------------------------------------

    def read_object(self, tag: int) -> bytes | None:
        return self._objects.get(tag)

    def write_object(self, tag: int, value: bytes | None) -> None:
        file = self.path / "objects" / f"{tag:06x}"
        if value is None:
            file.unlink(missing_ok=True)
            self._objects.pop(tag, None)
        else:
            _atomic_write(file, value, 0o644)
            self._objects[tag] = value

    def power_cycle(self) -> None:
        """Nothing outside the card holds session state for a local card."""

    def card_guid(self) -> bytes:
        return bytes.fromhex(self._card["guid"])

    # PIN, PUK, management key -------------------------------------------------------------

    def verify_pin(self, pin: bytes) -> None:
        self._check("pin", pin)

    def pin_status(self) -> PinStatus:
        return self._status("pin")

    def puk_status(self) -> PinStatus:
        return self._status("puk")

    def change_pin(self, old: bytes, new: bytes) -> None:
        check_new_pin(new)
        self._check("pin", old)
        self._set_secret("pin", new, default=False)
        self._save_secrets()

    def change_puk(self, old: bytes, new: bytes) -> None:
        check_new_pin(new, "PUK")
        self._check("puk", old)
        self._set_secret("puk", new, default=False)
        self._save_secrets()

    def unblock_pin(self, puk: bytes, new_pin: bytes) -> None:
        check_new_pin(new_pin)
        self._check("puk", puk)
        self._set_secret("pin", new_pin, default=False)
        self._save_secrets()

    def management_key(self) -> tuple[MgmtAlg, bytes]:
        mgmt = self._secrets["mgmt"]
        return MgmtAlg(mgmt["alg"]), bytes.fromhex(mgmt["key"])

    def set_management_key(self, alg: MgmtAlg, key: bytes) -> None:
        if len(key) != alg.key_len:
            raise ValueError(f"a {alg.name} key is {alg.key_len} bytes")
        self._secrets["mgmt"] = {"alg": int(alg), "key": key.hex()}
        self._save_secrets()

    # Internals --------------------------------------------------------------------------

    def _set_key(self, slot: Slot, key: PrivateKey) -> None:
        self._keys[slot] = key
        if isinstance(key, rsa.RSAPrivateKey):
            self._rsa[slot] = _RsaKey(key)
        else:
            self._rsa.pop(slot, None)

    def _rsa_key(self, slot: Slot) -> _RsaKey:
        if slot not in self._rsa:
            raise ValueError(f"slot {slot} holds no RSA key")
        return self._rsa[slot]

    def _ec_key(self, slot: Slot) -> tuple[ec.EllipticCurvePrivateKey, KeyType]:
        key = self._keys.get(slot)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"slot {slot} holds no EC key")
        return key, _key_type_of(key)

    def _set_secret(self, name: str, value: bytes, *, default: bool) -> None:
        salt = secrets.token_bytes(16)
        self._secrets[name] = {
            "salt": salt.hex(),
            "hash": _hash_secret(value, salt).hex(),
            "remaining": _TRIES[name],
            "default": default,
        }

    def _status(self, name: str) -> PinStatus:
        entry = self._secrets[name]
        return PinStatus(_TRIES[name], entry["remaining"], entry["default"])

    def _check(self, name: str, value: bytes) -> None:
        """Compare ``value`` with the stored PIN/PUK, counting the try (persisted first)."""
        entry = self._secrets[name]
        if entry["remaining"] <= 0:
            raise PinBlocked(f"the {name.upper()} is blocked")
        digest = _hash_secret(value, bytes.fromhex(entry["salt"]))
        if hmac.compare_digest(digest, bytes.fromhex(entry["hash"])):
            if entry["remaining"] != _TRIES[name]:
                entry["remaining"] = _TRIES[name]
                self._save_secrets()
            return
        entry["remaining"] -= 1
        self._save_secrets()
        raise PinIncorrect(entry["remaining"])

    def _save_card(self) -> None:
        _atomic_write(self.path / _CARD_FILE, json.dumps(self._card, indent=1).encode(), 0o644)

    def _save_secrets(self) -> None:
        _atomic_write(self.path / _SECRETS_FILE, json.dumps(self._secrets, indent=1).encode())
