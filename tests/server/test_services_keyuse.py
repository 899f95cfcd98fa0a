# SPDX-License-Identifier: Apache-2.0
"""keyuse's decryption budget (finding 3) on SQLite and PostgreSQL: per key and login, within
a window, and parallel decryptions cannot exceed it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import MakeUser
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from test_services_concurrency import run_together

from server.config import Policy
from server.db import unit_of_work
from server.errors import DecryptionBudgetExhausted
from server.models import Credential, DecryptBudget, utcnow
from server.services import keyuse

BUDGET = Policy(decrypt_budget=3, decrypt_window=60)


@pytest.fixture
def key(session: Session, make_user: MakeUser) -> keyuse.KeyUse:
    user = make_user()
    session.add(Credential(id="d1", user_id=user.id, slot="9d", alg="rsa2048", key_id="0d"))
    session.commit()
    return keyuse.key_use(session, user.id, "d1")


def spend(session: Session, key: keyuse.KeyUse, family: int) -> None:
    with unit_of_work(session):
        keyuse.spend_decryption(session, BUDGET, key, family)


def test_a_key_decrypts_its_budget_per_login_and_window(
    session: Session, key: keyuse.KeyUse
) -> None:
    for _ in range(BUDGET.decrypt_budget):
        spend(session, key, 7)
    with pytest.raises(DecryptionBudgetExhausted) as e:
        spend(session, key, 7)
    assert (e.value.status, e.value.code, e.value.commit) == (
        429, "decryption_budget_exhausted", True)
    spend(session, key, 8)  # another login of the same user has its own budget
    session.execute(update(DecryptBudget).values(window_start=utcnow() - timedelta(seconds=61)))
    session.commit()
    spend(session, key, 7)  # a new window


def test_parallel_decryptions_cannot_exceed_the_budget(
    sessions: sessionmaker[Session], key: keyuse.KeyUse
) -> None:
    def decrypt(_: int) -> list[str]:
        seen = []
        for _ in range(BUDGET.decrypt_budget):
            try:
                with unit_of_work(sessions()) as s:
                    keyuse.spend_decryption(s, BUDGET, key, 9)
                seen.append("ok")
            except DecryptionBudgetExhausted as e:
                seen.append(e.code)
        return seen

    outcomes = [o for r in run_together(decrypt, 4) for o in r]  # type: ignore[union-attr]
    assert outcomes.count("ok") == BUDGET.decrypt_budget
    assert outcomes.count("decryption_budget_exhausted") == 3 * BUDGET.decrypt_budget
