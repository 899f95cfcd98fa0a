# SPDX-License-Identifier: Apache-2.0
"""Migrations run from package data on SQLite and PostgreSQL, idempotently, and match the
models exactly."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from sqlalchemy import inspect, text

from server.db import alembic_config, make_engine, migrate
from server.models import Base


def test_migrations_match_the_models_and_rerun(db_url: str) -> None:
    migrate(db_url)  # second run: nothing to do
    command.check(alembic_config(db_url))  # raises if models and migrations differ
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {
            "alembic_version"
        }
        with engine.connect() as c:
            assert c.execute(text("SELECT last_seq, last_hash FROM audit_head")).one() == (
                0,
                "0" * 64,
            )
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "base")
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    migrate(db_url)
    command.check(cfg)


def test_the_upgrade_keys_names_case_insensitively_and_disables_lookalikes(db_url: str) -> None:
    """Finding 11's migration: before it, ALICE and alice could both exist. The first keeps the
    name; the later one is disabled, its key suffixed, so the unique key can hold."""
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "0007")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            for user_id, name in ((1, "alice"), (2, "ALICE"), (3, "bob")):
                c.execute(text("INSERT INTO users (id, name, disabled, created_at, pin_retries, "
                               "puk_retries, otp_failures) VALUES (:id, :name, false, "
                               "'2025-01-01 00:00:00', 0, 0, 0)"), {"id": user_id, "name": name})
        migrate(db_url)
        with engine.connect() as c:
            rows = c.execute(text("SELECT id, name_key, disabled FROM users ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, "alice", False), (2, "alice~2", True),
                                            (3, "bob", False)]
    finally:
        engine.dispose()


def test_the_upgrade_gives_existing_tokens_their_refresh_tokens_family(db_url: str) -> None:
    """Finding 9's migration: a refresh token issued before is its own family's root; its
    access tokens and PIN marks join it, so a reuse (or a logout) revokes them together."""
    command.downgrade(alembic_config(db_url), "0005")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO users (id, name, disabled, created_at, pin_retries, "
                           "puk_retries, otp_failures) VALUES (1, 'old', false, "
                           "'2025-01-01 00:00:00', 0, 0, 0)"))
            for token_id, kind, parent in ((10, "refresh", None), (11, "access", 10),
                                           (12, "piv-pin", 10), (13, "admin", None)):
                c.execute(text("INSERT INTO auth_tokens (id, token_hash, kind, user_id, "
                               "parent_id, second_factor, created_at, revoked) VALUES (:id, "
                               ":hash, :kind, 1, :parent, false, '2025-01-01 00:00:00', false)"),
                          {"id": token_id, "hash": f"{token_id:064d}", "kind": kind,
                           "parent": parent})
        migrate(db_url)
        with engine.connect() as c:
            rows = c.execute(text("SELECT id, family_id FROM auth_tokens ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(10, 10), (11, 10), (12, 10), (13, None)]
    finally:
        engine.dispose()


def test_the_upgrade_from_a_deployment_database_dates_revoked_credentials(db_url: str) -> None:
    """0009 on a database at 0008 (several nodes, no timestamps yet): the deployment row keeps
    its CA and gets no TSA (``server init`` makes one, with the HSM), a credential revoked
    before gets the upgrade's time as its revocation time (its CRL entry), an active one none."""
    command.downgrade(alembic_config(db_url), "0008")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO users (id, name, name_key, disabled, created_at, "
                           "pin_retries, puk_retries, otp_failures) VALUES (1, 'old', 'old', "
                           "false, '2025-01-01 00:00:00', 0, 0, 0)"))
            for cred_id, status in (("c-revoked", "revoked"), ("c-active", "active")):
                c.execute(text("INSERT INTO credentials (id, user_id, slot, alg, key_id, status, "
                               "otp_per_signature, pin_always, created_at) VALUES (:id, 1, '9c', "
                               "'p256', :id, :status, false, false, '2025-01-01 00:00:00')"),
                          {"id": cred_id, "status": status})
            c.execute(text("INSERT INTO deployment (id, ca_key_id, ca_key_alg, ca_cert_pem, "
                           "token_label, created_at) VALUES (1, 'ab', 'p256', 'PEM', 'tok', "
                           "'2025-01-01 00:00:00')"))
        before = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        migrate(db_url)
        with engine.connect() as c:
            rows = dict(c.execute(text("SELECT id, revoked_at FROM credentials")).all())
            deployment = c.execute(text("SELECT ca_key_id, tsa_key_id, tsa_cert_pem "
                                        "FROM deployment")).one()
            assert c.execute(text("SELECT count(*) FROM revocation_list")).scalar() == 0
        assert rows["c-active"] is None
        revoked_at = rows["c-revoked"]
        revoked_at = (datetime.fromisoformat(revoked_at) if isinstance(revoked_at, str)
                      else revoked_at)  # fmt: skip
        assert before <= revoked_at <= datetime.now(UTC).replace(tzinfo=None)
        assert tuple(deployment) == ("ab", None, None)
    finally:
        engine.dispose()


def test_a_database_of_the_released_schema_upgrades(db_url: str) -> None:
    """Revision ids keep the meaning they had when released: 0003 is the deployment table, so a
    database stamped 0003 by the release before the hardening upgrades to the head."""
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "0003")
    engine = make_engine(db_url)
    try:
        assert "deployment" in inspect(engine).get_table_names()
        assert "mac" not in {c["name"] for c in inspect(engine).get_columns("audit_log")}
    finally:
        engine.dispose()
    migrate(db_url)
    command.check(cfg)
