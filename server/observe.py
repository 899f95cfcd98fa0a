# SPDX-License-Identifier: Apache-2.0
"""What a request did that only the services know, noted for the metrics.

The metrics middleware (:mod:`server.api.metrics`) sees each request from outside: its route,
method, status and time. Two facts it cannot see come from the one place that decides them,
through an :class:`Observation` that the middleware puts in a context variable for the
request (the thread-pool hand-off copies the context, so the services' threads see it):

- :func:`key_use`: which key operation the request asked for, with which key algorithm and how
  many (``server.services.keyuse.require_op``, which every key use on every path passes);
- :func:`blocked`: a wrong PIN or PUK took the last try (``server.services.pins``).

No metrics library here: services note plain facts, and outside a request (the CLI, a test
calling a service) a note goes nowhere.
"""

from __future__ import annotations

from contextvars import ContextVar


class Observation:
    """The notes of one request."""

    __slots__ = ("algorithm", "blocked", "count", "operation")

    def __init__(self) -> None:
        self.operation: str | None = None
        """The key operation asked for (``KeyOp`` value), or None: the request used no key."""
        self.algorithm = ""
        self.count = 0
        """Operations asked for: the digests of a signHash batch, else 1."""
        self.blocked: list[str] = []
        """``"pin"`` or ``"puk"`` for each counter this request blocked."""


OBSERVATION: ContextVar[Observation | None] = ContextVar("observation", default=None)


def key_use(operation: str, algorithm: str, count: int) -> None:
    """Note that the request asks ``count`` operations of the key (type ``algorithm``)."""
    note = OBSERVATION.get()
    if note is not None:
        note.operation, note.algorithm, note.count = operation, algorithm, count


def blocked(secret: str) -> None:
    """Note that a wrong ``secret`` (``"pin"`` or ``"puk"``) used its last try."""
    note = OBSERVATION.get()
    if note is not None:
        note.blocked.append(secret)
