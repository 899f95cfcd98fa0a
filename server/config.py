# SPDX-License-Identifier: Apache-2.0
"""Server settings: where the data directory's pieces are and the security policy.

``cardbridge server init --data DIR`` (or ``server join``) writes ``DIR/server.json``; every
other command reads it back with :meth:`Settings.load`. Paths in the file, and the file of a
``sqlite:///`` database URL, are relative to DIR when they lie inside it, so a copied or moved
data directory uses its own files; absolute paths (files elsewhere, or a file written before
paths were relative) are kept as they are.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SETTINGS_FILE = "server.json"
DB_FILE = "cardbridge.db"
DEFAULT_HSM_LABEL = "cardbridge"
DEFAULT_BIND = "127.0.0.1:8443"
_PATHS = (
    "hsm_pin_file",
    "tls_cert",
    "tls_key",
    "ca_cert",
    "admin_token_file",
    "metrics_token_file",
    "softhsm_conf",
    "audit_checkpoint_file",
)
"""The fields that name files; stored relative to the data directory when inside it."""
_SQLITE = "sqlite:///"


def local_url(host: str, port: int) -> str:
    """The URL a local client uses to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - the wildcard is mapped to loopback here
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class Policy(BaseModel):
    """Security policy (DESIGN.md rules 4-6); lifetimes in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_token_ttl: int = Field(default=15 * 60, gt=0)
    refresh_token_ttl: int = Field(default=8 * 3600, gt=0)
    sad_ttl: int = Field(default=5 * 60, gt=0)
    enrollment_code_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    pin_tries: int = Field(default=3, ge=1, le=15)
    puk_tries: int = Field(default=3, ge=1, le=15)
    otp_max_failures: int = Field(default=5, ge=1)
    """Wrong one-time passwords a user may give within ``otp_window`` (after a right password,
    or in a session); further codes are refused unchecked (rule 6)."""
    otp_window: int = Field(default=5 * 60, gt=0)
    login_address_failures: int = Field(default=20, ge=1)
    """Failed password logins one client address may have within ``login_window``, whatever
    the names; then its logins are answered 429 unchecked. The address is the TCP peer."""
    login_name_failures: int = Field(default=100, ge=1)
    """Failed password logins one user name (known or not) may have within ``login_window``,
    from all addresses together; then its logins are answered 429 unchecked. Far above
    ``login_address_failures``: no single client locks a user out."""
    login_window: int = Field(default=15 * 60, gt=0)
    pin_always: bool = True
    """Slot 9C needs the PIN before every signature (SP 800-73-4 PIN policy "always")."""
    csc_authorize_otp: bool = True
    """CSC ``credentials/authorize`` needs a fresh TOTP beside the PIN for every credential:
    CSC ``auth/login`` takes the password alone, so without it CSC signing would rest on two
    things the user knows. False: only credentials enrolled ``--otp-per-signature`` ask."""
    multisign: int = Field(default=16, ge=1)
    """Most signatures one SAD may authorize (CSC ``multisign``)."""
    decrypt_budget: int = Field(default=256, ge=1)
    """RSA decryptions one key may do for one login (across its refreshes) within
    ``decrypt_window``; past it the answer is 429 ``decryption_budget_exhausted``, audited."""
    decrypt_window: int = Field(default=3600, gt=0)
    tsa_per_minute: int = Field(default=600, ge=1)
    """Requests one client address may make to ``/tsa`` per minute, on all nodes together (the
    endpoint is public, and every timestamp costs an HSM signature and an audit record)."""

    def ttl(self, name: str) -> timedelta:
        """The lifetime called ``name`` (e.g. ``"sad_ttl"``) as a timedelta."""
        return timedelta(seconds=int(getattr(self, name)))


class Settings(BaseModel):
    """Everything a server process needs to start; see DESIGN.md "Storage and scale"."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path
    db_url: str
    hsm_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = DEFAULT_HSM_LABEL
    hsm_pin_file: Path
    bind: str = DEFAULT_BIND
    tls_cert: Path
    tls_key: Path
    ca_cert: Path
    ca_key_id: str | None = None
    """Hex CKA_ID of the CA key in the HSM (``KeyRef.key_id``); set by ``server init``."""
    ca_key_alg: str | None = None
    """``KeyAlg`` value of the CA key; set by ``server init``."""
    admin_token_file: Path
    metrics_token_file: Path
    """This node's bearer token for ``GET /metrics`` (which the admin token reads too)."""
    softhsm_conf: Path | None = None
    """Set when the token is the data directory's own SoftHSM2 token."""
    node_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    """This node's name in the audit records of key uses (default: the host name)."""
    threads: int = Field(default=8, ge=1, le=256)
    """Worker threads of a server process, where requests act (HSM, database, argon2) while
    its event loop serves other connections. Few, because the process has one HSM session
    behind a lock: more threads would only queue there and contend for the interpreter."""
    public_url: str | None = None
    """The URL clients use (e.g. the load balancer's); its host is in the TLS certificate."""
    audit_checkpoint_file: Path
    """Where each server process appends signed audit checkpoints (JSON lines); keep it, or a
    copy, out of reach of whoever can write the database (rule 7)."""
    audit_checkpoint_syslog: bool = False
    """Send each checkpoint to syslog (facility AUTH) too, e.g. to a remote log host."""
    audit_checkpoint_interval: int = Field(default=300, gt=0)
    """Seconds between checkpoints while the audit chain grows."""
    policy: Policy = Field(default_factory=Policy)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        """Fill the data directory's default paths for the fields left out."""
        if not isinstance(raw, dict) or "data_dir" not in raw:
            return raw
        d = Path(raw["data_dir"]).expanduser().resolve()
        defaults: dict[str, object] = {
            "data_dir": d,
            "db_url": f"{_SQLITE}{DB_FILE}",
            "hsm_pin_file": "hsm-pin",
            "tls_cert": "tls/server.pem",
            "tls_key": "tls/server.key",
            "ca_cert": "ca.pem",
            "admin_token_file": "admin-token",
            "metrics_token_file": "metrics-token",
            "audit_checkpoint_file": "audit-checkpoints.jsonl",
        }
        merged = {**defaults, **{k: v for k, v in raw.items() if v is not None}, "data_dir": d}
        for name in _PATHS:
            if merged.get(name) is not None:
                merged[name] = d / Path(merged[name])  # an absolute path stays as it is
        url = str(merged["db_url"])
        if url.startswith(_SQLITE) and not url[len(_SQLITE) :].startswith(("/", ":memory:")):
            merged["db_url"] = f"{_SQLITE}{d / url[len(_SQLITE) :]}"
        return merged

    @classmethod
    def for_data_dir(cls, data_dir: Path | str, **overrides: object) -> Settings:
        """Settings with the data directory's defaults, changed by ``overrides``."""
        return cls.model_validate({**overrides, "data_dir": data_dir})

    @classmethod
    def load(cls, data_dir: Path | str) -> Settings:
        """Read ``DIR/server.json``.

        :raises FileNotFoundError: when DIR was never initialised.
        """
        path = Path(data_dir) / SETTINGS_FILE
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["data_dir"] = str(Path(data_dir))
        return cls.model_validate(raw)

    def save(self) -> Path:
        """Write ``DIR/server.json`` (mode 0600: it names the HSM PIN file), with the paths
        inside DIR relative to it."""
        path = self.data_dir / SETTINGS_FILE
        data = self.model_dump(mode="json", exclude={"data_dir"})
        for name in _PATHS:
            if data[name] is not None:
                data[name] = self._relative(Path(data[name]))
        if self.db_url.startswith(_SQLITE + "/"):
            data["db_url"] = _SQLITE + self._relative(Path(self.db_url[len(_SQLITE) :]))
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @property
    def base_url(self) -> str:
        """Where clients reach the deployment: :attr:`public_url`, else this node's bind address.
        Certificates issued by the CA name its ``/crl`` and ``/ca.crt`` there (RFC 5280
        §4.2.1.13, §4.2.2.1)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host, _, port = self.bind.rpartition(":")
        return local_url(host.strip("[]"), int(port))

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.data_dir) if path.is_relative_to(self.data_dir) else path)

    def hsm_pin(self) -> str:
        """The HSM user PIN, read from :attr:`hsm_pin_file`."""
        return self.hsm_pin_file.read_text(encoding="utf-8").strip()
