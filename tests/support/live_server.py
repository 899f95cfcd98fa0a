"""The real server process for end-to-end tests: ``cardbridge server init`` and ``cardbridge
server run`` as subprocesses, HTTPS on a free loopback port, the CA pinned from ``DIR/ca.pem``.

Nothing here is faked: the tests that use it talk to uvicorn + the FastAPI app + SoftHSM2 +
SQLite exactly as an administrator's shell would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import pyotp
from cryptography import x509

CARDBRIDGE = str(Path(sys.executable).with_name("cardbridge"))
START_TIMEOUT = 60.0


def cardbridge(
    *args: str | Path,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cardbridge ARGS`` (with ``env`` added to the environment) and return its result;
    ``check`` fails the test, showing the command's stderr, when it exits non-zero."""
    proc = subprocess.run(
        [CARDBRIDGE, *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cardbridge {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ca_context(data: Path) -> ssl.SSLContext:
    """An SSL context that trusts only the server's CA, ``DIR/ca.pem``."""
    return ssl.create_default_context(cafile=str(data / "ca.pem"))


class HttpsEndpoint(Protocol):
    """Where clients send requests: one server, or a load balancer in front of several."""

    @property
    def url(self) -> str: ...

    @property
    def data(self) -> Path:
        """A data directory whose ``ca.pem`` (the deployment's CA) clients trust."""
        ...

    @property
    def http(self) -> httpx.Client: ...


@dataclass
class LiveServer:
    """A running ``cardbridge server run`` process."""

    data: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    _http: httpx.Client | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        """An HTTPS client of this server that trusts only its CA."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, verify=ca_context(self.data), timeout=60)
        return self._http

    def admin(self, *args: str, input: str | None = None, check: bool = True) -> (
        subprocess.CompletedProcess[str]
    ):
        """``cardbridge admin --data DIR ARGS``."""
        return cardbridge("admin", "--data", self.data, *args, input=input, check=check)

    def admin_json(self, *args: str, input: str | None = None) -> Any:
        """``cardbridge admin --data DIR ARGS --json``, parsed."""
        return json.loads(self.admin(*args, "--json", input=input).stdout)

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's records, oldest first (``admin audit export``)."""
        records: list[dict[str, Any]] = self.admin_json("audit", "export")
        return records

    @property
    def ca(self) -> x509.Certificate:
        """The deployment's CA certificate (``DIR/ca.pem``)."""
        return x509.load_pem_x509_certificate((self.data / "ca.pem").read_bytes())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit status (a clean shutdown is 0)."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as e:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout}s:\n{self.log()}") from e
        return self.proc.returncode


def init_data_dir(data: Path, *extra: str) -> str:
    """``cardbridge server init --data DIR``; returns its output."""
    return cardbridge("server", "init", "--data", data, *extra, timeout=300).stdout


def start_server(
    data: Path,
    *,
    workers: int = 1,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> LiveServer:
    """Start ``cardbridge server run`` (with ``env`` added to the environment) on a free port
    and wait until ``/healthz`` answers over HTTPS; fail loudly (with the server's log) if it
    does not come up."""
    port = port or free_port()
    log_path = data.parent / f"{data.name}-server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [CARDBRIDGE, "server", "run", "--data", str(data), "--bind", f"127.0.0.1:{port}",
             "--workers", str(workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = LiveServer(data=data, port=port, proc=proc, log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if server.http.get("/healthz").status_code == 200:
                return server
        except httpx.TransportError as e:
            last = e
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"server not healthy after {START_TIMEOUT}s ({last}):\n{server.log()}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll ``condition`` every 0.1 s until it holds; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


@contextmanager
def running_server(data: Path, **policy: object) -> Iterator[LiveServer]:
    """``server init`` in ``data``, the policy changed by ``policy``, and ``server run`` until
    the block ends; the server must then stop cleanly (exit status 0)."""
    init_data_dir(data)
    if policy:
        set_policy(data, **policy)
    server = start_server(data)
    try:
        yield server
    except BaseException:
        server.stop()
        raise
    assert server.stop() == 0, server.log()


def enroll_user(
    server: LiveServer, name: str, password: str, *, alg: str, otp_per_signature: bool = False
) -> dict[str, Any]:
    """Add ``name`` with ``password`` and enroll it; returns ``enroll --json``."""
    server.admin("user", "add", name, "--password-stdin", "--email", f"{name}@example.test",
                 input=password + "\n")
    args = ["enroll", name, "--alg", alg] + (["--otp-per-signature"] if otp_per_signature else [])
    result: dict[str, Any] = server.admin_json(*args)
    return result


class Authenticator:
    """A user's TOTP app, as the tests use it: each code is of a time step not used yet (the
    server accepts a step once per user): the current step, else the next one (one step of
    drift is accepted), else it waits for the next step. Never the previous step: the server
    checks the PIN (argon2id) before the OTP, and a step boundary passing meanwhile would put
    that code out of the window."""

    def __init__(self, totp: pyotp.TOTP) -> None:
        self.totp = totp
        self._last_step = -1

    def code(self) -> str:
        now = self.totp.timecode(datetime.now(UTC))
        if self._last_step > now:
            time.sleep(self.totp.interval - time.time() % self.totp.interval + 0.05)
            now = self.totp.timecode(datetime.now(UTC))
        self._last_step = max(now, self._last_step + 1)
        return self.totp.generate_otp(self._last_step)


def credential_for(enrollment: dict[str, Any], slot: str) -> str:
    """The credential id of ``slot`` in an ``enroll --json`` result."""
    for cred in enrollment["credentials"]:
        if cred["slot"].lower() == slot:
            return str(cred["credential_id"])
    raise AssertionError(f"no credential for slot {slot} in {enrollment['credentials']}")


def set_policy(data: Path, **values: object) -> None:
    """Change the security policy in ``data``'s ``server.json`` (before ``server run``)."""
    from server.config import Policy, Settings

    settings = Settings.load(data)
    settings.policy = Policy.model_validate(settings.policy.model_dump() | values)
    settings.save()
