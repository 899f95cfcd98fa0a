# SPDX-License-Identifier: Apache-2.0
"""The real components of a deployment of several server nodes, for tests (DESIGN.md, "Real
components, and how they start"):

- :class:`NetworkHsm`: a SoftHSM2 token exported by ``p11-kit server`` on a unix socket, which
  every node reaches through ``p11-kit-client.so``, as nodes reach a network HSM;
- :class:`LoadBalancer`: HAProxy with the project's example configuration
  (``etc/haproxy/cardbridge.cfg``) in front of two nodes, on a free loopback port.

Each runs in the test's own directory, is stopped by whoever started it, and fails loudly when
its binary is missing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import httpx
from live_server import ca_context, free_port

SOFTHSM_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT: Final = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
HAPROXY_CONFIG: Final = Path(__file__).resolve().parents[2] / "etc" / "haproxy" / "cardbridge.cfg"
START_TIMEOUT: Final = 20.0


def _require(*programs: str) -> None:
    for program in programs:
        if not (Path(program).exists() if program.startswith("/") else shutil.which(program)):
            raise RuntimeError(f"{program} is missing: run scripts/bootstrap")


def _wait_for(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not start in {START_TIMEOUT}s:\n{log.read_text()}")


class NetworkHsm:
    """A SoftHSM2 token (its own store in ``base``) exported by ``p11-kit server``."""

    def __init__(self, base: Path, label: str = "cluster") -> None:
        _require("p11-kit", "softhsm2-util", SOFTHSM_MODULE, P11KIT_CLIENT)
        self.base = base
        self.label = label
        self.socket = base / "p11-kit.sock"
        self.log = base / "p11-kit.log"
        self.pin_file = base / "hsm-pin"
        (base / "tokens").mkdir(mode=0o700, parents=True)
        conf = base / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
        self._env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        pin = secrets.token_hex(8)
        self.pin_file.write_text(pin + "\n")
        self.pin_file.chmod(0o600)
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--so-pin", secrets.token_hex(8), "--pin", pin],
            env=self._env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def client_env(self) -> dict[str, str]:
        """What a process loading :data:`P11KIT_CLIENT` needs to reach the token."""
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}

    def start(self) -> None:
        """Serve the token on :attr:`socket` until :meth:`stop`."""
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["p11-kit", "server", "-f", "--provider", SOFTHSM_MODULE, "-n", str(self.socket),
                 f"pkcs11:token={self.label}"],
                env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_for(self.socket.exists, "p11-kit server", self._proc, self.log)

    def stop(self) -> None:
        """Stop the server and the per-connection processes it started (as a restart would)."""
        if self._proc is None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        self._proc.wait(timeout=30)
        self._proc = None
        self.socket.unlink(missing_ok=True)


class LoadBalancer:
    """HAProxy with ``etc/haproxy/cardbridge.cfg`` in front of two nodes.

    :param data: a node's data directory, whose ``ca.pem`` (the deployment's CA) clients trust.
    """

    def __init__(self, base: Path, node_a: str, node_b: str, data: Path) -> None:
        _require("haproxy")
        self.port = free_port()
        self.log = base / "haproxy.log"
        self.data = data
        self._env = {
            **os.environ,
            "CARDBRIDGE_LB_BIND": f"127.0.0.1:{self.port}",
            "CARDBRIDGE_NODE_A": node_a,
            "CARDBRIDGE_NODE_B": node_b,
            "CARDBRIDGE_CA": str(data / "ca.pem"),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        """A client that trusts the deployment's CA and opens a connection per request, so
        that HAProxy balances every request over the nodes."""
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.url,
                verify=ca_context(self.data),
                timeout=30,
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._http

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(HAPROXY_CONFIG)],
                env=self._env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_for(self._accepts, "haproxy", self._proc, self.log)

    def _accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_size(self) -> int:
        """Where HAProxy's log ends now (for :meth:`wait_for_log`'s ``since``)."""
        return self.log.stat().st_size

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 15) -> str:
        """The first line of HAProxy's log after byte ``since`` that matches ``pattern``,
        waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[since:].decode(errors="replace")
            found = re.search(f".*{pattern}.*", text)
            if found:
                return found.group(0)
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in HAProxy's log:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            self._proc = None
