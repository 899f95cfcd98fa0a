# SPDX-License-Identifier: Apache-2.0
"""The HSM over PKCS#11 (python-pkcs11): key generation and every private-key operation.

python-pkcs11 calls ``C_Initialize(NULL)``, so the module may do no locking of its own
(SoftHSM2 then disables its mutexes) and the GIL is released during each call. Every call
into a module therefore goes through one process-wide lock per module, on one logged-in
session per (module, token) that all :class:`Hsm` handles of the process share. A session
pool cannot help: measured here, two threads signing on two sessions of SoftHSM2 without the
lock fail with CKR_GENERAL_ERROR.

SoftHSM2 keeps a token in files that a login rewrites, and another process reading them at that
moment gets CKR_GENERAL_ERROR. :meth:`Hsm.open` therefore logs in under an exclusive lock file
next to ``SOFTHSM2_CONF`` (several ``server run`` workers start together) and retries an open
that still fails with CKR_GENERAL_ERROR a few times (a writer that takes no lock).

A network HSM (``p11-kit server`` in front of a token, or a vendor's appliance) can restart
under a running server: every session then fails, and a restarted p11-kit server also refuses
new ones until the module is finalised and initialised again (field-notes.md). Such errors
become :class:`~server.errors.HsmUnavailable` (503), and the next operation logs in again,
reinitialising the module when a plain login fails; no server restart is needed.

This module is the one place where ``PKCS11Error`` becomes a :mod:`server.errors` error.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from server.algorithms import OID_ED25519, KeyAlg, hash_by_name
from server.errors import (
    Conflict,
    Forbidden,
    HsmError,
    HsmUnavailable,
    InvalidRequest,
    NotFound,
    ServerError,
)

log = logging.getLogger(__name__)

_SIGN: Final = MechanismFlag.SIGN | MechanismFlag.VERIFY

_HASH_MECHS: Final[dict[str, tuple[Mechanism, MGF]]] = {
    "sha224": (Mechanism.SHA224, MGF.SHA224),
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}
_CURVES: Final[dict[KeyAlg, ec.EllipticCurve]] = {
    KeyAlg.P256: ec.SECP256R1(),
    KeyAlg.P384: ec.SECP384R1(),
}
# PKCS#11 errors that mean "the caller's input is wrong", not "the HSM failed".
_CLIENT_ERRORS: Final[tuple[type[p11e.PKCS11Error], ...]] = (
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.MechanismParamInvalid,
)


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SecretKind(Enum):
    """The server's own symmetric keys (field-notes.md: an HMAC key works in SoftHSM2 and
    through p11-kit with ``SENSITIVE`` true and ``EXTRACTABLE`` false)."""

    HMAC = (KeyType.GENERIC_SECRET, MechanismFlag.SIGN | MechanismFlag.VERIFY)
    """HMAC-SHA256 (CKM_SHA256_HMAC) with a 256-bit generic secret."""


@dataclass(frozen=True)
class KeyRef:
    """A key pair in the HSM: ``key_id`` is the hex CKA_ID shared by both halves."""

    key_id: str
    alg: KeyAlg


# Errors after which the session is gone or the device unreachable (a network HSM restarted, a
# session closed or logged out, a device removed): the operation fails as unavailable and the
# next one logs in again (:meth:`_SharedSession.reopen`).
_SESSION_LOST: Final[tuple[type[p11e.PKCS11Error], ...]] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SlotIDInvalid,
)


def _translate(e: p11e.PKCS11Error) -> ServerError:
    """The server error for a PKCS#11 error (the only place this mapping happens)."""
    name = type(e).__name__
    if isinstance(e, _SESSION_LOST) or isinstance(e, p11e.NoSuchToken):
        return HsmUnavailable(f"The HSM is unavailable [{name}]")
    if isinstance(e, _CLIENT_ERRORS):
        return InvalidRequest(f"The HSM refused the input [{name}]")
    if isinstance(e, p11e.NoSuchKey):
        return NotFound("No such key in the HSM")
    return HsmError(f"HSM operation failed [{name}]")


@contextmanager
def _translated() -> Iterator[None]:
    """Raise PKCS#11 errors as server errors, chained (``from e``)."""
    try:
        yield
    except p11e.PKCS11Error as e:
        raise _translate(e) from e


def quiet_search_finalizers() -> None:
    """Log at debug level, instead of printing a traceback, the PKCS#11 errors that
    python-pkcs11's finalizers raise. Idempotent; process-wide hooks, for server processes.

    When C_FindObjectsInit fails (the device is gone), python-pkcs11 leaves its search marked
    active, and the search's finalizer calls C_FindObjectsFinal, which fails again: Cython
    prints that error through ``sys.excepthook`` and reports it to ``sys.unraisablehook``. The
    operation that failed has already been answered (503); the second error says nothing new.
    PKCS#11 errors never reach the top level otherwise (this module translates them all).
    """
    if getattr(sys.unraisablehook, "__quiet_pkcs11__", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(report: Any) -> None:
        if not _ignored(report.exc_value):
            previous_unraisable(report)

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _ignored(value):
            previous_except(kind, value, tb)

    unraisable.__quiet_pkcs11__ = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _ignored(error: BaseException | None) -> bool:
    if isinstance(error, p11e.PKCS11Error):
        log.debug("PKCS#11 error in a finalizer ignored [%s]", type(error).__name__)
        return True
    return False


def _login(token: Any, pin: str) -> Any:
    """A new read-write session on ``token``, logged in as the user (the login state is shared
    by the sessions of a process, so a second login is not an error)."""
    try:
        return token.open(rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        return token.open(rw=True)


LOCK_TIMEOUT: Final = 30.0
"""Seconds an operation waits for the module lock before it answers unavailable: a hung
network HSM holds the lock in its call, and requests must not queue behind it forever (an
RSA-4096 key generation in SoftHSM2 holds it for seconds)."""
OPEN_ATTEMPTS: Final = 5
"""Tries of :meth:`Hsm.open` when the module answers CKR_GENERAL_ERROR (a concurrent writer)."""
_OPEN_BACKOFF: Final = 0.05
LOCK_FILE: Final = ".cardbridge-hsm.lock"
"""Created next to ``SOFTHSM2_CONF``; held while a process opens the token and logs in."""


@contextmanager
def _token_files_lock(conf: str | None) -> Iterator[None]:
    """Hold the cross-process lock of the SoftHSM2 token store named by ``conf``.

    No lock without ``SOFTHSM2_CONF`` (another vendor's module) or where the lock file cannot
    be created (a read-only system-wide configuration): :meth:`Hsm.open` still retries then.
    """
    if conf is None:
        yield
        return
    try:
        fd = os.open(Path(conf).parent / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        log.debug("no HSM lock file next to %s; opening without it", conf, exc_info=True)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _SharedSession:
    """The logged-in session of one (module, token) in this process, and its lock.

    When an operation reports that the session was lost, the session is marked stale and
    the next operation logs in again on a new one (the failed operation is not retried).
    """

    def __init__(
        self,
        lib: Any,
        module_path: str,
        label: str,
        token: Any,
        session: Any,
        pin: str,
        conf: str | None,
        lock: threading.Lock,
    ) -> None:
        self.lib = lib
        self.module_path = module_path
        self.label = label
        self.token = token
        self.pin = pin
        self.conf = conf
        self.pin_digest = _pin_digest(pin)
        self.lock = lock
        self.session = session
        self.stale = False
        self.users = 0
        self.private: dict[str, Any] = {}
        self.public: dict[str, PublicKey] = {}
        self.secret: dict[str, Any] = {}

    def reopen(self) -> None:
        """Log in on a fresh session; call with the lock held.

        When the token opens none (a restarted p11-kit server answers DeviceError or
        SlotIDInvalid until its clients reinitialise), the module is finalised and initialised
        again, which ends every session of this process on it: those are marked stale too.
        """
        try:
            self.session.close()
        except p11e.PKCS11Error:
            log.debug("closing the lost HSM session failed", exc_info=True)
        self.private.clear()
        self.secret.clear()
        try:
            self._login()
        except p11e.PKCS11Error as e:
            name = type(e).__name__
            log.warning("the HSM opened no session [%s]; reinitialising the module", name)
            self.lib.reinitialize()
            for other in list(_sessions.values()):
                if other.module_path == self.module_path:
                    other.stale = True
            self._login()
        self.stale = False
        log.warning("the HSM session was lost; logged in again")

    def _login(self) -> None:
        self.token = self.lib.get_token(token_label=self.label)
        with _token_files_lock(self.conf):
            self.session = _login(self.token, self.pin)


class HsmClock:
    """The time the HSM spent on one request's operations (its ``Server-Timing``), unless an
    operation conceals it (:func:`conceal_timing`)."""

    __slots__ = ("seconds", "shown")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.shown = True


HSM_CLOCK: ContextVar[HsmClock | None] = ContextVar("hsm_clock", default=None)
"""The current request's clock; the request pipeline sets it."""
_entered = threading.local()


def conceal_timing() -> None:
    """Keep this request's HSM and processing times out of its answer (a decryption's timing
    must tell a client nothing)."""
    clock = HSM_CLOCK.get()
    if clock is not None:
        clock.shown = False


class _Guard:
    """Holds the module lock around one use of the shared session; translates errors; adds
    the time inside the lock to the request's :class:`HsmClock`.

    A class rather than a generator context manager: it runs on every signature.
    """

    __slots__ = ("_shared", "_timeout")

    def __init__(self, shared: _SharedSession, timeout: float = LOCK_TIMEOUT) -> None:
        self._shared = shared
        self._timeout = timeout

    def __enter__(self) -> Any:
        shared = self._shared
        if not shared.lock.acquire(timeout=self._timeout):
            raise HsmUnavailable(f"The HSM is busy: no answer within {self._timeout:g} s")
        if shared.stale:
            try:
                shared.reopen()
            except p11e.PKCS11Error as e:
                shared.lock.release()
                raise _translate(e) from e
        _entered.at = time.perf_counter()
        return shared.session

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        clock = HSM_CLOCK.get()
        if clock is not None:
            clock.seconds += time.perf_counter() - _entered.at
        if isinstance(exc, _SESSION_LOST):
            self._shared.stale = True
        self._shared.lock.release()
        if isinstance(exc, p11e.PKCS11Error):
            raise _translate(exc) from exc


_registry_lock = threading.Lock()
_module_locks: dict[str, threading.Lock] = {}
# SOFTHSM2_CONF each loaded module was initialised with (SoftHSM reads it only then).
_module_confs: dict[str, str | None] = {}
_sessions: dict[tuple[str, str | None, str], _SharedSession] = {}


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


class Hsm:
    """A handle on one HSM token; thread-safe. Build it with :meth:`Hsm.open`.

    Open it after forking (e.g. in each server worker's lifespan), never before.
    """

    def __init__(self, shared: _SharedSession, key: tuple[str, str | None, str]) -> None:
        self._shared = shared
        self._guard = _Guard(shared)
        self._key = key
        self._closed = False
        self.token_label = key[2]

    @classmethod
    def open(cls, module_path: str, token_label: str, pin: str) -> Hsm:
        """Load ``module_path``, find the token labelled ``token_label`` and log in with ``pin``.

        All handles of a process on one token share one logged-in session. SoftHSM2 reads
        ``SOFTHSM2_CONF`` (and its token directory) only when the module is initialised, so
        the module is re-initialised when that variable has changed or the token appeared
        later; that is refused while another session of this process is open on the module.
        The login is serialised with other processes' and retried on CKR_GENERAL_ERROR (see
        the module's docstring).
        """
        conf = os.environ.get("SOFTHSM2_CONF")
        key = (module_path, conf, token_label)
        with _registry_lock, _translated():
            shared = _sessions.get(key)
            if shared is not None:
                if not hmac.compare_digest(shared.pin_digest, _pin_digest(pin)):
                    raise HsmError("HSM login failed [PinIncorrect]")
            else:
                lock = _module_locks.setdefault(module_path, threading.Lock())
                with lock:
                    shared = cls._open_shared(module_path, conf, token_label, pin, lock)
                _sessions[key] = shared
            shared.users += 1
        return cls(shared, key)

    @classmethod
    def _open_shared(
        cls, module_path: str, conf: str | None, token_label: str, pin: str, lock: threading.Lock
    ) -> _SharedSession:
        """Find the token and log in under the cross-process lock, retrying a general error."""
        attempt = 1
        while True:
            try:
                with _token_files_lock(conf):
                    lib = pkcs11.lib(module_path)
                    token = cls._find_token(lib, module_path, conf, token_label)
                    session = _login(token, pin)
                    return _SharedSession(
                        lib, module_path, token_label, token, session, pin, conf, lock
                    )
            except p11e.GeneralError:
                if attempt == OPEN_ATTEMPTS:
                    raise
                log.warning("opening the HSM token failed [GeneralError]; retrying")
                time.sleep(_OPEN_BACKOFF * attempt)
                attempt += 1

    @staticmethod
    def _find_token(lib: Any, module_path: str, conf: str | None, token_label: str) -> Any:
        busy = any(k[0] == module_path for k in _sessions)
        loaded_conf = _module_confs.setdefault(module_path, conf)
        if loaded_conf != conf:
            if busy:
                raise HsmError("SOFTHSM2_CONF changed while a session on the module is open")
            lib.reinitialize()
            _module_confs[module_path] = conf
        try:
            return lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            if busy:
                raise HsmError(
                    f"Token {token_label!r} not found; the module was initialised before "
                    "it existed and another session of this process is open"
                ) from None
        lib.reinitialize()
        try:
            return lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            raise NotFound(f"No HSM token labelled {token_label!r}") from None

    def close(self) -> None:
        """Release this handle; the last one of the process logs out and closes the session."""
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
            shared = self._shared
            shared.users -= 1
            if shared.users == 0:
                del _sessions[self._key]
                with shared.lock, _translated():
                    shared.session.close()

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> _Guard:
        if self._closed:
            raise HsmError("HSM handle is closed")
        return self._guard

    def check(self, ref: KeyRef, timeout: float) -> None:
        """Readiness: within ``timeout`` seconds of waiting for the lock, the token answers one
        object lookup and holds the public half of ``ref`` (a lost session is replaced first).

        :raises HsmUnavailable: busy, unreachable, or ``ref`` is not on the token.
        """
        if self._closed:
            raise HsmUnavailable("The HSM handle is closed")
        key_id = bytes.fromhex(ref.key_id)
        template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
        with _Guard(self._shared, timeout) as s:
            found = list(s.get_objects(template))
        if not found:
            raise HsmUnavailable(f"The HSM token lacks key {ref.key_id}")

    # -- keys -------------------------------------------------------------------------------

    def generate_key(self, alg: KeyAlg, label: str, *, sign_only: bool = False) -> KeyRef:
        """Generate a token key pair: private half sensitive, never extractable (rule 1).

        ``label`` must be unique on the token; the CKA_ID is 16 random bytes. With
        ``sign_only`` the private key gets neither CKA_DECRYPT nor CKA_DERIVE, so the HSM
        itself refuses decryption and ECDH with it (for the PIV 9A, 9C and 9E keys).
        """
        alg = KeyAlg(alg)
        key_id = secrets.token_bytes(16)
        private_template: dict[Attribute, Any] = {
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.PRIVATE: True,
        }
        public_template: dict[Attribute, Any] = {}
        if alg.is_rsa:
            key_type, length = KeyType.RSA, alg.bits
            caps = _SIGN if sign_only else _SIGN | MechanismFlag.DECRYPT | MechanismFlag.ENCRYPT
        elif alg.curve_oid is not None:
            caps = _SIGN if sign_only else _SIGN | MechanismFlag.DERIVE
            key_type, length = KeyType.EC, None
            public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(alg.curve_oid)
        else:
            key_type, length, caps = KeyType.EC_EDWARDS, None, _SIGN
            public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(OID_ED25519)
        with self._session() as s:
            if list(s.get_objects({Attribute.LABEL: label})):
                raise Conflict(f"An HSM key labelled {label!r} already exists")
            s.generate_keypair(
                key_type,
                length,
                id=key_id,
                label=label,
                store=True,
                capabilities=caps,
                public_template=public_template,
                private_template=private_template,
            )
        log.info("generated %s key %s", alg.value, key_id.hex())
        return KeyRef(key_id.hex(), alg)

    def destroy_key(self, ref: KeyRef) -> None:
        """Delete both halves of a key pair from the token."""
        key_id = bytes.fromhex(ref.key_id)
        with self._session() as s:
            objs = list(s.get_objects({Attribute.ID: key_id}))
            if not objs:
                raise NotFound("No such key in the HSM")
            for obj in objs:
                obj.destroy()
            self._shared.private.pop(ref.key_id, None)
            self._shared.public.pop(ref.key_id, None)

    def _private(self, s: Any, ref: KeyRef) -> Any:
        cache = self._shared.private
        obj = cache.get(ref.key_id)
        if obj is None:
            obj = s.get_key(ObjectClass.PRIVATE_KEY, id=bytes.fromhex(ref.key_id))
            cache[ref.key_id] = obj
        return obj

    def public_key(self, ref: KeyRef) -> PublicKey:
        """The public half as a cryptography key."""
        key = self._shared.public.get(ref.key_id)
        if key is None:
            with self._session() as s:
                key = _public_from_object(
                    s.get_key(ObjectClass.PUBLIC_KEY, id=bytes.fromhex(ref.key_id))
                )
            self._shared.public[ref.key_id] = key
        if _alg_of_public(key) is not ref.alg:
            raise HsmError(f"Key {ref.key_id} is not {ref.alg.value}")
        return key

    # -- the server's secret keys -------------------------------------------------------------

    def generate_secret_key(self, kind: SecretKind, label: str) -> None:
        """Generate a 256-bit token secret key labelled ``label``: sensitive, never extractable
        (rule 1), usable only for ``kind``'s operations.

        :raises Conflict: a key with that label exists.
        """
        key_type, caps = kind.value
        with self._session() as s:
            if list(s.get_objects({Attribute.LABEL: label})):
                raise Conflict(f"An HSM key labelled {label!r} already exists")
            s.generate_key(
                key_type,
                256,
                label=label,
                store=True,
                capabilities=caps,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                },
            )
        log.info("generated %s key %r", kind.name, label)

    def has_secret_key(self, label: str) -> bool:
        """Whether the token holds a secret key labelled ``label``."""
        try:
            with self._session() as s:
                self._secret(s, label)
        except NotFound:
            return False
        return True

    def _secret(self, s: Any, label: str) -> Any:
        cache = self._shared.secret
        obj = cache.get(label)
        if obj is None:
            objs = list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                       Attribute.LABEL: label}))
            if len(objs) != 1:
                raise NotFound(f"No single HSM secret key labelled {label!r}")
            obj = cache[label] = objs[0]
        return obj

    def hmac_sha256(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA256 (RFC 2104) of ``data`` with the secret key ``label``, in the HSM."""
        with self._session() as s:
            return bytes(self._secret(s, label).sign(data, mechanism=Mechanism.SHA256_HMAC))

    # -- operations -------------------------------------------------------------------------

    def rsa_raw(self, ref: KeyRef, block: bytes) -> bytes:
        """Raw RSA (CKM_RSA_X_509) on a modulus-sized block; the caller checks the padding."""
        self._check_rsa_input(ref, block)
        with self._session() as s:
            return bytes(self._private(s, ref).sign(block, mechanism=Mechanism.RSA_X_509))

    def rsa_decrypt_raw(self, ref: KeyRef, block: bytes) -> bytes:
        """Raw RSA decryption (CKM_RSA_X_509 C_Decrypt); the result is left-padded to k bytes."""
        k = self._check_rsa_input(ref, block)
        with self._session() as s:
            key = _capable(self._private(s, ref), "decrypt")
            out = bytes(key.decrypt(block, mechanism=Mechanism.RSA_X_509))
        return out.rjust(k, b"\0")

    def _check_rsa_input(self, ref: KeyRef, block: bytes) -> int:
        """Refuse a raw-RSA input that is not k bytes or not below the modulus; return k."""
        if not ref.alg.is_rsa:
            raise InvalidRequest("This operation needs an RSA key")
        pub = self.public_key(ref)
        if not isinstance(pub, rsa.RSAPublicKey):
            raise HsmError(f"Key {ref.key_id} is not an RSA key")
        k = (pub.key_size + 7) // 8
        if len(block) != k or int.from_bytes(block, "big") >= pub.public_numbers().n:
            raise InvalidRequest("The block must be k bytes and below the modulus")
        return k

    def sign_digest(
        self, ref: KeyRef, digest: bytes, hash_name: str, *, pss_salt_len: int | None = None
    ) -> bytes:
        """Sign a prehashed digest (csc-api.md §5).

        RSA: CKM_RSA_PKCS over the DER DigestInfo, or CKM_RSA_PKCS_PSS with MGF1 of the same
        hash when ``pss_salt_len`` is given. EC: CKM_ECDSA, returned as DER Ecdsa-Sig-Value.
        """
        hash_alg = hash_by_name(hash_name)
        if len(digest) != hash_alg.size:
            raise InvalidRequest("Invalid digest value length")
        if ref.alg is KeyAlg.ED25519:
            raise InvalidRequest("Ed25519 signs messages, not digests")
        if ref.alg.is_rsa:
            if pss_salt_len is None:
                return self._rsa_sign(ref, hash_alg.digest_info(digest), Mechanism.RSA_PKCS, None)
            if pss_salt_len < 0:
                raise InvalidRequest("Invalid PSS salt length")
            hash_mech, mgf = _HASH_MECHS[hash_alg.name]
            return self._rsa_sign(
                ref, digest, Mechanism.RSA_PKCS_PSS, (hash_mech, mgf, pss_salt_len)
            )
        if pss_salt_len is not None:
            raise InvalidRequest("PSS needs an RSA key")
        with self._session() as s:
            rs = self._private(s, ref).sign(digest, mechanism=Mechanism.ECDSA)
        half = len(rs) // 2
        return utils.encode_dss_signature(
            int.from_bytes(rs[:half], "big"), int.from_bytes(rs[half:], "big")
        )

    def _rsa_sign(self, ref: KeyRef, data: bytes, mech: Mechanism, param: Any) -> bytes:
        with self._session() as s:
            key = self._private(s, ref)
            return bytes(key.sign(data, mechanism=mech, mechanism_param=param))

    def eddsa_sign(self, ref: KeyRef, message: bytes) -> bytes:
        """Pure Ed25519 (RFC 8032) over the whole message with CKM_EDDSA."""
        if ref.alg is not KeyAlg.ED25519:
            raise InvalidRequest("EdDSA needs an Ed25519 key")
        with self._session() as s:
            return bytes(self._private(s, ref).sign(message, mechanism=Mechanism.EDDSA))

    def ecdh(self, ref: KeyRef, peer_point: bytes) -> bytes:
        """ECDH (CKM_ECDH1_DERIVE, no KDF) with an uncompressed peer point; returns Z.

        The peer point is validated on the key's curve first, so no invalid-curve input
        reaches the HSM.
        """
        curve = _CURVES.get(ref.alg)
        if curve is None:
            raise InvalidRequest("ECDH needs a P-256 or P-384 key")
        try:
            if peer_point[:1] != b"\x04":
                raise ValueError("not an uncompressed point")
            ec.EllipticCurvePublicKey.from_encoded_point(curve, peer_point)
        except ValueError:
            raise InvalidRequest("The peer point is not an uncompressed curve point") from None
        size = (curve.key_size + 7) // 8
        template = {
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            Attribute.TOKEN: False,
        }
        with self._session() as s:
            secret = _capable(self._private(s, ref), "derive_key").derive_key(
                KeyType.GENERIC_SECRET,
                size * 8,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, peer_point),
                template=template,
            )
            try:
                return bytes(secret[Attribute.VALUE])
            finally:
                secret.destroy()


def _capable(key: Any, method: str) -> Any:
    """``key`` if it has the capability (python-pkcs11 adds a mixin per CKA_DECRYPT etc.)."""
    if not hasattr(key, method):
        raise Forbidden("This key is a signing key; the HSM does not let it do that")
    return key


def _ec_point(value: bytes, raw_len: int) -> bytes:
    """CKA_EC_POINT content: a DER OCTET STRING (PKCS#11 v2.40 §2.3.3), or the bare point
    some modules return; told apart by the point's known length."""
    if len(value) == raw_len:
        return value
    header = 2 if raw_len < 0x80 else 3
    if len(value) == raw_len + header and value[0] == 0x04:
        return value[header:]
    raise HsmError("Malformed CKA_EC_POINT")


_EC_PARAMS_TO_ALG: Final[dict[bytes, KeyAlg]] = {
    encode_named_curve_parameters(a.curve_oid): a for a in KeyAlg if a.curve_oid is not None
}


def _public_from_object(pub: Any) -> PublicKey:
    """A cryptography public key from a PKCS#11 public-key object."""
    alg = _alg_of(pub)
    if alg.is_rsa:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if alg is KeyAlg.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(_ec_point(pub[Attribute.EC_POINT], 32))
    point = _ec_point(pub[Attribute.EC_POINT], 1 + 2 * ((alg.bits + 7) // 8))
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[alg], point)


def _alg_of_public(key: PublicKey) -> KeyAlg:
    """The :class:`KeyAlg` of a cryptography public key."""
    if isinstance(key, rsa.RSAPublicKey):
        return KeyAlg(f"rsa{key.key_size}")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyAlg.P256 if key.curve.name == "secp256r1" else KeyAlg.P384
    return KeyAlg.ED25519


def _alg_of(pub: Any) -> KeyAlg:
    """The :class:`KeyAlg` of a public-key object, from its type and size or curve."""
    key_type = pub[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        return KeyAlg(f"rsa{pub[Attribute.MODULUS_BITS]}")
    if key_type == KeyType.EC_EDWARDS:
        return KeyAlg.ED25519
    if key_type == KeyType.EC:
        alg = _EC_PARAMS_TO_ALG.get(bytes(pub[Attribute.EC_PARAMS]))
        if alg is not None:
            return alg
    raise HsmError("Unsupported key type in the HSM")


__all__ = ["Hsm", "KeyAlg", "KeyRef", "SecretKind"]
