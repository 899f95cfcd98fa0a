"""What the benchmarks that run a real server share (``bench_e2e``, ``bench_sign``): the
``cardbridge`` command beside this interpreter, a ``cardbridge server run`` of their own in a
fresh data directory, a user enrolled on it with a card configuration, and a process's CPU
time. A failure ends the benchmark with one line."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import httpx

from server.config import Policy, Settings

CARDBRIDGE = str(Path(sys.executable).with_name("cardbridge"))
PASSWORD = "benchmark password 1"  # noqa: S105 -- the throwaway benchmark users'


def fail(message: str) -> NoReturn:
    """End the benchmark with ``scripts/bench-NAME: message``."""
    sys.exit(f"{Path(sys.argv[0]).stem.replace('_', '-')}: {message}")


def wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
    """``cardbridge ARGS``; its standard output."""
    proc = subprocess.run([CARDBRIDGE, *args], capture_output=True, text=True, input=input,
                          env=env, timeout=300, check=False)  # fmt: skip
    if proc.returncode:
        fail(f"cardbridge {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BenchServer:
    """``cardbridge server init`` in ``work/server``, the policy changed by ``policy``, then
    ``cardbridge server run`` with ``run_args`` until :meth:`close`.

    :param policy: values of :class:`server.config.Policy` to set before the server starts.
    """

    def __init__(self, work: Path, *run_args: str, policy: dict[str, object] | None = None) -> None:
        self.work = work
        self.data = work / "server"
        cli("server", "init", "--data", str(self.data))
        if policy:
            settings = Settings.load(self.data)
            settings.policy = Policy.model_validate(settings.policy.model_dump() | policy)
            settings.save()
        self.log = (work / "server.log").open("wb")
        self.process = subprocess.Popen(
            [CARDBRIDGE, "server", "run", "--data", str(self.data), *run_args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait(lambda: (self.data / "server.url").exists(), "the server")
        self.url = (self.data / "server.url").read_text().strip()
        self.ca_pem = self.data / "ca.pem"
        self.context = ssl.create_default_context(cafile=str(self.ca_pem))
        wait(self._healthy, "the server's /healthz")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", verify=self.context).status_code == 200
        except httpx.HTTPError:
            return False

    def enroll(self, name: str, alg: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Add user ``name`` (:data:`PASSWORD`), enroll it with ``alg`` keys and a card in
        ``work/name``; ``enroll --json``, and the environment of that card's commands."""
        cli("admin", "--data", str(self.data), "user", "add", name, "--password-stdin",
            input=PASSWORD + "\n")  # fmt: skip
        enrollment: dict[str, Any] = json.loads(
            cli("admin", "--data", str(self.data), "enroll", name, "--alg", alg, "--json"))
        env = {**os.environ, "CARDBRIDGE_CONFIG": str(self.work / name / "config"),
               "CARDBRIDGE_RUNTIME_DIR": str(self.work / name / "run")}  # fmt: skip
        cli("card", "enroll", "--server", self.url, "--code", enrollment["enrollment_code"],
            env=env)  # fmt: skip
        return enrollment, env

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.close()
