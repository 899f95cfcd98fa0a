# SPDX-License-Identifier: Apache-2.0
"""The atomic paths under real concurrency: two threads, two connections, one database, each
call in its own unit of work as a request runs it.

Runs on both backends; PostgreSQL is the one several server nodes share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from conftest import MakeUser, totp_now
from sqlalchemy.orm import Session, sessionmaker

from server.config import Policy
from server.db import unit_of_work
from server.errors import Conflict, InvalidOtp, PinIncorrect, RateLimited, SadInvalid
from server.models import Credential, User
from server.services import audit, otp, pins, sad, users

T = TypeVar("T")
THREADS = 2


def run_together(work: Callable[[int], T], n: int = THREADS) -> list[T | BaseException]:
    """Run ``work(i)`` in ``n`` threads released at the same instant; results or errors."""
    barrier = threading.Barrier(n)
    out: list[T | BaseException] = [RuntimeError("not run")] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except BaseException as e:  # noqa: BLE001 -- collected for the assertions
            out[i] = e

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_concurrent_wrong_pins_lose_no_decrement(
    sessions: sessionmaker[Session], make_user: MakeUser
) -> None:
    policy = Policy(pin_tries=12)
    user = make_user()
    with sessions() as s:
        s.get(User, user.id).pin_retries = 12  # type: ignore[union-attr]
        s.commit()
    per_thread = 5

    def guess(_: int) -> list[int]:
        left = []
        for _ in range(per_thread):
            try:
                with unit_of_work(sessions()) as s:
                    pins.verify(s, users.get_by_id(s, user.id), "000000", policy)
            except PinIncorrect as e:
                left.append(e.retries)
        return left

    results = run_together(guess)
    seen = sorted(r for res in results for r in res)  # type: ignore[union-attr]
    assert seen == list(range(12 - THREADS * per_thread, 12))  # each try counted exactly once
    with sessions() as s:
        assert pins.status(s, s.get(User, user.id), policy).pin_retries == 2  # type: ignore[arg-type]


def _credential(sessions: sessionmaker[Session], user: User) -> str:
    with sessions() as s:
        s.add(Credential(id="cred-1", user_id=user.id, slot="9c", alg="p256", key_id="00aa"))
        s.commit()
    return "cred-1"


@pytest.mark.parametrize("round_", range(3))
def test_sad_double_spend_from_two_connections(
    sessions: sessionmaker[Session], make_user: MakeUser, policy: Policy, round_: int
) -> None:
    user = make_user()
    cred = _credential(sessions, user)
    digest = bytes(range(32))
    with unit_of_work(sessions()) as s:
        grant = sad.authorize(
            s, policy, user_id=user.id, credential_id=cred, num_signatures=1, hashes=[digest]
        )

    def spend(_: int) -> bool:
        with unit_of_work(sessions()) as s:
            found = sad.check(s, grant.sad, user_id=user.id, credential_id=cred, hashes=[digest])
            sad.spend(s, found)
        return True

    results = run_together(spend)
    assert results.count(True) == 1
    assert sum(isinstance(r, SadInvalid) for r in results) == 1


def test_audit_appends_from_two_connections_keep_the_chain(
    sessions: sessionmaker[Session],
) -> None:
    per_thread = 40

    def append(i: int) -> int:
        for n in range(per_thread):
            with unit_of_work(sessions()) as s:
                audit.append(s, actor=f"worker:{i}", event="test", details={"n": n})
        return per_thread

    assert run_together(append) == [per_thread] * THREADS
    with sessions() as s:
        assert audit.verify(s) is None
        seqs = [r["seq"] for r in audit.export(s)]
    assert seqs == list(range(1, THREADS * per_thread + 1))


def test_verify_while_another_connection_appends(sessions: sessionmaker[Session]) -> None:
    def work(i: int) -> list[object]:
        if i == 0:
            for n in range(60):
                with unit_of_work(sessions()) as s:
                    audit.append(s, actor="writer", event="test", details={"n": n})
            return []
        with sessions() as s:
            found = []
            for _ in range(15):
                found.append(audit.verify(s))
                s.rollback()  # a fresh snapshot each time
            return found

    results = run_together(work)
    assert results[0] == [] and results[1] == [None] * 15


def test_one_totp_code_from_two_connections_is_accepted_once(
    sessions: sessionmaker[Session], make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    code = totp_now(user)

    def submit(_: int) -> bool:
        with unit_of_work(sessions()) as s:
            otp.verify(s, users.get_by_id(s, user.id), code, policy)
        return True

    results = run_together(submit)
    assert results.count(True) == 1
    assert sum(isinstance(r, InvalidOtp) for r in results) == 1


def test_parallel_otp_guesses_cannot_exceed_the_limit(
    sessions: sessionmaker[Session], make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()

    def guess(_: int) -> list[str]:
        seen = []
        for _ in range(policy.otp_max_failures):
            try:
                with unit_of_work(sessions()) as s:
                    otp.verify(s, users.get_by_id(s, user.id), "abcdef", policy)
            except (InvalidOtp, RateLimited) as e:
                seen.append(e.code)
        return seen

    codes = [c for r in run_together(guess) for c in r]  # type: ignore[union-attr]
    assert codes.count("invalid_otp") == policy.otp_max_failures
    assert (
        codes.count("rate_limited") == THREADS * policy.otp_max_failures - policy.otp_max_failures
    )


def test_concurrent_adds_of_one_name_give_one_user_and_one_conflict(
    sessions: sessionmaker[Session],
) -> None:
    def add(_: int) -> bool:
        with unit_of_work(sessions()) as s:
            users.add_user(s, "twin")
        return True

    results = run_together(add)
    assert results.count(True) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 1
