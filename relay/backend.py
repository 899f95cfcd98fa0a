# SPDX-License-Identifier: Apache-2.0
"""``RemoteKeyBackend``: the card's keys are the enrolled user's keys in the server's HSM.

Private-key operations, PIN verification and the PIN/PUK counters go to the server's
``/api/v1`` (the server's counters and PIN marks are authoritative); certificates and data
objects come from the enrollment and are answered locally, so the card stays readable without
the server. This module is the one place where the relay's errors become status words:

=========================================  =====  ===============================================
relay outcome                              SW     meaning for the client
=========================================  =====  ===============================================
wrong PIN / PUK (``invalid_pin``)          63Cx   x tries left (the server's counter)
PIN or PUK blocked (``pin_blocked``)       6983   authentication method blocked
no session, session ended, PIN not         6982   security status not satisfied: log in, VERIFY
verified on the server, sole control not          again, or approve with a TOTP
approved in time, OTP refused
rule 3 refused the input                   6A80   incorrect data
revoked credential or device, disabled     6985   conditions of use not satisfied
user, rate limited, key use not allowed
no server reachable, server failed         6400   execution error, nothing changed; retry later
=========================================  =====  ===============================================

Each failure is logged once, with why, and never with a PIN, password, OTP or token.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from asn1crypto import algos
from cryptography import x509

from relay.client import NotLoggedIn, RelayError, ServerRefused, ServerUnavailable
from relay.config import CredentialInfo, Enrolled
from relay.session import Session
from vcard.constants import PIN_TRIES, PUK_TRIES, KeyType, MgmtAlg, PinPolicy, Slot
from vcard.errors import (
    CardError,
    ConditionsNotSatisfied,
    ExecutionError,
    IncorrectData,
    PinBlocked,
    PinIncorrect,
    SecurityStatusNotSatisfied,
)
from vcard.keys import PinStatus, PublicKey
from vcard.provision import cert_object

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SLOT_NAMES: Final = {
    Slot.AUTHENTICATION: "9a",
    Slot.SIGNATURE: "9c",
    Slot.KEY_MANAGEMENT: "9d",
    Slot.CARD_AUTH: "9e",
}
_NOT_ALLOWED: Final = frozenset({"forbidden", "not_found", "rate_limited", "decrypt_budget"})
_NEEDS_AUTH: Final = frozenset({"pin_required", "invalid_otp", "unauthorized"})


@dataclass
class Approval:
    """A signature with a sole-control key, waiting for the user's TOTP."""

    id: int
    slot: str
    what: str
    digest: str
    """Hex of the digest the server will sign (or of the whole block when no digest shows)."""
    since: float
    otp: str | None = None
    outcome: str | None = None
    approved: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "what": self.what,
            "digest": self.digest,
            "since": self.since,
            "waiting": round(time.time() - self.since, 1),
        }


class Approvals:
    """Signatures that wait for ``cardbridge card approve``.

    :param timeout: seconds a signature waits; then the card answers 6982.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._waiting: dict[int, Approval] = {}
        self._next = 1
        self._lock = threading.Lock()

    def pending(self) -> list[Approval]:
        with self._lock:
            return sorted(self._waiting.values(), key=lambda a: a.id)

    @contextmanager
    def waiting(self, slot: str, what: str, digest: str) -> Iterator[Approval]:
        """Show a signature as waiting until it is approved, times out or is done."""
        with self._lock:
            approval = Approval(self._next, slot, what, digest, time.time())
            self._next += 1
            self._waiting[approval.id] = approval
        logger.info("signature with %s (%s) waits for approval #%d", slot, what, approval.id)
        try:
            if not approval.approved.wait(self.timeout):
                approval.outcome = "timed out"
                why = f"no approval within {self.timeout:g} s: run `cardbridge card approve`"
                logger.warning("signature #%d with %s refused: %s", approval.id, slot, why)
                raise SecurityStatusNotSatisfied(why)
            yield approval
        finally:
            with self._lock:
                self._waiting.pop(approval.id, None)
            approval.done.set()

    def approve(self, otp: str, approval_id: int | None = None) -> Approval:
        """Hand ``otp`` to the oldest waiting signature (or ``approval_id``); the caller waits
        on ``done`` for its outcome.

        :raises LookupError: nothing (or not that) waits.
        """
        with self._lock:
            waiting = sorted(self._waiting.values(), key=lambda a: a.id)
            chosen = [a for a in waiting if approval_id in (None, a.id) and a.otp is None]
            if not chosen:
                raise LookupError(
                    "no signature waits for approval"
                    if approval_id is None
                    else f"no signature #{approval_id} waits for approval"
                )
            approval = chosen[0]
            approval.otp = otp
        approval.approved.set()
        return approval


def _describe_block(block: bytes) -> tuple[str, str]:
    """What a raw RSA signing block signs: the hash and digest of a PKCS#1 v1.5 DigestInfo
    (RFC 8017 §9.2), else the block's SHA-256 for a PSS encoding."""
    if block[:2] == b"\x00\x01":
        try:
            info = algos.DigestInfo.load(block[block.index(b"\x00", 2) + 1 :])
            hash_name = info["digest_algorithm"]["algorithm"].native
            return f"RSA PKCS#1 v1.5, {hash_name}", info["digest"].native.hex()
        except ValueError:
            pass
    return "RSA PSS block (its SHA-256)", hashlib.sha256(block).hexdigest()


def card_error(refusal: ServerRefused) -> CardError:
    """The status word for a server's refusal (the table in this module's docstring)."""
    if refusal.code in ("invalid_pin", "invalid_puk"):
        return PinIncorrect(refusal.retries if refusal.retries is not None else 0)
    if refusal.code == "pin_blocked":
        return PinBlocked(refusal.description)
    if refusal.code in _NEEDS_AUTH:
        return SecurityStatusNotSatisfied(refusal.description)
    if refusal.code in _NOT_ALLOWED:
        return ConditionsNotSatisfied(refusal.description)
    if refusal.code in ("invalid_padding", "invalid_request"):
        return IncorrectData(refusal.description)
    return ExecutionError(refusal.description)


@dataclass(frozen=True)
class Timing:
    """One key operation as the relay saw it (milliseconds)."""

    op: str
    relay: float
    """The whole call: proof, request, server, answer."""
    server: float | None
    """The server's own processing (Server-Timing ``app``)."""
    hsm: float | None
    """The HSM's part of it (Server-Timing ``hsm``)."""


class RemoteKeyBackend:
    """A ``vcard.keys.KeyBackend`` over the server's ``/api/v1`` PIV operations.

    :param enrolled: the card's configuration (credentials, certificates, GUID) and device key.
    :param session: the user's session (login happens through the control channel).
    :param approval_timeout: seconds a sole-control signature waits for ``card approve``.
    """

    def __init__(
        self, enrolled: Enrolled, session: Session, *, approval_timeout: float = 60.0
    ) -> None:
        self.enrolled = enrolled
        self.session = session
        self.approvals = Approvals(approval_timeout)
        self.timings: deque[Timing] = deque(maxlen=100_000)
        self._creds: dict[Slot, CredentialInfo] = {}
        self._public: dict[Slot, PublicKey] = {}
        self._objects: dict[int, bytes] = {}
        for slot, name in _SLOT_NAMES.items():
            cred = enrolled.config.credential(name)
            if cred is None:
                continue
            cert = x509.load_pem_x509_certificate(cred.certificate.encode())
            public = cert.public_key()
            self._creds[slot] = cred
            self._public[slot] = public  # type: ignore[assignment]
            self._objects[slot.object_id] = cert_object(cert)
        self._pin = PinStatus(PIN_TRIES, PIN_TRIES, False)
        self._puk = PinStatus(PUK_TRIES, PUK_TRIES, False)
        self.server_verified: bool | None = None
        """The server's PIN mark of this session, when last heard (None: never)."""
        self._marked = False
        """Whether the server may hold a PIN mark of this card session."""
        self._reset_pending = False
        """The card was reset while the server held a mark that is not cleared yet."""
        self._lock = threading.Lock()

    # Errors: the one translation of relay outcomes into status words -------------------------

    def _call(self, what: str, send: Callable[[], T]) -> T:
        try:
            return send()
        except NotLoggedIn as e:
            logger.warning("%s refused: %s", what, e)
            raise SecurityStatusNotSatisfied(str(e)) from e
        except ServerUnavailable as e:
            self.session.last_error = str(e)
            logger.warning("%s failed: %s", what, e)
            raise ExecutionError(str(e)) from e
        except ServerRefused as e:
            self.session.last_error = f"{what}: {e}"
            logger.warning("%s refused by the server: %s", what, e)
            raise card_error(e) from e
        except RelayError as e:
            logger.warning("%s failed: %s", what, e)
            raise ExecutionError(str(e)) from e

    # Keys ---------------------------------------------------------------------------------

    def _cred(self, slot: Slot) -> CredentialInfo:
        cred = self._creds.get(slot)
        if cred is None:
            raise KeyError(f"no key in slot {slot}")
        return cred

    def key_type(self, slot: Slot) -> KeyType | None:
        cred = self._creds.get(slot)
        return KeyType.from_name(cred.alg) if cred else None

    def public_key(self, slot: Slot) -> PublicKey:
        return self._public[slot]

    def pin_policy(self, slot: Slot) -> PinPolicy:
        if slot is Slot.CARD_AUTH:
            return PinPolicy.NEVER
        return PinPolicy.ALWAYS if self._cred(slot).pin_always else PinPolicy.ONCE

    def _operate(self, slot: Slot, op: str, field: str, data: bytes) -> bytes:
        cred = self._cred(slot)
        body: dict[str, str] = {field: base64.b64encode(data).decode()}
        self._reset_if_pending()
        if cred.otp_per_signature and op in ("rsa-raw", "ecdsa", "eddsa"):
            what, digest = _describe_block(data) if op == "rsa-raw" else (op, data.hex())
            with self.approvals.waiting(cred.slot, what, digest) as approval:
                assert approval.otp is not None  # noqa: S101 -- set by approve()
                body["otp"] = approval.otp
                try:
                    result = self._send(cred, op, body)
                except CardError as e:
                    approval.outcome = f"the server refused it: {e}"
                    raise
                approval.outcome = "signed"
                return result
        return self._send(cred, op, body)

    def _send(self, cred: CredentialInfo, op: str, body: dict[str, str]) -> bytes:
        started = time.perf_counter()
        answer = self._call(
            f"{op} with {cred.slot}",
            lambda: self.session.call(
                "POST", f"/api/v1/credentials/{cred.credential_id}/{op}", json=body
            ),
        )
        self.timings.append(
            Timing(
                op,
                (time.perf_counter() - started) * 1000,
                answer.timing.get("app"),
                answer.timing.get("hsm"),
            )
        )
        return base64.b64decode(answer.body["result"], validate=True)

    def rsa_raw(self, slot: Slot, block: bytes) -> bytes:
        # The key-management key decrypts; the others sign (rule 3 on the server).
        op = "decrypt" if slot is Slot.KEY_MANAGEMENT else "rsa-raw"
        return self._operate(slot, op, "block", block)

    def ecdsa_sign(self, slot: Slot, digest: bytes) -> bytes:
        return self._operate(slot, "ecdsa", "digest", digest)

    def ecdh(self, slot: Slot, peer_point: bytes) -> bytes:
        return self._operate(slot, "ecdh", "peer_point", peer_point)

    def eddsa_sign(self, slot: Slot, message: bytes) -> bytes:
        return self._operate(slot, "eddsa", "message", message)

    def generate_key(
        self, slot: Slot, key_type: KeyType, pin_policy: PinPolicy = PinPolicy.DEFAULT
    ) -> PublicKey:
        raise ConditionsNotSatisfied(
            "the keys are generated in the server's HSM: ask the administrator "
            "(cardbridge admin enroll)"
        )

    # Data objects -------------------------------------------------------------------------

    def read_object(self, tag: int) -> bytes | None:
        return self._objects.get(tag)

    def write_object(self, tag: int, value: bytes | None) -> None:
        raise ConditionsNotSatisfied("the card's data objects come from the server")

    def card_guid(self) -> bytes:
        return bytes.fromhex(self.enrolled.config.card_guid)

    # PIN, PUK, management key -------------------------------------------------------------

    def _pin_call(self, what: str, path: str, body: dict[str, str] | None) -> Any:
        def send() -> Any:
            if body is None:
                return self.session.call("GET", path).body
            return self.session.call("POST", path, json=body).body

        self._reset_if_pending()
        return self._call(what, send)

    def _learn(self, status: Any) -> None:
        if isinstance(status, dict):
            self._pin = PinStatus(self._pin.total, int(status["pin_retries"]), False)
            self._puk = PinStatus(self._puk.total, int(status["puk_retries"]), False)
            self.server_verified = bool(status["verified"])

    def _learn_failure(self, e: CardError, *, puk: bool) -> None:
        remaining = e.retries if isinstance(e, PinIncorrect) else 0
        if puk:
            self._puk = PinStatus(self._puk.total, remaining, False)
        else:
            self._pin = PinStatus(self._pin.total, remaining, False)

    def verify_pin(self, pin: bytes) -> None:
        try:
            status = self._pin_call("VERIFY", "/api/v1/pin/verify", {"pin": pin.decode("ascii")})
        except (PinIncorrect, PinBlocked) as e:
            self._learn_failure(e, puk=False)
            raise
        self._learn(status)
        self._marked = True

    def pin_status(self) -> PinStatus:
        if self.session.active:
            try:
                self._learn(self._pin_call("PIN status", "/api/v1/pin/status", None))
            except CardError:
                pass  # the last known counters still describe the card
        return self._pin

    def puk_status(self) -> PinStatus:
        self.pin_status()
        return self._puk

    def change_pin(self, old: bytes, new: bytes) -> None:
        body = {"pin": old.decode("ascii"), "new_pin": new.decode("ascii")}
        try:
            self._pin_call("CHANGE REFERENCE DATA (PIN)", "/api/v1/pin/change", body)
        except (PinIncorrect, PinBlocked) as e:
            self._learn_failure(e, puk=False)
            raise

    def change_puk(self, old: bytes, new: bytes) -> None:
        body = {"puk": old.decode("ascii"), "new_puk": new.decode("ascii")}
        try:
            self._pin_call("CHANGE REFERENCE DATA (PUK)", "/api/v1/pin/change-puk", body)
        except (PinIncorrect, PinBlocked) as e:
            self._learn_failure(e, puk=True)
            raise

    def unblock_pin(self, puk: bytes, new_pin: bytes) -> None:
        body = {"puk": puk.decode("ascii"), "new_pin": new_pin.decode("ascii")}
        try:
            self._pin_call("RESET RETRY COUNTER", "/api/v1/pin/unblock", body)
        except (PinIncorrect, PinBlocked) as e:
            self._learn_failure(e, puk=True)
            raise
        self._pin = PinStatus(self._pin.total, self._pin.total, False)

    def management_key(self) -> tuple[MgmtAlg, bytes]:
        return MgmtAlg.AES256, bytes.fromhex(self.enrolled.config.management_key)

    def set_management_key(self, alg: MgmtAlg, key: bytes) -> None:
        if alg is not MgmtAlg.AES256:
            raise IncorrectData("this card's management key is AES-256")
        self.enrolled.config.management_key = key.hex()
        self.enrolled.save_config()

    def power_cycle(self) -> None:
        """Clear the server's PIN mark of this session, now or before the next call."""
        with self._lock:
            self._reset_pending = self._reset_pending or self._marked
        self._reset_if_pending()

    def _reset_if_pending(self) -> None:
        with self._lock:
            if not self._reset_pending:
                return
            try:
                self.session.call("POST", "/api/v1/pin/reset")
            except NotLoggedIn:
                pass  # no session, no mark
            except RelayError as e:
                logger.warning("card reset: the server's PIN mark stays until it answers (%s)", e)
                return
            self._reset_pending = self._marked = False
