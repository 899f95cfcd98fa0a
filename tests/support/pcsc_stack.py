"""Helpers for tests on the real PC/SC stack: card processes, client tools, constants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcard.constants import DEFAULT_PIN, DEFAULT_PUK, KeyType, Slot
from vcard.doctor import card_answers
from vcard.doctor import card_ready as reader_ready
from vcard.provision import init_soft

READER = "cardbridge vpcd 00 00"
VPCD = "127.0.0.1:35963"
PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
CARDBRIDGE = str(Path(sys.executable).with_name("cardbridge"))
PIN = DEFAULT_PIN.decode()
PUK = DEFAULT_PUK.decode()

#: OpenSC's PKCS#11 object ids of the four standard slots (pkcs15-piv.c).
PKCS11_ID = {
    Slot.AUTHENTICATION: "01",
    Slot.SIGNATURE: "02",
    Slot.KEY_MANAGEMENT: "03",
    Slot.CARD_AUTH: "04",
}

ALGS = ["rsa2048", "rsa3072", "p256", "p384"]


@dataclass
class SoftCard:
    """A provisioned card directory and the certificates it was given."""

    path: Path
    key_type: KeyType
    certs: dict[Slot, x509.Certificate] = field(default_factory=dict)

    def cert_pem(self, slot: Slot, into: Path) -> Path:
        """Write ``slot``'s certificate to a PEM file (for openssl)."""
        out = into / f"cert-{slot.value:02x}.pem"
        out.write_bytes(self.certs[slot].public_bytes(serialization.Encoding.PEM))
        return out

    def run_args(self) -> list[str]:
        return ["card", "run", "--soft", str(self.path), "--vpcd", VPCD]

    def run_env(self) -> dict[str, str]:
        return dict(os.environ)

    def pubkey_pem(self, slot: Slot, into: Path) -> Path:
        """Write ``slot``'s public key to a PEM file (for openssl -verify / pkeyutl)."""
        out = into / f"pub-{slot.value:02x}.pem"
        out.write_bytes(
            self.certs[slot]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return out


def make_card(path: Path, alg: str) -> SoftCard:
    made = init_soft(path, KeyType.from_name(alg), DEFAULT_PIN, DEFAULT_PUK)
    return SoftCard(path, made.key_type, {s.slot: s.certificate for s in made.slots})


def card_present() -> bool:
    """Whether a card is in the reader and answers SELECT PIV."""
    return card_answers(READER)


def card_ready() -> bool:
    """A card in the reader that has settled (see ``vcard.doctor.card_ready``)."""
    return reader_ready(READER)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Presentable(Protocol):
    """A card `cardbridge card run` can present: where it lives and how to start it."""

    path: Path

    def run_args(self) -> list[str]: ...

    def run_env(self) -> dict[str, str]: ...


C = TypeVar("C", bound=Presentable)


class CardSlot:
    """The reader's one card position: at most one `cardbridge card run` at a time."""

    def __init__(self) -> None:
        self.current: Presentable | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    def present(self, card: C, command: Sequence[str | Path] = ()) -> C:
        """Run ``card`` (with its ``cardbridge card run``, or ``command``) in the reader."""
        if self.current is card and self._proc is not None and self._proc.poll() is None:
            return card
        self.remove()
        self._log = card.path.with_suffix(".log")
        argv = command or [CARDBRIDGE, *card.run_args()]
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=card.run_env()
            )
        self.current = card

        def up() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                pytest.fail(f"cardbridge card run exited: {self._log_text()}")
            return card_ready()

        wait_for(up, f"pcscd to see the card {card.path.name}")
        return card

    def remove(self) -> None:
        """Stop the running card and wait until pcscd reports the reader empty."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            rc = self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            pytest.fail(f"cardbridge card run ignored SIGTERM: {self._log_text()}")
        self._proc = None
        self.current = None
        assert rc == 0, f"cardbridge card run exited {rc}: {self._log_text()}"
        wait_for(lambda: not card_present(), "pcscd to see the card removed")

    @property
    def running(self) -> bool:
        """Whether the presented card's process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """What the running (or last) card process wrote."""
        return self._log.read_text(errors="replace") if self._log else ""

    def _log_text(self) -> str:
        return self.log()[-2000:]


def run(
    *args: str | Path, ok: bool = True, input: bytes | None = None,
    env: dict[str, str] | None = None, cwd: Path | None = None,
) -> str:
    """Run a client tool (in ``cwd``); returns stdout+stderr, failing the test on an unexpected
    exit code."""
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        input=input,
        timeout=120,
        env={**os.environ, **(env or {}), "LC_ALL": "C"},
        cwd=cwd,
    )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{out}")
    if not ok and proc.returncode == 0:
        pytest.fail(f"{' '.join(map(str, args))} unexpectedly succeeded:\n{out}")
    return out


def pkcs11(*args: str | Path, ok: bool = True) -> str:
    """pkcs11-tool on OpenSC's module."""
    return run("pkcs11-tool", "--module", PKCS11, *args, ok=ok)


def pkcs11_sign(key_id: str, mechanism: str, data: Path, sig: Path) -> str:
    """Log in with the default PIN and sign ``data`` with OpenSC's key ``key_id`` into ``sig``;
    ECDSA signatures come out DER-encoded, as openssl verifies them."""
    extra = ["--signature-format", "openssl"] if mechanism.startswith("ECDSA") else []
    return pkcs11(
        "--login", "--pin", PIN, "--sign", "--id", key_id, "-m", mechanism,
        "-i", data, "-o", sig, *extra,
    )  # fmt: skip
