# SPDX-License-Identifier: Apache-2.0
"""SQLAlchemy 2 models of the server's state.

Secrets are never stored in clear: passwords, PINs and PUKs as argon2id hashes, tokens, SADs
and enrollment codes as SHA-256 of their high-entropy value. The TOTP seed is the one secret the
server must be able to read back (RFC 6238 needs it to compute codes): it is sealed with AES-GCM
under a key derived for that value by the HSM's seal HMAC key, which never leaves the HSM.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UtcDateTime()}


class User(Base):
    """A person who owns credentials; holds the PIN/PUK and TOTP state (rules 5, 6)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    name_key: Mapped[str] = mapped_column(String(64), unique=True)
    """The name NFKC-normalised and case-folded: what is unique and looked up
    (:func:`server.services.users.name_key`)."""
    email: Mapped[str | None] = mapped_column(String(254))
    upn: Mapped[str | None] = mapped_column(String(254))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    pin_hash: Mapped[str | None] = mapped_column(String(255))
    puk_hash: Mapped[str | None] = mapped_column(String(255))
    pin_retries: Mapped[int] = mapped_column(Integer, default=0)
    puk_retries: Mapped[int] = mapped_column(Integer, default=0)

    otp_seed: Mapped[bytes | None] = mapped_column(LargeBinary(128))
    """The TOTP seed, sealed under a key the HSM derives for it
    (:func:`server.services.otp.seal_seed`)."""
    otp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    otp_failures: Mapped[int] = mapped_column(Integer, default=0)
    otp_window_start: Mapped[datetime | None]

    credentials: Mapped[list[Credential]] = relationship(
        back_populates="user", order_by="Credential.slot"
    )


class Credential(Base):
    """One HSM key of a user in one PIV slot, with its certificate and policy (rule 2)."""

    __tablename__ = "credentials"
    __table_args__ = (UniqueConstraint("key_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    slot: Mapped[str] = mapped_column(String(2))
    alg: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(128))
    """Hex CKA_ID of the private key in the HSM."""
    cert_pem: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="active")
    revoked_at: Mapped[datetime | None]
    """When ``admin revoke`` revoked it: its certificate's revocation date on the CRL."""
    otp_per_signature: Mapped[bool] = mapped_column(Boolean, default=False)
    pin_always: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(back_populates="credentials", lazy="joined")


class AuthToken(Base):
    """An opaque bearer token, stored as SHA-256; kinds: access, refresh, admin."""

    __tablename__ = "auth_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("auth_tokens.id"))
    """For an access token: the refresh token it came with (revoking that revokes this)."""
    family_id: Mapped[int | None] = mapped_column(index=True)
    """The login this token descends from: the id of its first refresh token, shared by every
    refresh token rotated from it and their access tokens and PIN marks (RFC 9700 §4.14.2)."""
    second_factor: Mapped[bool] = mapped_column(Boolean, default=False)
    jkt: Mapped[str | None] = mapped_column(String(64))
    """For a device-bound token: the JWK thumbprint of the device key (RFC 9449 ``cnf.jkt``)
    whose DPoP proof must come with every use."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Sad(Base):
    """Signature activation data (rule 4), stored as SHA-256 of the opaque value."""

    __tablename__ = "sads"

    id: Mapped[int] = mapped_column(primary_key=True)
    sad_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    credential_id: Mapped[str] = mapped_column(ForeignKey("credentials.id"), index=True)
    remaining: Mapped[int] = mapped_column(Integer)
    hashes: Mapped[list[str] | None] = mapped_column(JSON)
    """Pinned digests (base64), or None when the SAD only carries a count (SCAL 1)."""
    hash_oid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class EnrollmentCode(Base):
    """A one-time code that lets one device fetch a user's credentials."""

    __tablename__ = "enrollment_codes"

    id: Mapped[int] = mapped_column(primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class Device(Base):
    """A workstation's device key, registered by redeeming an enrollment code."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 (hex) of the device public key's SubjectPublicKeyInfo."""
    jkt: Mapped[str] = mapped_column(String(64), unique=True)
    """JWK SHA-256 thumbprint of the device key (RFC 7638): what its DPoP proofs name."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class DpopProof(Base):
    """A DPoP proof already used (RFC 9449 §11.1), kept while a replay would be accepted."""

    __tablename__ = "dpop_proofs"

    jti_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    """SHA-256 (hex) of the key thumbprint and the proof's ``jti``."""
    expires_at: Mapped[datetime] = mapped_column(index=True)


class LoginFailures(Base):
    """Failed password logins in the current window, per source address and per user name
    (known or not alike, so neither the answers nor the counting tell names apart)."""

    __tablename__ = "login_failures"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    """``address`` or ``name``."""
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The client address, or the SHA-256 (hex) of the name key."""
    failures: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(index=True)


class DecryptBudget(Base):
    """RSA decryptions of one key for one login (token family) in the current window."""

    __tablename__ = "decrypt_budgets"

    credential_id: Mapped[str] = mapped_column(ForeignKey("credentials.id"), primary_key=True)
    family_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    window_start: Mapped[datetime] = mapped_column(index=True)
    used: Mapped[int] = mapped_column(Integer)


class AuditRecord(Base):
    """One link of the hash-chained, HSM-anchored audit log (rule 7); rows are only ever
    inserted."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    time: Mapped[str] = mapped_column(String(32))
    """ISO 8601 UTC with microseconds, exactly as hashed."""
    actor: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[str] = mapped_column(Text)
    """Canonical JSON, exactly as hashed."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    """HMAC-SHA256 (hex) of ``hash`` under the HSM's audit key."""


class AuditHead(Base):
    """The single row that serialises audit appends and remembers the chain's tip."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class Deployment(Base):
    """The deployment that every node on this database belongs to (one row, ``id`` 1): its CA,
    whose key lives on the HSM token all nodes reach. ``server init`` records it; ``server
    join`` reads it, and ``server init`` on a database that has it refuses to fork it."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    ca_key_id: Mapped[str] = mapped_column(String(128))
    """Hex CKA_ID of the CA key in the HSM."""
    ca_key_alg: Mapped[str] = mapped_column(String(16))
    ca_cert_pem: Mapped[str] = mapped_column(Text)
    token_label: Mapped[str] = mapped_column(String(64))
    """Label of the HSM token that holds the CA key and every user key."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    tsa_key_id: Mapped[str | None] = mapped_column(String(128))
    """Hex CKA_ID of the time-stamping authority's key in the HSM (RFC 3161); set by ``server
    init``, on a new data directory or on the upgrade of an existing one."""
    tsa_key_alg: Mapped[str | None] = mapped_column(String(16))
    tsa_cert_pem: Mapped[str | None] = mapped_column(Text)
    """The TSA's certificate, issued by the CA (critical EKU timeStamping)."""


class RevocationList(Base):
    """The CA's current CRL (RFC 5280 §5), one row (``id`` 1) that every node serves: signed
    again when a revocation changes what it lists or before its ``next_update``."""

    __tablename__ = "revocation_list"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    number: Mapped[int] = mapped_column(BigInteger)
    """The cRLNumber extension: grows by one with each CRL."""
    der: Mapped[bytes] = mapped_column(LargeBinary)
    this_update: Mapped[datetime]
    next_update: Mapped[datetime]
    revoked: Mapped[int] = mapped_column(Integer)
    """How many revoked credentials it was made from ..."""
    last_revoked_at: Mapped[datetime | None]
    """... and the latest of their revocation times: a revocation since changes one of them."""


class TsaBudget(Base):
    """Timestamps one client address asked ``/tsa`` for in the current window, counted in the
    database so that every node spends the same budget (``Policy.tsa_per_minute``)."""

    __tablename__ = "tsa_budgets"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The client's address (the TCP peer, :func:`server.api.deps.client_address`)."""
    window_start: Mapped[datetime] = mapped_column(index=True)
    used: Mapped[int] = mapped_column(Integer)
