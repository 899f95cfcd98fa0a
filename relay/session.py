# SPDX-License-Identifier: Apache-2.0
"""The user's session inside the running card: login with password and TOTP, silent refresh,
logout; every call the card makes goes through it.

Tokens live only in this process's memory; they are bound to the device key (DPoP), so a copy
of them is useless elsewhere. The access token is refreshed before it expires, and once more
when the server says it is no longer valid; when the session cannot be refreshed it has ended,
and every call fails with :class:`~relay.client.NotLoggedIn` until the next login.
"""

from __future__ import annotations

import getpass
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from relay.client import Answer, NotLoggedIn, RelayError, ServerClient, ServerRefused

logger = logging.getLogger(__name__)

REFRESH_MARGIN: Final = 30.0
"""Seconds before the access token expires when it is refreshed ahead of a call."""


def read_password(from_stdin: bool, prompt: str) -> str:
    """The password of a login: stdin's first line (``--password-stdin``), or asked at the
    terminal without echo.

    :raises ValueError: stdin holds no password.
    """
    if not from_stdin:
        return getpass.getpass(prompt)
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("--password-stdin: stdin holds no password")
    return password


@dataclass
class _Tokens:
    access: str
    refresh: str
    access_expires: float
    """time.monotonic() deadline."""
    session_expires: float | None
    """Wall-clock end of the session (the refresh token's), when the server says it."""


class Session:
    """The session of ``user`` on the servers of ``client``.

    :param client: the server client (device key, pinned CA, fail-over).
    :param user: the enrolled user's name.
    """

    def __init__(self, client: ServerClient, user: str) -> None:
        self.client = client
        self.user = user
        self._tokens: _Tokens | None = None
        self._lock = threading.RLock()
        self.last_error: str | None = None

    @property
    def active(self) -> bool:
        return self._tokens is not None

    @property
    def expires_at(self) -> float | None:
        """When the session ends (epoch seconds), if known."""
        tokens = self._tokens
        return tokens.session_expires if tokens else None

    def _store(self, body: dict[str, Any]) -> None:
        session_left = body.get("refresh_expires_in")
        self._tokens = _Tokens(
            access=str(body["access_token"]),
            refresh=str(body["refresh_token"]),
            access_expires=time.monotonic() + float(body["expires_in"]),
            session_expires=time.time() + float(session_left) if session_left else None,
        )

    def login(self, password: str, otp: str) -> None:
        """Open the session: password, TOTP and the device's DPoP proof.

        :raises ServerRefused: wrong password or OTP, device not enrolled, rate limited.
        :raises ServerUnavailable: no server answered.
        """
        with self._lock:
            answer = self.client.call(
                "POST",
                "/api/v1/auth/login",
                json={"username": self.user, "password": password, "otp": otp},
            )
            self._store(answer.body)
            self.last_error = None
            logger.info("session opened for %s on %s", self.user, answer.server)

    def logout(self) -> None:
        """End the session here and on the server (best effort there)."""
        with self._lock:
            tokens, self._tokens = self._tokens, None
            if tokens is None:
                return
            try:
                self.client.call("POST", "/api/v1/auth/logout", token=tokens.access)
            except RelayError as e:  # forgetting the tokens here is what matters
                logger.info("logout: the server did not confirm (%s)", e)
            logger.info("session of %s closed", self.user)

    def end(self, why: str) -> None:
        """Forget the session after the server refused it (no server call)."""
        with self._lock:
            if self._tokens is not None:
                logger.warning("session of %s ended: %s", self.user, why)
            self._tokens = None
            self.last_error = why

    def _refresh(self, tokens: _Tokens) -> _Tokens:
        try:
            answer = self.client.call(
                "POST", "/api/v1/auth/refresh", json={"refresh_token": tokens.refresh}
            )
        except ServerRefused as e:
            self.end(f"the server refused to refresh it ({e.code})")
            raise NotLoggedIn("the session has ended: run `cardbridge card login`") from e
        self._store(answer.body)
        assert self._tokens is not None  # noqa: S101 -- just stored
        return self._tokens

    def _current(self) -> _Tokens:
        with self._lock:
            tokens = self._tokens
            if tokens is None:
                raise NotLoggedIn("no session: run `cardbridge card login`")
            if tokens.access_expires - time.monotonic() < REFRESH_MARGIN:
                tokens = self._refresh(tokens)
            return tokens

    def call(self, method: str, path: str, *, json: Any = None) -> Answer:
        """One request in the session; refreshes the access token when needed.

        :raises NotLoggedIn: no session, or it has ended.
        :raises ServerRefused, ServerUnavailable: as :meth:`ServerClient.call`.
        """
        tokens = self._current()
        try:
            return self.client.call(method, path, json=json, token=tokens.access)
        except ServerRefused as e:
            if e.status != 401:
                raise
        # The access token was refused (revoked by a refresh elsewhere, or expired early):
        # refresh once and try again; nothing was done with the refused request.
        with self._lock:
            if self._tokens is None:
                raise NotLoggedIn("the session has ended: run `cardbridge card login`")
            tokens = self._refresh(self._tokens)
        try:
            return self.client.call(method, path, json=json, token=tokens.access)
        except ServerRefused as e:
            if e.status == 401:
                self.end(f"the server refused the session ({e.code})")
                raise NotLoggedIn("the session has ended: run `cardbridge card login`") from e
            raise
