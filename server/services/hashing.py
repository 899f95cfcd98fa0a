# SPDX-License-Identifier: Apache-2.0
"""One place for how secrets are stored (DESIGN.md rule 5).

Low-entropy secrets people choose or type (passwords, PINs, PUKs) get argon2id; high-entropy
random values the server hands out (tokens, SADs, enrollment codes) get SHA-256, which is enough
for 256-bit random strings and keeps every request fast.
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

PRODUCTION_HASHER = PasswordHasher()
"""argon2id with argon2-cffi's defaults (RFC 9106 low-memory profile: t=3, m=64 MiB, p=4)."""
_hasher = PRODUCTION_HASHER
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def hash_secret(value: str) -> str:
    """An argon2id hash of ``value``."""
    return _hasher.hash(value)


def verify_secret(stored: str | None, value: str) -> bool:
    """Whether ``value`` matches the argon2id hash ``stored``.

    With ``stored`` None a dummy hash is checked, so an unknown user costs as much time as a
    known one.
    """
    try:
        return _hasher.verify(stored or _DUMMY_HASH, value) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    """A fresh 256-bit random, URL-safe opaque value."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """SHA-256 (hex) under which an opaque token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()
