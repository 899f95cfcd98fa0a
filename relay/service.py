# SPDX-License-Identifier: Apache-2.0
"""The enrolled card while it runs: its server client, the user's session, the remote key
backend, and the answers to the control channel (``card login|status|logout|approve``, and the
CSC requests of ``cardbridge sign``)."""

from __future__ import annotations

import logging
import statistics
from typing import Any, Final

from relay.backend import RemoteKeyBackend
from relay.client import RelayError, ServerClient, Timeouts
from relay.config import Enrolled
from relay.session import Session

logger = logging.getLogger(__name__)

OUTCOME_MARGIN: Final = 5.0
"""Seconds ``approve`` waits for the signature's outcome beyond the server's answer timeout."""
CSC_METHODS: Final = frozenset(
    {"credentials/info", "credentials/authorize", "signatures/signHash"}
)
"""The CSC v2 methods ``cardbridge sign`` may have the card call in its session: what signing
needs, nothing that would hand out the session (no login, no token revocation)."""


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


class CardService:
    """Everything the running remote card holds besides the card itself.

    :param enrolled: the card's configuration and device key.
    :param timeouts: server connect and answer timeouts.
    :param approval_timeout: seconds a sole-control signature waits for approval.
    :param failback_after: seconds before a server that failed is tried first again.
    """

    def __init__(
        self,
        enrolled: Enrolled,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- a frozen dataclass
        approval_timeout: float = 60.0,
        failback_after: float = 30.0,
    ) -> None:
        self.enrolled = enrolled
        self.timeouts = timeouts
        config = enrolled.config
        self.client = ServerClient(
            config.servers,
            config.ca_pem,
            enrolled.device,
            timeouts=timeouts,
            retry_after=failback_after,
        )
        self.session = Session(self.client, config.user)
        self.backend = RemoteKeyBackend(enrolled, self.session, approval_timeout=approval_timeout)
        self._ops = {
            "status": self.status,
            "login": self.login,
            "logout": self.logout,
            "approve": self.approve,
            "stats": self.stats,
            "csc": self.csc,
        }

    @property
    def longest_operation(self) -> float:
        """The longest a key operation may take: approval, then the server's answer."""
        return self.backend.approvals.timeout + self.timeouts.connect + self.timeouts.read

    def close(self) -> None:
        """Log out (the session dies with the card process) and close the connections."""
        self.session.logout()
        self.client.close()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (see :mod:`relay.control`)."""
        op = self._ops.get(str(request.get("op")))
        if op is None:
            return {"ok": False, "error": f"unknown request {request.get('op')!r}"}
        try:
            return op(request)
        except RelayError as e:
            return {"ok": False, "error": str(e)}

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        pin = self.backend.pin_status()
        puk = self.backend.puk_status()
        config = self.enrolled.config
        return {
            "ok": True,
            "user": config.user,
            "device_id": config.device_id,
            "servers": config.servers,
            "server": self.client.last_server,
            "session": {"active": self.session.active, "expires_at": self.session.expires_at},
            "pin": {
                "retries": pin.remaining,
                "puk_retries": puk.remaining,
                "verified_on_server": self.backend.server_verified,
            },
            "last_error": self.session.last_error,
            "approval_timeout": self.backend.approvals.timeout,
            "pending": [a.as_dict() for a in self.backend.approvals.pending()],
            "slots": {
                c.slot: {
                    "alg": c.alg,
                    "pin_always": c.pin_always,
                    "otp_per_signature": c.otp_per_signature,
                }
                for c in config.credentials
            },
        }

    def login(self, request: dict[str, Any]) -> dict[str, Any]:
        password, otp = request.get("password"), request.get("otp")
        if not isinstance(password, str) or not isinstance(otp, str):
            return {"ok": False, "error": "login needs a password and a one-time password"}
        self.session.login(password, otp)
        return {"ok": True, "user": self.session.user, "expires_at": self.session.expires_at}

    def logout(self, request: dict[str, Any]) -> dict[str, Any]:
        self.session.logout()
        return {"ok": True}

    def approve(self, request: dict[str, Any]) -> dict[str, Any]:
        otp, wanted = request.get("otp"), request.get("id")
        if not isinstance(otp, str):
            return {"ok": False, "error": "approval needs a one-time password"}
        if wanted is not None and not isinstance(wanted, int):
            return {"ok": False, "error": "id is a number"}
        try:
            approval = self.backend.approvals.approve(otp, wanted)
        except LookupError as e:
            return {"ok": False, "error": str(e)}
        approval.done.wait(self.timeouts.connect + self.timeouts.read + OUTCOME_MARGIN)
        outcome = approval.outcome or "no outcome yet"
        if outcome != "signed":
            return {"ok": False, "error": f"signature #{approval.id}: {outcome}"}
        return {"ok": True, "outcome": outcome, "approval": approval.as_dict()}

    def csc(self, request: dict[str, Any]) -> dict[str, Any]:
        """One CSC v2 request of ``cardbridge sign`` in the card's session (its tokens and DPoP
        proofs never leave this process); its JSON answer as ``body``."""
        method, body = request.get("method"), request.get("body")
        if method not in CSC_METHODS:
            return {"ok": False, "error": f"the card does not make the CSC request {method!r}"}
        if not isinstance(body, dict):
            return {"ok": False, "error": "a CSC request's body is a JSON object"}
        answer = self.session.call("POST", f"/csc/v2/{method}", json=body)
        return {"ok": True, "body": answer.body}

    def stats(self, request: dict[str, Any]) -> dict[str, Any]:
        """The key operations' timings since the last ``clear`` (for ``scripts/bench-e2e``)."""
        timings = list(self.backend.timings)
        if request.get("clear"):
            self.backend.timings.clear()
        return {
            "ok": True,
            "operations": len(timings),
            "relay_ms": _summary([t.relay for t in timings]),
            "server_ms": _summary([t.server for t in timings if t.server is not None]),
            "hsm_ms": _summary([t.hsm for t in timings if t.hsm is not None]),
        }
