"""The server's domain errors. Services raise these; ``server.api.errors`` alone turns them
into HTTP responses ``{"error": code, "error_description": message}``.

Each error has a stable ``code`` (part of the API contract) and an HTTP ``status``.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server reports to a client."""

    code: str = "server_error"
    status: int = 500
    commit: bool = False
    """Whether the request's writes so far are committed although it fails: True for errors
    that record an attempt (a try spent, a refusal audited), which must outlive the answer."""
    backend: str | None = None
    """``"hsm"`` or ``"database"`` when the error is that backend's failure (the metrics
    count these apart from the clients' mistakes)."""

    def __init__(self, description: str = "") -> None:
        super().__init__(description or self.code)
        self.description = description or self.code

    def recorded(self) -> ServerError:
        """This error, marked as recording an attempt (:attr:`commit`); ``raise e.recorded()``."""
        self.commit = True
        return self


class InvalidRequest(ServerError):
    """The request is malformed or names something inconsistent."""

    code = "invalid_request"
    status = 400


class UnsupportedMediaType(InvalidRequest):
    """The body is not of the media type the route takes."""

    code = "unsupported_media_type"
    status = 415


class TooLarge(InvalidRequest):
    """The body is larger than the route takes."""

    code = "request_too_large"
    status = 413


class Unauthorized(ServerError):
    """No valid credentials (token, password, OTP) were presented."""

    code = "unauthorized"
    status = 401


class InvalidDpopProof(Unauthorized):
    """A missing, malformed, misbound, stale or replayed DPoP proof (RFC 9449 §7.1)."""

    code = "invalid_dpop_proof"


class Forbidden(ServerError):
    """The caller is authenticated but may not do this."""

    code = "forbidden"
    status = 403


class NotFound(ServerError):
    """The named user, credential or object does not exist (for this caller)."""

    code = "not_found"
    status = 404


class Conflict(ServerError):
    """The request conflicts with the current state (e.g. the user already exists)."""

    code = "conflict"
    status = 409


class RateLimited(ServerError):
    """Too many failed attempts; try again later."""

    code = "rate_limited"
    status = 429
    commit = True


class DecryptionBudgetExhausted(RateLimited):
    """A key did all the decryptions its budget allows for this login in the window
    (``Policy.decrypt_budget``): what a padding-oracle attack needs, and no mail reader."""

    code = "decryption_budget_exhausted"


class HsmError(ServerError):
    """The HSM refused or failed an operation (PKCS#11 errors are translated to this)."""

    code = "hsm_error"
    status = 502
    backend = "hsm"


class Unavailable(ServerError):
    """Something the request needs (the database, the HSM) cannot be reached now; the same
    request may succeed after ``retry_after`` seconds (HTTP 503 with ``Retry-After``)."""

    code = "temporarily_unavailable"
    status = 503
    retry_after = 3


class HsmUnavailable(Unavailable):
    """The HSM cannot be reached or lost the session (a restarted network HSM, a removed
    device); the next operation logs in again."""

    backend = "hsm"


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (down, restarting, a dropped connection, no free pooled
    connection); the pool reconnects by itself."""

    backend = "database"


class PinIncorrect(ServerError):
    """A wrong PIN; ``retries`` tries are left (the card answers 63Cx)."""

    code = "invalid_pin"
    status = 400
    commit = True

    def __init__(self, retries: int, description: str = "") -> None:
        super().__init__(description or f"Incorrect PIN, {retries} tries left")
        self.retries = retries


class PinBlocked(ServerError):
    """The PIN (or, for an unblock, the PUK) has no tries left (the card answers 6983)."""

    code = "pin_blocked"
    status = 403
    commit = True


class PukIncorrect(PinIncorrect):
    """A wrong PUK; ``retries`` tries are left."""

    code = "invalid_puk"

    def __init__(self, retries: int) -> None:
        super().__init__(retries, f"Incorrect PUK, {retries} tries left")


class InvalidOtp(ServerError):
    """A wrong, reused or missing one-time password (CSC ``invalid_otp``)."""

    code = "invalid_otp"
    status = 400
    commit = True


class SadInvalid(InvalidRequest):
    """The SAD is unknown, expired, spent, not the caller's or does not cover the hashes
    (CSC ``invalid_request``, e.g. "Invalid parameter SAD", "SAD expired")."""


class PaddingRejected(InvalidRequest):
    """A raw RSA block is not an allowed encoding for this key (security rule 3)."""

    code = "invalid_padding"
    commit = True


class PinRequired(Forbidden):
    """The key needs a PIN verification in this session first (the card answers 6982)."""

    code = "pin_required"
    commit = True
