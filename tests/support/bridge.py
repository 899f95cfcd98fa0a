"""The whole bridge for tests: a real `cardbridge server run` process and a user's card enrolled
with `cardbridge card enroll`, run by `cardbridge card run` in vpcd's reader, its session opened
with `cardbridge card login`. Every step is the real command line, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
from cryptography import x509
from live_server import CARDBRIDGE, Authenticator, LiveServer, enroll_user
from pcsc_stack import VPCD

PASSWORD = "bridge password 1"
SLOT_IDS = {"9a": "01", "9c": "02", "9d": "03", "9e": "04"}
"""OpenSC's PKCS#11 object ids of the PIV slots."""


@dataclass
class RemoteCard:
    """An enrolled user's card on this "workstation" (a config and a runtime directory).

    :param run_extra: more ``card run`` options (e.g. ``--approval-timeout``).
    """

    path: Path
    runtime: Path
    servers: list[str]
    enrollment: dict[str, Any]
    run_extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.otp = Authenticator(pyotp.parse_uri(self.enrollment["otp_uri"])).code

    @property
    def user(self) -> str:
        return str(self.enrollment["user"])

    @property
    def pin(self) -> str:
        return str(self.enrollment["pin"])

    @property
    def puk(self) -> str:
        return str(self.enrollment["puk"])

    def credential(self, slot: str) -> str:
        return next(c["credential_id"] for c in self.enrollment["credentials"]
                    if c["slot"] == slot)  # fmt: skip

    def certificate(self, slot: str) -> x509.Certificate:
        card = json.loads((self.path / "card.json").read_text())
        pem = next(c["certificate"] for c in card["credentials"] if c["slot"] == slot)
        return x509.load_pem_x509_certificate(pem.encode())

    def run_args(self) -> list[str]:
        return ["card", "run", "--config", str(self.path), "--vpcd", VPCD, *self.run_extra]

    def run_env(self) -> dict[str, str]:
        return {**os.environ, "CARDBRIDGE_RUNTIME_DIR": str(self.runtime),
                "CARDBRIDGE_CONFIG": str(self.path)}  # fmt: skip

    def cli(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``cardbridge ARGS`` as this workstation's user (its config and runtime dirs), with
        ``env`` added to the environment."""
        proc = subprocess.run(
            [CARDBRIDGE, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.run_env(), **(env or {})},
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cardbridge {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def login(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("card", "login", "--password-stdin", "--otp", self.otp(),
                        input=PASSWORD + "\n", check=check)  # fmt: skip

    def pin_file(self) -> Path:
        """A file that holds this user's PIN (for ``--pin-file``)."""
        pin = self.path.parent / "pin"
        pin.write_text(self.pin + "\n")
        return pin

    def sign_process(
        self, *args: str, otp: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``cardbridge sign ARGS`` with this user's PIN (``--pin-file``), a fresh TOTP (unless
        not ``otp``) and, for a login of its own, the password on stdin; whatever its exit."""
        secrets = ["--pin-file", str(self.pin_file()), "--password-stdin"]
        secrets += ["--otp", self.otp()] if otp else []
        return self.cli("sign", *args, *secrets, input=PASSWORD + "\n", check=False, env=env)

    def sign(self, *args: str, ok: bool = True) -> dict[str, Any]:
        """:meth:`sign_process` with ``--json``: its report; it exits 0 exactly when ``ok``."""
        proc = self.sign_process(*args, "--json")
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        report: dict[str, Any] = json.loads(proc.stdout)
        return report

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("card", "status", "--json").stdout)
        return result


def signed_outputs(report: dict[str, Any]) -> list[Path]:
    """The outputs of a ``cardbridge sign --json`` report in which every file was signed."""
    assert all(r["ok"] for r in report["results"]), report
    return [Path(r["output"]) for r in report["results"]]


def enroll_card(
    server: LiveServer,
    name: str,
    into: Path,
    *,
    alg: str,
    otp_per_signature: bool = False,
    servers: list[str] | None = None,
    run_extra: list[str] | None = None,
) -> RemoteCard:
    """Add ``name`` on ``server``, enroll it there, and enroll a card for it in ``into``."""
    enrollment = enroll_user(server, name, PASSWORD, alg=alg, otp_per_signature=otp_per_signature)
    urls = servers or [server.url]
    card = RemoteCard(into / "config", into / "run", urls, enrollment, run_extra or [])
    args = [a for url in urls for a in ("--server", url)]
    card.cli("card", "enroll", *args, "--code", enrollment["enrollment_code"])
    return card
