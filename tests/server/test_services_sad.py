# SPDX-License-Identifier: Apache-2.0
"""SAD rules (DESIGN.md rule 4; CSC v2 §9): bound, counted, pinned, expiring, spent once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import MakeUser
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import unit_of_work
from server.errors import InvalidRequest, SadInvalid
from server.models import Credential, Sad, User, utcnow
from server.services import sad

H1, H2, H3 = (bytes([i]) * 32 for i in (1, 2, 3))
SHA256 = "2.16.840.1.101.3.4.2.1"


@pytest.fixture
def owner(session: Session, make_user: MakeUser) -> tuple[User, str]:
    user = make_user()
    session.add(Credential(id="c1", user_id=user.id, slot="9c", alg="p256", key_id="01"))
    session.commit()
    return user, "c1"


def grant(session: Session, owner: tuple[User, str], n: int = 1, **kw: object) -> str:
    user, cred = owner
    with unit_of_work(session):
        return sad.authorize(
            session,
            Policy(),
            user_id=user.id,
            credential_id=cred,
            num_signatures=n,
            **kw,  # type: ignore[arg-type]
        ).sad


def spend(
    session: Session, owner: tuple[User, str], value: str, *hashes: bytes, **kw: object
) -> None:
    """Check and spend in one unit of work, as signHash does."""
    user, cred = owner
    with unit_of_work(session):
        found = sad.check(session, value, user_id=user.id, credential_id=cred,
                          hashes=list(hashes), **kw)  # type: ignore[arg-type]
        sad.spend(session, found)


def test_replay_is_refused(session: Session, owner: tuple[User, str]) -> None:
    value = grant(session, owner, hashes=[H1], hash_oid=SHA256)
    spend(session, owner, value, H1)
    with pytest.raises(SadInvalid):
        spend(session, owner, value, H1)


def test_another_user_or_credential_cannot_spend_it(
    session: Session, owner: tuple[User, str], make_user: MakeUser
) -> None:
    value = grant(session, owner)
    mallory = make_user("mallory")
    with pytest.raises(SadInvalid):
        spend(session, (mallory, "c1"), value, H1)
    session.add(Credential(id="c2", user_id=owner[0].id, slot="9a", alg="p256", key_id="02"))
    session.commit()
    with pytest.raises(SadInvalid):
        spend(session, (owner[0], "c2"), value, H1)
    spend(session, owner, value, H1)  # still intact for its owner


def test_pinned_hashes_are_consumed_one_by_one(session: Session, owner: tuple[User, str]) -> None:
    value = grant(session, owner, 2, hashes=[H1, H2])
    with pytest.raises(SadInvalid, match="not authorized"):
        spend(session, owner, value, H3)
    spend(session, owner, value, H1)
    with pytest.raises(SadInvalid):  # H1 was consumed, even though one signature is left
        spend(session, owner, value, H1)
    spend(session, owner, value, H2)


def test_count_without_pinning(session: Session, owner: tuple[User, str]) -> None:
    value = grant(session, owner, 2)
    with pytest.raises(SadInvalid):
        spend(session, owner, value, H1, H2, H3)
    spend(session, owner, value, H1, H2)
    with pytest.raises(SadInvalid):
        spend(session, owner, value, H3)


def test_expiry(session: Session, owner: tuple[User, str]) -> None:
    value = grant(session, owner)
    session.execute(update(Sad).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    with pytest.raises(SadInvalid, match="expired"):
        spend(session, owner, value, H1)


def test_hash_algorithm_must_match_the_pinned_one(
    session: Session, owner: tuple[User, str]
) -> None:
    value = grant(session, owner, hashes=[H1], hash_oid=SHA256)
    with pytest.raises(SadInvalid):
        spend(session, owner, value, H1, hash_oid="2.16.840.1.101.3.4.2.2")


@pytest.mark.parametrize(("n", "hashes"), [(0, None), (17, None), (1, [H1, H2]), (1, [])])
def test_bad_authorize_requests(
    session: Session, owner: tuple[User, str], n: int, hashes: list[bytes] | None
) -> None:
    with pytest.raises(InvalidRequest):
        grant(session, owner, n, hashes=hashes)


def extend(session: Session, owner: tuple[User, str], value: str, *hashes: bytes) -> str:
    user, cred = owner
    with unit_of_work(session):
        return sad.extend(session, value, user_id=user.id, credential_id=cred,
                          hashes=list(hashes) or None).sad


def test_extend_moves_the_budget(session: Session, owner: tuple[User, str]) -> None:
    old = grant(session, owner, 3)  # a count only (SCAL 1): an extension may pin hashes
    spend(session, owner, old, H1)
    new = extend(session, owner, old, H2)
    with pytest.raises(SadInvalid):
        spend(session, owner, old, H2)
    with pytest.raises(SadInvalid):
        spend(session, owner, new, H3)  # pinned to H2 now
    spend(session, owner, new, H2)


def test_an_extension_of_pinned_hashes_covers_only_those_not_signed(
    session: Session, owner: tuple[User, str]
) -> None:
    """Finding 1: no PIN, no OTP, so nothing new: only hashes the authorization pinned."""
    old = grant(session, owner, 3, hashes=[H1, H2, H2], hash_oid=SHA256)
    spend(session, owner, old, H1)
    with pytest.raises(SadInvalid, match="not authorized"):
        extend(session, owner, old, H3)
    with pytest.raises(SadInvalid, match="not authorized"):
        extend(session, owner, old, H1)  # pinned, but signed already
    with pytest.raises(InvalidRequest):
        extend(session, owner, old, H2, H2, H2)  # more than the two left
    new = extend(session, owner, old, H2)
    with pytest.raises(SadInvalid):
        spend(session, owner, new, H2, H2)  # the count shrank to the hashes kept
    spend(session, owner, new, H2)


def test_a_chain_of_extensions_ends_when_the_authorization_does(
    session: Session, owner: tuple[User, str]
) -> None:
    value = grant(session, owner, 2, hashes=[H1, H2], hash_oid=SHA256)
    deadline = utcnow() + timedelta(seconds=30)
    session.execute(update(Sad).values(expires_at=deadline))
    session.commit()
    for _ in range(3):
        value = extend(session, owner, value)
    expiries = session.scalars(select(Sad.expires_at)).all()
    assert len(expiries) == 4 and all(e == deadline for e in expiries)
    session.execute(update(Sad).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    with pytest.raises(SadInvalid, match="expired"):
        extend(session, owner, value)
