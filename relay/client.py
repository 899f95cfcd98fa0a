# SPDX-License-Identifier: Apache-2.0
"""The relay's HTTPS client of the signing server: the pinned CA, a DPoP proof of the device
key on every request (RFC 9449), one kept-alive connection per server, fail-over between
several server URLs and back.

Fail-over never repeats an operation the server may have carried out: a request moves on to the
next URL only when it was not sent (the connection failed) or the server answered 503 (it
refuses work it cannot finish: nothing was done). A URL that failed is skipped for
``retry_after`` seconds, then tried first again, so the relay comes back to its first server.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx

from relay.dpop import DeviceKey, DpopAuth

logger = logging.getLogger(__name__)

SERVER_TIMING: Final = "server-timing"


class RelayError(Exception):
    """Base of the relay's errors: each says in one line what went wrong."""


class ServerUnavailable(RelayError):
    """No server could be reached, or the one that took the request did not answer."""


class NotLoggedIn(RelayError):
    """There is no session (never opened, ended, or refused by the server)."""


class ServerRefused(RelayError):
    """The server answered with an error: its status, stable code and description.

    :param retries: tries left, with ``invalid_pin`` and ``invalid_puk``.
    """

    def __init__(self, status: int, code: str, description: str, retries: int | None = None):
        super().__init__(f"{description} ({code})")
        self.status = status
        self.code = code
        self.description = description
        self.retries = retries

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerRefused:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        retries = body.get("retries")
        return cls(
            response.status_code,
            str(body.get("error", f"http_{response.status_code}")),
            str(body.get("error_description", response.reason_phrase)),
            retries if isinstance(retries, int) else None,
        )


@dataclass(frozen=True)
class Timeouts:
    """Seconds to connect, and to wait for an answer (which includes the HSM's work)."""

    connect: float = 3.0
    read: float = 10.0


@dataclass(frozen=True)
class Answer:
    """A successful answer: its JSON body (None for 204), the server that gave it, and the
    server's own timing of the request (``Server-Timing``, milliseconds by metric)."""

    body: Any
    server: str
    timing: dict[str, float]


def _server_timing(header: str | None) -> dict[str, float]:
    """``app;dur=1.2, hsm;dur=0.1`` → ``{"app": 1.2, "hsm": 0.1}`` (W3C Server Timing)."""
    timing: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    timing[name] = float(value)
                except ValueError:
                    pass
    return timing


class ServerClient:
    """HTTPS to the deployment's servers, each trusted only through the pinned CA.

    :param servers: base URLs, the preferred first.
    :param ca_pem: the deployment's CA certificate, the only trust anchor.
    :param device: the device key that signs every request's DPoP proof.
    :param timeouts: connect and answer timeouts.
    :param retry_after: seconds a failed server is skipped before it is tried first again.
    """

    def __init__(
        self,
        servers: list[str],
        ca_pem: str,
        device: DeviceKey,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- a frozen dataclass
        retry_after: float = 30.0,
    ) -> None:
        if not servers:
            raise ValueError("at least one server URL is needed")
        self.servers = [s.rstrip("/") for s in servers]
        self.device = device
        self.retry_after = retry_after
        context = ssl.create_default_context(cadata=ca_pem)
        timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect)
        self._clients = {
            url: httpx.Client(base_url=url, verify=context, timeout=timeout)
            for url in self.servers
        }
        self._down_until: dict[str, float] = {}
        self._clock_offset = 0.0
        self._lock = threading.Lock()
        self.last_server: str | None = None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def now(self) -> float:
        """The server's time as this workstation estimates it (for DPoP ``iat``)."""
        return time.time() + self._clock_offset

    def _order(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            up = [u for u in self.servers if self._down_until.get(u, 0.0) <= now]
            down = sorted(
                (u for u in self.servers if u not in up), key=lambda u: self._down_until[u]
            )
        return up + down

    def _mark(self, url: str, *, down: bool) -> None:
        with self._lock:
            if down:
                self._down_until[url] = time.monotonic() + self.retry_after
            else:
                self._down_until.pop(url, None)
                self.last_server = url

    def _learn_clock(self, response: httpx.Response) -> None:
        date = response.headers.get("date")
        if date is None:
            return
        try:
            server_time = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        offset = server_time - time.time()
        # The header has one-second resolution: follow only a skew it can show.
        self._clock_offset = offset if abs(offset) > 2 else 0.0

    def _send(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> tuple[httpx.Response, str]:
        """Send one request with a fresh DPoP proof (and ``token`` as ``Authorization: DPoP``)
        to the first server that takes it; ``body`` is httpx's ``json`` or ``content``.

        :raises ServerRefused: the server answered with an error.
        :raises ServerUnavailable: no server took the request, or the one that did failed to
            answer (it may or may not have carried it out, so it is not sent elsewhere).
        """
        errors: list[str] = []
        last: Exception | None = None
        for url in self._order():
            auth = DpopAuth(self.device, token, clock=self.now)
            try:
                response = self._clients[url].request(
                    method, path, auth=auth, headers=headers, **body
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self._mark(url, down=True)
                errors.append(f"{url}: {e or type(e).__name__}")
                last = e
                continue
            except httpx.TransportError as e:
                self._mark(url, down=True)
                raise ServerUnavailable(f"{url} did not answer: {e or type(e).__name__}") from e
            self._learn_clock(response)
            if response.status_code == 503:  # the server did nothing; another may do it
                self._mark(url, down=True)
                errors.append(f"{url}: 503 {ServerRefused.from_response(response).description}")
                continue
            self._mark(url, down=False)
            if not response.is_success:
                raise ServerRefused.from_response(response)
            return response, url
        raise ServerUnavailable("no server answered: " + "; ".join(errors)) from last

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
    ) -> Answer:
        """Send one JSON request (see :meth:`_send`); ``basic`` is a user name and password
        sent as HTTP Basic authentication (RFC 7617), as CSC ``auth/login`` takes them.

        :raises ServerRefused, ServerUnavailable: as :meth:`_send`.
        """
        headers = None
        if basic is not None:
            pair = base64.b64encode(":".join(basic).encode()).decode("ascii")
            headers = {"Authorization": f"Basic {pair}"}
        response, url = self._send(method, path, token=token, headers=headers, json=json)
        body = response.json() if response.content else None
        return Answer(body, url, _server_timing(response.headers.get(SERVER_TIMING)))

    def fetch(
        self, method: str, path: str, *, content: bytes | None = None, media_type: str = ""
    ) -> bytes:
        """One request of a public endpoint whose answer is not JSON (a timestamp, a CRL).

        :param media_type: the ``Content-Type`` of ``content``.
        :raises ServerRefused, ServerUnavailable: as :meth:`_send`.
        """
        headers = {"Content-Type": media_type} if content is not None else None
        response, _ = self._send(method, path, headers=headers, content=content)
        return response.content
