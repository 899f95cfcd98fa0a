# SPDX-License-Identifier: Apache-2.0
"""A private PostgreSQL 15 cluster for tests: initdb + pg_ctl in a temporary directory,
listening only on a unix socket there, on a free port number.

We run as root in CI, and PostgreSQL refuses to run as root, so the server runs as the
``postgres`` OS user (``runuser -u postgres --``). Fails loudly when PostgreSQL is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One throw-away cluster; :meth:`create_database` hands out fresh databases."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if not (PG_BIN / tool).exists():
                raise RuntimeError(f"PostgreSQL 15 is not installed ({PG_BIN / tool} missing)")
        self.base = Path(tempfile.mkdtemp(prefix="cardbridge-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.base, PG_USER, PG_USER)
        self._counter = 0

    def _run(self, *args: str) -> None:
        cmd = [*(["runuser", "-u", PG_USER, "--"] if self._as_root else []), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}{tail}")

    def start(self) -> None:
        """initdb (trust auth, no fsync) and start the server; waits until it accepts."""
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
            "-E", "UTF8", "--no-sync",
        )
        self.start_server()

    def start_server(self) -> None:
        """Start the (initialised) server; waits until it accepts connections."""
        opts = f"-c listen_addresses='' -k {self.base} -p {self.port} -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
            "-w", "-o", opts, "start",
        )

    def stop_server(self) -> None:
        """Stop the server (fast mode: sessions are ended), keeping its files."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        """Stop the server and delete its files."""
        try:
            self.stop_server()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) for ``dbname`` over the cluster's unix socket."""
        return f"postgresql+psycopg://{PG_USER}@/{dbname}?host={self.base}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._counter += 1
        name = f"t{self._counter}"
        with psycopg.connect(
            host=str(self.base), port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
