# SPDX-License-Identifier: Apache-2.0
"""Server-side PIN and PUK (DESIGN.md rules 2 and 5; SP 800-73-4 Pt 2 §3.2 VERIFY/RESET RETRY).

An attempt reads the counter and the argon2id hash and checks the value before it writes
anything: argon2id takes tens of milliseconds, and holding SQLite's database-wide write lock (or
a PostgreSQL row lock) meanwhile would queue every other writer behind it; a read takes no
lock. The outcome is then applied in one guarded statement, which is where the attempt takes
its place among concurrent ones:

- a wrong value spends a try: ``UPDATE ... SET retries = retries - 1 WHERE retries > 0``;
- a correct value resets the counter: ``UPDATE ... WHERE retries > 0 AND hash = <checked>``.
  When that matches no row the counter reached 0 meanwhile (a blocked PIN stays blocked) or
  the value was replaced (the old one no longer counts): the attempt is then a wrong one.

Concurrent wrong PINs therefore each cost one try, a correct PIN is never refused because
other checks are in flight, and no outcome is revealed once the counter is 0: however many
guesses run in parallel, at most ``retries`` wrong ones are ever answered. The audit record is
written in the transaction that changes the counter, and the errors record the attempt
(``ServerError.commit``), so the request commits both even though it fails. Counters live in
the database, so they survive restarts. They are only ever changed by SQL, never through the
ORM object (a stale attribute flushed later would undo a concurrent decrement); the object is
then brought up to date without being marked dirty (:func:`_mirror`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.orm.attributes import set_committed_value

from server.config import Policy
from server.db import affected
from server.errors import (
    Forbidden,
    InvalidRequest,
    PinBlocked,
    PinIncorrect,
    PukIncorrect,
    ServerError,
)
from server.models import User
from server.services import audit, pin_marks
from server.services.hashing import hash_secret, verify_secret

PIN_MIN, PIN_MAX = 6, 8
"""PIV PINs are 6-8 bytes (SP 800-73-4 Pt 2 §2.4.3); PUKs are 8."""
PUK_LEN = 8


@dataclass(frozen=True)
class PinStatus:
    """Retry counters as a card reports them."""

    pin_retries: int
    pin_max: int
    puk_retries: int
    puk_max: int

    @property
    def blocked(self) -> bool:
        return self.pin_retries == 0


def validate_pin(pin: str) -> str:
    """``pin`` if it is 6-8 printable ASCII characters."""
    if not (PIN_MIN <= len(pin) <= PIN_MAX and pin.isascii() and pin.isprintable()):
        raise InvalidRequest("a PIN is 6 to 8 printable ASCII characters")
    return pin


def validate_puk(puk: str) -> str:
    """``puk`` if it is 8 printable ASCII characters."""
    if not (len(puk) == PUK_LEN and puk.isascii() and puk.isprintable()):
        raise InvalidRequest("a PUK is 8 printable ASCII characters")
    return puk


def random_digits(n: int) -> str:
    """``n`` random decimal digits (initial PINs and PUKs)."""
    return "".join(secrets.choice("0123456789") for _ in range(n))


def set_initial(user: User, pin: str, puk: str, policy: Policy) -> None:
    """Set the PIN and PUK and full counters (caller commits)."""
    user.pin_hash = hash_secret(validate_pin(pin))
    user.puk_hash = hash_secret(validate_puk(puk))
    user.pin_retries = policy.pin_tries
    user.puk_retries = policy.puk_tries


def _current(
    session: Session,
    user: User,
    counter: InstrumentedAttribute[int],
    stored: InstrumentedAttribute[str | None],
) -> tuple[int, str | None]:
    """The counter and hash as committed now."""
    row = session.execute(select(counter, stored).where(User.id == user.id)).one()
    return int(row[0]), row[1]


def _spend_try(session: Session, user: User, counter: InstrumentedAttribute[int]) -> int | None:
    """Count a wrong value: the tries left, or None when none were left (nothing changed)."""
    row = session.execute(
        update(User)
        .where(User.id == user.id, counter > 0)
        .values({counter.key: counter - 1})
        .returning(counter)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return None if row is None else int(row[0])


def _accept(
    session: Session,
    user: User,
    counter: InstrumentedAttribute[int],
    stored: InstrumentedAttribute[str | None],
    checked: str,
    values: dict[str, object],
) -> bool:
    """Apply a correct value's ``values`` unless the counter is 0 or ``checked`` was replaced."""
    result = session.execute(
        update(User)
        .where(User.id == user.id, counter > 0, stored == checked)
        .values(values)
        .execution_options(synchronize_session=False)
    )
    return affected(result) == 1


def _mirror(user: User, **values: object) -> None:
    """Show committed values on ``user`` without giving the ORM anything to flush."""
    for name, value in values.items():
        set_committed_value(user, name, value)


def _new_pin(pin: str, policy: Policy) -> dict[str, object]:
    """The columns of a new PIN with both counters reset (hashes it: call with no transaction)."""
    return {
        "pin_hash": hash_secret(pin),
        "pin_retries": policy.pin_tries,
        "puk_retries": policy.puk_tries,
    }


def _set_pin(session: Session, user: User, pin: str, policy: Policy) -> None:
    """Store a new PIN and reset both counters (caller audits and commits). No verification of
    the old PIN outlives it (the PIV sessions' PIN marks are cleared)."""
    values = _new_pin(pin, policy)
    session.execute(
        update(User)
        .where(User.id == user.id)
        .values(values)
        .execution_options(synchronize_session=False)
    )
    _mirror(user, **values)
    pin_marks.clear_user(session, user.id)


def _require_pin_set(user: User) -> None:
    if user.pin_hash is None:
        raise Forbidden(f"user {user.name!r} has no PIN (not enrolled)")


def _present(
    session: Session,
    user: User,
    value: str,
    *,
    counter: InstrumentedAttribute[int],
    stored_hash: InstrumentedAttribute[str | None],
    on_correct: Callable[[], dict[str, object]],
    events: tuple[audit.Event, audit.Event],
    wrong: Callable[[int], ServerError],
    what: str,
    actor: str,
) -> None:
    """Check ``value`` against a PIN or PUK, then apply the outcome atomically.

    argon2id runs before anything is written; a correct value applies ``on_correct()`` only
    if the counter still has tries and the hash is unchanged (else it counts as wrong), a wrong
    one spends a try with one guarded statement; either way with its audit record.

    :raises ServerError: ``wrong(retries_left)`` for a wrong value.
    :raises PinBlocked: no tries left; nothing was checked.
    """
    ok_event, failed_event = events
    subject = f"user:{user.name}"
    left, stored = _current(session, user, counter, stored_hash)
    if left > 0 and stored is not None:
        values = on_correct() if verify_secret(stored, value) else None
        if values is not None and _accept(session, user, counter, stored_hash, stored, values):
            audit.append(session, actor=actor, event=ok_event, subject=subject)
            _mirror(user, **values)
            return
        spent = _spend_try(session, user, counter)
        if spent is not None:
            audit.append(
                session,
                actor=actor,
                event=failed_event,
                subject=subject,
                details={"retries": spent},
            )
            _mirror(user, **{counter.key: spent})
            raise wrong(spent)
    audit.append(
        session, actor=actor, event=failed_event, subject=subject, details={"blocked": True}
    )
    _mirror(user, **{counter.key: 0})
    raise PinBlocked(f"{what} blocked")


def verify(
    session: Session, user: User, pin: str, policy: Policy, *, actor: str | None = None
) -> None:
    """Check the user's PIN (a wrong one spends a try, recorded by the error). When the PIN is
    blocked, every PIV session of the user forgets its PIN verification.

    :raises PinIncorrect: wrong PIN (``retries`` left, possibly 0).
    :raises PinBlocked: no tries left; nothing was checked.
    """
    _require_pin_set(user)
    try:
        _present(
            session,
            user,
            pin,
            counter=User.pin_retries,
            stored_hash=User.pin_hash,
            on_correct=lambda: {"pin_retries": policy.pin_tries},
            events=(audit.Event.PIN_OK, audit.Event.PIN_FAILED),
            wrong=PinIncorrect,
            what="PIN",
            actor=actor or f"user:{user.name}",
        )
    except (PinIncorrect, PinBlocked) as e:
        if isinstance(e, PinBlocked) or e.retries == 0:
            pin_marks.clear_user(session, user.id)
        raise


def change(session: Session, user: User, old_pin: str, new_pin: str, policy: Policy) -> None:
    """Change the PIN after checking the old one (CHANGE REFERENCE DATA)."""
    validate_pin(new_pin)
    verify(session, user, old_pin, policy)
    _set_pin(session, user, new_pin, policy)
    audit.append(
        session,
        actor=f"user:{user.name}",
        event=audit.Event.PIN_CHANGE,
        subject=f"user:{user.name}",
    )


def change_puk(session: Session, user: User, old_puk: str, new_puk: str, policy: Policy) -> None:
    """Change the PUK after checking the old one (CHANGE REFERENCE DATA, key reference 81).

    :raises PukIncorrect: wrong PUK (``retries`` PUK tries left).
    :raises PinBlocked: the PUK is blocked.
    """
    validate_puk(new_puk)
    _require_pin_set(user)
    _present(
        session,
        user,
        old_puk,
        counter=User.puk_retries,
        stored_hash=User.puk_hash,
        on_correct=lambda: {"puk_hash": hash_secret(new_puk), "puk_retries": policy.puk_tries},
        events=(audit.Event.PUK_CHANGE, audit.Event.PUK_CHANGE_FAILED),
        wrong=PukIncorrect,
        what="PUK",
        actor=f"user:{user.name}",
    )


def unblock(session: Session, user: User, puk: str, new_pin: str, policy: Policy) -> None:
    """Set a new PIN and reset its counter with the PUK (RESET RETRY COUNTER); no PIV session
    keeps a verification of the old PIN.

    :raises PukIncorrect: wrong PUK (``retries`` PUK tries left).
    :raises PinBlocked: the PUK is blocked too; only an administrator can help.
    """
    validate_pin(new_pin)
    _require_pin_set(user)
    _present(
        session,
        user,
        puk,
        counter=User.puk_retries,
        stored_hash=User.puk_hash,
        on_correct=lambda: _new_pin(new_pin, policy),  # hashed only once the PUK is right
        events=(audit.Event.PIN_UNBLOCK, audit.Event.PIN_UNBLOCK_FAILED),
        wrong=PukIncorrect,
        what="PUK",
        actor=f"user:{user.name}",
    )
    pin_marks.clear_user(session, user.id)


def admin_unblock(
    session: Session,
    user: User,
    policy: Policy,
    *,
    new_pin: str | None = None,
    actor: str = "admin",
) -> str:
    """Set a new PIN (random 6 digits unless given) and reset both counters; returns the PIN."""
    _require_pin_set(user)
    pin = validate_pin(new_pin) if new_pin is not None else random_digits(PIN_MIN)
    _set_pin(session, user, pin, policy)
    audit.append(session, actor=actor, event=audit.Event.ADMIN_UNBLOCK, subject=f"user:{user.name}")
    return pin


def status(session: Session, user: User, policy: Policy) -> PinStatus:
    """The user's current counters, read from the database."""
    row = session.execute(
        select(User.pin_retries, User.puk_retries).where(User.id == user.id)
    ).one()
    return PinStatus(int(row[0]), policy.pin_tries, int(row[1]), policy.puk_tries)
