"""SoftKeyBackend: directory layout, file modes, clear errors, persistence."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from vcard.constants import DEFAULT_MANAGEMENT_KEY, KeyType, MgmtAlg, PinPolicy, Slot
from vcard.errors import NotACard, PinBlocked, PinIncorrect
from vcard.softkeys import SoftKeyBackend


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_layout_and_modes(tmp_path: Path) -> None:
    backend = SoftKeyBackend.create(tmp_path / "card")
    backend.generate_key(Slot.AUTHENTICATION, KeyType.ECCP256)
    backend.write_object(0x5FC105, b"\x70\x00")
    root = tmp_path / "card"
    assert mode(root) == 0o700
    assert mode(root / "secrets.json") == 0o600
    assert mode(root / "keys" / "9a.pem") == 0o600
    assert sorted(p.name for p in root.rglob("*")) == sorted(
        ["card.json", "secrets.json", "keys", "9a.pem", "objects", "5fc105"]
    ), "no temporary files are left behind"
    secrets_text = (root / "secrets.json").read_text()
    assert "123456" not in secrets_text, "PINs are stored hashed"
    assert json.loads((root / "card.json").read_text())["format"] == "cardbridge-soft-card"


def test_create_refuses_an_existing_card(tmp_path: Path) -> None:
    SoftKeyBackend.create(tmp_path / "card")
    with pytest.raises(NotACard, match="already holds a card"):
        SoftKeyBackend.create(tmp_path / "card")


def test_create_in_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    backend = SoftKeyBackend.create(tmp_path)
    assert SoftKeyBackend.open(tmp_path).card_guid() == backend.card_guid()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pin": b"12345"}, "PIN must be 6 to 8"),
        ({"pin": b"123456789"}, "PIN must be 6 to 8"),
        ({"puk": b"1234\x005678"}, "PUK must be"),
        ({"management_key": bytes(16)}, "TDES key is 24 bytes"),
        ({"management_key": bytes(24), "management_alg": MgmtAlg.AES256}, "AES256 key is 32"),
    ],
)
def test_create_validates(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SoftKeyBackend.create(tmp_path / "card", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "card" / "card.json").exists()


def test_open_refuses_what_is_not_a_card(tmp_path: Path) -> None:
    with pytest.raises(NotACard, match="not a cardbridge soft card"):
        SoftKeyBackend.open(tmp_path)
    with pytest.raises(NotACard):
        SoftKeyBackend.open(tmp_path / "missing")
    (tmp_path / "card.json").write_text('{"format": "something else"}')
    with pytest.raises(NotACard, match="not a cardbridge soft card"):
        SoftKeyBackend.open(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(NotACard, match="not a usable soft card"):
        SoftKeyBackend.open(tmp_path)
    assert issubclass(NotACard, ValueError)


def test_keys_objects_and_policies_persist(tmp_path: Path) -> None:
    backend = SoftKeyBackend.create(tmp_path / "card", pin=b"24681357")
    public = backend.generate_key(Slot.RETIRED1, KeyType.ED25519, PinPolicy.NEVER)
    backend.write_object(0x5FC10D, b"\x70\x01\x00")
    backend.set_management_key(MgmtAlg.AES128, bytes(range(16)))
    reopened = SoftKeyBackend.open(tmp_path / "card")
    assert reopened.key_type(Slot.RETIRED1) is KeyType.ED25519
    assert reopened.public_key(Slot.RETIRED1) == public
    assert reopened.pin_policy(Slot.RETIRED1) is PinPolicy.NEVER
    assert reopened.pin_policy(Slot.SIGNATURE) is PinPolicy.ALWAYS
    assert reopened.pin_policy(Slot.CARD_AUTH) is PinPolicy.NEVER
    assert reopened.pin_policy(Slot.AUTHENTICATION) is PinPolicy.ONCE
    assert reopened.read_object(0x5FC10D) == b"\x70\x01\x00"
    assert reopened.management_key() == (MgmtAlg.AES128, bytes(range(16)))
    assert reopened.pin_status().is_default is False
    reopened.verify_pin(b"24681357")
    backend.write_object(0x5FC10D, None)
    assert SoftKeyBackend.open(tmp_path / "card").read_object(0x5FC10D) is None


def test_pin_counter_semantics(tmp_path: Path) -> None:
    backend = SoftKeyBackend.create(tmp_path / "card")
    assert backend.management_key() == (MgmtAlg.TDES, DEFAULT_MANAGEMENT_KEY)
    with pytest.raises(PinIncorrect) as e:
        backend.verify_pin(b"12345")
    assert e.value.retries == 2 and e.value.sw == 0x63C2
    with pytest.raises(PinIncorrect):
        backend.verify_pin(b"1234567")
    with pytest.raises(PinIncorrect) as e:
        backend.verify_pin(b"12345\x00")
    assert e.value.retries == 0 and e.value.sw == 0x6983
    with pytest.raises(PinBlocked):
        backend.verify_pin(b"123456")
    assert SoftKeyBackend.open(tmp_path / "card").pin_status().remaining == 0
    backend.unblock_pin(b"12345678", b"654321")
    backend.verify_pin(b"654321")
    assert backend.pin_status().remaining == 3


def test_key_operations_refuse_the_wrong_key(tmp_path: Path) -> None:
    backend = SoftKeyBackend.create(tmp_path / "card")
    backend.generate_key(Slot.AUTHENTICATION, KeyType.ECCP256)
    assert backend.key_type(Slot.SIGNATURE) is None
    with pytest.raises(ValueError, match="no RSA key"):
        backend.rsa_raw(Slot.AUTHENTICATION, bytes(256))
    with pytest.raises(ValueError, match="no Ed25519 key"):
        backend.eddsa_sign(Slot.AUTHENTICATION, b"m")
    with pytest.raises(ValueError, match="no EC key"):
        backend.ecdsa_sign(Slot.SIGNATURE, bytes(32))
    with pytest.raises(ValueError, match="1..32 bytes"):
        backend.ecdsa_sign(Slot.AUTHENTICATION, b"")
    with pytest.raises(ValueError, match="uncompressed"):
        backend.ecdh(Slot.AUTHENTICATION, b"\x02" + bytes(32))
