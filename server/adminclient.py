"""An HTTPS client of the server's Administration API (``/api/v1/admin/...``).

The ``cardbridge admin`` commands use it, locally (``--data DIR``: the URL, the admin token and
the CA come from the data directory) or remotely (``--server URL --token T``). TLS is verified
against the deployment's CA (``DIR/ca.pem``), never against the system store alone.

Every failure becomes an :class:`AdminApiError` carrying one readable line; the HTTP error
body is the server's ``{"error", "error_description"}``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

#: Written by ``cardbridge server run``: the URL the local server listens on.
SERVER_URL_FILE = "server.url"

_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class AdminApiError(Exception):
    """The Administration API could not be reached or refused a request.

    :param message: one line for the user.
    :param status: the HTTP status, or None when no response arrived.
    :param code: the server's stable error code, when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """An SSL context that trusts ``ca_file`` (the deployment's CA) or, without one, the
    system store."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise AdminApiError(f"cannot load the CA certificate {ca_file}: {e}") from e


class AdminClient:
    """A synchronous client of the Administration API.

    :param base_url: the server's root URL, e.g. ``https://127.0.0.1:8443``.
    :param token: the admin API token (sent as a Bearer token).
    :param ca_file: the CA that issued the server's TLS certificate.
    :param transport: an httpx transport (tests pass an ASGI or mock transport).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ca_file: Path | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            verify=tls_context(ca_file),
            timeout=_TIMEOUT,
            transport=transport,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- users ---------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        *,
        password: str | None = None,
        email: str | None = None,
        upn: str | None = None,
    ) -> dict[str, Any]:
        """Create a user; without ``password`` the server generates one and returns it."""
        body = {"name": name, "password": password, "email": email, "upn": upn}
        payload = {k: v for k, v in body.items() if v is not None}
        return self._json("POST", "/api/v1/admin/users", json=payload)

    def list_users(self) -> list[dict[str, Any]]:
        """Every user with its state."""
        result = self._request("GET", "/api/v1/admin/users").json()
        if not isinstance(result, list):
            raise AdminApiError("unexpected answer from GET /api/v1/admin/users")
        return result

    def disable_user(self, name: str) -> dict[str, Any]:
        """Disable a user: no login, no key use."""
        return self._json("POST", f"/api/v1/admin/users/{_seg(name)}/disable")

    def unlock_user(self, name: str) -> dict[str, Any]:
        """Lift the user's failed-login lock."""
        return self._json("POST", f"/api/v1/admin/users/{_seg(name)}/unlock")

    def enroll(self, name: str, *, alg: str, otp_per_signature: bool) -> dict[str, Any]:
        """Generate the user's keys and certificates, PIN, PUK, TOTP secret and enrollment
        code; the answer holds those secrets once."""
        return self._json(
            "POST",
            f"/api/v1/admin/users/{_seg(name)}/enroll",
            json={"alg": alg, "otp_per_signature": otp_per_signature},
        )

    def revoke(self, name: str) -> dict[str, Any]:
        """Revoke the user's credentials and devices."""
        return self._json("POST", f"/api/v1/admin/users/{_seg(name)}/revoke")

    def unblock(self, name: str) -> dict[str, Any]:
        """Reset the user's blocked PIN (administrator unblock)."""
        return self._json("POST", f"/api/v1/admin/users/{_seg(name)}/unblock")

    # -- certificates --------------------------------------------------------------------

    def cert_csr(self, name: str, slot: str) -> str:
        """A PEM CSR for the user's key in ``slot``, signed in the HSM."""
        path = f"/api/v1/admin/users/{_seg(name)}/certs/{_seg(slot)}/csr"
        csr = self._json("POST", path).get("csr")
        if not isinstance(csr, str):
            raise AdminApiError(f"unexpected answer from POST {path}")
        return csr

    def cert_import(self, name: str, slot: str, cert_pem: str) -> dict[str, Any]:
        """Install a certificate issued by an external CA for the user's key in ``slot``."""
        return self._json(
            "PUT",
            f"/api/v1/admin/users/{_seg(name)}/certs/{_seg(slot)}",
            json={"certificate": cert_pem},
        )

    # -- audit ---------------------------------------------------------------------------

    def audit_verify(self, checkpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Check the audit hash chain (against ``checkpoints`` exported earlier, if given); the
        answer names the first bad record, if any."""
        if checkpoints:
            return self._json(
                "POST", "/api/v1/admin/audit/verify", json={"checkpoints": checkpoints}
            )
        return self._json("GET", "/api/v1/admin/audit/verify")

    def audit_checkpoint(self) -> dict[str, Any]:
        """A signed checkpoint of the audit chain as it is now."""
        return self._json("GET", "/api/v1/admin/audit/checkpoint")

    def audit_export(self) -> Any:
        """Every audit record, oldest first."""
        return self._request("GET", "/api/v1/admin/audit/export").json()

    # -- plumbing ------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        result = self._request(method, path, **kwargs).json()
        if not isinstance(result, dict):
            raise AdminApiError(f"unexpected answer from {method} {path}")
        return result

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise AdminApiError(f"cannot reach the server at {self.base_url}: {e}") from e
        if resp.is_success:
            return resp
        raise _error_from(resp)


def _seg(value: str) -> str:
    """One URL path segment (names may contain anything)."""
    return quote(value, safe="")


def _error_from(resp: httpx.Response) -> AdminApiError:
    code: str | None = None
    description = resp.reason_phrase
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = str(body.get("error") or "") or None
        description = str(body.get("error_description") or code or description)
    message = f"{description} (HTTP {resp.status_code}" + (f", {code})" if code else ")")
    return AdminApiError(message, status=resp.status_code, code=code)

