# SPDX-License-Identifier: Apache-2.0
"""Signed audit checkpoints exported outside the database (DESIGN.md rule 7).

The MACs in the audit chain show a rewritten chain, not a cut one (tail deleted and head moved
back, or everything wiped): for that, a server process appends a checkpoint
(:class:`server.services.audit.Checkpoint`, one JSON line, HMAC'd in the HSM) to
``Settings.audit_checkpoint_file`` and, with ``audit_checkpoint_syslog``, to syslog
(facility AUTH): when it starts, every ``audit_checkpoint_interval`` seconds while the chain
grows, and when it stops. ``cardbridge admin audit verify --checkpoint FILE`` then checks the
chain against the latest one. Keep the file (or the syslog stream) where whoever can write the
database cannot: another host, an append-only mount.
"""

from __future__ import annotations

import asyncio
import logging
import os
import syslog
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from server.config import Settings
from server.db import unit_of_work
from server.services import audit

log = logging.getLogger(__name__)

SYSLOG_IDENT = "cardbridge-audit"


def export(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Sign a checkpoint of the chain as committed now and append it where ``settings`` say;
    returns its seq."""
    with unit_of_work(sessions()) as session:
        cp = audit.checkpoint(session)
    line = cp.to_json()
    fd = os.open(settings.audit_checkpoint_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if settings.audit_checkpoint_syslog:
        syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_AUTH)
        syslog.syslog(syslog.LOG_NOTICE, line)
    return cp.seq


def export_if_grown(sessions: sessionmaker[Session], settings: Settings, seq: int | None) -> int:
    """:func:`export` unless the chain still ends at ``seq`` (the last export's); the seq the
    chain ends at."""
    with unit_of_work(sessions()) as session:
        head = audit.head_seq(session)
    return head if head == seq else export(sessions, settings)


async def _run(job: Callable[..., int], *args: object) -> int | None:
    """``job`` in the thread pool (HSM, database and file I/O never run on the event loop);
    None, logged, when it failed: a server keeps serving while its checkpoint target is down."""
    try:
        return await run_in_threadpool(job, *args)
    except Exception as e:  # noqa: BLE001 -- one line: the database or the target is down
        log.warning("could not export an audit checkpoint: %s: %s", type(e).__name__, e)
        return None


@asynccontextmanager
async def exporting(sessions: sessionmaker[Session], settings: Settings) -> AsyncIterator[None]:
    """Export checkpoints while the block runs (a server process's lifetime): at its start,
    every ``audit_checkpoint_interval`` seconds while the chain grows, and at its end."""

    async def every_interval(seq: int | None) -> None:
        while True:
            await asyncio.sleep(settings.audit_checkpoint_interval)
            seq = await _run(export_if_grown, sessions, settings, seq)

    task = asyncio.create_task(every_interval(await _run(export, sessions, settings)))
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await _run(export, sessions, settings)
