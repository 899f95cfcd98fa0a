# SPDX-License-Identifier: Apache-2.0
"""The running card's local control channel: a Unix socket only its user can reach.

``cardbridge card login|status|logout|approve`` talk to the ``card run`` process through
``control.sock`` in the runtime directory (a 0700 directory; the socket 0600; the peer's uid is
checked with ``SO_PEERCRED`` too). One JSON object per line each way: ``{"op": ..., ...}`` in,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

MAX_LINE: Final = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The card process cannot be reached, or it refused the request (its message)."""


class CardNotRunning(ControlError):
    """No card process listens on the socket (none was started, or it ended)."""


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_request_op: Handler


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        if _peer_uid(self.connection) != os.getuid():
            logger.warning("control: refused a connection from another user")
            return
        line = self.rfile.readline(MAX_LINE)
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("a request is a JSON object with an op")
            answer = self.server.handle_request_op(request)
        except ValueError as e:
            answer = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # noqa: BLE001 -- the card process must keep running
            logger.exception("control: %s failed", str(request.get("op")))
            answer = {"ok": False, "error": f"internal error: {type(e).__name__}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class ControlServer:
    """Serves ``handler`` on the socket at ``path`` in background threads.

    :param path: the socket's path; its directory is created 0700.
    :param handler: turns a request into an answer (runs in a connection's thread).
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if _answers(path):
                raise ControlError(f"a card already runs with the control socket {path}")
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(path), _Connection)
        finally:
            os.umask(old_umask)
        self._server.handle_request_op = handler
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="control", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def request(path: Path, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the running card and return its answer.

    :raises CardNotRunning: no card runs there.
    :raises ControlError: the card cannot be reached, or it answered ``ok: false``.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(MAX_LINE)
    except FileNotFoundError as e:
        raise CardNotRunning(
            f"no card is running (no {path}): start it with `cardbridge card run`"
        ) from e
    except ConnectionRefusedError as e:  # a socket left behind by a card that ended
        raise CardNotRunning(f"no card is running (nothing listens on {path})") from e
    except OSError as e:
        raise ControlError(f"cannot reach the running card at {path}: {e}") from e
    try:
        answer = json.loads(line)
    except ValueError as e:
        raise ControlError("the running card gave no answer") from e
    if not isinstance(answer, dict):
        raise ControlError("the running card gave a malformed answer")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "refused")))
    return answer
