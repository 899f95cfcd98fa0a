# SPDX-License-Identifier: Apache-2.0
"""Users, TOTP (rule 6) and tokens: login, replayed steps, rate limits, refresh, revoke."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from conftest import PASSWORD, MakeUser, totp_now, totp_of
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from test_services_concurrency import run_together

from server.config import Policy
from server.db import unit_of_work
from server.errors import Conflict, InvalidOtp, InvalidRequest, RateLimited, Unauthorized
from server.models import AuditRecord, AuthToken, LoginFailures, User, utcnow
from server.services import audit, login_limits, otp, tokens, users

ADDRESS = "192.0.2.1"


def test_add_list_disable(session: Session) -> None:
    users.add_user(session, "bob", password="long enough pw")
    users.add_user(session, "amy")
    assert [u.name for u in users.list_users(session)] == ["amy", "bob"]
    with pytest.raises(Conflict):
        users.add_user(session, "bob")
    with pytest.raises(InvalidRequest):
        users.add_user(session, "bad name")
    with pytest.raises(InvalidRequest):
        users.add_user(session, "carl", password="short")
    authenticate(session, "bob", "long enough pw")
    users.disable_user(session, "bob")
    with pytest.raises(Unauthorized):
        authenticate(session, "bob", "long enough pw")


@pytest.mark.parametrize(
    ("name", "password"), [("alice", "wrong password"), ("nobody", PASSWORD), ("amy", PASSWORD)]
)
def test_password_failures(session: Session, make_user: MakeUser, name: str, password: str) -> None:
    make_user()
    users.add_user(session, "amy")  # no password: cannot log in by password
    with pytest.raises(Unauthorized):
        users.authenticate_password(session, name, password, policy=Policy(), address=ADDRESS)
    with pytest.raises(Unauthorized):
        tokens.login(session, Policy(), name, password, "000000", address=ADDRESS)
    last = session.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc())).first()
    assert last is not None and last.event == audit.Event.LOGIN_FAILED


def test_totp_step_is_accepted_once(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    code = totp_now(user)
    otp.verify(session, user, code, policy)
    with pytest.raises(InvalidOtp):
        otp.verify(session, user, code, policy)
    with pytest.raises(InvalidOtp):  # an older step after a newer one is refused too
        otp.verify(session, user, totp_now(user, -1), policy)
    otp.verify(session, user, totp_now(user, +1), policy)  # next step (clock drift) is fine


def test_otp_failures_are_rate_limited(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    for _ in range(policy.otp_max_failures):
        with pytest.raises(InvalidOtp):
            otp.verify(session, user, "abcdef", policy)
    with pytest.raises(RateLimited):  # even the right code is not checked now
        otp.verify(session, user, totp_now(user), policy)
    later = utcnow() + timedelta(seconds=policy.otp_window + 1)
    code = totp_of(user).at(later)
    otp.verify(session, user, code, policy, now=later)  # the window has passed


def test_correct_otp_returns_its_reservation(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    with pytest.raises(InvalidOtp):
        otp.verify(session, user, "000000" if totp_now(user) != "000000" else "111111", policy)
    otp.verify(session, user, totp_now(user), policy)
    session.expire_all()
    assert session.get(User, user.id).otp_failures == 1  # type: ignore[union-attr]


def test_otpauth_uri(make_user: MakeUser) -> None:
    user = make_user("bob@example.org")
    seed = totp_of(user).secret
    uri = otp.otpauth_uri(user, seed)
    assert uri.startswith("otpauth://totp/cardbridge:bob%40example.org?")
    assert f"secret={seed}" in uri and "issuer=cardbridge" in uri


def test_login_refresh_revoke(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    pair = tokens.login(session, policy, "alice", PASSWORD, totp_now(user), address=ADDRESS)
    me = tokens.authenticate(session, pair.access_token)
    assert (me.kind, me.name, me.user_id, me.second_factor) == ("user", "alice", user.id, True)
    with pytest.raises(Unauthorized):  # a refresh token is not an access token
        tokens.authenticate(session, pair.refresh_token)

    new = tokens.refresh(session, policy, pair.refresh_token)
    with pytest.raises(Unauthorized):  # rotated: the old access token is spent
        tokens.authenticate(session, pair.access_token)
    tokens.authenticate(session, new.access_token)
    newer = tokens.refresh(session, policy, new.refresh_token)
    assert tokens.authenticate(session, newer.access_token).family_id == me.family_id

    tokens.revoke(session, newer.refresh_token)
    with pytest.raises(Unauthorized):  # revoking a refresh token kills its access tokens
        tokens.authenticate(session, newer.access_token)


def test_a_reused_refresh_token_revokes_the_family(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    pair = tokens.login(session, policy, "alice", PASSWORD, totp_now(user), address=ADDRESS)
    other = tokens.login(session, policy, "alice", PASSWORD, totp_now(user, 1), address=ADDRESS)
    new = tokens.refresh(session, policy, pair.refresh_token)
    with pytest.raises(Unauthorized) as e:  # the rotated token again: a copy is in use
        tokens.refresh(session, policy, pair.refresh_token)
    assert e.value.commit  # the revocation and its audit record outlive the refusal
    for token in (new.access_token, pair.access_token):
        with pytest.raises(Unauthorized):
            tokens.authenticate(session, token)
    with pytest.raises(Unauthorized):
        tokens.refresh(session, policy, new.refresh_token)
    tokens.authenticate(session, other.access_token)  # another login of the user lives on
    last = session.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc())).first()
    assert last is not None and last.event == audit.Event.REFRESH_REUSED


def test_login_needs_otp_unless_csc(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    with pytest.raises(InvalidOtp):
        tokens.login(session, policy, "alice", PASSWORD, None, address=ADDRESS)
    code = totp_now(user)
    tokens.login(session, policy, "alice", PASSWORD, code, address=ADDRESS)
    with pytest.raises(InvalidOtp):  # the same code again
        tokens.login(session, policy, "alice", PASSWORD, code, address=ADDRESS)
    events = [r["event"] for r in audit.export(session)]
    assert events[-4:] == [
        audit.Event.LOGIN_FAILED,
        audit.Event.LOGIN_OK,
        audit.Event.OTP_FAILED,
        audit.Event.LOGIN_FAILED,
    ]
    pair = tokens.login(session, policy, "alice", PASSWORD, None, require_otp=False,
                        address=ADDRESS)
    assert tokens.authenticate(session, pair.access_token).second_factor is False


def test_expired_and_disabled(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    pair = tokens.login(session, policy, "alice", PASSWORD, totp_now(user), address=ADDRESS)
    session.execute(update(AuthToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    with pytest.raises(Unauthorized):
        tokens.authenticate(session, pair.access_token)
    pair = tokens.login(session, policy, "alice", PASSWORD, totp_now(user, 1), address=ADDRESS)
    users.disable_user(session, "alice")
    with pytest.raises(Unauthorized):
        tokens.authenticate(session, pair.access_token)


def test_admin_token(session: Session) -> None:
    token = tokens.create_admin_token(session)
    p = tokens.authenticate(session, token)
    assert (p.kind, p.actor) == ("admin", "admin")
    tokens.revoke(session, token)  # the admin token cannot be revoked through the user API
    tokens.authenticate(session, token)
    stored = session.scalars(select(AuthToken.token_hash)).all()
    assert token not in stored
    with pytest.raises(Unauthorized):
        tokens.authenticate(session, token + "x")


SMALL = Policy(login_address_failures=3, login_name_failures=7)
"""Small budgets, so a test plays them out quickly (the defaults are 20 and 100)."""


def authenticate(session: Session, name: str, password: str, address: str = ADDRESS,
                 policy: Policy = SMALL) -> User:
    return users.authenticate_password(session, name, password, policy=policy, address=address)


def test_an_address_spends_its_own_budget_not_the_owners(
    session: Session, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: one client's wrong passwords lock out that client, whatever the name, and
    not the owner logging in from elsewhere."""
    user = make_user()
    for _ in range(SMALL.login_address_failures):
        with pytest.raises(Unauthorized):
            authenticate(session, "alice", "wrong password")
    checked: list[str] = []
    monkeypatch.setattr(users, "verify_secret", lambda stored, value: checked.append(value))
    for name in ("alice", "amy-unknown"):  # the right password is not even checked now
        with pytest.raises(RateLimited) as e:
            authenticate(session, name, PASSWORD)
        assert (e.value.code, e.value.status, checked) == ("rate_limited", 429, [])
    monkeypatch.undo()
    assert authenticate(session, "alice", PASSWORD, address="198.51.100.9").id == user.id
    session.execute(update(LoginFailures).values(
        window_start=utcnow() - timedelta(seconds=SMALL.login_window + 1)))
    session.commit()
    assert authenticate(session, "alice", PASSWORD).id == user.id  # the window has passed


def test_a_name_has_a_larger_budget_that_an_administrator_lifts(
    session: Session, make_user: MakeUser
) -> None:
    """Guesses from many addresses are bounded per name (the per-user lock), far above what
    one address may do; the administrator sees it and unlocks the user."""
    user = make_user()
    for i in range(SMALL.login_name_failures):
        with pytest.raises(Unauthorized):
            authenticate(session, "ALICE", "wrong password", address=f"192.0.2.{10 + i}")
    assert login_limits.name_failures(session, SMALL, user.name_key) == SMALL.login_name_failures
    with pytest.raises(RateLimited):
        authenticate(session, "alice", PASSWORD, address="198.51.100.9")
    users.unlock(session, "Alice")
    assert authenticate(session, "alice", PASSWORD, address="198.51.100.9").id == user.id


def test_login_applies_the_servers_policy_and_audits_refusals(
    session: Session, make_user: MakeUser
) -> None:
    """tokens.login counts password failures against the configured budget, not a default,
    and a refusal for the rate limit is audited like any failed login."""
    user = make_user()
    strict = Policy(login_address_failures=2)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            tokens.login(session, strict, "alice", "wrong password", totp_now(user),
                         address=ADDRESS)
    with pytest.raises(RateLimited):
        tokens.login(session, strict, "alice", PASSWORD, totp_now(user), address=ADDRESS)
    last = session.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc())).first()
    assert last is not None
    assert (last.event, json.loads(last.details)) == (
        audit.Event.LOGIN_FAILED,
        {"reason": "rate_limited", "address": ADDRESS},
    )


def test_a_correct_password_counts_no_failure(session: Session, make_user: MakeUser) -> None:
    make_user()
    for _ in range(SMALL.login_address_failures - 1):
        with pytest.raises(Unauthorized):
            authenticate(session, "alice", "wrong password")
    authenticate(session, "alice", PASSWORD)
    with pytest.raises(Unauthorized):  # the last failure the budget allows
        authenticate(session, "alice", "wrong password")
    with pytest.raises(RateLimited):
        authenticate(session, "alice", PASSWORD)


def test_wrong_passwords_and_wrong_otps_have_budgets_of_their_own(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    for _ in range(SMALL.login_address_failures):
        with pytest.raises(Unauthorized):
            authenticate(session, "alice", "wrong password")
    otp.verify(session, user, totp_now(user), policy)  # the OTP budget is untouched
    for _ in range(policy.otp_max_failures):
        with pytest.raises(InvalidOtp):
            otp.verify(session, user, "abcdef", policy)
    with pytest.raises(RateLimited):
        otp.verify(session, user, totp_now(user, 1), policy)
    assert authenticate(session, "alice", PASSWORD, address="198.51.100.9").id == user.id


def test_unknown_and_known_names_are_counted_and_answered_alike(
    session: Session, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: no enumeration. An unknown name costs one argon2id check (a dummy hash), is
    counted like a known one, and gets the same answers: 401, then 429 once its budget is
    spent (a known name's 429 told it apart before)."""
    make_user()
    real_verify, checked = users.verify_secret, []

    def counting(stored: str | None, value: str) -> bool:
        checked.append(stored is None)
        return real_verify(stored, value)

    monkeypatch.setattr(users, "verify_secret", counting)
    answers = {}
    for name in ("alice", "nobody"):
        seen = []
        for i in range(SMALL.login_name_failures + 1):
            try:
                authenticate(session, name, "wrong password", address=f"203.0.113.{i}")
            except (Unauthorized, RateLimited) as e:
                seen.append((e.status, e.code, e.description))
        answers[name] = seen
    assert answers["alice"] == answers["nobody"]
    assert answers["alice"][-1][:2] == (429, "rate_limited")
    assert checked == [False] * SMALL.login_name_failures + [True] * SMALL.login_name_failures


def test_parallel_wrong_passwords_cannot_exceed_the_limit(
    sessions: sessionmaker[Session], make_user: MakeUser
) -> None:
    make_user()
    threads = 4

    def guess(_: int) -> list[str]:
        seen = []
        for _ in range(SMALL.login_address_failures):
            try:
                with unit_of_work(sessions()) as s:
                    authenticate(s, "alice", "wrong password")
            except (Unauthorized, RateLimited) as e:
                seen.append(e.code)
        return seen

    codes = [c for r in run_together(guess, threads) for c in r]  # type: ignore[union-attr]
    assert codes.count("unauthorized") == SMALL.login_address_failures
    assert codes.count("rate_limited") == (threads - 1) * SMALL.login_address_failures


def test_names_are_unique_without_regard_to_case_or_width(session: Session) -> None:
    """Finding 11: ``ALICE`` and ``alice`` could coexist, and log in as each other's lookalike;
    names are NFKC-normalised and unique case-insensitively now, however they are spelled."""
    users.add_user(session, "alice", password=PASSWORD)
    for twin in ("ALICE", "Alice", "ａｌｉｃｅ", "ＡＬＩＣＥ"):
        with pytest.raises(Conflict):
            users.add_user(session, twin, password=PASSWORD)
    assert authenticate(session, "ALICE", PASSWORD).name == "alice"
    assert users.get_user(session, "ＡＬＩＣＥ").name == "alice"
    assert users.add_user(session, "ｂｏｂ").name == "bob"  # stored NFKC-normalised
    with pytest.raises(InvalidRequest):
        users.add_user(session, "a" * 65)
